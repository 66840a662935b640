"""Break the code on purpose, one change at a time, and check that the tests guarding it fail.

    .venv/bin/python tools/mutations.py                    # every break (CI runs this after the suite)
    .venv/bin/python tools/mutations.py resume-restarts    # some breaks, by name
    .venv/bin/python tools/mutations.py --list

Each break names a file, a piece of its text, what to put there instead, and
the tests that claim to guard that code. The repository's files (tracked, and
new ones git does not ignore) are copied to a temporary folder once; each break
is applied there, its tests run in one pytest session, and the file is put
back. Every one of those tests must fail: a failed assert, or a skip that
tests/allowed_skips.txt does not allow (an error collecting or setting up a
test does not count). A break that some test survives, or whose text is no
longer in its file, makes the command exit 1, so the list follows the code.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST_TIMEOUT_S = 600
UNLISTED_SKIPS = "skips that tests/allowed_skips.txt does not allow"
"""The title of the section in which tests/conftest.py lists the skips that fail a run."""


@dataclass(frozen=True)
class Break:
    name: str
    path: str
    original: str
    broken: str
    tests: tuple[str, ...]
    what: str


RESUME_TEST = "tests/test_train.py::test_sigkill_then_resume_loses_nothing"
TORCHRUN_TEST = "tests/test_train.py::test_two_processes_with_torchrun"
QUANT_TESTS = (
    "tests/test_models.py::test_4bit_is_nf4_with_double_quantisation_in_the_compute_dtype",
    "tests/test_presets.py::test_qlora_on_meta_quantises_and_adapts_only_language_linears[tinyllava]",
)
BROWSER_TEST = "tests/test_browser.py::test_demo_data_train_compare_chat_export_and_runs_in_the_browser"
COMPARE_TEST = "tests/test_evaluate.py::test_compare_puts_every_run_in_one_table"
README_COMPARE_TEST = "tests/test_readme.py::test_evaluate_and_merge_commands_run[python -m l2t.evaluate runs/tiny-l2t --compare runs/tiny-response]"
REPORT_TEST = "tests/test_evaluate.py::test_report_files_have_every_number_and_one_gallery_row_per_sample"

BREAKS = [
    # 1. Resume
    Break(
        "resume-restarts",
        "l2t/train.py",
        "checkpoint, incomplete = runs.last_checkpoint(run_dir)",
        "checkpoint, incomplete = None, runs.last_checkpoint(run_dir)[1]",
        (RESUME_TEST, "tests/test_faults.py::test_sigkill_during_training_then_resume_loses_nothing"),
        "--resume ignores the checkpoint and trains again from step 0 (same seed, same losses)",
    ),
    Break(
        "metrics-not-trimmed",
        "l2t/train.py",
        "    runs.trim_metrics(run_dir, runs.checkpoint_step(checkpoint) if checkpoint else 0)",
        "    pass",
        (RESUME_TEST,),
        "rows logged after the checkpoint stay in metrics.jsonl and are logged again",
    ),
    Break(
        "checkpoints-without-optimiser",
        "l2t/train.py",
        "        ddp_find_unused_parameters=False,\n",
        "        ddp_find_unused_parameters=False,\n        save_only_model=True,\n",
        (RESUME_TEST,),
        "checkpoints hold the weights only: a resume starts the optimiser and the schedule afresh",
    ),
    # 2. Two processes
    Break(
        "no-cross-process-reduction",
        "l2t/trainer.py",
        'parts = self.accelerator.reduce(parts, reduction="sum")',
        "pass",
        (TORCHRUN_TEST,),
        "the logged response/instruction losses and counts are the main process's only",
    ),
    Break(
        "no-num-processes-rescale",
        "l2t/trainer.py",
        "loss = loss * self.accelerator.num_processes",
        "pass",
        (TORCHRUN_TEST,),
        "under DDP the loss is a token mean divided by the number of processes",
    ),
    # 3. 4-bit NF4
    Break("fp4", "l2t/models.py", 'bnb_4bit_quant_type="nf4"', 'bnb_4bit_quant_type="fp4"', QUANT_TESTS, "4-bit weights in FP4, not NF4"),
    Break(
        "no-double-quantisation",
        "l2t/models.py",
        "bnb_4bit_use_double_quant=True",
        "bnb_4bit_use_double_quant=False",
        QUANT_TESTS,
        "the quantisation constants are not quantised again",
    ),
    Break(
        "float32-compute",
        "l2t/models.py",
        "bnb_4bit_compute_dtype=dtype",
        "bnb_4bit_compute_dtype=torch.float32",
        QUANT_TESTS,
        "4-bit layers compute in float32 whatever model.dtype says",
    ),
    # 4. Browser compare
    Break(
        "tuned-answer-is-the-base-answer",
        "l2t/generation.py",
        "    return before[0], after[0]",
        "    return before[0], before[0]",
        (BROWSER_TEST, "tests/test_app.py::test_compare_returns_base_and_tuned_answers"),
        "the Compare tab shows the base model's answer as the tuned one",
    ),
    # 5. Silent skips
    Break(
        "chromium-missing",
        "tests/test_browser.py",
        'CHROMIUM = Path("/usr/bin/chromium")',
        'CHROMIUM = Path("/nonexistent/chromium")',
        (BROWSER_TEST,),
        "the browser test is skipped (no Chromium): a skip that is not on tests/allowed_skips.txt",
    ),
    Break(
        "import-skipped",
        "tests/test_merge.py",
        "\nimport pytest\n",
        '\nimport pytest\n\npytest.importorskip("l2t.no_such_module")\n',
        ("tests/test_merge.py",),
        "a test file skips itself when an import fails",
    ),
    # 6. Comparisons with itself
    Break(
        "every-run-answered-by-the-first",
        "l2t/evaluate.py",
        "        model, encoder = load_run(folder)",
        "        model, encoder = load_run(folders[0])",
        (COMPARE_TEST, README_COMPARE_TEST),
        "with --compare, every run's answers come from the first run's model",
    ),
    Break(
        "runs-swapped",
        "l2t/evaluate.py",
        "by_label = dict(zip(run_labels(folders), folders, strict=True))",
        "by_label = dict(zip(run_labels(folders), folders[::-1], strict=True))",
        (COMPARE_TEST, README_COMPARE_TEST),
        "each run's answers and numbers are filed under another run's name",
    ),
    Break(
        "base-answers-are-the-tuned-ones",
        "l2t/evaluate.py",
        "            with base_model_context(model):\n                name =",
        "            with __import__('contextlib').nullcontext():\n                name =",
        (REPORT_TEST,),
        "the base model's column holds the tuned model's answers",
    ),
    Break(
        "short-answers-scored-against-themselves",
        "l2t/scoring.py",
        "vqa = metrics.vqa_accuracy([result.answers[i] for i in short], [items[i].reference for i in short])",
        "vqa = metrics.vqa_accuracy([items[i].reference for i in short], [items[i].reference for i in short])",
        (REPORT_TEST,),
        "the short-answer accuracy compares each reference with itself",
    ),
]


def repository_files() -> list[str]:
    """Tracked files and new ones git does not ignore: what a commit of the working tree would hold."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (REPO / name).is_file()]


def copy_repository(target: Path) -> None:
    for name in repository_files():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target / name)


def run_tests(copy: Path, tests: tuple[str, ...]) -> tuple[int, str, float]:
    """pytest on these tests in the copy, in one session: (exit status, its output, seconds)."""
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    started = time.time()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests],
            cwd=copy, env=env, capture_output=True, text=True, timeout=TEST_TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {TEST_TIMEOUT_S} s", time.time() - started
    return done.returncode, done.stdout + done.stderr, time.time() - started


def how_it_failed(test: str, output: str) -> str | None:
    """pytest's one-line report of how `test` failed (a failed assert, or a skip that is not allowed), None if it did not."""
    lines = output.splitlines()
    for line in lines:
        if line == f"FAILED {test}" or line.startswith(f"FAILED {test} - "):
            return line.removeprefix(f"FAILED {test}").removeprefix(" - ") or "failed"
    if UNLISTED_SKIPS in output:
        allowed_section = output[output.index(UNLISTED_SKIPS) :].splitlines()[1:]
        for line in allowed_section:
            if line.startswith((f"{test}: ", f"{test}::")):
                return "skipped, and the skip is not allowed: " + line
    return None


def check(copy: Path, item: Break) -> list[str]:
    """Apply the break, run its tests, restore the file; returns what went wrong (empty: every test failed)."""
    path = copy / item.path
    original = path.read_text(encoding="utf-8")
    if original.count(item.original) != 1:
        return [f"{item.path}: the text to break is found {original.count(item.original)} times, not once: {item.original!r}"]
    path.write_text(original.replace(item.original, item.broken), encoding="utf-8")
    try:
        status, output, seconds = run_tests(copy, item.tests)
    finally:
        path.write_text(original, encoding="utf-8")
    print(f"  {len(item.tests)} test(s) in {seconds:.0f} s", flush=True)
    problems = []
    for test in item.tests:
        failure = how_it_failed(test, output) if status == 1 else None
        if failure is not None:
            print(f"  {test}: fails, as it should\n    {failure[:200]}", flush=True)
            continue
        verdict = "SURVIVED" if status in (0, 1) else f"could not run (pytest exit status {status})"
        print(f"  {test}: {verdict}", flush=True)
        problems.append(f"{item.name}: {test} {verdict}\n{output[-2000:]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/mutations.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="breaks to check (default: all)")
    parser.add_argument("--list", action="store_true", help="list the breaks and the tests that guard them")
    args = parser.parse_args(argv)
    known = {b.name: b for b in BREAKS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown break(s) {', '.join(unknown)}; see --list")
    chosen = [known[n] for n in args.names] or BREAKS
    if args.list:
        for item in chosen:
            print(f"{item.name}: {item.what}\n  {item.path}\n  " + "\n  ".join(item.tests))
        return 0
    started = time.time()
    problems = []
    with tempfile.TemporaryDirectory(prefix="l2t-mutations-") as folder:
        copy = Path(folder) / "repo"
        copy_repository(copy)
        for item in chosen:
            print(f"{item.name}: {item.what}", flush=True)
            problems += check(copy, item)
    print(f"\n{len(chosen)} breaks in {time.time() - started:.0f} s")
    if problems:
        print("\nNot caught:\n\n" + "\n\n".join(problems), file=sys.stderr)
        return 1
    print("every break made its tests fail")
    return 0


if __name__ == "__main__":
    sys.exit(main())
