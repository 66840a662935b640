"""Time `python -m l2t.evaluate` on the tiny preset: 200 samples, base and tuned model, all metrics.

    python bench/eval_speed.py [--run RUN_DIR] [--samples 200] [--batch-size 16] [--baseline-samples 50] [--repeats 3]

Without --run it first trains a short tiny run (60 steps, not timed) in a temp
folder. The test samples are a fresh balanced synthetic split of --samples
samples (captions, short answers, yes/no, a few text-only questions). With the
model loaded once, it times in the same process:

- batched: what the command does, answers (greedy, left-padded batches, sorted
  by expected answer length) and teacher-forced visual-contribution passes for
  both models, then every metric;
- baseline: the same work one sample at a time (batch size 1), over the first
  --baseline-samples samples and scaled to --samples;
- end to end: the whole command after its imports (config, model load, data,
  both models, all metrics, report files and charts).

Each timing is the best of --repeats runs: on a shared machine the other
processes only ever add time. The load average is printed with the numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from l2t import answers, evaluate, generation, runs, scoring, synthetic
from l2t.data import load_samples
from l2t.images import ImageSource


def train_short_run(folder: Path) -> Path:
    from l2t.config import load_config
    from l2t.train import train

    config = load_config("tiny", overrides=[f"output={folder}", "train.max_steps=60", "train.preview_samples=0"])
    return train(config)


def timed_answers_and_scores(model, encoder, items, max_new_tokens: int, batch_size: int) -> float:
    started = time.perf_counter()
    base, tuned = answers.base_and_tuned_answers(model, encoder, items, "tuned", max_new_tokens, batch_size)
    scoring.score_answers(items, base)
    scoring.score_answers(items, tuned)
    return time.perf_counter() - started


def time_command(run_dir: Path, test_file: Path, args) -> float:
    """What `python -m l2t.evaluate RUN_DIR --data TEST` does after its imports."""
    started = time.perf_counter()
    settings = evaluate.Settings(data=str(test_file), max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    report, items = evaluate.evaluate_runs([run_dir], settings)
    evaluate.write_report(run_dir / runs.EVAL, report, items)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a tiny-preset run folder (default: train a short one)")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=generation.DEFAULT_BATCH_SIZE)
    parser.add_argument(
        "--baseline-samples", type=int, default=50, help="samples the one-at-a-time baseline runs on (its time is scaled to --samples)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=generation.DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--repeats", type=int, default=3, help="each timing is the best of this many runs (the machine may be shared)")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="l2t-eval-speed-"))
    run_dir = Path(args.run) if args.run else train_short_run(work / "run")
    synthetic.generate(work / "test", n=1, seed=7, n_test=args.samples)
    test_file = work / "test" / "test.json"

    folder = runs.open_trained_run(run_dir)
    model, encoder = generation.load_run(folder)
    samples, _ = load_samples(test_file, work / "test")
    items, _ = evaluate.load_test_items(samples, ImageSource(work / "test"))
    kinds = {kind: sum(item.kind == kind for item in items) for kind in scoring.KINDS}
    timed_answers_and_scores(model, encoder, items[:4], args.max_new_tokens, args.batch_size)  # warm-up

    batched = [timed_answers_and_scores(model, encoder, items, args.max_new_tokens, args.batch_size) for _ in range(args.repeats)]
    subset = items[: args.baseline_samples]
    scale = len(items) / len(subset)
    baseline = [timed_answers_and_scores(model, encoder, subset, args.max_new_tokens, 1) * scale for _ in range(args.repeats)]
    del model
    end_to_end = [time_command(run_dir, test_file, args) for _ in range(args.repeats)]

    print(
        f"tiny preset, {len(items)} samples ({', '.join(f'{n} {k}' for k, n in kinds.items())}), "
        f"max {args.max_new_tokens} new tokens, torch threads {torch.get_num_threads()}, "
        f"load average before/after {load_before:.1f}/{os.getloadavg()[0]:.1f}; best of {args.repeats} (all runs in brackets)"
    )
    print(f"{'':<52}{'seconds':>9}{'samples/s':>11}")
    rows = [
        (f"baseline: one sample at a time ({len(subset)} run, scaled)", baseline),
        (f"batched (batch size {args.batch_size})", batched),
        ("end to end: load, both models, metrics, report", end_to_end),
    ]
    for label, seconds in rows:
        print(f"{label:<52}{min(seconds):>9.2f}{len(items) / min(seconds):>11.1f}   [{', '.join(f'{t:.1f}' for t in seconds)}]")
    print(f"batched vs baseline: {min(baseline) / min(batched):.1f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
