"""Every command the README shows is checked here, so the README can't drift from the code.

Cheap commands run as written; training commands are parsed and validated (the
runs themselves are covered by test_train.py and by CI's `make demo`);
evaluate and merge run against a real tiny run.
"""

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")


def readme_commands() -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


COMMANDS = readme_commands()


def test_the_readme_starts_with_the_two_setup_commands():
    assert COMMANDS[:2] == ["make demo", "make test"]
    demo = subprocess.run(["make", "-n", "-B", "demo"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "-m l2t.train --preset tiny" in demo and "pip install" in demo
    test = subprocess.run(["make", "-n", "-B", "test"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "-m pytest" in test
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci and "make demo" in ci


def test_every_readme_command_is_known():
    known = ("make ", "python -m l2t.", "python -m app", "torchrun ", "accelerate launch --config_file ")
    unknown = [c for c in COMMANDS if not c.startswith(known)]
    assert not unknown, f"README commands this test does not check: {unknown}"


@pytest.mark.parametrize("command", [c for c in COMMANDS if "l2t.train" in c])
def test_training_commands_parse_and_validate(command):
    from l2t.train import parse_args

    argv = shlex.split(command)
    config, _ = parse_args(argv[argv.index("l2t.train") + 1 :])
    assert config.preset in {p.stem for p in (REPO / "presets").glob("*.yaml")}


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("accelerate launch")])
def test_accelerate_commands_name_a_shipped_config(command):
    """The launch itself needs GPUs; its config is read by accelerate's launcher in test_accelerate_configs.py."""
    argv = shlex.split(command)
    config = REPO / argv[argv.index("--config_file") + 1]
    assert config.is_file() and config.parent == REPO / "configs" / "accelerate"
    assert argv[argv.index("--config_file") + 2 :][:2] == ["-m", "l2t.train"]


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python -m app")])
def test_ui_commands_parse(command):
    from app.__main__ import parse_args

    args = parse_args(shlex.split(command)[3:])
    assert args.host == "127.0.0.1"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith(("python -m l2t.data", "python -m l2t.synthetic", "python -m l2t.relevance"))])
def test_data_commands_run_as_written(command, tmp_path, monkeypatch, capsys):
    import importlib

    argv = shlex.split(command)
    module = importlib.import_module(argv[2])
    args = [str(REPO / a) if a.startswith("l2t/assets") else a for a in argv[3:]]
    monkeypatch.chdir(tmp_path)  # commands that write do so here
    if any(a.startswith("data/shapes") for a in args):
        write_shapes_datasets(tmp_path / "data")
    assert module.main(args) in (0, None)
    assert capsys.readouterr().out.strip()


def write_shapes_datasets(folder: Path, count: int = 20) -> None:
    """The README's datasets: bundled samples with embedded images, saved with save_to_disk and as two parquet files."""
    import json

    import datasets

    shapes = REPO / "l2t" / "assets" / "shapes"
    records = json.loads((shapes / "train.json").read_text())[:count]
    dataset = datasets.Dataset.from_dict(
        {"conversations": [r["conversations"] for r in records], "image": [(shapes / r["image"]).read_bytes() for r in records]},
        features=datasets.Features({"conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}), "image": datasets.Image()}),
    )
    dataset.save_to_disk(str(folder / "shapes_hf"))
    for part in range(2):
        dataset.shard(2, part).to_parquet(str(folder / f"shapes-{part}.parquet"))


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith(("python -m l2t.evaluate", "python -m l2t.merge"))])
def test_evaluate_and_merge_commands_run(command, trained_run, response_run, tmp_path):
    """Each run folder the command names is a different trained run (copied here, so what the command writes stays here);
    each run's answers in the report are the ones its own end-of-training evaluation gave."""
    import importlib

    trained = {"runs/tiny-l2t": trained_run, "runs/tiny-response": response_run}
    argv = shlex.split(command)
    named = [a for a in argv if a.startswith("runs/")]
    for name in named:
        shutil.copytree(trained[name], tmp_path / name, ignore=shutil.ignore_patterns("checkpoints"))
    args = [str(tmp_path / a) if a.startswith(("runs/", "merged/")) else a for a in argv[3:]]
    assert importlib.import_module(argv[2]).main(args) == 0
    if argv[2] == "l2t.merge":
        assert (tmp_path / "merged" / "tiny-l2t" / "config.json").exists()
        return
    report = json.loads((tmp_path / named[0] / "eval" / "report.json").read_text())
    labels = [Path(name).name for name in named]
    assert [m["name"] for m in report["models"]] == ["base", *labels]
    assert [m["loss_mode"] for m in report["models"]] == [None, *(yaml.safe_load((trained[n] / "config.yaml").read_text())["loss"]["mode"] for n in named)]
    for label, name in zip(labels, named, strict=True):
        own = json.loads((trained[name] / "eval" / "report.json").read_text())
        assert [s["answers"][label] for s in report["samples"]] == [s["answers"][label] for s in own["samples"]], label
    if len(labels) > 1:
        assert any(len({s["answers"][label] for label in labels}) > 1 for s in report["samples"]), "the runs must answer differently"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python -m l2t.tiny")])
def test_tiny_commands_run(command, tmp_path, monkeypatch, capsys):
    """As written, but pretraining shrunk to a few steps (the full recipe takes minutes; test_tiny checks what it built)."""
    from l2t import tiny

    for name, value in (("TRAIN_SCENES", 64), ("STAGE1_STEPS", 2), ("STAGE2_STEPS", 2), ("CHECK_SCENES", 8)):
        monkeypatch.setattr(tiny, name, value)
    args = [str(tmp_path / "out") if a.startswith("/tmp/") else a for a in shlex.split(command)[3:]]
    assert tiny.main(args) == 0
    assert capsys.readouterr().out.strip()
    if "pretrain" in args:
        assert (tmp_path / "out" / "base" / "pretrain_report.json").is_file() and (tmp_path / "out" / "stage1" / "model.safetensors").is_file()
