"""Run folders: the name of every file in one, and reading and writing them safely.

A run folder `runs/<name>/` holds everything needed to understand and reuse a
run; `evaluate`, `merge` and the UI take the folder and read the rest from it.
The training recipe writes it (`l2t.train`); this module knows where each file
lives, when a checkpoint or an adapter is complete, and what a run's status is.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from l2t.config import Config, ConfigError, config_from_dict, read_yaml
from l2t.errors import L2TError
from l2t.files import atomic_write_json, atomic_write_text, read_json
from l2t.templates import TaskTemplate, load_templates

CONFIG = "config.yaml"
TEMPLATES = "templates.json"
DATA_REPORT = "data_report.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
ADAPTER_CONFIG = f"{ADAPTER}/adapter_config.json"
"""Written last by peft: a run with it has a trained adapter."""
HELD_OUT = "held_out.json"
RELEVANCE = "relevance"
"""Folder of the l2t_relevance pass's cache: key.json and part-*.npz."""
LOSS_PLOT = "loss.png"
STATUS = "status.json"
LOG = "train.log"
LAUNCH = "launch.yaml"
"""The UI's settings for a run (the file passed to the training command with --config)."""
EVAL = "eval"
"""Folder of `python -m l2t.evaluate`'s report files:"""
EVAL_REPORT = "report.json"
EVAL_MARKDOWN = "report.md"
EVAL_PAGE = "report.html"
EVAL_CHARTS = ("metrics.png", "visual_contribution.png")
ATTENTION_CHART = "attention.png"
ATTENTION_MAP = "attention_map.png"
EVAL_LOG = "evaluate.log"
MERGED = "merged"
"""Where the UI exports the merged model."""
MERGE_LOG = "merge.log"

LAUNCH_FILES = {LAUNCH, LOG}
"""Files a launcher (the UI) writes into a run folder before the run starts."""


class RunFolderError(L2TError, ValueError):
    """A run folder that can't be used (yet); the message names what is missing."""


# ---------------------------------------------------------------- metrics and status


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


def append_metrics(run_dir: Path, row: dict) -> None:
    with open(Path(run_dir) / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def trim_metrics(run_dir: Path, step: int) -> None:
    """Drop metric rows after `step` (they will be logged again when the run resumes)."""
    rows = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    atomic_write_text(Path(run_dir) / METRICS, "".join(json.dumps(r) + "\n" for r in rows))


def read_status(run_dir: Path) -> dict:
    """status.json (state, step, total, pid, times, error), or {} where there is none yet."""
    try:
        status = read_json(Path(run_dir) / STATUS)
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def write_status(run_dir: Path, state: str, **extra) -> None:
    atomic_write_json(Path(run_dir) / STATUS, {"state": state, "pid": os.getpid(), "updated": time.time(), **extra})


def summary(run_dir: Path) -> dict:
    """What a list of runs shows of one: preset, loss mode, status, last logged losses, its own evaluation metrics."""
    run_dir = Path(run_dir)
    try:
        config = read_yaml(run_dir / CONFIG) if (run_dir / CONFIG).exists() else read_yaml(run_dir / LAUNCH)
    except (ConfigError, OSError):
        config = {}
    losses: dict = {}
    for row in read_metrics(run_dir):
        losses.update({key: row[key] for key in ("instruction_loss", "response_loss") if key in row})
    metrics: dict = {}
    try:
        report = read_json(run_dir / EVAL / EVAL_REPORT)
        own = [m for m in report.get("models", []) if m.get("run_dir") == str(run_dir.resolve())]
        metrics = own[0].get("metrics", {}) if own else {}
    except (OSError, ValueError, AttributeError):
        pass
    loss = config.get("loss") if isinstance(config.get("loss"), dict) else {}
    return {"preset": config.get("preset", ""), "loss_mode": loss.get("mode", ""), "status": read_status(run_dir), "losses": losses, "metrics": metrics}


# ---------------------------------------------------------------- checkpoints and the adapter


def checkpoint_complete(folder: Path) -> bool:
    """Whether a Trainer checkpoint was saved whole: its weights are there and trainer_state.json,
    which the Trainer writes last, parses (a kill or a full disk mid-save leaves it missing or torn)."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "global_step" in state and any(folder.glob("*.safetensors"))


def checkpoint_step(checkpoint: Path) -> int:
    return json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]


def last_checkpoint(run_dir: Path) -> tuple[Path | None, list[Path]]:
    """The newest complete checkpoint, and the newer incomplete ones passed over."""
    found = sorted(
        (p for p in (run_dir / CHECKPOINTS).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    incomplete = []
    for checkpoint in reversed(found):
        if checkpoint_complete(checkpoint):
            return checkpoint, incomplete
        incomplete.append(checkpoint)
    return None, incomplete


def is_trained(run_dir: Path) -> bool:
    """Whether the run has a finished adapter (saved whole: peft writes its config last)."""
    return (Path(run_dir) / ADAPTER_CONFIG).is_file()


def save_adapter(model, run_dir: Path, state_dict: dict | None = None) -> None:
    """adapter/ in peft format (loads with PeftModel.from_pretrained), renamed into place whole.

    `state_dict`: the model's full weights where FSDP or DeepSpeed ZeRO-3 left each
    process only a shard (gathered by every process before the main one saves).
    """
    tmp = run_dir / f".{ADAPTER}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written adapter must not outlive the failure
        raise
    final = run_dir / ADAPTER
    old = run_dir / f".{ADAPTER}.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- the folder of a new run


def holds_only_launch_files(run_dir: Path) -> bool:
    """Whether the folder exists and holds nothing a run wrote (at most what the UI wrote to start it)."""
    return run_dir.is_dir() and all(p.name in LAUNCH_FILES for p in run_dir.iterdir())


def clear_for_new_run(run_dir: Path, overwrite: bool) -> None:
    """Empty a folder that holds an earlier run (only with `overwrite`); the launcher's files stay."""
    if not run_dir.exists() or holds_only_launch_files(run_dir):
        return
    if not overwrite:
        raise RunFolderError(f"{run_dir} already holds files; pass --resume to continue that run or --overwrite to replace it")
    for path in run_dir.iterdir():
        if path.name not in LAUNCH_FILES:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def make_writable_folder(run_dir: Path) -> None:
    """Create the folder, and prove a file can be written in it before any work starts."""
    probe = run_dir / ".write-test"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise RunFolderError(f"output folder {run_dir} is not writable: {exc.strerror}") from None


# ---------------------------------------------------------------- a finished run


@dataclass
class TrainedRun:
    """What evaluate, merge and the UI read from a run with a trained adapter."""

    path: Path
    config: Config
    task_templates: list[TaskTemplate]


def open_trained_run(run_dir: str | Path) -> TrainedRun:
    """The resolved config and task templates of a run that has a trained adapter; errors name what is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} does not exist")
    config_path = run_dir / CONFIG
    if not config_path.is_file():
        raise RunFolderError(f"{run_dir} is not a run folder: it has no {CONFIG}")
    if not is_trained(run_dir):
        raise RunFolderError(
            f"{run_dir} has no adapter: the run has no trained adapter yet ({run_dir / ADAPTER_CONFIG} is missing). "
            f"Let it finish, or continue it: python -m l2t.train --output {run_dir} --resume"
        )
    try:
        config = config_from_dict(read_yaml(config_path), str(config_path))
    except ConfigError as exc:
        raise RunFolderError(f"cannot use the run's config: {exc}") from None
    templates_path = run_dir / TEMPLATES
    try:
        templates = load_templates(templates_path) if templates_path.is_file() else []
    except (ValueError, OSError) as exc:
        raise RunFolderError(f"{templates_path} can't be read: {exc}") from None
    return TrainedRun(run_dir, config, templates)
