"""The demo, as `make demo` runs it: the built-in base adapted to the demo task, on its fixed seed.

What the README promises of it, checked on the demo's own end-of-training evaluation of the
bundled balanced held-out split (eval/report.json), not on a timing.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(stdout, eval/report.json) of `python -m l2t.train --preset tiny`, the command behind `make demo`."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "l2t.train", "--preset", "tiny", "--output", str(out), "--overwrite"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads((out / "eval" / "report.json").read_text())


def metrics(report: dict, name: str) -> dict:
    return next(m["metrics"] for m in report["models"] if m["name"] == name)


def test_the_demo_trains_with_l2t_and_prints_the_numbers_beside_their_baselines(demo):
    stdout, report = demo
    assert [m["loss_mode"] for m in report["models"]] == [None, "l2t"]
    assert "| metric | samples | base | demo | baseline |" in stdout
    for label in ("Exact match, all questions", "  exact match: count", "POPE accuracy (yes/no)", "POPE yes-ratio", "VC per token, image removed"):
        assert any(line.startswith(f"| {label}") for line in stdout.splitlines()), label


def test_the_tuned_model_answers_the_demo_task_about_the_image(demo):
    _, report = demo
    questions = metrics(report, "demo")["questions"]
    assert questions["exact_match"] >= 0.6
    for kind, scores in questions["by_type"].items():
        assert scores["samples"] >= 20, kind
        assert scores["exact_match"] > scores["majority_baseline"], (kind, scores)


def test_yes_no_beats_both_constant_answers(demo):
    _, report = demo
    yes_no = metrics(report, "demo")["yes_no"]
    assert yes_no["accuracy"] > max(yes_no["always_yes_accuracy"], yes_no["always_no_accuracy"])
    assert yes_no["always_yes_accuracy"] == yes_no["always_no_accuracy"] == 0.5  # the held-out split is balanced
    assert 0 < yes_no["yes_ratio"] < 1


def test_the_answers_depend_on_the_image(demo):
    _, report = demo
    tuned = metrics(report, "demo")
    assert tuned["visual_contribution"]["mean_per_token"] >= 0.3  # the paper's: image tokens removed
    assert tuned["visual_contribution_noise"]["mean_per_token"] >= 0.3


def test_tuning_keeps_what_the_base_could_see(demo):
    _, report = demo
    assert metrics(report, "base")["caption"]["main_object_accuracy"] >= 0.9
    assert metrics(report, "demo")["caption"]["main_object_accuracy"] >= 0.8
