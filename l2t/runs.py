"""Run folders: where each file of a run lives, and writes a crash can't tear.

A run folder `runs/<name>/` holds everything needed to understand and reuse a
run; `evaluate`, `merge` and the UI take the folder and read the rest from it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

CONFIG = "config.yaml"
TEMPLATES = "templates.json"
DATA_REPORT = "data_report.json"
METRICS = "metrics.jsonl"
ADAPTER = "adapter"
PROJECTOR = "projector.safetensors"
HELD_OUT = "held_out.json"
LOSS_PLOT = "loss.png"
STATUS = "status.json"
LOG = "train.log"
EVAL = "eval"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl as a list; a torn last line (a crash mid-write) is ignored."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class RunFolderError(ValueError):
    """A run folder that can't be used yet; the message names what is missing."""


def read_trained_run(run_dir: Path):
    """The resolved config of a run that has a trained adapter (for evaluate, merge and the UI)."""
    from l2t.config import ConfigError, config_from_dict, read_yaml  # config imports this module

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} does not exist")
    config_path = run_dir / CONFIG
    if not config_path.is_file():
        raise RunFolderError(f"{run_dir} is not a run folder: it has no {CONFIG}")
    adapter = run_dir / ADAPTER
    if not (adapter / "adapter_config.json").is_file():
        raise RunFolderError(
            f"{run_dir} has no adapter: the run has no trained adapter yet ({adapter}/adapter_config.json is missing). "
            f"Let it finish, or continue it: python -m l2t.train --output {run_dir} --resume"
        )
    try:
        return config_from_dict(read_yaml(config_path), str(config_path))
    except ConfigError as exc:
        raise RunFolderError(f"cannot use the run's config: {exc}") from None
