"""The mask as a person reads it: each token's text, role and place in the loss.

`python -m l2t.data preview` prints it (`preview_sample`), the UI's Data tab
colours it (`app/mask_view.py`), and `python -m l2t.relevance` adds the
l2t_relevance weights as a heat map (`format_relevance`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from l2t.config import load_config
from l2t.masking import IGNORE, Encoded, Encoder, Role, labels_and_weights
from l2t.templates import mine_with_settings


def token_text(tokenizer, token_id: int) -> str:
    """One token's text as it reads inside a sentence.

    Decoded alone, a SentencePiece token (Llama, Mistral) loses its leading space: the
    decoder strips the space a sequence starts with. Decoded after a copy of itself, it
    keeps it; a byte-level token reads the same either way.
    """
    alone = tokenizer.decode([token_id])
    return tokenizer.decode([token_id, token_id])[len(alone) :]


def preview_tokens(encoded: Encoded, tokenizer, mode: str) -> list[tuple[str, str, bool]]:
    """(token text, role name, in the loss) per token: what the UI colours and the CLI prints."""
    labels, _ = labels_and_weights(encoded, mode)
    texts = [token_text(tokenizer, int(t)) for t in encoded.input_ids]
    return [(text, Role(int(r)).name.lower(), bool(lab != IGNORE)) for text, r, lab in zip(texts, encoded.roles, labels, strict=True)]


@dataclass
class MaskPreview:
    """One sample's tokens under one loss mode, as `python -m l2t.data preview` and the UI show them."""

    sample_id: str
    mode: str
    task_templates: int
    """How many task templates the encoder knew."""
    tokens: list[tuple[str, str, bool]]
    """(token text, role name, in the loss) per token."""
    weights: list[float]
    """Each token's loss weight with both loss weights at 1: 0 or 1, or the relevance weight in l2t_relevance."""

    @property
    def in_loss(self) -> int:
        return sum(flag for _, _, flag in self.tokens)


def mask_preview(encoder: Encoder, sample, mode: str, relevance: np.ndarray | None = None) -> MaskPreview:
    """The mask of an `l2t.data.Sample` under loss `mode`, as `encoder`'s tokenizer splits it
    (`relevance`: per-token weights from `l2t.relevance`, which l2t_relevance needs)."""
    encoded = encoder.encode(sample.messages, sample.image_sizes)
    encoded.relevance = relevance
    _, weights = labels_and_weights(encoded, mode)
    tokens = preview_tokens(encoded, encoder.tokenizer, mode)
    return MaskPreview(sample.id, mode, len(encoder.task_templates), tokens, [round(float(w), 3) for w in weights])


def format_relevance(preview: MaskPreview) -> str:
    """Each instruction token with its weight and a bar of it: the l2t_relevance heat map as text."""
    lines = []
    for (text, role, _), weight in zip(preview.tokens, preview.weights, strict=True):
        if role == "instruction":
            lines.append(f"  {text!r:<16} {weight:4.2f} {'█' * round(weight * 20)}")
    return "\n".join(lines)


def format_preview(tokens: list[tuple[str, str, bool]]) -> str:
    """Runs of tokens with the same role and loss flag, one per line (image runs collapsed)."""
    lines = []
    run: list[str] = []
    key = None
    for text, role, in_loss in tokens + [("", "", None)]:
        if (role, in_loss) != key and run:
            shown = f"{run[0]} x{len(run)}" if key[0] == "image" else "".join(run)
            mark = "LOSS" if key[1] else "    "
            lines.append(f"{mark}  {key[0]:<13} {shown!r}")
            run = []
        key = (role, in_loss)
        run.append(text)
    return "\n".join(lines)


def preview_sample(samples, index: int, preset: str = "tiny", mode: str | None = None, overrides: list[str] = ()) -> str:
    """The `python -m l2t.data preview` text for one sample."""
    from l2t.models import fetch_model, load_processor  # torch and transformers: only loaded when a preview is asked for

    config = load_config(preset, overrides=overrides)
    if not 0 <= index < len(samples):
        raise IndexError(f"--index {index} is out of range: the file has {len(samples)} usable samples")
    # The same list training uses: mined, then the preset's additions and removals.
    mined = mine_with_settings([s.instructions() for s in samples], config.templates)
    fetch_model(config, weights=False)
    encoder = Encoder.from_config(config, load_processor(config.model), mined)
    mode = mode or config.loss.mode
    hint = ""
    if mode == "l2t_relevance":  # its weights need the base model: `python -m l2t.relevance` draws them
        mode, hint = (
            "l2t",
            f"\n(l2t_relevance: the tokens of l2t, weighted; see python -m l2t.relevance FILE --preset {preset} --index {index})",
        )
    preview = mask_preview(encoder, samples[index], mode)
    header = (
        f"sample {preview.sample_id}: {len(preview.tokens)} tokens, {preview.in_loss} in the loss "
        f"(mode {preview.mode}, preset {preset}, {preview.task_templates} task templates)"
    )
    return header + "\n" + format_preview(preview.tokens) + hint
