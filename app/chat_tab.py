"""The Chat tab: talk to a run's tuned model about an image, turn after turn, and see the base
model's answers to the same questions beside it (each model keeps its own earlier answers).

Answers come from `l2t.generation.chat_pair` on the model the Compare tab keeps loaded
(`app.compare_tab.MODELS`): one run in memory at a time.
"""

from __future__ import annotations

import logging

import gradio as gr

from app.common import AppContext, guarded, run_choices, run_dir, run_picker
from app.compare_tab import MODELS, check_image
from l2t import generation

log = logging.getLogger("app.chat")


@guarded
def send(context: AppContext, run: str | None, image, question: str, base_history: list | None, tuned_history: list | None):
    """One turn: (base conversation, tuned conversation, the emptied question box); each conversation is role and text."""
    if not run:
        raise gr.Error("Pick a finished run first (train one in the Train tab).")
    question = (question or "").strip()
    if not question:
        raise gr.Error("Type a question first.")
    base_history, tuned_history = list(base_history or []), list(tuned_history or [])
    with MODELS.lock:
        _, model, encoder = MODELS.get(run_dir(context, run))
        base, tuned = generation.chat_pair(model, encoder, base_history, tuned_history, question, image)
    asked = {"role": "user", "content": question}
    return [*base_history, asked, {"role": "assistant", "content": base}], [*tuned_history, asked, {"role": "assistant", "content": tuned}], ""


def build_chat_tab(context: AppContext, demo: gr.Blocks, refresh_on: list) -> None:
    """The Chat tab; its run list refreshes like the Compare tab's."""
    run, refresh = run_picker("chat-run")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, elem_classes="l2t-card"):
            upload = gr.File(label="An image to talk about (optional)", file_types=["image"], height=110)
            picture = gr.Image(label="Image", type="pil", format="png", interactive=False, height=220, buttons=[])
            gr.Markdown("The image goes with the first question; changing it or the run starts a new conversation.", elem_classes="l2t-hint")
        with gr.Column(scale=5):
            with gr.Row(equal_height=True):
                base = gr.Chatbot(label="Base model", height=380, elem_id="chat-base")
                tuned = gr.Chatbot(label="Tuned model (base + adapter)", height=380, elem_id="chat-tuned")
            with gr.Row():
                question = gr.Textbox(show_label=False, placeholder="Ask about the image, then press Enter", scale=5, elem_id="chat-question")
                ask = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
                clear = gr.Button("New conversation", scale=1)

    def refresh_runs(current):
        return run_choices(context, current)

    gr.on([refresh.click, demo.load, *refresh_on], refresh_runs, run, run, api_visibility="private", show_progress="hidden")
    upload.upload(lambda name, path: check_image(context, name, path), [run, upload], picture, api_name="chat_image")

    base_history, tuned_history = gr.State([]), gr.State([])  # what the models see; the chatbots only show it

    def turn(name, image, text, base_turns, tuned_turns):
        base_turns, tuned_turns, emptied = send(context, name, image, text, base_turns, tuned_turns)
        return base_turns, tuned_turns, base_turns, tuned_turns, emptied

    gr.on(
        [ask.click, question.submit], turn, [run, picture, question, base_history, tuned_history],
        [base_history, tuned_history, base, tuned, question], api_name="chat",
    )  # fmt: skip
    new_conversation = [base_history, tuned_history, base, tuned]
    gr.on([clear.click, run.change, picture.change], lambda: ([], [], [], []), None, new_conversation, api_visibility="private")
