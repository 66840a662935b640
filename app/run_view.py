"""What a run folder says about a training: its state, progress, losses and log.

Read, never written: status.json and metrics.jsonl come from the training
recipe, train.log from the job's output, and the job (if this server started
it) adds whether the process still runs and how it exited.
"""

from __future__ import annotations

import html
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from app.jobs import Job, pid_alive
from l2t import runs

LOG_TAIL_LINES = 15
LOSS_SERIES = {"instruction_loss": "instruction loss", "response_loss": "response loss"}


@dataclass
class TrainState:
    state: str
    """none, preparing, running, stopping, finished, stopped, failed or interrupted."""
    run: str = ""
    step: int = 0
    total: int = 0
    eta_s: float | None = None
    elapsed_s: float | None = None
    error: str = ""
    trained: int | None = None
    """Samples trained on, and skipped (bad, too long, nothing to learn): known once finished."""
    skipped: int = 0
    checkpoint: bool = True
    """Whether a checkpoint was saved (Resume continues from it) or not (Resume starts over)."""


def log_tail(path: Path, lines: int = LOG_TAIL_LINES, max_bytes: int = 64_000) -> str:
    """The last lines of a log, with progress-bar redraws (carriage returns) collapsed."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    shown = []
    for line in text.split("\n"):  # not splitlines(): it also splits at the \r of progress-bar redraws
        redraws = [part for part in line.split("\r") if part.strip()]
        if redraws:
            shown.append(redraws[-1])
    return "\n".join(shown[-lines:])


_TRACEBACK_END = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*")


def error_in_log(text: str) -> str:
    """The line that says why a process failed: an `error:` line, else a traceback's last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            start = lines.index(line)
            return "\n".join(lines[start : start + 8])[len("error:") :].strip()
    for line in reversed(lines):
        if _TRACEBACK_END.match(line):
            return line
    return lines[-1] if lines else "the process ended without output"


def train_state(job: Job | None, run_dir: Path | None) -> TrainState:
    """The state of the run a Train tab shows: the server's job, else what its folder says."""
    if run_dir is None:
        return TrainState("none")
    status = runs.read_status(run_dir)
    result = TrainState(
        status.get("state", "none"), run_dir.name, int(status.get("step", 0)), int(status.get("total", 0)), status.get("eta_s")
    )
    if "trained" in status:
        result.trained, result.skipped = int(status["trained"]), int(status.get("skipped", 0))
    result.checkpoint = runs.last_checkpoint(run_dir)[0] is not None
    if "started" in status:
        result.elapsed_s = float(status.get("updated", time.time())) - float(status["started"])
    this_attempt = job is not None and float(status.get("updated", 0)) >= job.started - 1.0
    if job is not None and job.running:
        result.elapsed_s = time.time() - job.started
        if job.stop_requested:
            result.state = "stopping"
        elif not (this_attempt and result.state == "running"):
            result.state = "preparing"
        return result
    if job is not None and job.returncode not in (0, None) and not (this_attempt and result.state in ("finished", "stopped")):
        if job.stop_requested:
            result.state = "stopped"
            return result
        result.state = "failed"
        if job.returncode < 0:  # ended by a signal: its log stops mid-way and says nothing about why
            name = signal.Signals(-job.returncode).name if -job.returncode in signal.Signals._value2member_map_ else str(-job.returncode)
            result.error = f"the training process was killed ({name}): out of host memory, or ended from outside. Press Resume to continue from the last checkpoint."
        else:
            result.error = status.get("error") if this_attempt and status.get("error") else error_in_log(log_tail(run_dir / runs.LOG, 200))
        return result
    if result.state == "running" and not pid_alive(int(status.get("pid", 0) or 0)):
        result.state = "interrupted"
    return result


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


STATE_TEXT = {
    "none": ("idle", "No training yet. Load data, pick a preset and press Start."),
    "preparing": ("info", "Checking the data and loading the model…"),
    "running": ("info", "Training."),
    "stopping": ("warn", "Stopping: a checkpoint is saved at the end of this step."),
    "finished": ("ok", "Finished. Compare the base and tuned model in the Compare tab, or export it."),
    "stopped": ("warn", "Stopped. Press Resume to continue from the last checkpoint."),
    "stopped-early": ("warn", "Stopped before the first checkpoint was saved. Resume starts the run from the beginning."),
    "failed": ("error", "Failed. The run folder is kept: fix the cause, then press Resume (or start a new run)."),
    "interrupted": ("warn", "The training process is gone without finishing (the server or machine restarted?). Press Resume to continue."),
}


def status_html(state: TrainState) -> str:
    early = state.state == "stopped" and not state.checkpoint
    kind, text = STATE_TEXT.get("stopped-early" if early else state.state, ("info", state.state))
    percent = 100.0 * state.step / state.total if state.total else 0.0
    if state.state == "finished":
        percent = 100.0
    name = f'<span class="run-name">{html.escape(state.run)}</span>' if state.run else ""
    steps = f"step <b>{state.step}</b> / {state.total or '?'}" if state.state != "none" else ""
    facts = [steps, f"elapsed {_duration(state.elapsed_s)}" if state.elapsed_s is not None else ""]
    if state.trained is not None:
        facts.append(f"trained on <b>{state.trained}</b> samples, {state.skipped} skipped")
    if state.state == "running" and state.eta_s is not None:
        facts.append(f"about {_duration(state.eta_s)} left")
    error = f'<pre class="run-error">{html.escape(state.error)}</pre>' if state.error else ""
    return (
        f'<div class="run-status run-{kind}" data-state="{state.state}">'
        f'<div class="run-head"><span class="run-pill">{state.state}</span>{name}</div>'
        f'<div class="run-bar"><div style="width:{percent:.1f}%"></div></div>'
        f'<div class="run-facts">{" · ".join(f for f in facts if f)}</div>'
        f'<div class="run-text">{html.escape(text)}</div>{error}</div>'
    )


def loss_frame(run_dir: Path | None) -> pd.DataFrame | None:
    """Instruction and response loss per logged step, long format for a line plot (None before the first)."""
    rows = []
    for row in runs.read_metrics(run_dir) if run_dir is not None else []:
        for key, label in LOSS_SERIES.items():
            if key in row:
                rows.append({"step": row["step"], "loss": row[key], "series": label})
    if not rows:
        return None  # an empty frame would fix the plot's axes and colours before the first point arrives
    return pd.DataFrame(rows, columns=["step", "loss", "series"])
