"""The training recipe: run folder, the weighted loss, resume after SIGKILL, two processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from l2t import runs
from l2t.config import config_from_dict, load_config
from l2t.synthetic import BUNDLE_ARGS
from l2t.train import main
from l2t.trainer import L2TTrainer

BUNDLED = BUNDLE_ARGS["n"]  # samples in the bundled demo train split

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args, timeout=240, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-W", "ignore", "-m", "l2t.train", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)


def test_run_folder_is_self_describing(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"config.yaml", "templates.json", "data_report.json", "metrics.jsonl", "adapter", "loss.png", "held_out.json", "status.json", "checkpoints"} <= names
    config = config_from_dict(yaml.safe_load((trained_run / "config.yaml").read_text()))
    assert config.train.max_steps == 60 and config.loss.mode == "l2t"
    assert Path(config.data.path).is_absolute() and Path(config.data.images).is_dir()
    templates = json.loads((trained_run / "templates.json").read_text())
    assert "Answer the question using a single word or phrase." in [t["sentence"] for t in templates["templates"]]
    assert templates["settings"]["min_count"] == config.templates.min_count
    rows = runs.read_metrics(trained_run)
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    for row in rows:
        assert {"loss", "response_loss", "instruction_loss", "learning_rate", "grad_norm", "samples_per_s", "tokens_per_s"} <= set(row)
    assert rows[-1]["response_loss"] < rows[0]["response_loss"]
    assert json.loads((trained_run / "status.json").read_text())["state"] == "finished"


def test_adapter_loads_with_peft(trained_run, tiny_config):
    from peft import PeftModel

    from l2t.models import load_base_model

    base = load_base_model(tiny_config.model, quant="none", device="cpu")
    model = PeftModel.from_pretrained(base, str(trained_run / "adapter"))
    saved = {n for n, _ in model.named_parameters() if "modules_to_save" in n}
    assert any("multi_modal_projector" in n for n in saved), "the trained projector is not in the adapter"


class _Args:
    average_tokens_across_devices = True
    world_size = 1


def _bare_trainer(labelled_logits_only: bool) -> L2TTrainer:
    trainer = L2TTrainer.__new__(L2TTrainer)
    trainer.args = _Args()
    trainer.labelled_logits_only = labelled_logits_only
    trainer._parts = torch.zeros(6, dtype=torch.float64)
    return trainer


@pytest.mark.parametrize("labelled_logits_only", [False, True])
def test_weighted_loss_is_token_mean_with_weights(labelled_logits_only):
    """loss = sum(weight * CE) / number of tokens in the loss; split losses are plain means per kind."""
    from transformers.modeling_utils import slice_logits_to_keep

    torch.manual_seed(0)
    vocab, batch, length = 11, 2, 6
    logits = torch.randn(batch, length, vocab)

    class Model(torch.nn.Module):
        def forward(self, input_ids, attention_mask, logits_to_keep=0):
            return type("Out", (), {"logits": slice_logits_to_keep(logits, logits_to_keep)})()

    labels = torch.tensor([[-100, 3, 4, -100, 5, 6], [-100, -100, 7, 8, 9, -100]])
    weights = torch.tensor([[0, 0.5, 0.5, 0, 1, 1], [0, 0, 0.5, 1, 1, 0]])
    kinds = torch.tensor([[0, 1, 1, 0, 2, 2], [0, 0, 1, 2, 2, 0]])
    trainer = _bare_trainer(labelled_logits_only)
    inputs = {"input_ids": torch.zeros(batch, length, dtype=torch.long), "attention_mask": torch.ones(batch, length, dtype=torch.long),
              "labels": labels, "loss_weights": weights, "loss_kinds": kinds}  # fmt: skip
    loss = L2TTrainer.compute_loss(trainer, Model(), dict(inputs))
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="none").view(batch, length - 1)
    expected = (ce * weights[:, 1:]).sum() / (labels[:, 1:] != -100).sum()
    assert torch.allclose(loss, expected, atol=1e-6)
    k = kinds[:, 1:]
    assert torch.isclose(trainer._parts[0] / trainer._parts[1], ce[k == 2].mean().double(), atol=1e-6)
    assert torch.isclose(trainer._parts[2] / trainer._parts[3], ce[k == 1].mean().double(), atol=1e-6)


def test_labelled_logits_only_keeps_the_numerics(tiny_config, tiny_processor, shapes_dir):
    """On a real 4-bit batch, logits at labelled positions only give the same loss and gradients."""
    from l2t.batch import Collator, TrainingSet, encode_samples
    from l2t.chat import FORMATS
    from l2t.data import load_samples
    from l2t.images import ImageSource
    from l2t.masking import Encoder
    from l2t.models import load_for_training

    samples, _ = load_samples(shapes_dir / "train.json")
    encoder = Encoder(tiny_processor, FORMATS[tiny_config.model.prompt_format], ["Answer yes or no."])
    examples = encode_samples(samples[:8], encoder, "l2t", 1.0, 1.0)
    dataset = TrainingSet(examples, ImageSource(shapes_dir), tiny_processor)
    batch = Collator(tiny_processor.tokenizer.pad_token_id)([dataset[i] for i in range(8)])
    torch.manual_seed(0)
    model, _ = load_for_training(tiny_config, device="cpu")
    results = []
    for flag in (False, True):
        loss = L2TTrainer.compute_loss(_bare_trainer(flag), model, dict(batch))
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        results.append((loss.detach(), grads.clone()))
        model.zero_grad(set_to_none=True)
    (full, full_grads), (kept, kept_grads) = results
    assert abs(kept.item() - full.item()) <= 1e-3 * abs(full.item())
    assert torch.allclose(kept_grads, full_grads, rtol=1e-3, atol=1e-6)


PAUSE_AT_STEP = """
import sys, time
from pathlib import Path

from transformers import TrainerCallback

import l2t.train as recipe

step, paused, release = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])


class PauseAtStep(TrainerCallback):
    # At the end of optimiser step `step` (not logged or saved yet): say so with a file, then wait for another.
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == step:
            paused.touch()
            deadline = time.time() + 300
            while not release.exists():  # the test kills the process here
                if time.time() > deadline:
                    sys.exit("paused for 300 s and neither killed nor released")
                time.sleep(0.05)


build_trainer = recipe.build_trainer


def build_trainer_that_pauses(*args, **kwargs):
    trainer = build_trainer(*args, **kwargs)
    trainer.add_callback(PauseAtStep())
    return trainer


recipe.build_trainer = build_trainer_that_pauses
sys.exit(recipe.main(sys.argv[4:]))
"""


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_tensors(expected, actual, where: str = "") -> None:
    """Nested dicts and lists of tensors and numbers (an optimiser's or scheduler's state_dict) are equal."""
    if isinstance(expected, dict):
        assert expected.keys() == actual.keys(), where
        for key in expected:
            assert_same_tensors(expected[key], actual[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), where
        for index, (a, b) in enumerate(zip(expected, actual)):
            assert_same_tensors(a, b, f"{where}[{index}]")
    elif isinstance(expected, torch.Tensor):
        assert torch.allclose(actual.double(), expected.double(), rtol=1e-4, atol=1e-9), where
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-6), where
    else:
        assert actual == expected, where


@pytest.mark.slow
def test_sigkill_then_resume_loses_nothing(tmp_path):
    """Killed at step 20 (checkpoints at 8 and 16, rows logged up to 19), --resume goes on from checkpoint-16
    with its optimiser and scheduler state and ends exactly where a run that was never killed ends."""
    common = ["--preset", "tiny", "train.max_steps=24", "train.save_steps=8", "train.logging_steps=1", "train.preview_samples=0", "train.seed=7"]
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    reference = run_cli(*common, "--output", str(straight_dir))
    assert reference.returncode == 0, reference.stderr[-3000:]

    paused, release = tmp_path / "paused-at-step-20", tmp_path / "never-released"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    pause = [sys.executable, "-W", "ignore", "-c", PAUSE_AT_STEP, "20", str(paused), str(release)]
    proc = subprocess.Popen([*pause, *common, "--output", str(killed_dir)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 180
        while not paused.exists():
            assert proc.poll() is None, f"training ended (exit {proc.returncode}) before step 20"
            assert time.time() < deadline, "training did not reach step 20"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    checkpoints = killed_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-16", "checkpoint-8"]
    logged_before_kill = runs.read_metrics(killed_dir)
    assert [r["step"] for r in logged_before_kill] == list(range(1, 20))
    resumed_from = file_bytes(checkpoints / "checkpoint-16")

    resumed = run_cli(*common, "--output", str(killed_dir), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 16 of 24" in resumed.stdout  # the step the Trainer read back from checkpoint-16
    assert file_bytes(checkpoints / "checkpoint-16") == resumed_from, "resuming changed the checkpoint it resumed from"
    after = runs.read_metrics(killed_dir)
    assert [r["step"] for r in after] == list(range(1, 25)), "missing or duplicated steps in metrics.jsonl"
    assert after[:16] == logged_before_kill[:16], "rows up to the checkpoint must be the ones logged before the kill"
    numbers = ("loss", "response_loss", "instruction_loss", "learning_rate", "grad_norm")
    for a, b in zip(runs.read_metrics(straight_dir), after, strict=True):
        expected, actual = ({key: row[key] for key in numbers if key in row} for row in (a, b))
        assert actual == pytest.approx(expected, rel=1e-4, abs=1e-7), a["step"]
    # The optimiser's moments and the schedule end where the straight run's do: they came with the checkpoint.
    for name in ("optimizer.pt", "scheduler.pt"):
        expected, actual = (torch.load(d / "checkpoints" / "checkpoint-24" / name, weights_only=True) for d in (straight_dir, killed_dir))
        assert_same_tensors(expected, actual, name)
    from safetensors.torch import load_file

    expected, actual = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (straight_dir, killed_dir))
    assert_same_tensors(expected, actual, "adapter")


def test_existing_run_folder_is_not_overwritten(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("precious: true\n")
    code = main(["--preset", "tiny", "--output", str(run_dir)])
    assert code == 1
    assert "already holds files; pass --resume" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_text() == "precious: true\n"


def test_resume_without_a_run_is_refused(tmp_path, capsys):
    assert main(["--preset", "tiny", "--output", str(tmp_path / "none"), "--resume"]) == 1
    assert "holds no run to resume" in capsys.readouterr().err


def test_cli_errors_are_one_line_not_tracebacks(capsys):
    assert main(["--preset", "nope"]) == 1
    err = capsys.readouterr().err
    assert "unknown preset 'nope'" in err and "Traceback" not in err
    assert main(["--preset", "tiny", "train.batch_size=zero"]) == 1
    assert "train.batch_size: expected int" in capsys.readouterr().err


def test_real_model_preset_needs_data(capsys):
    assert main(["--preset", "tinyllava"]) == 1
    assert "give your training data with --data" in capsys.readouterr().err


def test_samples_over_the_token_budget_are_dropped_and_counted(tmp_path, capsys):
    from l2t.train import train

    # Bundled samples are 42-110 tokens long (16 of them image tokens): 56 keeps about half.
    config = load_config("tiny", overrides=[f"output={tmp_path / 'run'}", "train.max_length=56", "train.max_steps=2", "train.preview_samples=0"])
    train(config)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["counts"]["too_long"] > 0
    assert report["ok"] == report["total"] - report["counts"]["too_long"]
    assert "exceed train.max_length=56" in capsys.readouterr().out

    strict = load_config("tiny", overrides=[f"output={tmp_path / 'strict'}", "train.max_length=56", "data.strict=true"])
    from l2t.data import DataError

    with pytest.raises(DataError, match="longer than train.max_length"):
        train(strict)


def logged_windows(run_dir: Path, step: int) -> list[dict]:
    """The Trainer's own log of each logging window (with the samples and tokens it counted), from checkpoint-`step`."""
    state = json.loads((run_dir / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [row for row in state["log_history"] if "loss" in row]


@pytest.mark.slow
def test_two_processes_with_torchrun(tmp_path):
    """Two processes of batch 8 take the steps one process of batch 16 takes: the same samples,
    the same losses (a token mean over both processes) and the same adapter."""
    from safetensors.torch import load_file

    common = ["--preset", "tiny", "train.max_steps=4", "train.logging_steps=1", "train.preview_samples=0", "train.batch_size=8"]
    torchrun = Path(sys.executable).with_name("torchrun")
    two, one = tmp_path / "two-processes", tmp_path / "one-process"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "l2t.train", *common, "--output", str(two)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(f"training {BUNDLED} samples") == 1
    reference = run_cli(*common, "train.batch_size=16", "--output", str(one))
    assert reference.returncode == 0, reference.stderr[-3000:]

    rows = runs.read_metrics(two)
    assert [r["step"] for r in rows] == [1, 2, 3, 4], "metrics must be written once, by the main process"
    numbers = ("loss", "response_loss", "instruction_loss", "learning_rate", "grad_norm")
    for expected, actual in zip(runs.read_metrics(one), rows, strict=True):
        assert {k: actual[k] for k in numbers} == pytest.approx({k: expected[k] for k in numbers}, rel=1e-4), actual["step"]
    # Each step's window counts both processes' samples (2 x 8) and tokens.
    windows, reference_windows = logged_windows(two, 4), logged_windows(one, 4)
    assert [w["samples"] for w in windows] == [16, 16, 16, 16]
    assert [w["tokens"] for w in windows] == [w["tokens"] for w in reference_windows]
    adapter, reference_adapter = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (two, one))
    assert adapter.keys() == reference_adapter.keys()
    for name, weight in adapter.items():
        assert torch.allclose(weight, reference_adapter[name], atol=1e-4), name


def test_out_of_memory_names_the_knobs_and_keeps_the_run(tmp_path, monkeypatch, capsys):
    from transformers import Trainer

    def out_of_memory(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "train", out_of_memory)
    run_dir = tmp_path / "run"
    assert main(["--preset", "tiny", "--output", str(run_dir)]) == 1
    err = capsys.readouterr().err
    for knob in ("train.max_length", "model.image_max_pixels", "train.batch_size", "train.grad_accum", "smaller preset", "--resume"):
        assert knob in err
    assert "Traceback" not in err
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"
    assert (run_dir / "config.yaml").exists()
