"""Evaluation: what the base model and the tuned model answer, side by side, and how well.

    python -m l2t.evaluate RUN_DIR [--data TEST] [--images DIR_OR_ZIP] [--compare RUN_DIR2 ...]
                                   [--n N] [--max-new-tokens K] [--batch-size B]
                                   [--attention [--attention-sample ID] [--attention-layers L]]

Everything else comes from the run folder: `config.yaml` (the model), `adapter/`
and `templates.json`. The test samples default to the run's `held_out.json`
(for the tiny preset: the bundled balanced test split) with images from the
run's `data.images`. The model is loaded once; the base model is the same
weights with the adapter (and the trained projector) switched off.

For each sample the question is its first user turn and the reference is the
first answer to it. Both models answer greedily (`l2t.generation`), and each
sample is scored by the metrics that apply to its kind, read off the reference
answer so that user data needs no labels (`l2t.scoring`: yes/no questions,
short answers, captions, text-only samples).

Each model also gets its visual contribution of two kinds (with the image
removed, the paper's; with a noise image) and the share of its attention on
the image while it answers (`l2t.answers`, `l2t.attention`).

The report goes to RUN_DIR/eval/: report.json (every number, the settings,
library versions and sample ids), and what `l2t.report` renders from it:
report.md (the table), report.html (one static page: the table, the charts and
a gallery with one row per sample, images embedded) and the charts as PNG
files; with `--attention`, attention.png (the image share of each answer token)
and attention_map.png (the first answer token's attention over the image's
patches), base beside tuned. With `--compare`, the other runs answer the same samples and join the
same table, chart and gallery.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from l2t import chat, report, runs
from l2t.answers import NOISE_SEED, EvaluationError, ModelAnswers, answer_items, base_and_tuned_answers, where_it_looks
from l2t.attention import DEFAULT_LAYERS
from l2t.data import DataError, Sample, load_samples, open_images
from l2t.errors import L2TError, print_error
from l2t.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from l2t.generation import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, base_model_context, load_run, prompt_and_reference
from l2t.images import ImageError
from l2t.masking import Encoder
from l2t.scoring import KINDS, QUESTION_ITEM_KINDS, SHORT_ANSWER_MAX_WORDS, EvalItem, sample_kind, score_answers
from l2t.sources import dataset_images, is_dataset

# ---------------------------------------------------------------- test samples


def load_test_samples(run: runs.TrainedRun, data: str | None, images: str | None) -> tuple[list[Sample], object, dict]:
    """The test samples (default: the run's held-out split), their image source and the load report."""
    if data:
        path = Path(data)
        image_root = images
    else:
        path = run.path / runs.HELD_OUT
        image_root = images or run.config.data.images or str(Path(run.config.data.path).parent)
        if is_dataset(run.config.data.path):  # held-out images embedded in the dataset are read from it by row
            image_root = dataset_images(run.config.data.path, image_root, run.config.data.max_image_pixels)
        if not path.is_file():
            raise EvaluationError(f"{run.path} has no {runs.HELD_OUT}; give test data with --data TEST")
    if not path.is_file():
        raise EvaluationError(f"test file {path} does not exist")
    try:
        samples, data_report = load_samples(path, image_root, max_pixels=run.config.data.max_image_pixels)
    except DataError as exc:
        hint = "" if data else "\nThe run held out no usable samples; give test data with --data TEST."
        raise EvaluationError(f"{exc}{hint}") from None
    source = open_images(image_root, path, run.config.data.max_image_pixels) if any(s.images for s in samples) else None
    return samples, source, data_report.to_dict()


def load_test_items(samples: list[Sample], images, limit: int | None = None) -> tuple[list[EvalItem], list[dict]]:
    """Test items with their images open; a sample whose image fails to load is skipped with a note."""
    items, skipped = [], []
    for sample in samples:
        if limit is not None and len(items) >= limit:
            break
        messages, reference = prompt_and_reference(sample)
        count = sum(m["content"].count(chat.IMAGE) for m in messages)
        try:
            pictures = [images.open(path) for path in sample.images[:count]]
        except ImageError as exc:
            skipped.append({"sample": sample.id, "reason": str(exc)})
            continue
        kind = sample_kind(reference, bool(pictures))
        objects = sample.meta.get("objects")
        turn_kinds = sample.meta.get("turn_kinds")
        question_type = str(turn_kinds[0]) if isinstance(turn_kinds, list) and turn_kinds and kind in QUESTION_ITEM_KINDS else kind
        items.append(EvalItem(sample.id, kind, messages, reference, pictures, objects if isinstance(objects, list) else [], question_type))
    return items, skipped


# ---------------------------------------------------------------- runs


def run_labels(folders: list[runs.TrainedRun]) -> list[str]:
    """Each run's label in the tables: its folder name, with its parent's where names repeat."""
    names = [f.path.resolve().name for f in folders]
    labels = [f"{f.path.resolve().parent.name}/{n}" if names.count(n) > 1 else n for f, n in zip(folders, names, strict=True)]
    return [
        f"{label} #{index + 1}" if labels.count(label) > 1 or label == "base" or label.startswith("base:") else label
        for index, label in enumerate(labels)
    ]


def base_model_key(run: runs.TrainedRun) -> tuple:
    """Runs with equal keys share a base model, whose answers are then computed once."""
    m = run.config.model
    return (m.hub_id, m.quant, m.dtype, tuple(sorted(m.processor_overrides.items())), m.image_max_pixels)


@dataclass
class Settings:
    data: str | None = None
    images: str | None = None
    n: int | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    batch_size: int = DEFAULT_BATCH_SIZE
    command: str | None = None
    """The command line, recorded in the report."""
    attention: bool = False
    """Also record, for one sample, where each model looks (attention.png, attention_map.png)."""
    attention_sample: str | None = None
    """That sample's id (default: the first short answer with an image)."""
    attention_layers: int = DEFAULT_LAYERS
    """How many of the last layers the attention is averaged over."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def evaluate_runs(run_dirs: list[str | Path], settings: Settings) -> tuple[dict, list[EvalItem]]:
    """Answer and score the test items with every run and its base model; returns the report."""
    folders = [runs.open_trained_run(d) for d in run_dirs]
    by_label = dict(zip(run_labels(folders), folders, strict=True))
    samples, source, data_report = load_test_samples(folders[0], settings.data, settings.images)
    items, skipped = load_test_items(samples, source, settings.n)
    skipped = [{"sample": p["sample"], "reason": f"[{p['code']}] {p['message']}"} for p in data_report["problems"]] + skipped
    for note in skipped:
        say(f"skipping sample {note['sample']}: {note['reason']}")
    if not items:
        raise EvaluationError(f"{settings.data or folders[0].path / runs.HELD_OUT}: no sample left to evaluate after the problems above")
    bases = list(dict.fromkeys(base_model_key(f) for f in folders))
    looked_at = attention_item(items, settings.attention_sample) if settings.attention else None
    results: list[ModelAnswers] = []
    looks: list[dict] = []
    done_bases: dict[tuple, ModelAnswers] = {}

    def look(name: str, model, encoder, answers: ModelAnswers) -> None:
        """With --attention: where this model looks at the chosen sample, for its own answer."""
        if looked_at is not None:
            looks.append(where_it_looks(name, model, encoder, looked_at, answers.answers[items.index(looked_at)], settings.attention_layers))

    for label, folder in by_label.items():
        model, encoder = load_run(folder)
        key = base_model_key(folder)
        say(f"evaluating {label}{'' if key in done_bases else ' and its base model'} on {len(items)} samples")
        if key not in done_bases:
            with base_model_context(model):
                name = "base" if len(bases) == 1 else f"base: {folder.config.model.hub_id} ({folder.config.model.quant})"
                done_bases[key] = answer_items(name, model, encoder, items, settings.max_new_tokens, settings.batch_size)
                look(name, model, encoder, done_bases[key])
            results.append(done_bases[key])
        results.append(answer_items(label, model, encoder, items, settings.max_new_tokens, settings.batch_size))
        look(label, model, encoder, results[-1])
        del model
    evaluation = build_report(by_label, items, skipped, results, settings, data_report)
    if looked_at is not None:
        evaluation["attention"] = {"sample": looked_at.id, "question": looked_at.question, "layers": settings.attention_layers, "models": looks}
    return evaluation, items


def attention_item(items: list[EvalItem], sample_id: str | None) -> EvalItem:
    """The item whose attention is drawn: the one named, else the first short answer (else any item) with an image."""
    if sample_id is not None:
        found = next((item for item in items if item.id == sample_id), None)
        if found is None or not found.images:
            raise EvaluationError(f"--attention-sample {sample_id}: no test sample with that id and an image")
        return found
    with_image = [item for item in items if item.images]
    if not with_image:
        raise EvaluationError("--attention needs a test sample with an image")
    return next((item for item in with_image if item.kind == "short_answer"), with_image[0])


def evaluate_loaded(run_dir: Path, model, encoder: Encoder, samples: list[Sample], images, settings: Settings | None = None):
    """The evaluation of a run whose model is in memory (the end of training): base vs tuned on
    `samples`, written to RUN_DIR/eval/ as `python -m l2t.evaluate RUN_DIR` would; returns (report, items)."""
    settings = settings or Settings()
    run = runs.open_trained_run(run_dir)
    label = run_labels([run])[0]
    items, skipped = load_test_items(samples, images, settings.n)
    if not items:
        raise EvaluationError(f"{run_dir / runs.HELD_OUT}: no sample left to evaluate")
    results = list(base_and_tuned_answers(model, encoder, items, label, settings.max_new_tokens, settings.batch_size))
    data_report = {"file": str(run_dir / runs.HELD_OUT), "total": len(samples), "ok": len(samples), "counts": {}}
    evaluation = build_report({label: run}, items, skipped, results, settings, data_report)
    write_report(run_dir / runs.EVAL, evaluation, items)
    return evaluation, items


# ---------------------------------------------------------------- the report


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "numpy", "pillow", "pycocoevalcap", "matplotlib"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def model_entries(by_label: dict[str, runs.TrainedRun], results: list[ModelAnswers], summaries: list[dict]) -> list[dict]:
    """Each model's name, run, loss mode, seed, time and metrics (base models have no run)."""
    entries = []
    for result, summary in zip(results, summaries, strict=True):
        folder = by_label.get(result.name)
        entries.append({
            "name": result.name,
            "run_dir": str(folder.path.resolve()) if folder else None,
            "loss_mode": folder.config.loss.mode if folder else None,
            "seed": folder.config.train.seed if folder else None,
            "seconds": round(result.seconds, 3),
            "metrics": summary,
        })  # fmt: skip
    return entries


def sample_entries(items: list[EvalItem], results: list[ModelAnswers], per_sample: list[list[dict]]) -> list[dict]:
    """Each sample's question, reference, and every model's answer and scores."""
    return [
        {
            "id": item.id,
            "kind": item.kind,
            "question": item.question,
            "reference": item.reference,
            "answers": {r.name: r.answers[index] for r in results},
            "scores": {r.name: scores[index] for r, scores in zip(results, per_sample, strict=True)},
        }
        for index, item in enumerate(items)
    ]


def build_report(
    by_label: dict[str, runs.TrainedRun], items: list[EvalItem], skipped: list[dict], results: list[ModelAnswers], settings: Settings, data_report: dict
) -> dict:
    summaries, per_sample = zip(*(score_answers(items, result) for result in results), strict=True)
    folders = list(by_label.values())
    first = folders[0].config
    return {
        "command": settings.command,
        "runs": [str(f.path.resolve()) for f in folders],
        "settings": {
            "data": str(Path(settings.data).resolve()) if settings.data else str((folders[0].path / runs.HELD_OUT).resolve()),
            "images": settings.images or (first.data.images if not settings.data else None),
            "n": settings.n,
            "max_new_tokens": settings.max_new_tokens,
            "batch_size": settings.batch_size,
            "decoding": "greedy",
            "noise_seed": NOISE_SEED,
            "model": first.model.hub_id,
            "quant": first.model.quant,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "short_answer_max_words": SHORT_ANSWER_MAX_WORDS,
        },
        "versions": library_versions(),
        "sample_ids": [item.id for item in items],
        "kinds": {kind: sum(item.kind == kind for item in items) for kind in KINDS},
        "skipped": skipped,
        "data_report": {k: data_report[k] for k in ("file", "total", "ok", "counts")},
        "models": model_entries(by_label, results, list(summaries)),
        "samples": sample_entries(items, results, list(per_sample)),
        "visual_contribution_per_token": {r.name: [v for values in r.visual_contribution if values for v in values] for r in results},
        "visual_contribution_noise_per_token": {
            r.name: [v for values in r.visual_contribution_noise if values for v in values] for r in results
        },
    }


def write_report(eval_dir: Path, evaluation: dict, items: list[EvalItem]) -> None:
    """report.json and what `l2t.report` renders from it (report.md, report.html, the charts), each written atomically."""
    charts = dict(zip(runs.EVAL_CHARTS, (report.metrics_chart(evaluation), report.visual_contribution_chart(evaluation)), strict=True))
    if "attention" in evaluation:
        picture = next(item.images[0] for item in items if item.id == evaluation["attention"]["sample"])
        charts.update({runs.ATTENTION_CHART: report.attention_chart(evaluation), runs.ATTENTION_MAP: report.attention_map(evaluation, picture)})
    for name, data in charts.items():
        atomic_write_bytes(eval_dir / name, data)
    atomic_write_json(eval_dir / runs.EVAL_REPORT, evaluation)
    atomic_write_text(eval_dir / runs.EVAL_MARKDOWN, report.markdown_report(evaluation))
    atomic_write_text(eval_dir / runs.EVAL_PAGE, report.html_report(evaluation, items, charts))


# ---------------------------------------------------------------- command line


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m l2t.evaluate", description="Compare a run's tuned model with its base model on test samples."
    )
    parser.add_argument("run_dir", help="run folder written by python -m l2t.train")
    parser.add_argument("--data", default=None, help="test data, LLaVA or messages JSON/JSONL (default: RUN_DIR/held_out.json)")
    parser.add_argument("--images", default=None, help="image folder or .zip for --data (default: the data file's folder)")
    parser.add_argument(
        "--compare", nargs="+", default=[], metavar="RUN_DIR2", help="more runs to evaluate on the same samples, in the same table"
    )
    parser.add_argument("--n", type=_positive_int, default=None, help="evaluate only the first N samples")
    parser.add_argument(
        "--max-new-tokens", type=_positive_int, default=DEFAULT_MAX_NEW_TOKENS, help=f"longest answer (default {DEFAULT_MAX_NEW_TOKENS})"
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE, help=f"samples per forward pass (default {DEFAULT_BATCH_SIZE})"
    )
    parser.add_argument("--attention", action="store_true", help="also draw where each model looks at one sample's image")
    parser.add_argument("--attention-sample", default=None, metavar="ID", help="that sample (default: the first short answer with an image)")
    parser.add_argument(
        "--attention-layers", type=_positive_int, default=DEFAULT_LAYERS, help=f"last layers to average (default {DEFAULT_LAYERS})"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m l2t.evaluate " + shlex.join(sys.argv[1:] if argv is None else argv)
    settings = Settings(
        args.data, args.images, args.n, args.max_new_tokens, args.batch_size, command, args.attention, args.attention_sample, args.attention_layers
    )
    eval_dir = Path(args.run_dir) / runs.EVAL
    try:
        evaluation, items = evaluate_runs([args.run_dir, *args.compare], settings)
        write_report(eval_dir, evaluation, items)
    except L2TError as exc:
        return print_error(exc)
    except OSError as exc:
        return print_error(f"{exc.filename or args.run_dir}: {exc.strerror}")
    print(report.markdown_table(evaluation))
    print(f"\nreport: {eval_dir / runs.EVAL_PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
