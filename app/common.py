"""What every tab shares: the server's folders and jobs, run lookup, and error handling.

Callbacks never let an exception reach the page as a stack trace: errors the
user can act on (a bad config value, a bad data file, a missing model) become
a `gr.Error` with the library's own message; anything else is logged with its
traceback and the page says where to look.
"""

from __future__ import annotations

import functools
import html
import inspect
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from app.jobs import Job, JobBusy, JobManager
from app.run_view import error_in_log, log_tail
from l2t import runs
from l2t.errors import L2TError

log = logging.getLogger("app")

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
USER_ERRORS = (L2TError, JobBusy)
JOB_POLL_SECONDS = 1.0


@dataclass
class AppContext:
    """Server-wide settings and state, shared by every browser session."""

    runs_dir: Path
    uploads_dir: Path
    jobs: JobManager
    allow_server_paths: bool = True
    """Whether the Data tab may read paths on the server (off for an unauthenticated --share link)."""
    data_roots: tuple[Path, ...] = ()
    """The folders server paths may lie in (the working folder and each --data-root)."""


def run_dir(context: AppContext, name: str | None) -> Path:
    """The folder of run `name` inside the runs folder, refusing names that could leave it."""
    if not name or not RUN_NAME.match(name):
        raise gr.Error(f"'{name or ''}' is not a run name: use letters, digits, '.', '_' or '-'.")
    return context.runs_dir / name


def list_runs(context: AppContext, with_adapter: bool = False) -> list[str]:
    """Run folders, newest first; with_adapter: only those that finished saving an adapter."""
    if not context.runs_dir.is_dir():
        return []
    found = [p for p in context.runs_dir.iterdir() if p.is_dir() and RUN_NAME.match(p.name) and (p / runs.CONFIG).exists()]
    if with_adapter:
        found = [p for p in found if runs.is_trained(p)]
    return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]


def run_choices(context: AppContext, current: str | None = None, with_adapter: bool = True) -> dict:
    """A gr.update for a run dropdown: fresh choices, keeping the current pick if it still exists."""
    names = list_runs(context, with_adapter=with_adapter)
    return gr.update(choices=names, value=current if current in names else (names[0] if names else None))


def _as_gradio_error(name: str, exc: Exception) -> gr.Error:
    if isinstance(exc, USER_ERRORS):
        log.info("%s: %s", name, exc)
        return gr.Error(html.escape(str(exc)), print_exception=False)  # the toast renders HTML: keep "<image>" visible
    log.exception("%s failed", name)
    return gr.Error(f"Something went wrong in '{name}' ({type(exc).__name__}). The details are in the server log.", print_exception=False)


def _one_line(name: str, exc: gr.Error) -> gr.Error:
    """A message for the user (no file chosen, nothing to stop): one log line, no traceback on the server's stderr."""
    log.info("%s: %s", name, exc.message)
    exc.print_exception = False
    return exc


def guarded(fn):
    """Turn any exception of a callback into a clean message on the page (details to the log)."""
    name = fn.__name__.replace("_", " ")
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error as exc:
                raise _one_line(name, exc) from None
            except Exception as exc:
                raise _as_gradio_error(name, exc) from None

        return generator

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error as exc:
            raise _one_line(name, exc) from None
        except Exception as exc:
            raise _as_gradio_error(name, exc) from None

    return wrapper


def notice(text: str, kind: str = "info", title: str = "") -> str:
    """A status box for an HTML output (kinds: info, ok, warn, error); text is escaped."""
    head = f"<b>{html.escape(title)}</b> " if title else ""
    body = html.escape(text).replace("\n", "<br>")
    return f'<div class="l2t-notice l2t-{kind}">{head}{body}</div>'


def run_picker(elem_id: str) -> tuple[gr.Dropdown, gr.Button]:
    """The run dropdown and its refresh button that head the Compare and Export tabs."""
    with gr.Row():
        run = gr.Dropdown(label="Run", choices=[], scale=4, allow_custom_value=True, elem_id=elem_id)
        refresh = gr.Button("↻ Refresh runs", scale=1)
    return run, refresh


def follow_job(
    job: Job,
    progress: Callable[[float, str], str],
    failed_title: str,
    finished: Callable[[], tuple[str, object]],
    failed_result: object = None,
) -> Iterator[tuple[str, str, object]]:
    """A subprocess job followed on the page, as (status HTML, log tail, result) updates.

    Every second while it runs: `progress(seconds, log tail)` as the status, the result unchanged.
    When it ends: the error its log names and `failed_result`, or what `finished()` returns.
    """
    while job.running:
        tail = log_tail(job.log_path)
        yield notice(progress(time.time() - job.started, tail), "info"), tail, gr.update()
        time.sleep(JOB_POLL_SECONDS)
    tail = log_tail(job.log_path)
    if job.returncode != 0:
        yield notice(error_in_log(tail), "error", failed_title), tail, failed_result
        return
    status, result = finished()
    yield status, tail, result
