"""The page: header, the six tabs, theme and styles, and how it is served.

Each tab is built by its own module; this one only lays them out and wires
what they share: the preset dropdown (shown in the Train tab, also used by
the Data tab's mask preview) and the session's data selection.
"""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from app.chat_tab import build_chat_tab
from app.common import AppContext
from app.compare_tab import build_compare_tab
from app.data_tab import build_data_tab
from app.export_tab import build_export_tab
from app.jobs import JobManager
from app.mask_view import MASK_CSS
from app.run_config import SETTING_KEYS
from app.runs_tab import build_runs_tab
from app.train_tab import build_train_tab, preset_choices
from app.uploads import MAX_UPLOAD_BYTES
from l2t.config import Config

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860

HEADER_TEMPLATE = """
<div class="l2t-header">
  <div class="l2t-brand"><span class="l2t-logo">L2T</span><div>
    <div class="l2t-title">L2T Studio</div>
    <div class="l2t-sub">Fine-tune a small vision-language model on one GPU with 4-bit QLoRA and the L2T loss, see what changed, export it.</div>
  </div></div>
  <div class="l2t-steps"><span>{device}</span></div>
</div>
<div class="l2t-explain">
  <b>What L2T changes.</b> Standard visual instruction tuning learns only from the answer. <b>L2T</b> (Learning to Instruct)
  also puts the loss on what the user wrote, minus <span class="tok tok-system tok-in">system templates</span>
  (system prompt, role markers) and <span class="tok tok-task_template tok-in">task templates</span> (sentences pasted into
  many prompts, like “Answer yes or no.”). To predict the <span class="tok tok-instruction tok-in">instruction</span>
  the model has to look at the image, which makes it rely on the image more and hallucinate less, for about 1% extra
  training time. Inputs, model and inference stay the same: only the loss mask changes.
</div>
"""

CSS = (
    MASK_CSS
    + """
.gradio-container { max-width: 1320px !important; margin: 0 auto; }
.l2t-header { display: flex; justify-content: space-between; align-items: center; gap: 16px; flex-wrap: wrap;
  padding: 18px 22px; border-radius: 14px; color: #fff;
  background: linear-gradient(120deg, #312e81 0%, #4338ca 45%, #0e7490 100%); }
.l2t-brand { display: flex; align-items: center; gap: 14px; }
.l2t-logo { font-weight: 800; font-size: 18px; letter-spacing: .5px; padding: 10px 12px; border-radius: 12px;
  background: rgba(255,255,255,.16); border: 1px solid rgba(255,255,255,.35); }
.l2t-header, .l2t-header * { color: #fff !important; }
.l2t-title { font-size: 24px; font-weight: 700; line-height: 1.2; }
.l2t-sub { opacity: .88; font-size: 14px; margin-top: 2px; }
.l2t-steps { display: flex; gap: 8px; flex-wrap: wrap; }
.l2t-steps span { font-size: 12.5px; padding: 4px 10px; border-radius: 999px; background: rgba(255,255,255,.14);
  border: 1px solid rgba(255,255,255,.28); }
.l2t-explain { margin: 10px 2px 4px; padding: 10px 14px; font-size: 13.5px; line-height: 1.65; border-radius: 10px;
  border: 1px solid var(--border-color-primary); background: var(--background-fill-secondary); }
.l2t-card { padding: 12px !important; border-radius: 12px; border: 1px solid var(--border-color-primary); }
.l2t-hint, .l2t-hint p { color: var(--body-text-color-subdued); font-size: 12.5px; }
.l2t-tag { font-size: 11px; padding: 1px 7px; border-radius: 999px; background: #fef3c7; color: #92400e; margin-left: 4px; }
.l2t-notice { padding: 9px 12px; border-radius: 10px; font-size: 14px; border: 1px solid; margin: 2px 0; }
.l2t-info { background: #eff6ff; border-color: #bfdbfe; color: #1e3a8a; }
.l2t-ok { background: #ecfdf5; border-color: #a7f3d0; color: #065f46; }
.l2t-warn { background: #fffbeb; border-color: #fde68a; color: #92400e; }
.l2t-error { background: #fef2f2; border-color: #fecaca; color: #991b1b; }
.l2t-report { width: 100%; margin-top: 8px; font-size: 13px; border-collapse: collapse; }
.l2t-report th, .l2t-report td { text-align: left; vertical-align: top; padding: 6px 8px; border-bottom: 1px solid var(--border-color-primary); }
.l2t-report ul { margin: 4px 0 0 16px; padding: 0; }
.l2t-warn-line { color: #92400e; font-size: 13px; margin-top: 2px; }
.preset-card { padding: 8px 12px; margin: -4px 0 4px; border-radius: 10px; background: var(--background-fill-secondary); font-size: 14px; }
.conv { font-size: 13.5px; }
.conv-id { color: var(--body-text-color-subdued); font-size: 12px; margin-bottom: 4px; }
.conv-turn { padding: 6px 10px; border-radius: 10px; margin: 4px 0; white-space: pre-wrap; }
.conv-user { background: rgba(96,165,250,.14); }
.conv-assistant { background: rgba(52,211,153,.16); }
.conv-system { background: rgba(148,163,184,.18); }
.conv-role { display: block; font-size: 11px; text-transform: uppercase; letter-spacing: .6px; color: var(--body-text-color-subdued); }
.conv-image { font-size: 12px; padding: 0 4px; border-radius: 4px; background: rgba(167,139,250,.30); }
.run-status { padding: 12px 14px; border-radius: 12px; border: 1px solid var(--border-color-primary); background: var(--background-fill-secondary); }
.run-head { display: flex; align-items: center; gap: 10px; margin-bottom: 8px; }
.run-pill { text-transform: uppercase; font-size: 11.5px; font-weight: 700; letter-spacing: .6px; padding: 3px 10px; border-radius: 999px;
  background: #e0e7ff; color: #3730a3; }
.run-ok .run-pill { background: #d1fae5; color: #065f46; }
.run-warn .run-pill { background: #fef3c7; color: #92400e; }
.run-error .run-pill { background: #fee2e2; color: #991b1b; }
.run-idle .run-pill { background: #f1f5f9; color: #475569; }
.run-name { font-family: var(--font-mono); font-size: 13.5px; }
.run-bar { height: 8px; border-radius: 999px; background: rgba(148,163,184,.25); overflow: hidden; }
.run-bar div { height: 100%; border-radius: 999px; background: linear-gradient(90deg, #4338ca, #0e7490); transition: width .6s ease; }
.run-facts { margin-top: 8px; font-size: 14px; }
.run-text { margin-top: 4px; font-size: 13px; color: var(--body-text-color-subdued); }
.run-error pre, .run-error { white-space: pre-wrap; }
pre.run-error { margin-top: 8px; padding: 8px 10px; border-radius: 8px; background: #fef2f2; color: #991b1b; font-size: 12.5px; }
.l2t-log textarea { font-family: var(--font-mono) !important; font-size: 12px !important; line-height: 1.45 !important;
  white-space: pre !important; overflow-x: auto !important; }
.answer-box textarea { font-size: 15px !important; line-height: 1.5 !important; }
.answer-tuned textarea { background: rgba(52,211,153,.10) !important; }
.eval-report { width: 100%; height: 720px; border: 1px solid var(--border-color-primary); border-radius: 10px; margin-top: 6px; background: #fff; }
.merged-at { margin-top: 8px; font-size: 13.5px; }
ul.parity { margin: 0 0 0 16px; padding: 0; }
"""
)


def device_label() -> str:
    """Where training will run, for the header."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"GPU: {props.name}, {props.total_memory / 1024**3:.0f} GB"
    return "no GPU: CPU training (fine for the tiny preset)"


THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="cyan", neutral_hue="slate", radius_size="md")


def create(
    runs_dir: str | Path = "runs",
    uploads_dir: str | Path = "uploads",
    allow_server_paths: bool = True,
    data_roots: list[str | Path] = (),
) -> tuple[gr.Blocks, AppContext]:
    """The app and its server-side context (folders and jobs); server paths are read in the working folder and `data_roots`."""
    runs_path, uploads_path = Path(runs_dir).resolve(), Path(uploads_dir).resolve()
    runs_path.mkdir(parents=True, exist_ok=True)
    uploads_path.mkdir(parents=True, exist_ok=True)
    roots = (Path.cwd().resolve(), *(Path(root).expanduser().resolve() for root in data_roots))
    context = AppContext(runs_path, uploads_path, JobManager(), allow_server_paths, roots)
    context.jobs.adopt_training(runs_path)
    with gr.Blocks(title="L2T Studio", delete_cache=(3600, 24 * 3600)) as demo:
        gr.HTML(HEADER_TEMPLATE.replace("{device}", html.escape(device_label())))
        preset = gr.Dropdown(preset_choices(), value=Config().preset, label="Model preset", render=False, elem_id="preset")
        selection = gr.State(None)
        with gr.Tabs() as tabs:
            with gr.Tab("1 · Data", id="data"):
                length_fix = build_data_tab(context, preset, selection)
            with gr.Tab("2 · Train", id="train"):
                settings = build_train_tab(context, demo, preset, selection)
            with gr.Tab("3 · Compare", id="compare") as compare_tab:
                compare = build_compare_tab(context, demo, [compare_tab.select, settings.finished.change])
            with gr.Tab("4 · Chat", id="chat") as chat_tab:
                build_chat_tab(context, demo, [chat_tab.select, settings.finished.change])
            with gr.Tab("5 · Export", id="export") as export_tab:
                build_export_tab(context, demo, [export_tab.select, settings.finished.change])
            with gr.Tab("6 · Runs", id="runs") as runs_tab:
                build_runs_tab(context, demo, runs_tab, tabs, compare)
        max_length = settings.numbers[SETTING_KEYS.index("train.max_length")]
        length_fix.fix.click(lambda needed: needed, length_fix.needed, max_length, api_visibility="private")
    return demo, context


def serve(
    demo: gr.Blocks,
    context: AppContext,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    share: bool = False,
    auth: tuple[str, str] | None = None,
    block: bool = True,
):
    """Launch the server. Files are served only from the runs and uploads folders."""
    return demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        auth=auth,
        allowed_paths=[str(context.runs_dir), str(context.uploads_dir)],
        max_file_size=MAX_UPLOAD_BYTES,
        prevent_thread_lock=not block,
        show_error=False,
        theme=THEME,
        css=CSS,
        footer_links=["api", "gradio"],
        quiet=not block,
    )
