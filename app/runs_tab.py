"""The Runs tab: every run folder with its status, preset, loss mode, steps, last losses and
evaluation numbers (`l2t.runs.summary`), and what to do with them: open one in Compare, A/B
several there, or delete one (after a tick, and never one that a job is using)."""

from __future__ import annotations

import logging
import shutil
import time
from types import SimpleNamespace

import gradio as gr

from app import run_view
from app.common import AppContext, guarded, list_runs, notice, run_dir
from app.jobs import pid_alive
from l2t import runs
from l2t.report import table_value

log = logging.getLogger("app.runs")

COLUMNS = ["run", "status", "preset", "loss mode", "steps", "instruction loss", "response loss", "exact match", "VC per token", "updated"]


def _number(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "–"


def run_row(context: AppContext, name: str) -> list:
    folder = context.runs_dir / name
    found = runs.summary(folder)
    job = context.jobs.get("train")
    state = run_view.train_state(job if job is not None and job.run_dir == folder else None, folder)
    status = found["status"]
    steps = f"{state.step} / {state.total}" if state.total else "–"
    updated = time.strftime("%Y-%m-%d %H:%M", time.localtime(status["updated"])) if "updated" in status else "–"
    metrics, losses = found["metrics"], found["losses"]
    return [
        name, state.state if status else "not started", found["preset"], found["loss_mode"] or "(preset's)", steps,
        _number(losses.get("instruction_loss")), _number(losses.get("response_loss")),
        _number(table_value(metrics, "questions", "exact_match")), _number(table_value(metrics, "visual_contribution", "mean_per_token")),
        updated,
    ]  # fmt: skip


@guarded
def runs_table(context: AppContext, chosen: list[str] | None):
    """(the table, the run picker with fresh choices)."""
    names = list_runs(context)
    rows = [run_row(context, name) for name in names]
    kept = [name for name in (chosen or []) if name in names]
    return {"headers": COLUMNS, "data": rows}, gr.update(choices=names, value=kept)


def in_use(context: AppContext, name: str) -> str:
    """Why run `name` can't be deleted now ("" when it can)."""
    folder = run_dir(context, name)
    for kind in ("train", "evaluate", "merge"):
        job = context.jobs.running(kind)
        if job is not None and job.run_dir.resolve() == folder.resolve():
            return f"a {kind} job is running on it"
    status = runs.read_status(folder)
    if status.get("state") == "running" and pid_alive(int(status.get("pid", 0) or 0)):
        return f"its training (pid {status['pid']}) is still running"
    return ""


@guarded
def delete_runs(context: AppContext, chosen: list[str] | None, sure: bool):
    if not chosen:
        raise gr.Error("Pick the run(s) to delete first.")
    if not sure:
        raise gr.Error(f"Tick “Yes, delete” to delete {', '.join(chosen)} and everything in it: checkpoints, adapter, exports.")
    busy = {name: why for name in chosen if (why := in_use(context, name))}
    if busy:
        raise gr.Error("Not deleted: " + "; ".join(f"{name}: {why}" for name, why in busy.items()) + ". Stop it first.")
    for name in chosen:
        shutil.rmtree(run_dir(context, name))
        log.info("deleted run %s", name)
    table, picker = runs_table(context, [])
    return table, picker, False, notice(f"Deleted {', '.join(chosen)}.", "ok")


def build_runs_tab(context: AppContext, demo: gr.Blocks, tab: gr.Tab, tabs: gr.Tabs, compare: SimpleNamespace) -> None:
    """The Runs tab; `compare` holds the Compare tab's run picker and A/B list, which Open and Compare fill."""
    with gr.Row():
        refresh = gr.Button("↻ Refresh", scale=0, min_width=120)
        gr.Markdown("Every run in the runs folder, newest first. Losses are the last logged ones; evaluation numbers come from the run's own batch evaluation.", elem_classes="l2t-hint")
    table = gr.Dataframe(headers=COLUMNS, interactive=False, wrap=True, elem_id="runs-table")
    with gr.Row(equal_height=True):
        chosen = gr.Dropdown(label="Runs", choices=[], multiselect=True, scale=4, elem_id="runs-chosen")
        open_button = gr.Button("Open in Compare", scale=1, elem_id="runs-open")
        compare_button = gr.Button("Compare them (A/B)", scale=1)
    with gr.Row(equal_height=True):
        sure = gr.Checkbox(label="Yes, delete the chosen runs and everything in them", value=False, scale=3)
        delete_button = gr.Button("Delete", variant="stop", scale=1, elem_id="runs-delete")
    message = gr.HTML()

    def refresh_table(names):
        return runs_table(context, names)

    gr.on([refresh.click, tab.select, demo.load], refresh_table, chosen, [table, chosen], api_name="runs_table", show_progress="hidden")
    delete_button.click(lambda names, ok: delete_runs(context, names, ok), [chosen, sure], [table, chosen, sure, message], api_name="delete_runs")

    def in_compare(names, against: bool):
        if not names:
            raise gr.Error("Pick a run first.")
        trained = list_runs(context, with_adapter=True)
        if names[0] not in trained:
            raise gr.Error(f"{names[0]} has no trained adapter yet: nothing to compare.")
        others = gr.update(choices=trained, value=names[1:] if against else [])
        return gr.update(choices=trained, value=names[0]), others, gr.Tabs(selected="compare")

    outputs = [compare.run, compare.others, tabs]
    open_button.click(lambda names: in_compare(names, False), chosen, outputs, api_visibility="private")
    compare_button.click(lambda names: in_compare(names, True), chosen, outputs, api_visibility="private")
