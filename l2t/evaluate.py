"""Evaluation: what the base model and the tuned model answer, side by side, and how well.

    python -m l2t.evaluate RUN_DIR [--data TEST] [--images DIR_OR_ZIP] [--compare RUN_DIR2 ...]
                                   [--n N] [--max-new-tokens K] [--batch-size B]

Everything else comes from the run folder: `config.yaml` (the model), `adapter/`
and `templates.json`. The test samples default to the run's `held_out.json`
(for the tiny preset: the bundled balanced test split) with images from the
run's `data.images`. The model is loaded once; the base model is the same
weights with the adapter (and the trained projector) switched off.

For each sample the question is its first user turn and the reference is the
first answer to it. Both models answer greedily (batched, left-padded), and
each sample is scored by the metrics that apply to its kind, read off the
reference answer so that user data needs no labels (`sample_kind`):

    yes_no        the reference's first word is yes or no -> POPE accuracy, F1, yes-ratio
    short_answer  a reference of at most 3 words          -> VQA exact match
    caption       a longer reference                      -> CIDEr-D, BLEU-4, and CHAIR
                                                             where the sample lists its `objects`
    text_only     no image in the first question          -> answered and shown, not scored

Visual contribution (VC) is scored on every sample with an image, from a
teacher-forced pass over the reference answer: for each answer token,
log p(token | image, question) - log p(token | noise image, question), where
the noise image has the size of the real one and uniform random pixels drawn
with a fixed seed. The tokens are those `loss.mode=response` trains on (the
answer and its end marker).

The report goes to RUN_DIR/eval/: report.json (every number, the settings,
library versions and sample ids), report.md (the table), report.html (one
static page: the table, the charts and a gallery with one row per sample,
images embedded) and the charts as PNG files. With `--compare`, the other runs
answer the same samples and join the same table, chart and gallery.

`caption_pair` is the one function that produces a before/after pair; the
training command's end-of-run preview and the UI's Compare tab call it (and
`generate`, its batched form).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import html
import io
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from l2t import chat, runs
from l2t.batch import process_images
from l2t.data import Sample
from l2t.masking import IGNORE, Encoder, labels_and_weights

DEFAULT_MAX_NEW_TOKENS = 48
DEFAULT_BATCH_SIZE = 16
NOISE_SEED = 0
SHORT_ANSWER_MAX_WORDS = 3
THUMBNAIL_PIXELS = 128
KINDS = ("caption", "short_answer", "yes_no", "text_only")


def prompt_and_reference(sample: Sample) -> tuple[list[dict], str]:
    """The conversation up to the first user turn, and the answer the data gives to it."""
    messages = []
    for m in sample.messages:
        messages.append(m)
        if m["role"] == "user":
            break
    answer = next((m["content"] for m in sample.messages[len(messages) :] if m["role"] == "assistant"), "")
    return messages, answer


def _batch_inputs(encoder: Encoder, prompts: list[tuple[list[dict], list]], device) -> dict:
    """Left-padded ids for generation, with the images' tensors."""
    encoded = [encoder.encode(messages, [img.size for img in images], add_generation_prompt=True) for messages, images in prompts]
    longest = max(len(e) for e in encoded)
    pad_id = encoder.tokenizer.pad_token_id if encoder.tokenizer.pad_token_id is not None else encoder.tokenizer.eos_token_id
    ids = torch.full((len(encoded), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), longest), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, longest - len(e) :] = torch.from_numpy(e.input_ids)
        mask[i, longest - len(e) :] = 1
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    batch.update(_image_tensors(encoder, [images for _, images in prompts], device))
    return batch


def _image_tensors(encoder: Encoder, images_per_sample: list[list], device) -> dict:
    """The processor's tensors for every sample's images, joined in sample order."""
    tensors: dict[str, list] = {}
    for images in images_per_sample:
        for key, value in process_images(encoder.processor, images).items():
            tensors.setdefault(key, []).append(value)
    return {key: torch.cat(values).to(device) for key, values in tensors.items()}


@torch.no_grad()
def generate(
    model,
    encoder: Encoder,
    prompts: list[tuple[list[dict], list]],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[str]:
    """Greedy answers for (messages, PIL images) prompts, batched and left-padded."""
    model.eval()
    device = next(model.parameters()).device
    vision_dtype = _vision_dtype(model)
    answers = []
    tokenizer = encoder.tokenizer
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        batch = _batch_inputs(encoder, chunk, device)
        if "pixel_values" in batch and vision_dtype is not None:
            batch["pixel_values"] = batch["pixel_values"].to(vision_dtype)
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        answers += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


def _vision_dtype(model):
    for name, param in model.named_parameters():
        if "vision" in name or "visual" in name:
            if param.dtype.is_floating_point:
                return param.dtype
    return None


def base_model_context(model):
    """Run the peft-wrapped model as the base model (adapter and trained projector off)."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if disable is not None else contextlib.nullcontext()


def generate_pairs(
    model, encoder: Encoder, prompts, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = DEFAULT_BATCH_SIZE
) -> tuple[list[str], list[str]]:
    """(base answers, tuned answers) for the same prompts and decoding."""
    with base_model_context(model):
        before = generate(model, encoder, prompts, max_new_tokens, batch_size)
    after = generate(model, encoder, prompts, max_new_tokens, batch_size)
    return before, after


def caption_pair(model, encoder: Encoder, image, prompt: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> tuple[str, str]:
    """Base and tuned answer to one prompt about one image."""
    messages = [{"role": "user", "content": (chat.IMAGE if image is not None else "") + prompt}]
    before, after = generate_pairs(model, encoder, [(messages, [image] if image is not None else [])], max_new_tokens)
    return before[0], after[0]


# ---------------------------------------------------------------- test samples


class EvaluationError(Exception):
    """A run folder or test file that can't be evaluated; the message names it."""


@dataclass
class EvalItem:
    """One test sample, ready for both models: its first question, reference and images."""

    id: str
    kind: str
    messages: list[dict]
    reference: str
    images: list[Image.Image]
    objects: list = field(default_factory=list)

    @property
    def question(self) -> str:
        return self.messages[-1]["content"].replace(chat.IMAGE, "").strip()


def sample_kind(reference: str, has_image: bool) -> str:
    """Which metrics a sample gets, read off its reference answer (see the module docstring)."""
    from l2t.metrics import parse_yes_no

    if not has_image:
        return "text_only"
    if parse_yes_no(reference) is not None:
        return "yes_no"
    if len(reference.split()) <= SHORT_ANSWER_MAX_WORDS:
        return "short_answer"
    return "caption"


def load_test_items(samples: list[Sample], images, limit: int | None = None) -> tuple[list[EvalItem], list[dict]]:
    """Test items with their images open; a sample whose image fails to load is skipped with a note."""
    from l2t.images import ImageError

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
        items.append(EvalItem(sample.id, kind, messages, reference, pictures, objects if isinstance(objects, list) else []))
    return items, skipped


# ---------------------------------------------------------------- visual contribution


def noise_image(size: tuple[int, int]) -> Image.Image:
    """Uniform random RGB pixels of this (width, height), the same for every call."""
    width, height = size
    pixels = np.random.default_rng(NOISE_SEED).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _scoring_batch(encoder: Encoder, items: list[EvalItem], images_per_item: list[list], device) -> tuple[dict, torch.Tensor]:
    """Right-padded prompt + reference ids, the images' tensors, and labels on the answer tokens."""
    encoded = []
    for item, pictures in zip(items, images_per_item, strict=True):
        conversation = item.messages + [{"role": "assistant", "content": item.reference}]
        encoded.append(encoder.encode(conversation, [p.size for p in pictures]))
    longest = max(len(e) for e in encoded)
    pad_id = encoder.tokenizer.pad_token_id if encoder.tokenizer.pad_token_id is not None else encoder.tokenizer.eos_token_id
    ids = torch.full((len(encoded), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(encoded), longest), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.from_numpy(e.input_ids)
        labels[i, : len(e)] = torch.from_numpy(labels_and_weights(e, "response")[0])
        mask[i, : len(e)] = 1
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    batch.update(_image_tensors(encoder, images_per_item, device))
    return batch, labels.to(device)


@torch.no_grad()
def answer_log_probs(
    model, encoder: Encoder, items: list[EvalItem], images_per_item: list[list], batch_size: int = DEFAULT_BATCH_SIZE
) -> list[np.ndarray]:
    """log p(token | images, question, earlier answer tokens) for each reference answer token."""
    model.eval()
    device = next(model.parameters()).device
    vision_dtype = _vision_dtype(model)
    results = []
    for start in range(0, len(items), batch_size):
        batch, labels = _scoring_batch(encoder, items[start : start + batch_size], images_per_item[start : start + batch_size], device)
        if "pixel_values" in batch and vision_dtype is not None:
            batch["pixel_values"] = batch["pixel_values"].to(vision_dtype)
        logits = model(**batch).logits[:, :-1]
        targets = labels[:, 1:]
        scored = targets != IGNORE
        # Only the answer positions go through log_softmax: the vocabulary is wide, the answers short.
        log_probs = logits[scored].float().log_softmax(-1).gather(1, targets[scored].unsqueeze(1)).squeeze(1)
        results += [chunk.cpu().numpy() for chunk in log_probs.split(scored.sum(1).tolist())]
    return results


def visual_contribution(model, encoder: Encoder, items: list[EvalItem], batch_size: int = DEFAULT_BATCH_SIZE) -> list[list[float]]:
    """Per answer token: log p(token | image, question) - log p(token | noise image, question)."""
    with_image = answer_log_probs(model, encoder, items, [item.images for item in items], batch_size)
    noise = [[noise_image(p.size) for p in item.images] for item in items]
    with_noise = answer_log_probs(model, encoder, items, noise, batch_size)
    return [(a - b).tolist() for a, b in zip(with_image, with_noise, strict=True)]


# ---------------------------------------------------------------- answering


@dataclass
class ModelAnswers:
    """What one model did on the test items: its answers and per-token visual contribution."""

    name: str
    answers: list[str]
    visual_contribution: list[list[float] | None]
    seconds: float


def _by_length(lengths: list[int]) -> list[int]:
    """Indices in order of length: batches of similar length waste less on padding."""
    return sorted(range(len(lengths)), key=lengths.__getitem__)


def _in_original_order(order: list[int], values: list) -> list:
    restored = [None] * len(order)
    for position, index in enumerate(order):
        restored[index] = values[position]
    return restored


def answer_items(name: str, model, encoder: Encoder, items: list[EvalItem], max_new_tokens: int, batch_size: int) -> ModelAnswers:
    """Greedy answers to every item and the visual contribution on items with an image."""
    started = time.perf_counter()
    # Short answers finish in a few steps; batching them with captions would run them to caption length.
    expected_length = {"yes_no": 0, "short_answer": 1, "caption": 2, "text_only": 2}
    order = sorted(range(len(items)), key=lambda i: (expected_length[items[i].kind], len(items[i].question)))
    prompts = [(items[i].messages, items[i].images) for i in order]
    answers = _in_original_order(order, generate(model, encoder, prompts, max_new_tokens, batch_size))
    visual = [i for i, item in enumerate(items) if item.images]
    vc = [None] * len(items)
    if visual:
        order = [visual[i] for i in _by_length([len(items[i].reference) + len(items[i].question) for i in visual])]
        for index, values in zip(order, visual_contribution(model, encoder, [items[i] for i in order], batch_size), strict=True):
            vc[index] = values
    return ModelAnswers(name, answers, vc, time.perf_counter() - started)


def base_and_tuned_answers(
    model, encoder: Encoder, items: list[EvalItem], tuned_name: str, max_new_tokens: int, batch_size: int
) -> tuple[ModelAnswers, ModelAnswers]:
    with base_model_context(model):
        base = answer_items("base", model, encoder, items, max_new_tokens, batch_size)
    return base, answer_items(tuned_name, model, encoder, items, max_new_tokens, batch_size)


# ---------------------------------------------------------------- scores


def ground_truth_objects(objects: list) -> set:
    """`objects` of a sample as the set a caption parser returns: (color, shape) pairs for
    the synthetic shapes, else lower-cased object names."""
    if objects and all(isinstance(o, dict) and "color" in o and "shape" in o for o in objects):
        return {(o["color"], o["shape"]) for o in objects}
    return {str(o).lower() for o in objects if isinstance(o, str)}


def object_parser(items: list[EvalItem]):
    """The parser that reads object mentions off a caption, for these items' ground truth.

    Synthetic shapes use `l2t.synthetic.objects_in`; named objects ("dog") use a
    whole-word match (plural -s allowed) over every name the test items list.
    """
    import re

    from l2t.synthetic import objects_in

    truths = [ground_truth_objects(item.objects) for item in items]
    if any(isinstance(o, tuple) for truth in truths for o in truth):
        return objects_in
    names = sorted({name for truth in truths for name in truth}, key=len, reverse=True)
    if not names:
        return lambda caption: set()
    pattern = re.compile(r"\b(" + "|".join(re.escape(n) for n in names) + r")s?\b", re.IGNORECASE)
    return lambda caption: {match.lower() for match in pattern.findall(caption)}


def score_answers(items: list[EvalItem], result: ModelAnswers) -> tuple[dict, list[dict]]:
    """Metrics of one model over the items they apply to, and each item's own scores."""
    from l2t.metrics import caption_scores, hallucination_rate, pope_scores, visual_contribution_summary, vqa_accuracy

    summary: dict = {}
    per_sample: list[dict] = [{} for _ in items]

    def subset(kind: str) -> list[int]:
        return [i for i, item in enumerate(items) if item.kind == kind]

    captions = subset("caption")
    if captions:
        scores = caption_scores([result.answers[i] for i in captions], [[items[i].reference] for i in captions])
        summary["caption"] = {"samples": len(captions), "cider_d": scores["cider_d"], "bleu4": scores["bleu4"]}
        for i, cider, bleu in zip(captions, scores["cider_d_per_sample"], scores["bleu4_per_sample"], strict=True):
            per_sample[i].update(cider_d=cider, bleu4=bleu)
    with_objects = [i for i in captions if ground_truth_objects(items[i].objects)]
    if with_objects:
        chair = hallucination_rate(
            [result.answers[i] for i in with_objects], [ground_truth_objects(items[i].objects) for i in with_objects], object_parser(items)
        )
        summary["hallucination"] = {"samples": len(with_objects), "chair_s": chair["chair_s"], "chair_i": chair["chair_i"]}
        for i, hallucinated in zip(with_objects, chair["hallucinated_per_sample"], strict=True):
            per_sample[i]["hallucinated"] = hallucinated
    short = subset("short_answer")
    if short:
        vqa = vqa_accuracy([result.answers[i] for i in short], [items[i].reference for i in short])
        summary["short_answer"] = {"samples": len(short), "accuracy": vqa["accuracy"]}
        for i, correct in zip(short, vqa["correct_per_sample"], strict=True):
            per_sample[i]["correct"] = correct
    yes_no = subset("yes_no")
    if yes_no:
        from l2t.metrics import parse_yes_no

        pope = pope_scores([result.answers[i] for i in yes_no], [parse_yes_no(items[i].reference) for i in yes_no])
        summary["yes_no"] = {
            "samples": len(yes_no),
            **{k: pope[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio", "no_answer")},
        }
        for i, correct in zip(yes_no, pope["correct_per_sample"], strict=True):
            per_sample[i]["correct"] = correct
    visual = [i for i, values in enumerate(result.visual_contribution) if values is not None]
    if visual:
        vc = visual_contribution_summary([result.visual_contribution[i] for i in visual])
        for i, total in zip(visual, vc.pop("sum_per_sample"), strict=True):
            values = result.visual_contribution[i]
            per_sample[i].update(vc_sum=total, vc_mean=total / len(values) if values else 0.0)
        summary["visual_contribution"] = vc
    return summary, per_sample


# The table's rows: (label, section of a model's metrics, key).
TABLE_ROWS = (
    ("VC per token (nats)", "visual_contribution", "mean_per_token"),
    ("VC per answer (nats)", "visual_contribution", "mean_per_sequence"),
    ("CIDEr-D", "caption", "cider_d"),
    ("BLEU-4", "caption", "bleu4"),
    ("VQA exact match", "short_answer", "accuracy"),
    ("POPE accuracy", "yes_no", "accuracy"),
    ("POPE F1", "yes_no", "f1"),
    ("POPE yes-ratio", "yes_no", "yes_ratio"),
    ("CHAIR_s (captions with a hallucinated object)", "hallucination", "chair_s"),
    ("CHAIR_i (hallucinated object mentions)", "hallucination", "chair_i"),
)


def table_value(summary: dict, section: str, key: str) -> float | None:
    return summary.get(section, {}).get(key)


# ---------------------------------------------------------------- runs


@dataclass
class RunFolder:
    path: Path
    config: object
    task_templates: list[str]
    name: str = ""


def open_run(path: str | Path) -> RunFolder:
    """A finished run folder's config and mined templates; errors name the missing piece."""
    from l2t.templates import load_templates

    path = Path(path)
    try:
        config = runs.read_trained_run(path)
    except runs.RunFolderError as exc:
        raise EvaluationError(str(exc)) from None
    templates_path = path / runs.TEMPLATES
    try:
        templates = [t.sentence for t in load_templates(templates_path)] if templates_path.is_file() else []
    except (ValueError, OSError) as exc:
        raise EvaluationError(f"{templates_path} can't be read: {exc}") from None
    return RunFolder(path, config, templates)


def name_runs(folders: list[RunFolder]) -> None:
    """Each run's label in the tables: its folder name, with its parent's where names repeat."""
    names = [f.path.resolve().name for f in folders]
    labels = [f"{f.path.resolve().parent.name}/{n}" if names.count(n) > 1 else n for f, n in zip(folders, names, strict=True)]
    for index, (folder, label) in enumerate(zip(folders, labels, strict=True)):
        if labels.count(label) > 1 or label == "base" or label.startswith("base:"):
            label = f"{label} #{index + 1}"
        folder.name = label


def load_test_samples(run: RunFolder, data: str | None, images: str | None) -> tuple[list[Sample], object, dict]:
    """The test samples (default: the run's held-out split), their image source and the load report."""
    from l2t.data import DataError, load_samples, open_images

    if data:
        path = Path(data)
        image_root = images
    else:
        path = run.path / runs.HELD_OUT
        image_root = images or run.config.data.images or str(Path(run.config.data.path).parent)
        if not path.is_file():
            raise EvaluationError(f"{run.path} has no {runs.HELD_OUT}; give test data with --data TEST")
    if not path.is_file():
        raise EvaluationError(f"test file {path} does not exist")
    try:
        samples, report = load_samples(path, image_root, max_pixels=run.config.data.max_image_pixels)
    except DataError as exc:
        hint = "" if data else "\nThe run held out no usable samples; give test data with --data TEST."
        raise EvaluationError(f"{exc}{hint}") from None
    source = open_images(image_root, path, run.config.data.max_image_pixels) if any(s.images for s in samples) else None
    return samples, source, report.to_dict()


def load_run(run: RunFolder):
    """The run's model (base + adapter, loaded once) and an encoder for its prompt format."""
    from l2t.models import load_processor, load_with_adapter

    processor = load_processor(run.config.model)
    encoder = Encoder(processor, chat.FORMATS[run.config.model.prompt_format], run.task_templates)
    return load_with_adapter(run.config, run.path / runs.ADAPTER), encoder


def base_model_key(run: RunFolder) -> tuple:
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


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def evaluate_runs(run_dirs: list[str | Path], settings: Settings) -> tuple[dict, list[EvalItem]]:
    """Answer and score the test items with every run and its base model; returns the report."""
    folders = [open_run(d) for d in run_dirs]
    name_runs(folders)
    samples, source, data_report = load_test_samples(folders[0], settings.data, settings.images)
    items, skipped = load_test_items(samples, source, settings.n)
    skipped = [{"sample": p["sample"], "reason": f"[{p['code']}] {p['message']}"} for p in data_report["problems"]] + skipped
    for note in skipped:
        say(f"skipping sample {note['sample']}: {note['reason']}")
    if not items:
        raise EvaluationError(f"{settings.data or folders[0].path / runs.HELD_OUT}: no sample left to evaluate after the problems above")
    bases = list(dict.fromkeys(base_model_key(f) for f in folders))
    results: list[ModelAnswers] = []
    done_bases: dict[tuple, ModelAnswers] = {}
    for folder in folders:
        model, encoder = load_run(folder)
        key = base_model_key(folder)
        say(f"evaluating {folder.name}{'' if key in done_bases else ' and its base model'} on {len(items)} samples")
        if key not in done_bases:
            with base_model_context(model):
                name = "base" if len(bases) == 1 else f"base: {folder.config.model.hub_id} ({folder.config.model.quant})"
                done_bases[key] = answer_items(name, model, encoder, items, settings.max_new_tokens, settings.batch_size)
            results.append(done_bases[key])
        results.append(answer_items(folder.name, model, encoder, items, settings.max_new_tokens, settings.batch_size))
        del model
    return build_report(folders, items, skipped, results, settings, data_report), items


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "numpy", "pillow", "pycocoevalcap", "matplotlib"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def model_entries(folders: list[RunFolder], results: list[ModelAnswers], summaries: list[dict]) -> list[dict]:
    """Each model's name, run, loss mode, seed, time and metrics (base models have no run)."""
    entries = []
    for result, summary in zip(results, summaries, strict=True):
        folder = next((f for f in folders if f.name == result.name), None)
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
    folders: list[RunFolder], items: list[EvalItem], skipped: list[dict], results: list[ModelAnswers], settings: Settings, data_report: dict
) -> dict:
    summaries, per_sample = zip(*(score_answers(items, result) for result in results), strict=True)
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
        "models": model_entries(folders, results, list(summaries)),
        "samples": sample_entries(items, results, list(per_sample)),
        "visual_contribution_per_token": {r.name: [v for values in r.visual_contribution if values for v in values] for r in results},
    }


# ---------------------------------------------------------------- report files


def format_number(value) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}"


def markdown_table(report: dict) -> str:
    """One row per metric, one column per model (base first)."""
    names = [m["name"] for m in report["models"]]
    lines = ["| metric | samples | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for label, section, key in TABLE_ROWS:
        values = [table_value(m["metrics"], section, key) for m in report["models"]]
        if all(v is None for v in values):
            continue
        count = next(
            (
                m["metrics"][section].get("samples", m["metrics"][section].get("num_sequences"))
                for m in report["models"]
                if section in m["metrics"]
            ),
            "",
        )
        lines.append(f"| {label} | {count} | " + " | ".join(format_number(v) for v in values) + " |")
    return "\n".join(lines)


def markdown_report(report: dict) -> str:
    kinds = ", ".join(f"{count} {kind.replace('_', ' ')}" for kind, count in report["kinds"].items() if count)
    s = report["settings"]
    lines = [
        "# Evaluation",
        "",
        f"Test data: `{s['data']}` — {len(report['sample_ids'])} samples ({kinds}); "
        f"greedy decoding, at most {s['max_new_tokens']} new tokens; model `{s['model']}` ({s['quant']}) on {s['device']}.",
        "",
        markdown_table(report),
        "",
        "VC: log p(answer | image, question) − log p(answer | noise image, question) on the reference answer tokens. "
        "CHAIR: lower is better. POPE yes-ratio: 0.5 is balanced.",
        "",
        "Charts: `metrics.png`, `visual_contribution.png`. Every sample's answers and scores: `report.html`, `report.json`.",
    ]
    if report["skipped"]:
        lines += ["", f"## Skipped samples ({len(report['skipped'])})", ""]
        lines += [f"- `{note['sample']}`: {note['reason']}" for note in report["skipped"]]
    return "\n".join(lines) + "\n"


def _png_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def metrics_chart(report: dict) -> bytes:
    """One panel per metric, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in TABLE_ROWS if any(table_value(m["metrics"], row[1], row[2]) is not None for m in report["models"])]
    names = [m["name"] for m in report["models"]]
    columns = min(4, len(rows))
    lines = -(-len(rows) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 2.8 * lines), dpi=100, squeeze=False)
    colors = plt.cm.tab10.colors
    for ax, (label, section, key) in zip(axes.flat, rows, strict=False):
        values = [table_value(m["metrics"], section, key) for m in report["models"]]
        bars = ax.bar(range(len(names)), [v if v is not None else 0.0 for v in values], color=[colors[i % 10] for i in range(len(names))])
        ax.bar_label(bars, labels=[format_number(v) for v in values], fontsize=7)
        ax.set_title(label.split(" (")[0], fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    fig.tight_layout()
    return _png_bytes(fig)


def visual_contribution_chart(report: dict) -> bytes:
    """The distribution of per-token VC for every model, on shared bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_model = {name: values for name, values in report["visual_contribution_per_token"].items() if values}
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    pooled = [v for values in per_model.values() for v in values]
    if pooled:
        bins = np.histogram_bin_edges(pooled, bins=40)
        for name, values in per_model.items():
            ax.hist(values, bins=bins, histtype="step", linewidth=1.5, label=f"{name} (mean {np.mean(values):.3f})")
        ax.axvline(0, color="black", linewidth=0.5)
        ax.legend(fontsize=8)
    ax.set_xlabel("log p(token | image) − log p(token | noise image)")
    ax.set_ylabel("answer tokens")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png_bytes(fig)


def thumbnail_uri(image: Image.Image) -> str:
    """The image, shrunk to at most THUMBNAIL_PIXELS a side, as a PNG data: URI."""
    small = image.copy()
    small.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _sample_scores_html(scores: dict) -> str:
    parts = []
    if "correct" in scores:
        parts.append("✓ correct" if scores["correct"] else "✗ wrong")
    for key, label in (("cider_d", "CIDEr-D"), ("bleu4", "BLEU-4"), ("vc_sum", "VC"), ("vc_mean", "VC/token")):
        if key in scores:
            parts.append(f"{label} {scores[key]:.3f}")
    if scores.get("hallucinated"):
        objects = ", ".join(" ".join(o) if isinstance(o, list) else str(o) for o in scores["hallucinated"])
        parts.append(f"hallucinated: {objects}")
    return "<br>".join(html.escape(p) for p in parts)


def gallery_rows(report: dict, items: list[EvalItem]) -> str:
    names = [m["name"] for m in report["models"]]
    rows = []
    for item, sample in zip(items, report["samples"], strict=True):
        pictures = "".join(f'<img src="{thumbnail_uri(p)}" alt="{html.escape(item.id)}">' for p in item.images) or "<em>no image</em>"
        cells = [
            f"<td>{pictures}</td>",
            f"<td><b>{html.escape(item.id)}</b><br><span class=kind>{item.kind.replace('_', ' ')}</span></td>",
            f"<td>{html.escape(item.question)}</td>",
            f"<td>{html.escape(item.reference)}</td>",
        ]
        for name in names:
            cells.append(
                f"<td>{html.escape(sample['answers'][name])}<div class=scores>{_sample_scores_html(sample['scores'][name])}</div></td>"
            )
        rows.append(f'<tr class="sample" id="{html.escape(item.id)}">' + "".join(cells) + "</tr>")
    return "\n".join(rows)


def html_report(report: dict, items: list[EvalItem], charts: dict[str, bytes]) -> str:
    names = [m["name"] for m in report["models"]]
    header = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    table_rows = []
    for label, section, key in TABLE_ROWS:
        values = [table_value(m["metrics"], section, key) for m in report["models"]]
        if any(v is not None for v in values):
            table_rows.append(f"<tr><td>{html.escape(label)}</td>" + "".join(f"<td>{format_number(v)}</td>" for v in values) + "</tr>")
    images = "".join(
        f'<img class=chart src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}" alt="{html.escape(name)}">'
        for name, data in charts.items()
    )
    skipped = "".join(f"<li><b>{html.escape(n['sample'])}</b>: {html.escape(n['reason'])}</li>" for n in report["skipped"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation: {html.escape(", ".join(names[1:]))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }}
.gallery td {{ max-width: 22em; overflow-wrap: anywhere; }}
.gallery td b {{ white-space: nowrap; }}
.gallery img {{ width: 96px; image-rendering: pixelated; border: 1px solid #ddd; }}
.scores, .kind {{ color: #666; font-size: 0.85em; }}
img.chart {{ display: block; max-width: 100%; margin: 1em 0; }}
</style></head><body>
<h1>Evaluation</h1>
<p>{len(items)} test samples from <code>{html.escape(report["settings"]["data"])}</code>; greedy decoding.</p>
<table><tr><th>metric</th>{header}</tr>
{"".join(table_rows)}
</table>
<div>{images}</div>
{f"<h2>Skipped samples</h2><ul>{skipped}</ul>" if skipped else ""}
<h2>Samples</h2>
<table class="gallery"><tr><th>image</th><th>sample</th><th>instruction</th><th>reference</th>{header}</tr>
{gallery_rows(report, items)}
</table>
</body></html>
"""


def write_report(eval_dir: Path, report: dict, items: list[EvalItem]) -> None:
    """report.json, report.md, report.html and the charts, each written atomically."""
    charts = {"metrics.png": metrics_chart(report), "visual_contribution.png": visual_contribution_chart(report)}
    for name, data in charts.items():
        runs.atomic_write_bytes(eval_dir / name, data)
    runs.atomic_write_json(eval_dir / "report.json", report)
    runs.atomic_write_text(eval_dir / "report.md", markdown_report(report))
    runs.atomic_write_text(eval_dir / "report.html", html_report(report, items, charts))


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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from l2t.config import ConfigError
    from l2t.images import ImageError
    from l2t.models import ModelError

    args = parse_args(argv)
    command = "python -m l2t.evaluate " + shlex.join(sys.argv[1:] if argv is None else argv)
    settings = Settings(args.data, args.images, args.n, args.max_new_tokens, args.batch_size, command)
    try:
        report, items = evaluate_runs([args.run_dir, *args.compare], settings)
        eval_dir = Path(args.run_dir) / runs.EVAL
        write_report(eval_dir, report, items)
    except (EvaluationError, ConfigError, ModelError, ImageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc.filename or args.run_dir}: {exc.strerror}", file=sys.stderr)
        return 1
    print(markdown_table(report))
    print(f"\nreport: {eval_dir / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
