"""What one model does on the test items: its answers, its visual contribution, where it looks.

`l2t.evaluate` calls `answer_items` for the base model and for each tuned
model; the scores are computed from what it returns (`l2t.scoring`).

Visual contribution (VC) is scored on every item with an image, from
teacher-forced passes over the reference answer, in two kinds. For each answer
token (the tokens `loss.mode=response` trains on: the answer and its end marker):

    visual_contribution        log p(token | image, question) - log p(token | question):
                               the paper's definition, the image tokens removed from the input
    visual_contribution_noise  log p(token | image, question) - log p(token | noise image, question):
                               the image replaced by uniform random pixels of its size (fixed seed)

The first asks how much the answer depends on having an image at all, the
second how much it depends on this image rather than any image. The attention
on the image (`l2t.attention`) is averaged over the answer tokens of up to
ATTENTION_ITEMS items with an image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from l2t import chat
from l2t.attention import looking, mean_image_share
from l2t.errors import L2TError
from l2t.generation import DEFAULT_BATCH_SIZE, answer_log_probs, base_model_context, generate
from l2t.masking import Encoder
from l2t.scoring import EvalItem

NOISE_SEED = 0
ATTENTION_ITEMS = 64


class EvaluationError(L2TError):
    """A run folder or test file that can't be evaluated; the message names it."""


def noise_image(size: tuple[int, int]) -> Image.Image:
    """Uniform random RGB pixels of this (width, height), the same for every call."""
    width, height = size
    pixels = np.random.default_rng(NOISE_SEED).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def visual_contribution(
    model, encoder: Encoder, items: list[EvalItem], batch_size: int = DEFAULT_BATCH_SIZE
) -> tuple[list[list[float]], list[list[float]]]:
    """Per answer token, both kinds (module docstring): (image removed, noise image)."""
    conversations = [(item.messages, item.reference) for item in items]
    with_image = answer_log_probs(model, encoder, conversations, [item.images for item in items], batch_size)
    removed = [(chat.without_images(item.messages), item.reference) for item in items]
    without_image = answer_log_probs(model, encoder, removed, [[] for _ in items], batch_size)
    noise = [[noise_image(p.size) for p in item.images] for item in items]
    with_noise = answer_log_probs(model, encoder, conversations, noise, batch_size)
    for item, a, b in zip(items, with_image, without_image, strict=True):
        if len(a) != len(b):
            raise EvaluationError(f"sample {item.id}: the answer tokenizes differently without its image ({len(a)} vs {len(b)} tokens)")
    return (
        [(a - b).tolist() for a, b in zip(with_image, without_image, strict=True)],
        [(a - b).tolist() for a, b in zip(with_image, with_noise, strict=True)],
    )


@dataclass
class ModelAnswers:
    """What one model did on the test items: its answers, per-token visual contribution of both kinds, where it looked."""

    name: str
    answers: list[str]
    visual_contribution: list[list[float] | None]
    visual_contribution_noise: list[list[float] | None]
    seconds: float
    image_attention: float | None = None
    """Mean share of attention on the image over the reference answers' tokens (`l2t.attention`)."""


def _by_length(lengths: list[int]) -> list[int]:
    """Indices in order of length: batches of similar length waste less on padding."""
    return sorted(range(len(lengths)), key=lengths.__getitem__)


def _in_original_order(order: list[int], values: list) -> list:
    restored = [None] * len(order)
    for position, index in enumerate(order):
        restored[index] = values[position]
    return restored


def answer_items(name: str, model, encoder: Encoder, items: list[EvalItem], max_new_tokens: int, batch_size: int) -> ModelAnswers:
    """Greedy answers to every item and the visual contribution on items with an image."""
    started = time.perf_counter()
    # Short answers finish in a few steps; batching them with captions would run them to caption length.
    expected_length = {"yes_no": 0, "short_answer": 1, "caption": 2, "text_only": 2}
    order = sorted(range(len(items)), key=lambda i: (expected_length[items[i].kind], len(items[i].question)))
    prompts = [(items[i].messages, items[i].images) for i in order]
    answers = _in_original_order(order, generate(model, encoder, prompts, max_new_tokens, batch_size))
    visual = [i for i, item in enumerate(items) if item.images]
    removed, noise = [None] * len(items), [None] * len(items)
    if visual:
        order = [visual[i] for i in _by_length([len(items[i].reference) + len(items[i].question) for i in visual])]
        per_kind = visual_contribution(model, encoder, [items[i] for i in order], batch_size)
        for position, index in enumerate(order):
            removed[index], noise[index] = per_kind[0][position], per_kind[1][position]
    looked = [item for item in items if item.images][:ATTENTION_ITEMS]
    attention = mean_image_share(model, encoder, [(i.messages, i.reference) for i in looked], [i.images for i in looked]) if looked else None
    return ModelAnswers(name, answers, removed, noise, time.perf_counter() - started, attention)


def base_and_tuned_answers(
    model, encoder: Encoder, items: list[EvalItem], tuned_name: str, max_new_tokens: int, batch_size: int
) -> tuple[ModelAnswers, ModelAnswers]:
    with base_model_context(model):
        base = answer_items("base", model, encoder, items, max_new_tokens, batch_size)
    return base, answer_items(tuned_name, model, encoder, items, max_new_tokens, batch_size)


def where_it_looks(name: str, model, encoder: Encoder, item: EvalItem, answer: str, layers: int) -> dict:
    """Where one model looked at `item`'s image while it gave `answer`: per answer token, the four shares and the image patches."""
    seen = looking(model, encoder, item.messages, answer, item.images, layers)
    return {"name": name, "answer": answer, "tokens": seen.tokens, "shares": seen.shares, "patches": seen.patches.round(5).tolist()}
