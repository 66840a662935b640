"""The Compare tab: base vs tuned answers to one image and prompt, and the batch evaluation report.

Single answers run in the server process (inference only): the run's model is
loaded once through `l2t.generation.load_run` and kept until another run is
asked for; `l2t.generation.caption_pair` gives both answers, the base one with
the adapter switched off. The batch evaluation is `python -m l2t.evaluate` as a
subprocess, and its report (RUN_DIR/eval/report.html) is shown in the page.
"""

from __future__ import annotations

import gc
import html
import io
import logging
import threading
import time
from pathlib import Path
from urllib.parse import quote

import gradio as gr
from PIL import Image

from app.common import AppContext, follow_job, guarded, list_runs, notice, run_choices, run_dir, run_picker
from app.jobs import module_command
from l2t import chat, evaluate, generation, runs
from l2t.answers import where_it_looks
from l2t.attention import DEFAULT_LAYERS
from l2t.config import DataConfig
from l2t.data import Sample
from l2t.images import ImageSource
from l2t.report import attention_chart, attention_map
from l2t.scoring import EvalItem
from l2t.synthetic import CAPTION_PROMPTS

log = logging.getLogger("app.compare")

DEFAULT_PROMPT = CAPTION_PROMPTS[0]


class ModelCache:
    """One run's model in memory at a time (GPU memory is the limit), reloaded when its adapter changes."""

    def __init__(self):
        self.lock = threading.Lock()
        self._key = None
        self._value = None

    def get(self, folder: Path):
        """(TrainedRun, model, encoder); call with `lock` held (generation switches the adapter off and on)."""
        adapter = folder / runs.ADAPTER_CONFIG
        key = (str(folder.resolve()), adapter.stat().st_mtime_ns if adapter.exists() else 0)
        if key != self._key:
            self._key, self._value = None, None
            gc.collect()
            run = runs.open_trained_run(folder)
            model, encoder = generation.load_run(run)
            self._key, self._value = key, (run, model, encoder)
            log.info("loaded the model of %s", folder)
        return self._value


MODELS = ModelCache()


def _checked_image(path: str, max_pixels: int):
    """The uploaded file as an RGB image, through the library's checks (pixel limit, corrupt files)."""
    file = Path(path)
    return ImageSource(file.parent, max_pixels=max_pixels).open(file.name)


@guarded
def check_image(context: AppContext, run: str | None, path: str | None):
    if not path:
        return None
    data = runs.open_trained_run(run_dir(context, run)).config.data if run else DataConfig()
    return _checked_image(path, data.max_image_pixels)


@guarded
def compare(context: AppContext, run: str | None, image, prompt: str):
    if not run:
        raise gr.Error("Pick a finished run first (train one in the Train tab).")
    folder = run_dir(context, run)
    prompt = (prompt or "").strip() or DEFAULT_PROMPT
    started = time.time()
    with MODELS.lock:
        _, model, encoder = MODELS.get(folder)
        base, tuned = generation.caption_pair(model, encoder, image, prompt)
    log.info("compare on %s took %.1f s", run, time.time() - started)
    return base, tuned


@guarded
def looks(context: AppContext, run: str | None, image, prompt: str):
    """Where the base and the tuned model look while they answer: the image share per answer token, and the
    first answer token's attention over the image's patches (`l2t.attention`, drawn by `l2t.report`)."""
    if not run:
        raise gr.Error("Pick a finished run first (train one in the Train tab).")
    if image is None:
        raise gr.Error("Attention on the image needs an image: upload one or try a held-out sample.")
    prompt = (prompt or "").strip() or DEFAULT_PROMPT
    item = EvalItem("this image", "short_answer", [{"role": "user", "content": chat.IMAGE + prompt}], "", [image], [], "")
    with MODELS.lock:
        trained, model, encoder = MODELS.get(run_dir(context, run))
        base_answer, tuned_answer = generation.caption_pair(model, encoder, image, prompt)
        with generation.base_model_context(model):
            base = where_it_looks("base", model, encoder, item, base_answer, DEFAULT_LAYERS)
        tuned = where_it_looks(run, model, encoder, item, tuned_answer, DEFAULT_LAYERS)
    study = {"attention": {"sample": item.id, "question": prompt, "layers": DEFAULT_LAYERS, "models": [base, tuned]}}
    return Image.open(io.BytesIO(attention_chart(study))), Image.open(io.BytesIO(attention_map(study, image)))


@guarded
def held_out_sample(context: AppContext, run: str | None, position: int):
    """The next held-out sample of the run: its image, question and reference answer."""
    if not run:
        raise gr.Error("Pick a finished run first.")
    trained = runs.open_trained_run(run_dir(context, run))
    samples, source, _ = evaluate.load_test_samples(trained, None, None)
    with_image = [s for s in samples if s.images] or samples
    sample: Sample = with_image[int(position) % len(with_image)]
    messages, reference = generation.prompt_and_reference(sample)
    question = messages[-1]["content"].replace(chat.IMAGE, "").strip()
    image = source.open(sample.images[0]) if sample.images and source is not None else None
    shown = f"Held-out sample <b>{html.escape(sample.id)}</b> · reference answer: <i>{html.escape(reference)}</i>"
    return image, question, f'<div class="l2t-hint">{shown}</div>', int(position) + 1


def report_html(folder: Path | None) -> str:
    report = folder / runs.EVAL / runs.EVAL_PAGE if folder is not None else None
    if report is None or not report.exists():
        return notice("No batch evaluation of this run yet.", "info")
    url = f"gradio_api/file={quote(str(report.resolve()))}"
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(report.stat().st_mtime))
    return (
        f'<div class="l2t-hint">Report of {stamp} · <a href="{html.escape(url)}" target="_blank">open in a new tab</a></div>'
        f'<iframe class="eval-report" src="{html.escape(url)}"></iframe>'
    )


@guarded
def show_report(context: AppContext, run: str | None):
    return report_html(run_dir(context, run) if run else None)


@guarded
def run_evaluation(context: AppContext, run: str | None, others: list[str] | None):
    if not run:
        raise gr.Error("Pick a finished run first.")
    folder = run_dir(context, run)
    extra = [str(run_dir(context, name)) for name in (others or []) if name != run]
    command = module_command("l2t.evaluate", str(folder), *(["--compare", *extra] if extra else []))
    job = context.jobs.start("evaluate", command, folder, folder / runs.EVAL_LOG)
    names = ", ".join([run, *[Path(p).name for p in extra]])
    yield from follow_job(
        job,
        lambda seconds, _: f"Evaluating {names}… ({seconds:.0f} s)",
        "The evaluation failed:",
        lambda: (notice(f"Evaluated in {time.time() - job.started:.0f} s.", "ok"), report_html(folder)),
        failed_result=gr.update(),
    )


def build_compare_tab(context: AppContext, demo: gr.Blocks) -> None:
    run, refresh = run_picker("compare-run")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, elem_classes="l2t-card"):
            upload = gr.File(label="Upload an image", file_types=["image"], height=110, elem_id="compare-upload")
            picture = gr.Image(label="Image", type="pil", format="png", interactive=False, height=220, buttons=[], elem_id="compare-picture")
            sample_button = gr.Button("Try a held-out sample")
            reference = gr.HTML()
            prompt = gr.Textbox(label="Prompt", value=DEFAULT_PROMPT, lines=2, elem_id="compare-prompt")
            go = gr.Button("Compare base and tuned", variant="primary", elem_id="compare-button")
        with gr.Column(scale=3):
            with gr.Row(equal_height=True):
                base = gr.Textbox(label="Base model", lines=6, interactive=False, elem_id="base-answer", elem_classes="answer-box")
                tuned = gr.Textbox(
                    label="Tuned model (base + adapter)",
                    lines=6,
                    interactive=False,
                    elem_id="tuned-answer",
                    elem_classes="answer-box answer-tuned",
                )
            gr.Markdown(
                "Both answers come from the same weights and greedy decoding; the base answer has the adapter "
                "(and the trained projector) switched off.",
                elem_classes="l2t-hint",
            )
            looks_button = gr.Button("Where does each model look?", elem_id="looks-button")
            with gr.Row(equal_height=True):
                looks_chart = gr.Image(label="Share of attention on the image, per answer token", interactive=False, elem_id="looks-chart", buttons=[])
                looks_map = gr.Image(label="First answer token's attention over the image", interactive=False, elem_id="looks-map", buttons=[])
    gr.Markdown("### Batch evaluation")
    with gr.Row():
        others = gr.Dropdown(
            label="A/B: also evaluate these runs on the same samples", choices=[], multiselect=True, allow_custom_value=True, scale=4
        )
        evaluate_button = gr.Button("Run the batch evaluation", scale=1)
    eval_status = gr.HTML()
    with gr.Accordion(runs.EVAL_LOG, open=False):
        eval_log = gr.Textbox(show_label=False, lines=10, max_lines=10, autoscroll=True, interactive=False, elem_classes="l2t-log")
    report = gr.HTML(report_html(None))
    position = gr.State(0)

    def refresh_runs(current):
        return run_choices(context, current), gr.update(choices=list_runs(context, with_adapter=True))

    refresh.click(refresh_runs, run, [run, others], api_visibility="private")
    demo.load(refresh_runs, run, [run, others], api_visibility="private")
    run.change(lambda name: show_report(context, name), run, report, api_visibility="private")
    upload.upload(lambda name, path: check_image(context, name, path), [run, upload], picture, api_name="check_image")
    sample_button.click(
        lambda name, pos: held_out_sample(context, name, pos),
        [run, position],
        [picture, prompt, reference, position],
        api_name="held_out_sample",
    )
    go.click(lambda name, image, text: compare(context, name, image, text), [run, picture, prompt], [base, tuned], api_name="compare")
    looks_button.click(
        lambda name, image, text: looks(context, name, image, text), [run, picture, prompt], [looks_chart, looks_map], api_name="looks"
    )

    def evaluate_clicked(name, names):
        yield from run_evaluation(context, name, names)

    evaluate_button.click(evaluate_clicked, [run, others], [eval_status, eval_log, report], api_name="run_evaluation")
