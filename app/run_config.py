"""From the Train tab's widgets to a run: config overrides, the equivalent command, the launch.

The widgets start at the chosen preset's values (`load_config(preset)`); a run
is the preset plus the `key=value` overrides for what the user changed, in the
CLI's own syntax. The same override strings are shown as the equivalent
command, validated by `load_config` before anything starts, and written as the
run's `launch.yaml` (the file passed with `--config`).
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from app.datasets import DataSelection, data_overrides, template_overrides
from app.jobs import Job, JobManager, module_command
from l2t import runs
from l2t.config import Config, ConfigError, field_docs, load_config, merge, parse_override, validate
from l2t.files import atomic_write_text


@dataclass(frozen=True)
class Setting:
    key: str
    """Dotted config key, as on the command line."""
    label: str
    minimum: float
    maximum: float
    integer: bool
    step: float | None = None


# The bounds are the UI's sanity limits for a single-GPU run; the values come from the preset.
SETTINGS = (
    Setting("loss.instruction_weight", "Instruction weight", 0, 10, False, 0.05),
    Setting("loss.response_weight", "Response weight", 0, 10, False, 0.05),
    Setting("lora.r", "LoRA rank r", 1, 1024, True),
    Setting("lora.alpha", "LoRA alpha", 1, 4096, True),
    Setting("train.learning_rate", "Learning rate", 1e-8, 1.0, False, 1e-5),
    Setting("train.epochs", "Epochs", 0, 1000, False, 0.5),
    Setting("train.max_steps", "Max steps (0: use epochs)", 0, 10_000_000, True),
    Setting("train.batch_size", "Batch size", 1, 1024, True),
    Setting("train.grad_accum", "Gradient accumulation", 1, 4096, True),
    Setting("train.max_length", "Max length (tokens)", 8, 131_072, True),
    Setting("model.image_max_pixels", "Image size cap (0: the processor's own)", 0, 100_000_000, True),
)
SETTING_KEYS = tuple(s.key for s in SETTINGS)


def value_of(config: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def help_of(config: Config, key: str) -> str:
    section, name = key.split(".")
    return field_docs(type(getattr(config, section))).get(name, "")


def loss_mode(l2t_on: bool, drop_task_templates: bool, preset_mode: str) -> str:
    if not l2t_on:
        return "response"
    if drop_task_templates:
        return "l2t"
    return "l2t_full" if preset_mode == "l2t_full" else "l2t_keep_task_templates"


def toggles_of(mode: str) -> tuple[bool, bool]:
    """(L2T on, task templates kept out) for a loss mode."""
    return mode != "response", mode == "l2t"


def _format(value) -> str:
    return json.dumps(value) if isinstance(value, (str, list)) else repr(value)


def settings_overrides(preset: str, l2t_on: bool, drop_task_templates: bool, values: dict, extra: str = "") -> list[str]:
    """`key=value` strings for every widget that differs from the preset, then the extra lines."""
    base = load_config(preset)
    overrides = []
    mode = loss_mode(l2t_on, drop_task_templates, base.loss.mode)
    if mode != base.loss.mode:
        overrides.append(f"loss.mode={mode}")
    for setting in SETTINGS:
        value = values.get(setting.key)
        if value is None:
            raise ConfigError(f"{setting.key}: no value given ({setting.label})")
        value = int(value) if setting.integer else float(value)
        if value != value_of(base, setting.key):
            overrides.append(f"{setting.key}={_format(value)}")
    for line in extra.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key = line.split("=", 1)[0].strip()
            if key in ("output", "preset"):
                raise ConfigError(f"'{line}': set the run name and the preset with their own fields")
            parse_override(line)  # a malformed line is an error that names it
            overrides.append(line)
    return overrides


def run_overrides(preset: str, selection: DataSelection, settings: list[str]) -> list[str]:
    """Everything a run changes from the preset: its data, template edits and settings."""
    return data_overrides(selection, preset, for_training=True) + template_overrides(selection) + settings


def _shown(path: str | Path) -> str:
    """A path as the command shows it: relative to the working folder when inside it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def command_line(preset: str, selection: DataSelection | None, settings: list[str], output: Path) -> str:
    """The `python -m l2t.train ...` command that does what the Start button does."""

    def q(value) -> str:
        return shlex.quote(_shown(value) if isinstance(value, Path) else value)

    chunks = ["python -m l2t.train", f"--preset {q(preset)}"]
    if selection is not None:
        if data_overrides(selection, preset, for_training=True):
            chunks.append(f"--data {q(Path(selection.path))}")
            if selection.images:
                chunks.append(f"--images {q(Path(selection.images))}")
        settings = template_overrides(selection) + settings
    chunks.append(f"--output {q(Path(output))}")
    chunks += [q(text) for text in settings]
    return " \\\n    ".join(chunks)


MIN_SAMPLES_FOR_HELD_OUT = 50
"""A run started from the UI on data this big holds out the schema's default train.eval_fraction when its preset
holds out nothing, so the Compare tab has samples the model never saw."""


def held_out_overrides(samples: int, held_out: int) -> list[str]:
    """train.eval_fraction for a UI run whose preset would hold out nothing from `samples` training samples."""
    if held_out or samples < MIN_SAMPLES_FOR_HELD_OUT:
        return []
    return [f"train.eval_fraction={Config().train.eval_fraction}"]


def default_run_name(preset: str, mode: str) -> str:
    return f"{preset}-{mode}-{time.strftime('%m%d-%H%M%S')}"


def _nested(overrides: list[str]) -> dict:
    values: dict = {}
    for text in overrides:
        for key, value in parse_override(text).items():
            if isinstance(value, dict):
                values.setdefault(key, {}).update(value)
            else:
                values[key] = value
    return values


def settings_yaml(preset: str, overrides: list[str]) -> str:
    """The preset and the overrides as a YAML file for --config (what launch.yaml holds, and what "Save settings" writes)."""
    return yaml.safe_dump({"preset": preset, **_nested(overrides)}, sort_keys=False, allow_unicode=True)


@dataclass
class Form:
    """The Train tab's fields, as read from a settings file."""

    preset: str
    l2t_on: bool
    drop_templates: bool
    values: list
    """One per SETTING_KEYS."""
    extra: str
    """key=value lines for the keys without a field of their own."""
    left_out: list[str]
    """data.* and templates.* keys: the Data tab sets them."""


FROM_THE_DATA_TAB = ("data", "templates")


def form_from_yaml(text: str, source: str) -> Form:
    """The Train tab's fields for a settings file in the --config format (launch.yaml, a saved file)."""
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected sections like 'train:' and 'loss:', got {type(values).__name__}")
    preset = values.get("preset") or Config().preset
    config = load_config(preset)
    preset_mode = config.loss.mode
    config = merge(config, {k: v for k, v in values.items() if k not in ("preset", "output")}, source)
    validate(config)
    l2t_on, drop_templates = toggles_of(config.loss.mode)
    extra, left_out = [], []
    for section, entries in values.items():
        if section in ("preset", "output") or not isinstance(entries, dict):
            continue
        for key, value in entries.items():
            dotted = f"{section}.{key}"
            if section in FROM_THE_DATA_TAB:
                left_out.append(dotted)
            elif dotted not in SETTING_KEYS and not (dotted == "loss.mode" and loss_mode(l2t_on, drop_templates, preset_mode) == value):
                extra.append(f"{dotted}={_format(value)}")
    return Form(preset, l2t_on, drop_templates, [value_of(config, key) for key in SETTING_KEYS], "\n".join(extra), left_out)


def write_launch_config(run_dir: Path, preset: str, overrides: list[str], command: str) -> Path:
    header = "# L2T Studio settings for this run (the file passed with --config). Equivalent command:\n"
    header += "".join(f"#   {line}\n" for line in command.splitlines())
    text = header + settings_yaml(preset, overrides)
    path = run_dir / runs.LAUNCH
    atomic_write_text(path, text)
    return path


def start_training(jobs: JobManager, run_dir: Path, preset: str, overrides: list[str], command: str) -> Job:
    """Validate, write launch.yaml and start `python -m l2t.train` on a new run folder."""
    jobs.check_free("train")
    if run_dir.exists():
        raise ConfigError(f"a run named '{run_dir.name}' already exists in {run_dir.parent}: pick another name, or Resume it")
    load_config(preset, overrides=[*overrides, f"output={json.dumps(str(run_dir))}"])  # every error before anything starts
    run_dir.mkdir(parents=True)
    write_launch_config(run_dir, preset, overrides, command)
    try:
        return jobs.start("train", _train_command(preset, run_dir), run_dir, run_dir / runs.LOG)
    except Exception:
        for path in (run_dir / runs.LAUNCH, run_dir / runs.LOG):
            path.unlink(missing_ok=True)
        run_dir.rmdir()
        raise


def resume_training(jobs: JobManager, run_dir: Path) -> Job:
    """Relaunch a run from its last checkpoint, with the settings it was started with."""
    launch = run_dir / runs.LAUNCH
    if not launch.exists():
        raise ConfigError(f"{run_dir.name} was not started from this UI (no {runs.LAUNCH}); resume it with python -m l2t.train --resume")
    preset = (yaml.safe_load(launch.read_text(encoding="utf-8")) or {}).get("preset")
    if not isinstance(preset, str):
        raise ConfigError(f"{launch}: no preset named")
    return jobs.start("train", _train_command(preset, run_dir, "--resume"), run_dir, run_dir / runs.LOG)


def _train_command(preset: str, run_dir: Path, *extra: str) -> list[str]:
    return module_command("l2t.train", "--preset", preset, "--config", str(run_dir / runs.LAUNCH), "--output", str(run_dir), *extra)
