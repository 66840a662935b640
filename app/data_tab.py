"""The Data tab: pick data, see the validation report, the samples, the loss mask and the task templates."""

from __future__ import annotations

import html
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from app import datasets, lengths_view, uploads
from app.common import AppContext, guarded, notice
from app.datasets import DataSelection
from app.lengths_view import FITS, OVER, LengthCheck
from app.mask_view import legend_html
from l2t.config import LOSS_MODE_DESCRIPTIONS, LOSS_MODES, load_config
from l2t.errors import L2TError
from l2t.models import ModelError
from l2t.sources import is_dataset, is_hub_spec

log = logging.getLogger("app.data")

EMPTY_REPORT = notice(
    "No data loaded yet. Press “Use the demo data”, upload a LLaVA / messages JSON file with an image .zip, or give paths on the server.",
    "info",
)


def _mask(selection: DataSelection, preset: str, index: float, mode: str) -> str:
    """The mask preview, or why it can't be drawn (the preset's tokenizer may not be downloadable here)."""
    try:
        return datasets.preview(selection, preset, index, mode)
    except ModelError as exc:
        log.info("mask preview with preset %s: %s", preset, exc)
        return notice(f"The mask preview needs the tokenizer of preset '{preset}', which can't be loaded here: {exc}", "warn")


def _shown(selection: DataSelection, preset: str, mode: str):
    """Everything the tab shows for a freshly loaded selection."""
    inspection = datasets.inspect_data(selection, preset)
    last = max(len(inspection.samples) - 1, 0)
    sample = inspection.samples[0]
    return (
        selection,
        datasets.report_html(inspection, selection),
        datasets.gallery_items(inspection),
        gr.update(value=0, maximum=max(last, 1), interactive=last > 0),
        datasets.template_rows(inspection, selection),
        datasets.sample_image(inspection, sample),
        datasets.conversation_html(sample),
        _mask(selection, preset, 0, mode),
    )


def _not_loaded(previous: DataSelection | None, message: str):
    """A failed load: the reason stays in the report area, and the data in use is named; nothing else changes."""
    still = f"Still using: {previous.label}." if previous is not None else "No data is loaded."
    return (previous, notice(f"{message}\n{still}", "error", "This data can't be used."), *[gr.update()] * 6)


def reported(load, previous: DataSelection | None, *args):
    """Run a load; a user error becomes the report's message (one log line), a bug a message and its traceback in the log."""
    try:
        return load(*args)
    except gr.Error as exc:  # `guarded` has logged it
        return _not_loaded(previous, html.unescape(exc.message))


@guarded
def use_demo_data(preset: str, mode: str):
    return _shown(datasets.demo_selection(), preset, mode)


@guarded
def load_upload(context: AppContext, data_file, images_zip, preset: str, mode: str, session_hash: str | None):
    if not data_file:
        raise gr.Error("Choose a data file (.json, .jsonl, .parquet or .arrow) to upload first.")
    data_path, images_path = uploads.store_upload(context.uploads_dir, session_hash, data_file, images_zip)
    log.info("upload stored in %s", data_path.parent)
    label = Path(data_file).name + (f" + {Path(images_zip).name}" if images_zip else "")
    selection = DataSelection(label, str(data_path), str(images_path or ""), uploaded=True)
    try:
        return _shown(selection, preset, mode)
    except L2TError as exc:  # name the files as the user did, not by where the upload is kept
        message = str(exc).replace(f"{data_path.parent}{os.sep}", "")
        hint = datasets.missing_images_hint(selection, getattr(exc, "report", None))
        message += f"\n{hint}" if hint else ""
        raise gr.Error(html.escape(message), print_exception=False) from None


@guarded
def load_server_paths(context: AppContext, data_path: str, images_path: str, preset: str, mode: str):
    if not context.allow_server_paths:
        raise gr.Error("Reading files on the server is off for this public link (start the app with --auth to allow it).")
    data_path, images_path = (data_path or "").strip(), (images_path or "").strip()
    if not data_path:
        raise gr.Error("Type the path of a data file, a dataset folder, parquet/arrow files or an hf: dataset on the server.")
    if is_hub_spec(data_path):  # read through the datasets library from the hub or its cache, not from a path
        data = data_path
    else:
        data = uploads.allowed_server_path(data_path, context.data_roots)
        if not (data.is_file() or is_dataset(data)):
            raise gr.Error(f"No data file, dataset folder, parquet/arrow file or hf: dataset at '{data_path}'.")
    images = uploads.allowed_server_path(images_path, context.data_roots) if images_path else None
    if images is not None and not images.exists():
        raise gr.Error(f"No image folder or .zip at '{images_path}'.")
    selection = DataSelection(data_path, str(data), str(images) if images else "")
    return _shown(selection, preset, mode)


@guarded
def show_lengths(selection: DataSelection | None, preset: str):
    """The histogram of token counts, the samples over max_length and the fix: (plot, summary, fix button, the length it sets)."""
    hidden = gr.update(visible=False)
    if selection is None:
        return None, "", hidden, 0
    try:
        counts, config = datasets.token_counts(selection, preset)
        check = LengthCheck(counts, config.train.max_length)
    except ModelError as exc:
        log.info("token lengths with preset %s: %s", preset, exc)
        return None, notice(f"Token lengths need the tokenizer of preset '{preset}', which can't be loaded here: {exc}", "warn"), hidden, 0
    plot = gr.update(value=lengths_view.histogram(check), x_bin=lengths_view.bin_width(check))
    fix = gr.update(visible=bool(check.over), value=f"Set Max length to {check.longest} in the Train tab")
    return plot, lengths_view.summary_html(check, config), fix, check.longest


@guarded
def show_sample(selection: DataSelection | None, preset: str, index: float, mode: str):
    if selection is None:
        return None, "", ""
    inspection = datasets.inspect_data(selection, preset)
    sample = inspection.samples[max(0, min(int(index), len(inspection.samples) - 1))]
    return (
        datasets.sample_image(inspection, sample),
        datasets.conversation_html(sample),
        _mask(selection, preset, index, mode),
    )


@guarded
def pick_from_gallery(selection: DataSelection | None, preset: str, mode: str, event: gr.SelectData):
    return (event.index, *show_sample(selection, preset, event.index, mode))


@guarded
def edit_templates(rows, selection: DataSelection | None, preset: str, index: float, mode: str):
    if selection is None:
        return selection, gr.update(), ""
    inspection = datasets.inspect_data(selection, preset)
    values = rows.values.tolist() if hasattr(rows, "values") else rows
    selection = datasets.edits_from_rows(values, inspection, selection)
    return selection, datasets.template_rows(inspection, selection), _mask(selection, preset, index, mode)


@guarded
def add_template(text: str, selection: DataSelection | None, preset: str, index: float, mode: str):
    if selection is None:
        raise gr.Error("Load data first: templates are mined from it.")
    if not text.strip():
        raise gr.Error("Type the sentence to treat as a task template.")
    inspection = datasets.inspect_data(selection, preset)
    try:
        selection = datasets.add_template(selection, inspection, text)
    except ValueError as exc:
        raise gr.Error(str(exc), print_exception=False) from None
    return selection, datasets.template_rows(inspection, selection), _mask(selection, preset, index, mode), ""


def _sources(context: AppContext) -> SimpleNamespace:
    with gr.Column(scale=2, min_width=300, elem_classes="l2t-card"):
        gr.Markdown("#### Choose data")
        demo = gr.Button("Use the demo data", variant="primary")
        gr.Markdown("Synthetic shapes with known answers: trains on a CPU in a minute.", elem_classes="l2t-hint")
        with gr.Accordion("Upload your own", open=True):
            data_file = gr.File(
                label="Data file: LLaVA or messages JSON / JSONL, or a parquet or arrow file", file_types=list(uploads.DATA_SUFFIXES), height=120, elem_id="upload-data"
            )
            images_zip = gr.File(label="Images: a .zip (paths in the data are relative to its root)", file_types=[".zip"], height=120, elem_id="upload-images")
            upload = gr.Button("Load the upload")
        with gr.Accordion("…or files on the server", open=False, visible=context.allow_server_paths):
            server_data = gr.Textbox(
                label="Data: a JSON/JSONL file, a save_to_disk folder, parquet/arrow files (or a glob), hf:<repo_id>[:config][@split]",
                placeholder="/data/my_set/train.json",
            )
            server_images = gr.Textbox(label="Image folder or .zip (default: the data file's folder)")
            server = gr.Button("Load from the server")
    return SimpleNamespace(
        demo=demo, data_file=data_file, images_zip=images_zip, upload=upload,
        server_data=server_data, server_images=server_images, server=server,
    )  # fmt: skip


def _lengths_section() -> SimpleNamespace:
    with gr.Accordion("Token lengths: what fits in max_length", open=True):
        with gr.Row(equal_height=False):
            plot = gr.BarPlot(
                x="tokens", y="samples", color="fits", y_aggregate="sum", title="Samples by token count (image tokens included)",
                x_title="tokens", y_title="samples", color_map={FITS: "#059669", OVER: "#dc2626"}, height=220, elem_id="length-plot",
            )  # fmt: skip
            with gr.Column():
                summary = gr.HTML(elem_id="length-summary")
                fix = gr.Button("Set Max length", visible=False, elem_id="length-fix")
    return SimpleNamespace(plot=plot, summary=summary, fix=fix, needed=gr.State(0))


def _preview_section(default_mode: str) -> SimpleNamespace:
    gr.Markdown("### What the model learns from: the loss mask")
    gr.HTML(legend_html())
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=260):
            index = gr.Slider(0, 1, value=0, step=1, label="Sample", interactive=False, elem_id="sample-index")
            mode = gr.Dropdown(
                list(LOSS_MODES),
                value=default_mode,
                label="Loss mode",
                elem_id="loss-mode",
                info=LOSS_MODE_DESCRIPTIONS[default_mode],
            )
            picture = gr.Image(label="Image", interactive=False, height=200, buttons=[])
            conversation = gr.HTML()
        with gr.Column(scale=3):
            mask = gr.HTML(elem_id="mask-preview")
    return SimpleNamespace(index=index, mode=mode, picture=picture, conversation=conversation, mask=mask)


def _templates_section() -> SimpleNamespace:
    gr.Markdown(
        "### Task templates\n"
        "Sentences pasted into many instructions carry no information about the image, so L2T keeps them out of the loss. "
        "Ticked sentences are masked (kept out of the loss). Untick one to keep it in the loss (`templates.remove`), or add your own (`templates.add`)."
    )
    table = gr.Dataframe(
        headers=datasets.TEMPLATE_HEADERS,
        datatype=["bool", "str", "number", "str", "str"],
        type="array",
        interactive=True,
        static_columns=[1, 2, 3, 4],
        column_widths=["12%", "58%", "10%", "8%", "12%"],
        max_height=320,
        label="Mined from the training split",
        elem_id="templates-table",
    )
    with gr.Row():
        new_sentence = gr.Textbox(
            label="Add a task template", placeholder="Answer with the option's letter from the given choices directly.", scale=4
        )
        add = gr.Button("Add", scale=1)
    return SimpleNamespace(table=table, new_sentence=new_sentence, add=add)


def build_data_tab(context: AppContext, preset: gr.Dropdown, selection: gr.State) -> SimpleNamespace:
    """The Data tab; `selection` (per session) receives the chosen data and template edits.
    Returns the length fix (a button and the max_length it sets) for the Train tab to take."""
    default_mode = load_config(preset.value).loss.mode
    with gr.Row(equal_height=False):
        src = _sources(context)
        with gr.Column(scale=5):
            report = gr.HTML(EMPTY_REPORT, elem_id="data-report")
            gallery = gr.Gallery(
                label="Samples (click one to see its mask)",
                show_label=False,
                columns=7,
                height=360,
                object_fit="contain",
                allow_preview=False,
                buttons=[],
                elem_id="data-gallery",
            )
    lengths = _lengths_section()
    view = _preview_section(default_mode)
    tpl = _templates_section()

    shown = [selection, report, gallery, view.index, tpl.table, view.picture, view.conversation, view.mask]
    length_view = [lengths.plot, lengths.summary, lengths.fix, lengths.needed]

    def then_lengths(event) -> None:
        event.then(show_lengths, [selection, preset], length_view, api_visibility="private")

    then_lengths(src.demo.click(use_demo_data, [preset, view.mode], shown, api_name="use_demo_data"))

    def upload_clicked(data_file, images_zip, preset_name, mode, previous, request: gr.Request):
        return reported(load_upload, previous, context, data_file, images_zip, preset_name, mode, request.session_hash)

    def server_clicked(data_path, images_path, preset_name, mode, previous):
        return reported(load_server_paths, previous, context, data_path, images_path, preset_name, mode)

    upload_inputs = [src.data_file, src.images_zip, preset, view.mode, selection]
    then_lengths(src.upload.click(upload_clicked, upload_inputs, shown, api_name="load_upload"))
    server_inputs = [src.server_data, src.server_images, preset, view.mode, selection]
    then_lengths(src.server.click(server_clicked, server_inputs, shown, api_name="load_server_paths"))
    sample_view = [view.picture, view.conversation, view.mask]
    inputs = [selection, preset, view.index, view.mode]
    # .change: dragging, typing a number with Enter and the arrow keys all move the preview
    view.index.change(show_sample, inputs, sample_view, api_name="mask_preview", trigger_mode="always_last")
    view.mode.input(show_sample, inputs, sample_view, api_visibility="private")
    view.mode.change(lambda mode: gr.update(info=LOSS_MODE_DESCRIPTIONS[mode]), view.mode, view.mode, api_name="loss_mode_help")
    preset.change(show_sample, inputs, sample_view, api_visibility="private")
    preset.change(show_lengths, [selection, preset], length_view, api_name="data_lengths")
    gallery.select(pick_from_gallery, [selection, preset, view.mode], [view.index, *sample_view], api_visibility="private")
    tpl.table.input(edit_templates, [tpl.table, *inputs], [selection, tpl.table, view.mask], api_name="edit_templates")
    tpl.add.click(add_template, [tpl.new_sentence, *inputs], [selection, tpl.table, view.mask, tpl.new_sentence], api_name="add_template")
    return lengths
