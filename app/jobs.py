"""The subprocesses the UI starts: training, batch evaluation and merging.

The UI never trains, evaluates in batch or merges inside a Gradio callback: it
starts `python -m l2t.train|evaluate|merge` with its output going to a log file
and reads the run folder. The jobs live here, in the server process, not in a
browser session, so a reload or a second browser sees the same job. There is
at most one job of each kind at a time, server-wide (they compete for the same
GPU memory); a second start is refused with `JobBusy`.

Jobs run in their own session (process group): a stop is a SIGTERM to the
job alone, which the training recipe turns into "save a checkpoint, then
stop". A training job survives a restart of the UI: the next server adopts it
from the run folder's status.json.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from l2t import runs

log = logging.getLogger("app.jobs")

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class JobBusy(Exception):
    """A job of this kind is already running."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Job:
    kind: str
    """train, evaluate or merge."""
    run_dir: Path
    command: list[str]
    log_path: Path
    pid: int
    started: float = field(default_factory=time.time)
    process: subprocess.Popen | None = None
    """None for a job adopted from an earlier server (no exit code then)."""
    stop_requested: bool = False
    returncode: int | None = None

    def poll(self) -> int | None:
        """The exit code, or None while the job runs."""
        if self.returncode is None:
            if self.process is not None:
                self.returncode = self.process.poll()
            elif not pid_alive(self.pid):
                self.returncode = 0  # adopted: how it ended is in status.json
        return self.returncode

    @property
    def running(self) -> bool:
        return self.poll() is None

    def stop(self) -> bool:
        """Ask the job to stop (SIGTERM); False if it had already ended."""
        if not self.running:
            return False
        self.stop_requested = True
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        return True

    def wait(self, timeout: float) -> int | None:
        deadline = time.time() + timeout
        while self.running and time.time() < deadline:
            time.sleep(0.2)
        return self.poll()


def module_command(module: str, *args: str) -> list[str]:
    """`python -m module args...` with this server's interpreter."""
    return [sys.executable, "-m", module, *args]


class JobManager:
    def __init__(self):
        self._lock = threading.RLock()
        self._jobs: dict[str, Job] = {}

    def get(self, kind: str) -> Job | None:
        with self._lock:
            return self._jobs.get(kind)

    def running(self, kind: str) -> Job | None:
        job = self.get(kind)
        return job if job is not None and job.running else None

    def check_free(self, kind: str) -> None:
        """JobBusy, naming the running job, if a job of this kind runs."""
        current = self.running(kind)
        if current is not None:
            started = time.strftime("%H:%M:%S", time.localtime(current.started))
            raise JobBusy(
                f"A {kind} job is already running ({current.run_dir.name}, started {started}). "
                "Only one runs at a time: wait for it to finish or stop it first."
            )

    def start(self, kind: str, command: list[str], run_dir: Path, log_path: Path) -> Job:
        """Start `command` with stdout and stderr appended to log_path; JobBusy if one of this kind runs."""
        with self._lock:
            current = self._jobs.get(kind)
            if current is not None and current.running:
                self.check_free(kind)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            env = dict(os.environ)
            env["PYTHONUNBUFFERED"] = "1"
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
            with open(log_path, "ab") as log_file:
                log_file.write(f"$ {' '.join(command)}\n".encode())
                log_file.flush()
                process = subprocess.Popen(
                    command,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=PROJECT_ROOT,
                    env=env,
                    start_new_session=True,
                )
            job = Job(kind, run_dir, command, log_path, process.pid, process=process)
            self._jobs[kind] = job
            log.info("started %s job pid %d: %s", kind, process.pid, " ".join(command))
            return job

    def adopt_training(self, runs_dir: Path) -> Job | None:
        """Re-attach to a training that an earlier server started and that still runs."""
        if not runs_dir.is_dir():
            return None
        for status_path in runs_dir.glob(f"*/{runs.STATUS}"):
            status = runs.read_status(status_path.parent)
            pid = status.get("pid")
            if status.get("state") == "running" and isinstance(pid, int) and pid_alive(pid) and _is_training(pid):
                run_dir = status_path.parent
                job = Job("train", run_dir, [], run_dir / runs.LOG, pid, started=float(status.get("started", time.time())))
                with self._lock:
                    self._jobs["train"] = job
                log.info("re-attached to the training of %s (pid %d)", run_dir, pid)
                return job
        return None

    def stop_all(self, timeout: float = 30.0) -> None:
        """Stop every running job and wait for them (used at shutdown and by tests)."""
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.stop()
        for job in jobs:
            if job.wait(timeout) is None and job.process is not None:
                job.process.kill()


def _is_training(pid: int) -> bool:
    """Whether pid is a `python -m l2t.train` process (a pid in an old status.json may be reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc (macOS): trust status.json
    return b"l2t.train" in cmdline
