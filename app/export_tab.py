"""The Export tab: merge a run into its base model (with the parity check), or download the adapter.

The merge is `python -m l2t.merge RUN_DIR --out RUN_DIR/merged` as a
subprocess; the page follows its log and then shows merge_report.json. The
adapter and merged-model zips are built in the run folder, so they are served
from there.
"""

from __future__ import annotations

import html
import os
import tempfile
import zipfile
from pathlib import Path

import gradio as gr

from app.common import AppContext, follow_job, guarded, notice, run_choices, run_dir, run_picker
from app.jobs import module_command
from l2t import runs
from l2t.files import read_json
from l2t.merge import REPORT
from l2t.model_card import parity_lines


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def result_html(out: Path) -> str:
    """The parity verdict and where the merged model is, from OUT/merge_report.json."""
    path = out / REPORT
    if not path.exists():
        return notice("Not merged yet.", "info")
    report = read_json(path)
    parity = report.get("parity")
    kind = "warn" if parity is None else ("ok" if parity.get("passed") else "error")
    headline, *details = parity_lines(report)
    lines = "".join(f"<li>{html.escape(line.lstrip('- '))}</li>" for line in details)
    return (
        f'<div class="l2t-notice l2t-{kind}" id="parity-result"><b>{html.escape(headline)}</b><ul class="parity">{lines}</ul></div>'
        f'<div class="merged-at">Merged model: <code>{html.escape(str(out.resolve()))}</code> · '
        f"{_size(out) / 1024**2:,.1f} MB · {html.escape(str(report.get('dtype')))} · "
        "loads with <code>AutoModelForImageTextToText.from_pretrained</code> and <code>AutoProcessor.from_pretrained</code></div>"
    )


@guarded
def show_result(context: AppContext, run: str | None):
    if not run:
        return notice("Pick a finished run.", "info"), None
    out = run_dir(context, run) / runs.MERGED
    report = read_json(out / REPORT) if (out / REPORT).exists() else None
    return result_html(out), report


@guarded
def merge(context: AppContext, run: str | None):
    if not run:
        raise gr.Error("Pick a finished run first (train one in the Train tab).")
    folder = run_dir(context, run)
    runs.open_trained_run(folder)  # a clear message if the run has no adapter yet
    out = folder / runs.MERGED
    command = module_command("l2t.merge", str(folder), "--out", str(out), "--overwrite")
    job = context.jobs.start("merge", command, folder, folder / runs.MERGE_LOG)

    def progress(seconds: float, tail: str) -> str:
        last = tail.splitlines()[-1] if tail else "starting"
        return f"Merging… ({seconds:.0f} s) {last[:160]}"

    yield from follow_job(job, progress, "The merge failed:", lambda: (result_html(out), read_json(out / REPORT)))


def _zip(folder: Path, target: Path, entries: list[tuple[Path, str]]) -> str:
    """Write `entries` (file, name in the archive) to `target` in `folder`, through a temp file renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".zip.", suffix=".tmp")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for path, name in entries:
                archive.write(path, name)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return str(target)


def _files_under(folder: Path, prefix: str) -> list[tuple[Path, str]]:
    return [(path, f"{prefix}/{path.relative_to(folder)}") for path in sorted(folder.rglob("*")) if path.is_file()]


@guarded
def adapter_zip(context: AppContext, run: str | None) -> str:
    """RUN_DIR/<run>-adapter.zip with the adapter folder (and the run's config and templates)."""
    if not run:
        raise gr.Error("Pick a finished run first.")
    folder = run_dir(context, run)
    runs.open_trained_run(folder)
    entries = _files_under(folder / runs.ADAPTER, f"{run}/adapter")
    entries += [(folder / name, f"{run}/{name}") for name in (runs.CONFIG, runs.TEMPLATES) if (folder / name).exists()]
    return _zip(folder, folder / f"{run}-adapter.zip", entries)


@guarded
def merged_zip(context: AppContext, run: str | None) -> str:
    """RUN_DIR/<run>-merged.zip: the merged model folder, to download from the browser."""
    if not run:
        raise gr.Error("Pick a finished run first.")
    folder = run_dir(context, run)
    out = folder / runs.MERGED
    if not (out / REPORT).exists():
        raise gr.Error(f"{run} has no merged model yet: press “Merge and check” first.")
    return _zip(folder, folder / f"{run}-merged.zip", _files_under(out, f"{run}-merged"))


def build_export_tab(context: AppContext, demo: gr.Blocks, refresh_on: list) -> None:
    """The Export tab; its run list refreshes on the page load, the Refresh button and the events in `refresh_on`."""
    run, refresh = run_picker("export-run")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, elem_classes="l2t-card"):
            gr.Markdown(
                "#### Merge into the base model\n"
                "The adapter is folded into a full-precision copy of the base model (never the 4-bit one), then checked: "
                "the merged model must give the same answers and logits as base + adapter. The result is a plain "
                "transformers folder that needs neither peft nor this project."
            )
            merge_button = gr.Button("Merge and check", variant="primary", elem_id="merge-button")
            result = gr.HTML(notice("Pick a finished run.", "info"))
            with gr.Row():
                merged_button = gr.Button("Zip the merged model", elem_id="merged-zip-button")
                merged_download = gr.File(label="Merged model (.zip)", interactive=False, height=90, elem_id="merged-download")
            with gr.Accordion(f"{runs.MERGE_LOG} and {REPORT}", open=False):
                merge_log = gr.Textbox(
                    label=runs.MERGE_LOG, lines=10, max_lines=10, autoscroll=True, interactive=False, elem_classes="l2t-log"
                )
                report = gr.JSON(label=REPORT)
        with gr.Column(scale=2, elem_classes="l2t-card"):
            gr.Markdown("#### Download the adapter\nA few MB: load it on top of the base model with `PeftModel.from_pretrained`.")
            zip_button = gr.Button("Zip the adapter")
            download = gr.File(label="Adapter (.zip)", interactive=False, height=90)

    def refresh_runs(current):
        return run_choices(context, current)

    gr.on([refresh.click, demo.load, *refresh_on], refresh_runs, run, run, api_visibility="private", show_progress="hidden")
    run.change(lambda name: show_result(context, name), run, [result, report], api_visibility="private")

    def merge_clicked(name):
        yield from merge(context, name)

    merge_button.click(merge_clicked, run, [result, merge_log, report], api_name="merge")
    zip_button.click(lambda name: adapter_zip(context, name), run, download, api_name="adapter_zip")
    merged_button.click(lambda name: merged_zip(context, name), run, merged_download, api_name="merged_zip")
