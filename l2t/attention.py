"""Where the model looks: the share of its attention that lands on the image while it answers.

One teacher-forced pass over a prompt and an answer, with eager attention for
that pass alone (SDPA returns no attention weights; every other pass keeps
SDPA). For each answer token, the query at the position that predicts it
spreads its attention over the sequence; averaged over the heads of the last
`layers` layers and summed by the role of the key tokens, that gives four
shares that sum to 1:

    image        the image tokens
    instruction  what the user wrote (task templates included)
    system       system prompt, role markers, separators, the start token
    response     the answer so far

`l2t.evaluate` reports the mean image share over the answer tokens of the test
samples for every model, and with `--attention` draws, for one sample, the
image share of each answer token and the attention over the image's patches
(`l2t.report`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from l2t.generation import teacher_forced_batch, vision_dtype, with_pixels_in
from l2t.masking import IGNORE, Role

DEFAULT_LAYERS = 2
SHARES = ("image", "instruction", "system", "response")
_GROUP = {
    Role.IMAGE: "image",
    Role.INSTRUCTION: "instruction",
    Role.TASK_TEMPLATE: "instruction",
    Role.SYSTEM: "system",
    Role.RESPONSE: "response",
    Role.RESPONSE_END: "response",
}


@dataclass
class Looking:
    """Where one model looked while it gave one answer."""

    tokens: list[str]
    """The answer's tokens (and its end marker), as text."""
    shares: dict[str, list[float]]
    """SHARES -> one value per answer token; the four values of a token sum to 1."""
    patches: np.ndarray
    """(answer tokens, image tokens): the attention each answer token gives each image token."""


@contextlib.contextmanager
def eager_attention(model):
    """Run `model` with eager attention (which returns attention weights) inside the block."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation
    base.set_attn_implementation("eager")
    try:
        yield
    finally:
        base.set_attn_implementation(before)


@torch.no_grad()
def looking(model, encoder, messages: list[dict], answer: str, pictures: list, layers: int = DEFAULT_LAYERS) -> Looking:
    """The attention shares of every token of `answer` given `messages` and `pictures`."""
    device = next(model.parameters()).device
    batch, labels = teacher_forced_batch(encoder, [(messages, answer)], [pictures], device)
    encoded = encoder.encode([*messages, {"role": "assistant", "content": answer}], [p.size for p in pictures])
    model.eval()
    with eager_attention(model):
        outputs = model(**with_pixels_in(batch, vision_dtype(model)), output_attentions=True)
    # (query, key) averaged over the heads of the last `layers` layers
    attention = torch.stack([a[0].float().mean(0) for a in outputs.attentions[-layers:]]).mean(0).cpu().numpy()
    targets = labels[0, 1:].cpu().numpy()
    queries = np.nonzero(targets != IGNORE)[0]  # the position before each answer token predicts it
    rows = attention[queries]
    groups = np.array([_GROUP.get(Role(int(r)), "system") for r in encoded.roles])
    shares = {name: rows[:, groups == name].sum(1).tolist() for name in SHARES}
    tokens = [encoder.tokenizer.decode([int(encoded.input_ids[q + 1])]) for q in queries]
    return Looking(tokens, shares, rows[:, groups == "image"])


def mean_image_share(model, encoder, conversations: list[tuple[list[dict], str]], images: list[list], layers: int = DEFAULT_LAYERS) -> float:
    """The image share averaged over every answer token of every conversation with an image."""
    values = [
        v
        for (messages, answer), pictures in zip(conversations, images, strict=True)
        if pictures
        for v in looking(model, encoder, messages, answer, pictures, layers).shares["image"]
    ]
    return float(np.mean(values)) if values else 0.0


def patch_grid(count: int) -> tuple[int, int] | None:
    """(rows, columns) of a square run of image tokens; None where the run is not one square grid."""
    side = int(round(count**0.5))
    return (side, side) if side * side == count else None
