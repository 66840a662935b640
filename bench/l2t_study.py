"""Does L2T beat response-only training on the tiny preset? Trains both, 3 seeds each, and evaluates.

    python bench/l2t_study.py OUT_DIR [--seeds 0 1 2] [--results docs/RESULTS.md]

For each loss mode (response, l2t) and seed it runs

    python -m l2t.train --preset tiny --output OUT_DIR/<mode>-seed<S> loss.mode=<mode> train.seed=<S>

on the bundled synthetic train split (biased: each shape usually has its usual
color), logging to OUT_DIR/logs/. A run whose folder already holds a finished
adapter is reused, so an interrupted study continues where it stopped. Then all
runs and the base model answer the bundled balanced test split in one
`l2t.evaluate` comparison (report in OUT_DIR/eval/), and the per-mode table,
mean ± standard deviation over seeds, is written to --results.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from l2t import evaluate, runs
from l2t.synthetic import bundled_dir

ROOT = Path(__file__).resolve().parent.parent

MODES = ("response", "l2t")
# (column, section of an evaluation summary, key, higher is better)
COLUMNS = (
    ("VC per token", "visual_contribution", "mean_per_token", True),
    ("VC per answer", "visual_contribution", "mean_per_sequence", True),
    ("CIDEr-D", "caption", "cider_d", True),
    ("VQA exact match", "short_answer", "accuracy", True),
    ("POPE F1", "yes_no", "f1", True),
    ("CHAIR_s", "hallucination", "chair_s", False),
    ("CHAIR_i", "hallucination", "chair_i", False),
)


def train_command(out_dir: Path, mode: str, seed: int) -> list[str]:
    run_dir = out_dir / f"{mode}-seed{seed}"
    return [sys.executable, "-m", "l2t.train", "--preset", "tiny", "--output", str(run_dir), "--overwrite", f"loss.mode={mode}", f"train.seed={seed}"]


def finished(run_dir: Path) -> bool:
    status = run_dir / runs.STATUS
    return (run_dir / runs.ADAPTER / "adapter_config.json").is_file() and status.is_file() and runs.read_json(status).get("state") == "finished"


def train_all(out_dir: Path, seeds: list[int]) -> tuple[list[Path], float]:
    """Every (mode, seed) run folder, training the ones not finished yet; and the training seconds."""
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    run_dirs, seconds = [], 0.0
    for mode in MODES:
        for seed in seeds:
            command = train_command(out_dir, mode, seed)
            run_dir = Path(command[command.index("--output") + 1])
            run_dirs.append(run_dir)
            if finished(run_dir):
                print(f"reusing {run_dir}", flush=True)
                continue
            print(f"training {run_dir.name}: {shlex.join(command[1:])}", flush=True)
            started = time.perf_counter()
            with open(out_dir / "logs" / f"{run_dir.name}.log", "w") as log:
                subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
            seconds += time.perf_counter() - started
    return run_dirs, seconds


def per_mode_table(report: dict, seeds: list[int]) -> str:
    """Base row, then mean ± std over seeds per mode, then the paired difference l2t − response."""
    by_name = {m["name"]: m["metrics"] for m in report["models"]}

    def values(mode: str, section: str, key: str) -> list[float | None]:
        return [evaluate.table_value(by_name[f"{mode}-seed{s}"], section, key) for s in seeds]

    def cell(numbers: list[float | None]) -> str:
        numbers = [n for n in numbers if n is not None]
        if not numbers:
            return "–"
        spread = statistics.stdev(numbers) if len(numbers) > 1 else 0.0
        return f"{statistics.fmean(numbers):.3f} ± {spread:.3f}"

    header = "| | " + " | ".join(c[0] for c in COLUMNS) + " |"
    lines = [header, "|---|" + "---:|" * len(COLUMNS)]
    lines.append("| base (untuned) | " + " | ".join(evaluate.format_number(evaluate.table_value(by_name["base"], s, k)) for _, s, k, _ in COLUMNS) + " |")
    for mode in MODES:
        lines.append(f"| {mode} | " + " | ".join(cell(values(mode, s, k)) for _, s, k, _ in COLUMNS) + " |")
    differences = []
    for _, section, key, _ in COLUMNS:
        pairs = zip(values("l2t", section, key), values("response", section, key), strict=True)
        differences.append(cell([a - b for a, b in pairs if a is not None and b is not None]))
    lines.append("| l2t − response, same seed | " + " | ".join(differences) + " |")
    return "\n".join(lines)


def per_seed_table(report: dict) -> str:
    lines = ["| run | " + " | ".join(c[0] for c in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for model in report["models"]:
        lines.append(f"| {model['name']} | " + " | ".join(evaluate.format_number(evaluate.table_value(model["metrics"], s, k)) for _, s, k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def reading(report: dict, seeds: list[int]) -> list[str]:
    """One line per metric: is the same-seed difference larger than its own spread over seeds?"""
    by_name = {m["name"]: m["metrics"] for m in report["models"]}
    lines, clear_wins, clear_losses = [], 0, 0
    for label, section, key, higher_is_better in COLUMNS:
        diffs = []
        for seed in seeds:
            a = evaluate.table_value(by_name[f"l2t-seed{seed}"], section, key)
            b = evaluate.table_value(by_name[f"response-seed{seed}"], section, key)
            if a is not None and b is not None:
                diffs.append(a - b)
        if not diffs:
            continue
        mean = statistics.fmean(diffs)
        spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        better = (mean > 0) == higher_is_better
        consistent = all((d > 0) == (mean > 0) and d != 0 for d in diffs)
        if consistent and abs(mean) > spread:
            verdict = "better with L2T" if better else "worse with L2T"
            clear_wins += better
            clear_losses += not better
        else:
            verdict = "no clear difference (the seeds disagree or the gap is within the spread)"
        lines.append(f"- {label}: l2t − response = {mean:+.3f} ± {spread:.3f} over {len(diffs)} seeds: {verdict}.")
    total = len(lines)
    if clear_wins and not clear_losses:
        summary = f"L2T is better on {clear_wins} of {total} metrics, consistently across seeds, and worse on none."
    elif clear_losses and not clear_wins:
        summary = f"L2T is worse on {clear_losses} of {total} metrics, consistently across seeds, and better on none: it does not help at this scale."
    elif not clear_wins and not clear_losses:
        summary = "L2T does not help at this scale: no metric differs consistently across seeds by more than the seed-to-seed spread."
    else:
        summary = f"Mixed: L2T is consistently better on {clear_wins} and worse on {clear_losses} of {total} metrics."
    return [summary, ""] + lines


def results_markdown(report: dict, seeds: list[int], command: str, train_seconds: float, eval_seconds: float) -> str:
    kinds = report["kinds"]
    return "\n".join([
        "# Results: L2T vs response-only training on the tiny preset",
        "",
        "Produced by",
        "",
        "```",
        command,
        "```",
        "",
        f"Each loss mode trains the tiny preset (a ~0.17M-parameter LLaVA, 4-bit QLoRA, 180 steps) on the bundled "
        f"synthetic train split (240 samples; each shape has its usual color 80% of the time) with seeds {', '.join(map(str, seeds))}. "
        f"All runs and the untuned base model answer the bundled balanced test split (colors independent of shapes): "
        f"{len(report['sample_ids'])} samples, of which {kinds['caption']} captions, {kinds['short_answer']} short answers, "
        f"{kinds['yes_no']} yes/no questions and {kinds['text_only']} text-only questions. Greedy decoding, "
        f"at most {report['settings']['max_new_tokens']} new tokens. Metrics as in `python -m l2t.evaluate` "
        "(VC in nats, on the reference answers of the samples with an image; CHAIR: lower is better).",
        "",
        "## Mean ± standard deviation over seeds",
        "",
        per_mode_table(report, seeds),
        "",
        "## Reading",
        "",
        *reading(report, seeds),
        "",
        f"Caveats: one tiny randomly initialised model, 180 optimiser steps, and a {len(report['sample_ids'])}-sample test split "
        f"({kinds['yes_no']} yes/no questions), so a single answer moves a metric by several points; "
        f"the spread over {len(seeds)} seeds is itself a rough estimate.",
        "",
        "## Every run",
        "",
        per_seed_table(report),
        "",
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {report['versions']['torch']}, transformers {report['versions']['transformers']}, peft {report['versions']['peft']}, "
        f"bitsandbytes {report['versions']['bitsandbytes']}. "
        + (f"Training took {train_seconds / 60:.1f} min, " if train_seconds else "Training: runs reused from an earlier invocation; ")
        + f"evaluation {eval_seconds:.0f} s. "
        "The full comparison report, with every answer, is in OUT_DIR/eval/report.html.",
        "",
    ])  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder for the runs, their logs and the comparison report")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--results", default=str(ROOT / "docs" / "RESULTS.md"), help="where to write the results page")
    args = parser.parse_args()
    out_dir = Path(args.out_dir).resolve()
    command = "python bench/l2t_study.py " + shlex.join(sys.argv[1:])

    run_dirs, train_seconds = train_all(out_dir, args.seeds)
    started = time.perf_counter()
    settings = evaluate.Settings(data=str(bundled_dir() / "test.json"), images=str(bundled_dir()), command=command)
    report, items = evaluate.evaluate_runs(run_dirs, settings)
    evaluate.write_report(out_dir / runs.EVAL, report, items)
    eval_seconds = time.perf_counter() - started

    runs.atomic_write_text(Path(args.results), results_markdown(report, args.seeds, command, train_seconds, eval_seconds))
    runs.atomic_write_json(out_dir / "study.json", {"seeds": args.seeds, "runs": [str(d) for d in run_dirs], "report": str(out_dir / runs.EVAL / "report.json")})
    print(per_mode_table(report, args.seeds))
    print(f"\nwrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
