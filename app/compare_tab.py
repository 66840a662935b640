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
from types import SimpleNamespace
from urllib.parse import quote

import gradio as gr
from PIL import Image

from app import uploads
from app.common import AppContext, follow_job, guarded, list_runs, notice, run_choices, run_dir, run_picker
from app.jobs import module_command
from l2t import chat, evaluate, generation, runs
from l2t.answers import where_it_looks
from l2t.attention import DEFAULT_LAYERS
from l2t.config import DataConfig
from l2t.data import Sample, load_samples
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


HELD_OUT, UPLOAD, SERVER = "the run's held-out split", "an upload", "a file on the server"


def test_data(context: AppContext, kind: str, data_file, images_zip, server_data: str, server_images: str, session: str | None):
    """(data file, image root) of the chosen test data; (None, None) for the run's held-out split."""
    if kind == UPLOAD:
        if not data_file:
            raise gr.Error("Choose a test data file (.json, .jsonl, .parquet or .arrow) to upload, or pick the held-out split.")
        data, images = uploads.store_upload(context.uploads_dir, session, data_file, images_zip)
        return str(data), str(images) if images else None
    if kind == SERVER:
        if not context.allow_server_paths:
            raise gr.Error("Reading files on the server is off for this public link.")
        if not (server_data or "").strip():
            raise gr.Error("Type the path of the test data file on the server, or pick the held-out split.")
        data = uploads.allowed_server_path(server_data.strip(), context.data_roots)
        images = uploads.allowed_server_path(server_images.strip(), context.data_roots) if (server_images or "").strip() else None
        return str(data), str(images) if images else None
    return None, None


@guarded
def choose_test_data(context: AppContext, kind, data_file, images_zip, server_data, server_images, session: str | None):
    """The test data the held-out samples and the batch evaluation take, checked now: (choice, note, sample position)."""
    data, images = test_data(context, kind, data_file, images_zip, server_data, server_images, session)
    if data is None:
        return (None, None), notice(f"Test samples: {HELD_OUT}.", "info"), 0
    samples, report = load_samples(Path(data), images or str(Path(data).parent))
    name = Path(data_file).name if kind == UPLOAD else server_data.strip()
    shown = f"Test samples: {name}, {report.ok} of {report.total} usable."
    return (data, images), notice(shown, "ok" if report.ok == report.total else "warn"), 0


def _test_samples(trained: runs.TrainedRun, data: str | None, images: str | None):
    try:
        return evaluate.load_test_samples(trained, data, images)
    except evaluate.EvaluationError as exc:
        if data:
            raise
        log.info("held-out sample of %s: %s", trained.path.name, exc)
        raise gr.Error(
            f"{trained.path.name} held out no samples to test on. Choose other test data under “Test data” "
            "(an upload or a file on the server).",
            print_exception=False,
        ) from None


@guarded
def held_out_sample(context: AppContext, run: str | None, position: int, test: tuple = (None, None)):
    """The next test sample (the run's held-out split by default): its image, question and reference answer."""
    if not run:
        raise gr.Error("Pick a finished run first.")
    trained = runs.open_trained_run(run_dir(context, run))
    samples, source, _ = _test_samples(trained, *test)
    with_image = [s for s in samples if s.images] or samples
    sample: Sample = with_image[int(position) % len(with_image)]
    messages, reference = generation.prompt_and_reference(sample)
    question = messages[-1]["content"].replace(chat.IMAGE, "").strip()
    image = source.open(sample.images[0]) if sample.images and source is not None else None
    where = "Held-out sample" if test[0] is None else "Test sample"
    shown = f"{where} <b>{html.escape(sample.id)}</b> · reference answer: <i>{html.escape(reference)}</i>"
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
def run_evaluation(context: AppContext, run: str | None, others: list[str] | None, test: tuple = (None, None)):
    if not run:
        raise gr.Error("Pick a finished run first.")
    folder = run_dir(context, run)
    _test_samples(runs.open_trained_run(folder), *test)  # no test data: say so here, not in the job's log
    extra = [str(run_dir(context, name)) for name in (others or []) if name != run]
    data, images = test
    chosen = [*(["--data", data] if data else []), *(["--images", images] if images else [])]
    command = module_command("l2t.evaluate", str(folder), *chosen, *(["--compare", *extra] if extra else []))
    job = context.jobs.start("evaluate", command, folder, folder / runs.EVAL_LOG)
    names = ", ".join([run, *[Path(p).name for p in extra]])
    yield from follow_job(
        job,
        lambda seconds, _: f"Evaluating {names}… ({seconds:.0f} s)",
        "The evaluation failed:",
        lambda: (notice(f"Evaluated in {time.time() - job.started:.0f} s.", "ok"), report_html(folder)),
        failed_result=gr.update(),
    )


def build_compare_tab(context: AppContext, demo: gr.Blocks, refresh_on: list) -> SimpleNamespace:
    """The Compare tab; its run lists refresh on the page load, the Refresh button and the events in `refresh_on`.
    Returns its run picker and A/B list (the Runs tab fills them)."""
    run, refresh = run_picker("compare-run")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, elem_classes="l2t-card"):
            upload = gr.File(label="Upload an image", file_types=["image"], height=110, elem_id="compare-upload")
            picture = gr.Image(label="Image", type="pil", format="png", interactive=False, height=220, buttons=[], elem_id="compare-picture")
            with gr.Accordion("Test data", open=False):
                test_kind = gr.Radio([HELD_OUT, UPLOAD, SERVER], value=HELD_OUT, label="Test samples from", elem_id="test-kind")
                test_file = gr.File(label="Test data: LLaVA or messages JSON / JSONL, or a parquet or arrow file", file_types=list(uploads.DATA_SUFFIXES), height=90)
                test_zip = gr.File(label="Its images (.zip)", file_types=[".zip"], height=90)
                test_path = gr.Textbox(label="Test data path on the server", visible=context.allow_server_paths)
                test_images = gr.Textbox(label="Image folder or .zip on the server", visible=context.allow_server_paths)
                use_test = gr.Button("Use this test data")
            test_note = gr.HTML(notice(f"Test samples: {HELD_OUT}.", "info"))
            test = gr.State((None, None))
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

    gr.on([refresh.click, demo.load, *refresh_on], refresh_runs, run, [run, others], api_visibility="private", show_progress="hidden")
    run.change(lambda name: show_report(context, name), run, report, api_visibility="private")
    upload.upload(lambda name, path: check_image(context, name, path), [run, upload], picture, api_name="check_image")
    chooser = [test_kind, test_file, test_zip, test_path, test_images]

    def choose(kind, data_file, images_zip, server_data, server_images, request: gr.Request):
        return choose_test_data(context, kind, data_file, images_zip, server_data, server_images, request.session_hash)

    def held_out_again(kind):
        return choose_test_data(context, kind, None, None, "", "", None) if kind == HELD_OUT else (gr.update(),) * 3

    use_test.click(choose, chooser, [test, test_note, position], api_name="choose_test_data")
    test_kind.input(held_out_again, test_kind, [test, test_note, position], api_visibility="private")
    sample_button.click(
        lambda name, pos, chosen: held_out_sample(context, name, pos, chosen),
        [run, position, test],
        [picture, prompt, reference, position],
        api_name="held_out_sample",
    )
    go.click(lambda name, image, text: compare(context, name, image, text), [run, picture, prompt], [base, tuned], api_name="compare")
    looks_button.click(
        lambda name, image, text: looks(context, name, image, text), [run, picture, prompt], [looks_chart, looks_map], api_name="looks"
    )

    def evaluate_clicked(name, names, chosen):
        yield from run_evaluation(context, name, names, chosen)

    evaluate_button.click(evaluate_clicked, [run, others, test], [eval_status, eval_log, report], api_name="run_evaluation")
    return SimpleNamespace(run=run, others=others)
