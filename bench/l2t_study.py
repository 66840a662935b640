"""Does L2T make the built-in model use the image more? The study behind docs/RESULTS.md.

    python bench/l2t_study.py OUT_DIR [--seeds 0 1 2 3 4] [--workers 2] [--settings paper product] [--results docs/RESULTS.md]

Two settings, each with every arm (ARMS) and every seed:

paper    The paper's setting: instruction tuning (stage 2) of the built-in model from its stage-1
         checkpoint (`builtin:tiny-stage1`: captions only), the projector and the language model trained
         in full and the vision tower frozen, as in LLaVA, in fp32, on PAPER_SCENES scenes in the base
         answer style (captions and every question kind, prompts with the base style's frequent
         sentences, which the miner finds as task templates), PAPER_STEPS steps. Tested on
         PAPER_TEST balanced held-out scenes of the same style.
product  The product's setting: `l2t.train` with the tiny preset unchanged (4-bit QLoRA on the
         pretrained `builtin:tiny`, the bundled demo data), tested on the preset's held-out split
         (the bundled balanced test.json), by the evaluation the recipe runs at its end.

Within a seed every arm starts from the same weights and sees the data in the same order; seeds
change both. Each (setting, arm, seed) writes OUT_DIR/<setting>/<arm>-seed<S>/summary.json, and a
rerun reuses what is there. Runs go to `--workers` processes with one thread each (the tiny model is
fastest on one thread per core). The results page gives, per metric, the mean over seeds with its
95% confidence interval (Student's t), and each arm's same-seed difference from `response` with its
interval; the hypotheses in HYPOTHESES were written before any run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from l2t.report import table_value  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

ARMS = {
    "response": ["loss.mode=response"],
    "l2t": ["loss.mode=l2t"],
    "l2t_keep_task_templates": ["loss.mode=l2t_keep_task_templates"],
    "l2t_full": ["loss.mode=l2t_full"],
    "l2t λ_I=0.3": ["loss.mode=l2t", "loss.instruction_weight=0.3"],
    "l2t λ_I=0.1": ["loss.mode=l2t", "loss.instruction_weight=0.1"],
    "l2t_relevance": ["loss.mode=l2t_relevance"],
}
SETTINGS = ("paper", "product")
PAPER_SCENES = 20000
PAPER_STEPS = 1200
PAPER_TEST = 400

# (label, path into a model's metrics, +1 higher is better / -1 lower is better / 0 neither)
METRICS = (
    ("VC/token, image removed", ("visual_contribution", "mean_per_token"), 1),
    ("VC/token, noise image", ("visual_contribution_noise", "mean_per_token"), 1),
    ("CIDEr-D", ("caption", "cider_d"), 1),
    ("caption main object", ("caption", "main_object_accuracy"), 1),
    ("CHAIR_s", ("hallucination", "chair_s"), -1),
    ("CHAIR_i", ("hallucination", "chair_i"), -1),
    ("exact match", ("questions", "exact_match"), 1),
    ("right about the image", ("questions", "content_accuracy"), 1),
    ("POPE accuracy", ("yes_no", "accuracy"), 1),
    ("POPE yes-ratio", ("yes_no", "yes_ratio"), 0),
)

HYPOTHESES = """\
Written before any run of this study, from the paper's claims:

1. L2T ≥ response on visual contribution (both kinds) and CIDEr-D, and lower CHAIR (fewer hallucinated objects).
2. Template removal matters: l2t (templates removed) ≥ l2t_keep_task_templates ≥ l2t_full on the same metrics.
3. Loss balance: the instruction tokens of this data outnumber the answer tokens, so with λ_I = 1 each answer token's
   gradient shrinks; if L2T trails response on answer accuracy, λ_I = 0.3 or 0.1 should close the gap.
4. Relevance weights (l2t_relevance: each instruction token weighted by how much the image makes it likely to the base
   model) keep L2T's gains on visual contribution and hallucination while costing less answer accuracy than l2t.
   (Written from the method's rationale when the arm was added, after one pilot run of it in the product setting,
   whose answer accuracy was below l2t's.)

A null or negative result is reported as it is."""

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
"""Two-sided 95% quantiles of Student's t by degrees of freedom."""


# ---------------------------------------------------------------- one run (in a worker process)


def run_product(arm: str, seed: int, run_dir: Path) -> dict:
    from l2t.config import load_config
    from l2t.train import train

    config = load_config("tiny", overrides=[f"output={run_dir}", f"train.seed={seed}", *ARMS[arm]])
    train(config, overwrite=True)
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    base, tuned = (m["metrics"] for m in report["models"])
    return {"tuned": tuned, "base": base}


def paper_items():
    from l2t.pretrain import scenes
    from l2t.scoring import EvalItem

    items = []
    for sample, picture in scenes("study-test", PAPER_TEST, 0, "base"):
        if picture is None:
            continue
        kind = sample.meta["turn_kinds"][0]
        scored_as = kind if kind in ("caption", "yes_no") else "short_answer"
        items.append(EvalItem(sample.id, scored_as, sample.messages[:1], sample.messages[1]["content"], [picture], sample.meta["objects"], kind))
    return items


def paper_scenes() -> list:
    """The paper setting's stage-2 training scenes: the same for every arm and seed (seeds change the order)."""
    from l2t.pretrain import scenes

    return scenes("study", PAPER_SCENES, 0, "base")


def paper_model_and_encoder(pairs: list):
    """The stage-1 model and an encoder with the task templates mined from the stage-2 scenes."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from l2t.chat import FORMATS
    from l2t.config import BUILTIN_MODELS, TemplatesConfig
    from l2t.masking import Encoder
    from l2t.templates import mine_with_settings
    from l2t.tiny import PROMPT_FORMAT

    folder = BUILTIN_MODELS["builtin:tiny-stage1"]
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype="float32")
    instructions = [s.instructions() for s, _ in pairs]
    templates = [t.sentence for t in mine_with_settings(instructions, TemplatesConfig())]
    encoder = Encoder(AutoProcessor.from_pretrained(folder), FORMATS[PROMPT_FORMAT], templates)
    return model, encoder


class InMemoryImages:
    """The scenes' pictures by path, where the relevance pass opens images."""

    def __init__(self, pairs):
        self.pictures = {sample.images[0]: picture for sample, picture in pairs if picture is not None}

    def open(self, path: str):
        return self.pictures[path]


def paper_relevance(out: Path, model, encoder, pairs: list) -> list:
    """The stage-1 model's relevance of every instruction token of the stage-2 data (cached: the same for every seed)."""
    from l2t import relevance

    samples = [s for s, _ in pairs]
    encoded = encoder.encode_many([(s.messages, s.image_sizes) for s in samples])
    key = relevance.cache_key("builtin:tiny-stage1", encoded, samples)
    pad = encoder.tokenizer.pad_token_id
    return relevance.relevance_pass(model, encoder.processor, encoded, samples, InMemoryImages(pairs), pad, out / "paper" / "relevance", key, 64, say=lambda _: None)


def run_paper(arm: str, seed: int, run_dir: Path) -> dict:
    import torch

    from l2t import pretrain
    from l2t.answers import answer_items
    from l2t.config import load_config
    from l2t.scoring import score_answers
    from l2t.tiny import BATCH_SIZE, LEARNING_RATE

    loss = load_config("tiny", overrides=ARMS[arm]).loss
    pairs = paper_scenes()  # built once: templates, relevance and training
    model, encoder = paper_model_and_encoder(pairs)
    values = paper_relevance(run_dir.parent.parent, model, encoder, pairs) if loss.mode == "l2t_relevance" else None
    data = pretrain.encode_scenes(pairs, encoder, loss, values)
    pretrain.set_trainable(model, ("projector", "language"))
    torch.manual_seed(seed)
    losses = pretrain.fit(model, data, pretrain.Schedule(PAPER_STEPS, BATCH_SIZE, LEARNING_RATE), seed, encoder.tokenizer.pad_token_id)
    items = paper_items()
    tuned, _ = score_answers(items, answer_items(arm, model, encoder, items, 48, 32))
    return {"tuned": tuned, "final_loss": statistics.fmean(losses[-100:])}


def paper_base() -> dict:
    from l2t.answers import answer_items
    from l2t.scoring import score_answers

    model, encoder = paper_model_and_encoder(paper_scenes())
    items = paper_items()
    return score_answers(items, answer_items("stage 1", model, encoder, items, 48, 32))[0]


def run_one(job: tuple[str, str, int, str]) -> tuple[tuple[str, str, int], float]:
    """Train and evaluate one (setting, arm, seed), in a worker process; its summary goes to summary.json."""
    import torch

    torch.set_num_threads(1)
    setting, arm, seed, out = job
    run_dir = summary_path(Path(out), setting, arm, seed).parent
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        summary = run_product(arm, seed, run_dir) if setting == "product" else run_paper(arm, seed, run_dir)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return (setting, arm, seed), summary["seconds"]


def summary_path(out: Path, setting: str, arm: str, seed: int) -> Path:
    return out / setting / f"{arm.replace(' ', '_').replace('=', '')}-seed{seed}" / "summary.json"


# ---------------------------------------------------------------- statistics


def interval(numbers: list[float]) -> tuple[float, float] | None:
    """(mean, half-width of the 95% confidence interval), None without numbers."""
    if not numbers:
        return None
    mean = statistics.fmean(numbers)
    if len(numbers) < 2:
        return mean, math.nan
    return mean, T_975.get(len(numbers) - 1, 1.96) * statistics.stdev(numbers) / math.sqrt(len(numbers))


def show(found: tuple[float, float] | None, signed: bool = False) -> str:
    if found is None:
        return "–"
    mean, half = found
    return f"{mean:+.3f} ± {half:.3f}" if signed else f"{mean:.3f} ± {half:.3f}"


def tables(results: dict, setting: str, seeds: list[int], base: dict | None) -> list[str]:
    """Per arm: mean ± CI of each metric; then each arm's same-seed difference from response."""
    present = [m for m in METRICS if any(table_value(results[(setting, arm, s)]["tuned"], *m[1]) is not None for arm in ARMS for s in seeds)]
    header = "| arm | " + " | ".join(m[0] for m in present) + " |"
    rule = "|---|" + "---:|" * len(present)
    lines = [header, rule]
    if base is not None:
        lines.append("| before tuning | " + " | ".join(_plain(table_value(base, *m[1])) for m in present) + " |")
    for arm in ARMS:
        per_seed = [[table_value(results[(setting, arm, s)]["tuned"], *m[1]) for s in seeds] for m in present]
        lines.append(f"| {arm} | " + " | ".join(show(interval([v for v in vs if v is not None])) for vs in per_seed) + " |")
    lines += ["", "Same-seed difference from `response` (mean ± 95% CI over seeds):", "", header, rule]
    for arm in list(ARMS)[1:]:
        cells = []
        for m in present:
            diffs = [
                a - b
                for s in seeds
                if (a := table_value(results[(setting, arm, s)]["tuned"], *m[1])) is not None
                and (b := table_value(results[(setting, "response", s)]["tuned"], *m[1])) is not None
            ]
            cells.append(show(interval(diffs), signed=True))
        lines.append(f"| {arm} − response | " + " | ".join(cells) + " |")
    return lines


def _plain(number) -> str:
    return "–" if number is None else f"{number:.3f}"


def verdicts(results: dict, setting: str, seeds: list[int], arm: str) -> dict[str, str]:
    """Per directed metric: better / worse when the 95% interval of the same-seed difference excludes 0, else no difference."""
    found = {}
    for label, path, direction in METRICS:
        diffs = [
            a - b
            for s in seeds
            if (a := table_value(results[(setting, arm, s)]["tuned"], *path)) is not None
            and (b := table_value(results[(setting, "response", s)]["tuned"], *path)) is not None
        ]
        estimate = interval(diffs)
        if direction == 0 or estimate is None or math.isnan(estimate[1]):
            continue
        mean, half = estimate
        if abs(mean) <= half:
            found[label] = "no clear difference"
        else:
            found[label] = "better" if mean * direction > 0 else "worse"
    return found


def reading(results: dict, setting: str, seeds: list[int]) -> list[str]:
    lines = []
    for arm in list(ARMS)[1:]:
        found = verdicts(results, setting, seeds, arm)
        better = [k for k, v in found.items() if v == "better"]
        worse = [k for k, v in found.items() if v == "worse"]
        unclear = [k for k, v in found.items() if v == "no clear difference"]
        lines.append(
            f"- **{arm}** vs response: better on {', '.join(better) or 'nothing'}; worse on {', '.join(worse) or 'nothing'}; "
            f"no clear difference on {', '.join(unclear) or 'nothing else'}."
        )
    return lines


def mean_of(results: dict, setting: str, arm: str, seeds: list[int], path: tuple) -> float | None:
    values = [v for s in seeds if (v := table_value(results[(setting, arm, s)]["tuned"], *path)) is not None]
    return statistics.fmean(values) if values else None


def hypothesis_reading(results: dict, setting: str, seeds: list[int]) -> list[str]:
    """Each hypothesis, held against this setting's numbers."""
    metric = {label: (path, direction) for label, path, direction in METRICS}
    found = verdicts(results, setting, seeds, "l2t")
    first = ["VC/token, image removed", "VC/token, noise image", "CIDEr-D", "CHAIR_s"]
    parts = [f"{label} {found.get(label, 'undecided (one seed)')}" for label in first]
    outcome = [found.get(label) for label in first]
    if "worse" in outcome:
        held = "contradicted"
    elif all(o == "better" for o in outcome):
        held = "supported"
    else:
        held = "not supported"
    lines = [f"- H1 (L2T ≥ response): {held} — l2t vs response: {'; '.join(parts)}."]
    orderings = []
    for label in ("VC/token, image removed", "CIDEr-D", "CHAIR_s", "right about the image"):
        path, direction = metric[label]
        means = [mean_of(results, setting, arm, seeds, path) for arm in ("l2t", "l2t_keep_task_templates", "l2t_full")]
        if None in means:
            continue
        ordered = all(direction * (a - b) >= 0 for a, b in zip(means, means[1:]))
        orderings.append(f"{label} {'in that order' if ordered else 'not in that order'} ({', '.join(f'{m:.3f}' for m in means)})")
    lines.append(f"- H2 (templates removed ≥ kept ≥ full), means of l2t, keep, full: {'; '.join(orderings)}.")
    gaps = []
    for arm in ("l2t", "l2t λ_I=0.3", "l2t λ_I=0.1"):
        for label in ("right about the image", "POPE accuracy"):
            path, _ = metric[label]
            a, b = mean_of(results, setting, arm, seeds, path), mean_of(results, setting, "response", seeds, path)
            if a is not None and b is not None:
                gaps.append(f"{arm} {label} {a - b:+.3f}")
    lines.append(f"- H3 (a smaller λ_I closes the gap to response), mean difference from response: {'; '.join(gaps)}.")
    relevance = []
    for label in ("VC/token, image removed", "CHAIR_s", "right about the image", "POPE accuracy"):
        path, _ = metric[label]
        a, b, c = (mean_of(results, setting, arm, seeds, path) for arm in ("l2t_relevance", "l2t", "response"))
        if None not in (a, b, c):
            relevance.append(f"{label} {a:.3f} (l2t {b:.3f}, response {c:.3f})")
    lines.append(f"- H4 (relevance weights keep L2T's gains at less cost), l2t_relevance: {'; '.join(relevance)}.")
    return lines


# ---------------------------------------------------------------- the page


def yes_share(results: dict, setting: str, seeds: list[int]) -> str:
    summary = results[(setting, "response", seeds[0])]["tuned"].get("yes_no", {})
    if not summary:
        return ""
    return f"{summary['always_yes_accuracy']:.3f} of the yes/no questions are answered yes (always yes {summary['always_yes_accuracy']:.3f}, always no {summary['always_no_accuracy']:.3f})"


OWN_WORDS = ("<!-- a person's reading, written after the numbers: kept when the script writes this page again -->", "<!-- end of the person's reading -->")


def own_words(page: Path) -> str:
    """The part of an existing results page that a person wrote after reading the numbers (empty if none)."""
    text = page.read_text(encoding="utf-8") if page.is_file() else ""
    start, end = text.find(OWN_WORDS[0]), text.find(OWN_WORDS[1])
    return text[start + len(OWN_WORDS[0]) : end].strip("\n") if 0 <= start < end else ""


def results_markdown(results: dict, bases: dict, seeds: list[int], settings: list[str], command: str, kept: str = "") -> str:
    import torch
    import transformers

    run_minutes = sum(summary["seconds"] for summary in results.values()) / 60
    lines = [
        "# Results: does L2T make the built-in model use the image more?",
        "",
        "Produced by",
        "",
        "```",
        command,
        "```",
        "",
        "## In short",
        "",
        OWN_WORDS[0],
        kept or "(No reading written yet: it goes between these two markers.)",
        OWN_WORDS[1],
        "",
        "## Hypotheses",
        "",
        HYPOTHESES,
        "",
        "## Reading",
        "",
        "Per setting, each hypothesis against the numbers below (verdicts: the 95% interval of the same-seed difference "
        "from response excludes 0, else no clear difference):",
        "",
    ]
    for setting in settings:
        lines += [f"**{setting}**", "", *hypothesis_reading(results, setting, seeds), ""]
    lines += [
        "Caveats: one 0.19M-parameter model on synthetic scenes, short schedules, "
        f"{len(seeds)} seeds. This says what L2T does here, not at the paper's scale.",
        "",
    ]
    descriptions = {
        "paper": (
            f"Stage-2 instruction tuning of `builtin:tiny-stage1` (captions only) in full (projector + language model, vision "
            f"frozen, fp32), {PAPER_STEPS} steps of 32 on {PAPER_SCENES:,} base-style scenes; {PAPER_TEST} balanced held-out scenes. "
            "The answers are sentences, so exact match is not meaningful here; 'right about the image' reads the value an answer names."
        ),
        "product": (
            "`python -m l2t.train --preset tiny` (4-bit QLoRA on `builtin:tiny`, the bundled demo data, preset defaults), "
            "evaluated by the recipe on the bundled balanced held-out split."
        ),
    }
    for setting in settings:
        lines += [f"## Setting: {setting}", "", descriptions[setting], ""]
        share = yes_share(results, setting, seeds)
        if share:
            lines += [f"Yes/no balance: {share}.", ""]
        lines += tables(results, setting, seeds, bases.get(setting))
        lines += ["", "Verdicts (95% interval of the same-seed difference excludes 0):", "", *reading(results, setting, seeds), ""]
    lines += [
        "## Every run",
        "",
        "OUT_DIR/<setting>/<arm>-seed<S>/summary.json (every metric) and log.txt; product runs also keep their run folder "
        "with eval/report.html.",
        "",
        f"Seeds {', '.join(map(str, seeds))}. Machine: {platform.machine()} CPU, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}. "
        f"The {len(results)} runs took {run_minutes:.0f} min in all (each run's own time, summed; they ran --workers at a time).",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder for the runs and their summaries")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--results", default=str(ROOT / "docs" / "RESULTS.md"), help="where to write the results page")
    args = parser.parse_args()
    out = Path(args.out_dir).resolve()
    command = "python bench/l2t_study.py " + shlex.join(sys.argv[1:])

    jobs = [
        (setting, arm, seed, str(out))
        for seed in args.seeds
        for setting in args.settings
        for arm in ARMS
        if not summary_path(out, setting, arm, seed).is_file()
    ]
    if "paper" in args.settings and any(arm == "l2t_relevance" and setting == "paper" for setting, arm, _, _ in jobs):
        print("the stage-1 model's relevance pass over the paper setting's data (once for every seed)", flush=True)
        pairs = paper_scenes()
        paper_relevance(out, *paper_model_and_encoder(pairs), pairs)
    print(f"{len(jobs)} runs to do, {args.workers} at a time", flush=True)
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for (setting, arm, seed), seconds in pool.imap_unordered(run_one, jobs):
            print(f"  {setting:8} {arm:24} seed {seed}: {seconds:.0f} s", flush=True)
    results = {
        (setting, arm, seed): json.loads(summary_path(out, setting, arm, seed).read_text())
        for setting in args.settings
        for arm in ARMS
        for seed in args.seeds
    }
    bases = {"product": results[("product", "response", args.seeds[0])]["base"]} if "product" in args.settings else {}
    if "paper" in args.settings:
        base_file = out / "paper" / "stage1.json"
        if not base_file.is_file():
            base_file.write_text(json.dumps(paper_base()))
        bases["paper"] = json.loads(base_file.read_text())
    page = results_markdown(results, bases, args.seeds, args.settings, command, own_words(Path(args.results)))
    Path(args.results).write_text(page, encoding="utf-8")
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
