"""Every command the README shows is checked here, so the README can't drift from the code.

Cheap commands run as written; training commands are parsed and validated (the
runs themselves are covered by test_train.py and by CI's `make demo`);
evaluate and merge run against a real tiny run.
"""

import re
import shlex
import subprocess
from pathlib import Path

import pytest

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
    known = ("make ", "python -m l2t.", "python -m app", "torchrun ")
    unknown = [c for c in COMMANDS if not c.startswith(known)]
    assert not unknown, f"README commands this test does not check: {unknown}"


@pytest.mark.parametrize("command", [c for c in COMMANDS if "l2t.train" in c])
def test_training_commands_parse_and_validate(command):
    from l2t.train import parse_args

    argv = shlex.split(command)
    config, _ = parse_args(argv[argv.index("l2t.train") + 1 :])
    assert config.preset in {p.stem for p in (REPO / "presets").glob("*.yaml")}


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
def test_evaluate_and_merge_commands_run(command, trained_run, tmp_path):
    import importlib

    argv = shlex.split(command)
    module = importlib.import_module(argv[2])
    args = [str(trained_run) if a.startswith("runs/") else str(tmp_path / a) if a.startswith("merged/") else a for a in argv[3:]]
    assert module.main(args) == 0


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
