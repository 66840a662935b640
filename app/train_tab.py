"""The Train tab: preset and settings, the equivalent command, Start / Stop / Resume, live progress.

Training runs as a subprocess (`app.jobs`), one at a time for the whole
server; the page polls the run folder with a timer, so a reload or a second
browser shows the same run.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import torch

from app import datasets, lengths_view, run_config, run_view, uploads
from app.common import AppContext, guarded, notice, run_dir
from app.datasets import DataSelection
from app.lengths_view import MAX_SKIPPED_SHARE, LengthCheck
from app.run_config import SETTING_KEYS, SETTINGS
from l2t import runs
from l2t.config import ConfigError, list_presets, load_config
from l2t.files import atomic_write_text
from l2t.models import ModelError, approx_download_gb, download_plan, hub_cache, in_cache

log = logging.getLogger("app.train")

POLL_SECONDS = 1.0


GPU_PRESET_GB = 1.0
"""Presets whose estimated peak memory is above this are marked as needing a GPU (the tiny one trains on a CPU)."""


def preset_needs(config) -> list[str]:
    """What a preset needs beyond this machine's CPU: a download (how big) and a GPU (how much memory)."""
    needs = []
    if not in_cache(config):
        size = approx_download_gb(config.model)
        needs.append(f"download ~{size:.1f} GB" if size else "download")
    if config.model.estimated_peak_gpu_gb >= GPU_PRESET_GB:
        needs.append(f"GPU ~{config.model.estimated_peak_gpu_gb:g} GB")
    return needs


def preset_choices() -> list[tuple[str, str]]:
    choices = []
    for name in list_presets():
        config = load_config(name)
        parts = [name, f"{config.model.parameters} parameters" if config.model.parameters else "", *preset_needs(config)]
        choices.append((" · ".join(p for p in parts if p), name))
    return choices


def preset_card(preset: str) -> str:
    config = load_config(preset)
    model = config.model
    if model.estimated_peak_gpu_gb:
        kind = "measured" if model.peak_gpu_gb_measured else "estimate"
        memory = f"~{model.estimated_peak_gpu_gb:g} GB GPU memory <span class='l2t-tag'>{kind}</span>"
    else:
        memory = "GPU memory: unknown"
    notes = []
    if not in_cache(config):
        size = approx_download_gb(model)
        notes.append(f"Not on this machine yet: Start downloads it{f' (about {size:.1f} GB)' if size else ''} into {hub_cache()}.")
    if model.estimated_peak_gpu_gb >= GPU_PRESET_GB and not torch.cuda.is_available():
        notes.append("No GPU here: this preset trains on the CPU only very slowly.")
    shown = "".join(f'<div class="l2t-warn-line">{html.escape(note)}</div>' for note in notes)
    return (
        f'<div class="preset-card"><div><b>{html.escape(model.parameters or "?")}</b> parameters · {memory}</div>'
        f'<div class="l2t-hint">{html.escape(model.hub_id)} · {html.escape(model.model_class)} · '
        f"{html.escape(model.quant)} · prompt format {html.escape(model.prompt_format)}</div>{shown}</div>"
    )


def data_card(selection: DataSelection | None) -> str:
    if selection is None:
        return notice("No data chosen yet: pick it in the Data tab (or press “Use the demo data” there).", "warn", "Data:")
    edits = []
    if selection.remove:
        edits.append(f"{len(selection.remove)} task template(s) kept in the loss")
    if selection.add:
        edits.append(f"{len(selection.add)} added")
    return notice(selection.label + (f" ({', '.join(edits)})" if edits else ""), "ok", "Data:")


def run_settings(preset: str, l2t_on, drop_templates, extra: str, selection: DataSelection | None, values) -> list[str]:
    """The overrides of the form, plus a held-out split when the preset would hold out nothing from big enough data."""
    settings = run_config.settings_overrides(preset, l2t_on, drop_templates, dict(zip(SETTING_KEYS, values, strict=True)), extra)
    if selection is None or any(line.startswith("train.eval_fraction") for line in settings):
        return settings
    if not datasets.data_overrides(selection, preset, for_training=True):
        return settings  # the preset's own data, with its own test split
    inspection = datasets.inspect_data(selection, preset)
    return run_config.held_out_overrides(len(inspection.samples), inspection.held_out) + settings


def command_preview(context: AppContext, preset, l2t_on, drop_templates, extra, name, selection, *values) -> str:
    extra, name = extra or "", name or ""
    try:
        settings = run_settings(preset, l2t_on, drop_templates, extra, selection, values)
    except (ConfigError, ValueError, TypeError) as exc:
        return f"# not a valid setting yet: {exc}"
    except Exception:  # the preview follows every keystroke: log, never raise
        log.exception("building the command preview failed")
        return "# the command can't be shown right now; details are in the server log"
    mode = run_config.loss_mode(l2t_on, drop_templates, load_config(preset).loss.mode)
    output = context.runs_dir / (name.strip() or run_config.default_run_name(preset, mode))
    return run_config.command_line(preset, selection, settings, output)


def check_lengths(selection: DataSelection, preset: str, overrides: list[str], skip_long: bool) -> None:
    """Refuse a run that would skip more than MAX_SKIPPED_SHARE of its samples for being too long, unless told to go on."""
    try:
        counts, config = datasets.token_counts(selection, preset, tuple(overrides))
        check = LengthCheck(counts, config.train.max_length)
    except ModelError:
        return  # the tokenizer isn't here: the run itself says so
    if check.share_over > MAX_SKIPPED_SHARE and not skip_long:
        raise gr.Error(html.escape(lengths_view.refusal(check)), print_exception=False)


@guarded
def start(context: AppContext, preset, l2t_on, drop_templates, extra, name, selection, *rest):
    """Start a run; returns (status, run name field, the command it runs), the command naming the folder actually used."""
    *values, skip_long = rest
    if selection is None:
        raise gr.Error("Choose the training data in the Data tab first (or press “Use the demo data”).")
    context.jobs.check_free("train")
    extra, name = extra or "", name or ""
    settings = run_settings(preset, l2t_on, drop_templates, extra, selection, values)
    overrides = run_config.run_overrides(preset, selection, settings)
    download_plan(load_config(preset, overrides=overrides))  # a model that is neither here nor downloadable: say so now
    check_lengths(selection, preset, overrides, skip_long)
    mode = run_config.loss_mode(l2t_on, drop_templates, load_config(preset).loss.mode)
    folder = run_dir(context, name.strip() or run_config.default_run_name(preset, mode))
    command = run_config.command_line(preset, selection, settings, folder)
    run_config.start_training(context.jobs, folder, preset, overrides, command)
    log.info("training started: %s", folder)
    return progress(context)[0], "", command


def _form(form: run_config.Form) -> tuple:
    """The fields a settings file fills: preset, its card, the two toggles, the numbers, the extra keys."""
    return (form.preset, preset_card(form.preset), form.l2t_on, form.drop_templates, *form.values, form.extra)


@guarded
def load_settings(path: str | None):
    if not path:
        raise gr.Error("Choose a settings file (.yaml) first.")
    form = run_config.form_from_yaml(Path(path).read_text(encoding="utf-8"), Path(path).name)
    note = f"Settings read from {Path(path).name}."
    if form.left_out:
        note += f" Left out ({', '.join(form.left_out)}): the data and its templates are chosen in the Data tab."
    return (*_form(form), notice(note, "ok"))


@guarded
def save_settings(context: AppContext, preset, l2t_on, drop_templates, extra, name, selection, *values) -> str:
    """The form as a YAML file in the --config format, to download (and load again, here or with --config)."""
    settings = run_settings(preset, l2t_on, drop_templates, extra or "", None, values)
    folder = context.uploads_dir / "settings"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / uploads.stored_name(f"{(name or '').strip() or preset}-settings.yaml", "settings.yaml")  # a name, never a path
    atomic_write_text(path, "# L2T Studio settings: python -m l2t.train --config THIS_FILE --data ...\n" + run_config.settings_yaml(preset, settings))
    return str(path)


def running_form(context: AppContext) -> tuple:
    """After a reload: the form shows the settings of the training that runs (its launch.yaml), not the defaults."""
    job = context.jobs.running("train")
    launch = job.run_dir / runs.LAUNCH if job is not None else None
    if launch is None or not launch.exists():
        return tuple(gr.update() for _ in range(5 + len(SETTING_KEYS)))
    try:
        form = run_config.form_from_yaml(launch.read_text(encoding="utf-8"), str(launch))
    except ConfigError as exc:
        log.info("the running job's settings: %s", exc)
        return tuple(gr.update() for _ in range(5 + len(SETTING_KEYS)))
    return (*_form(form), job.run_dir.name)


@guarded
def stop(context: AppContext):
    job = context.jobs.running("train")
    if job is None:
        raise gr.Error("No training is running.")
    job.stop()
    return progress(context)[0]


@guarded
def resume(context: AppContext):
    folder = shown_run(context)
    if folder is None:
        raise gr.Error("There is no run to resume yet.")
    run_config.resume_training(context.jobs, folder)
    return progress(context)[0]


def shown_run(context: AppContext) -> Path | None:
    """The server's training job, else the most recently updated run folder."""
    job = context.jobs.get("train")
    if job is not None:
        return job.run_dir
    folders = [p.parent for p in context.runs_dir.glob(f"*/{runs.STATUS}")] if context.runs_dir.is_dir() else []
    return max(folders, key=lambda p: (p / runs.STATUS).stat().st_mtime, default=None)


def progress(context: AppContext):
    """(status HTML, loss frame, log tail) of the shown run: what the timer refreshes."""
    try:
        folder = shown_run(context)
        state = run_view.train_state(context.jobs.get("train"), folder)
        tail = run_view.log_tail(folder / runs.LOG) if folder is not None else ""
        return run_view.status_html(state), run_view.loss_frame(folder), tail
    except Exception:  # a poll must never raise: it runs every second
        log.exception("reading the run folder failed")
        return notice("Can't read the run folder right now; details are in the server log.", "error"), run_view.loss_frame(None), ""


@guarded
def preset_changed(preset: str):
    """Every widget back to the new preset's values."""
    config = load_config(preset)
    l2t_on, drop_templates = run_config.toggles_of(config.loss.mode)
    return (preset_card(preset), l2t_on, drop_templates, *[run_config.value_of(config, key) for key in SETTING_KEYS])


def _number(config, setting) -> gr.Number:
    return gr.Number(
        value=run_config.value_of(config, setting.key),
        label=setting.label,
        info=f"{setting.key}: {run_config.help_of(config, setting.key)}",
        minimum=setting.minimum,
        maximum=setting.maximum,
        precision=0 if setting.integer else None,
        step=setting.step or 1,
        min_width=150,
    )


def _settings_column(config, preset: gr.Dropdown) -> SimpleNamespace:
    preset.render()
    card = gr.HTML(preset_card(preset.value))
    data = gr.HTML(data_card(None))
    l2t_on, drop_templates = run_config.toggles_of(config.loss.mode)
    numbers = {}
    with gr.Group():
        with gr.Row():
            l2t = gr.Checkbox(value=l2t_on, label="L2T: learn from the instruction too", info="off: response-only loss (standard tuning)")
            drop = gr.Checkbox(
                value=drop_templates, label="Keep task templates out of the loss", info="the mined sentences in the Data tab"
            )
        with gr.Row():
            for setting in SETTINGS[:2]:
                numbers[setting.key] = _number(config, setting)
    with gr.Accordion("LoRA and optimisation", open=True):
        with gr.Row():
            for setting in SETTINGS[2:5]:
                numbers[setting.key] = _number(config, setting)
        with gr.Row():
            for setting in SETTINGS[5:9]:
                numbers[setting.key] = _number(config, setting)
    with gr.Accordion("Length and images", open=False):
        with gr.Row():
            for setting in SETTINGS[9:]:
                numbers[setting.key] = _number(config, setting)
    with gr.Accordion("More config keys", open=False):
        extra = gr.Textbox(label="key=value, one per line", lines=3, placeholder="train.logging_steps=5\ntrain.warmup_ratio=0.1")
    name = gr.Textbox(label="Run name", placeholder="automatic: preset-mode-time", max_lines=1)
    skip_long = gr.Checkbox(
        value=False,
        label="Start anyway, skipping the long samples",
        info=f"Start refuses a run that would skip more than {MAX_SKIPPED_SHARE:.0%} of the samples for exceeding Max length",
    )
    return SimpleNamespace(
        card=card, data=data, l2t=l2t, drop=drop, numbers=[numbers[k] for k in SETTING_KEYS], extra=extra, name=name, skip_long=skip_long
    )


def _progress_column() -> SimpleNamespace:
    status = gr.HTML(run_view.status_html(run_view.TrainState("none")), elem_id="train-status")
    plot = gr.LinePlot(
        x="step", y="loss", color="series", title="Loss", x_title="optimiser step", y_title="cross-entropy",
        color_map={"instruction loss": "#2563eb", "response loss": "#059669"}, height=280, elem_id="loss-plot",
    )  # fmt: skip
    logs = gr.Textbox(
        label="train.log (last lines)",
        lines=8,
        max_lines=16,
        autoscroll=True,
        interactive=False,
        elem_id="train-log",
        elem_classes="l2t-log",
    )
    return SimpleNamespace(status=status, plot=plot, logs=logs)


def build_train_tab(context: AppContext, demo: gr.Blocks, preset: gr.Dropdown, selection: gr.State) -> SimpleNamespace:
    """The Train tab. Its progress comes from a timer and from the page load (a reload re-attaches). Returns its settings widgets."""
    config = load_config(preset.value)
    with gr.Row(equal_height=False):
        with gr.Column(scale=5, elem_classes="l2t-card"):
            settings = _settings_column(config, preset)
            command = gr.Code(label="Equivalent command", language="shell", lines=4, interactive=False, elem_id="train-command")
            with gr.Row():
                start_button = gr.Button("Start training", variant="primary", elem_id="start-training")
                stop_button = gr.Button("Stop", variant="stop")
                resume_button = gr.Button("Resume")
            with gr.Accordion("Save or load these settings (YAML, the --config format)", open=False):
                with gr.Row():
                    save_button = gr.Button("Save settings", elem_id="save-settings")
                    saved = gr.File(label="Settings file", interactive=False, height=90)
                load_file = gr.File(label="Load settings from a .yaml file", file_types=[".yaml", ".yml"], height=90)
                settings_note = gr.HTML()
        with gr.Column(scale=6):
            view = _progress_column()

    inputs = [preset, settings.l2t, settings.drop, settings.extra, settings.name, selection, *settings.numbers]
    shown = [view.status, view.plot, view.logs]

    def preview_command(*args):
        return command_preview(context, *args)

    def start_clicked(*args):
        return start(context, *args)

    triggers = [preset.change, settings.l2t.change, settings.drop.change, settings.extra.change, settings.name.change, selection.change]
    gr.on(
        [*triggers, *[n.change for n in settings.numbers]],
        preview_command,
        inputs,
        command,
        api_visibility="private",
        show_progress="hidden",
    )
    # .input, not .change: a preset set from a settings file or a running job keeps the file's values
    preset.input(preset_changed, preset, [settings.card, settings.l2t, settings.drop, *settings.numbers], api_visibility="private")
    form = [preset, settings.card, settings.l2t, settings.drop, *settings.numbers, settings.extra]
    load_file.upload(load_settings, load_file, [*form, settings_note], api_name="load_settings")
    save_button.click(lambda *args: save_settings(context, *args), inputs, saved, api_name="save_settings")
    demo.load(lambda: running_form(context), None, [*form, settings.name], api_name="running_settings", show_progress="hidden")
    selection.change(data_card, selection, settings.data, api_visibility="private")
    start_button.click(start_clicked, [*inputs, settings.skip_long], [view.status, settings.name, command], api_name="start_training")
    stop_button.click(lambda: stop(context), None, view.status, api_name="stop_training")
    resume_button.click(lambda: resume(context), None, view.status, api_name="resume_training")
    finished = gr.State("")
    """The name of the shown run once it has finished: the Compare and Export tabs refresh their run lists when it changes."""

    def poll():
        status, frame, tail = progress(context)
        folder = shown_run(context)
        done = folder.name if folder is not None and 'data-state="finished"' in status else ""
        return status, frame, tail, done

    timer = gr.Timer(POLL_SECONDS)
    timer.tick(poll, None, [*shown, finished], api_name="train_progress", show_progress="hidden", concurrency_limit=None)
    settings.finished = finished
    demo.load(lambda: progress(context), None, shown, api_visibility="private", show_progress="hidden")
    demo.load(preview_command, inputs, command, api_visibility="private", show_progress="hidden")
    return settings
