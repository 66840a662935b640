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


@pytest.mark.slow
def test_sigkill_then_resume_loses_nothing(tmp_path):
    common = ["--preset", "tiny", "train.max_steps=24", "train.save_steps=8", "train.logging_steps=1", "train.preview_samples=0", "train.seed=7"]
    reference = run_cli(*common, "--output", str(tmp_path / "straight"))
    assert reference.returncode == 0, reference.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-W", "ignore", "-m", "l2t.train", *common, "--output", str(killed_dir)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 180
    while time.time() < deadline and not (killed_dir / "checkpoints" / "checkpoint-16" / "trainer_state.json").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed_dir / "checkpoints" / "checkpoint-8").exists()
    assert not (killed_dir / "adapter").exists(), "the run finished before it was killed; the test proves nothing"

    resumed = run_cli(*common, "--output", str(killed_dir), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = runs.read_metrics(tmp_path / "straight")
    after = runs.read_metrics(killed_dir)
    assert [r["step"] for r in after] == list(range(1, 25)), "missing or duplicated steps in metrics.jsonl"
    for a, b in zip(straight, after):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a["step"], a["loss"], b["loss"])
    assert (killed_dir / "adapter" / "adapter_model.safetensors").exists()


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


@pytest.mark.slow
def test_two_processes_with_torchrun(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "l2t.train", "--preset", "tiny", "--output", str(out),
                             "train.max_steps=6", "train.logging_steps=2", "train.preview_samples=0"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = runs.read_metrics(out)
    assert [r["step"] for r in rows] == [2, 4, 6], "metrics must be written once, by the main process"
    # Both ranks fed the step: 2 processes x batch 8 x 2 steps per logging window.
    assert rows[0]["samples_per_s"] > 0 and all(json.dumps(r) for r in rows)
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert result.stdout.count(f"training {BUNDLED} samples") == 1


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
