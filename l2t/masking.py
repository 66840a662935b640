"""Tokens with a role each, and the L2T labels read off those roles.

The rendered conversation (`l2t.chat`) is expanded the way the model's
processor expands images (each image placeholder becomes that processor's run
of image tokens), tokenized once — never piece by piece, since BPE merges
across piece boundaries — and every token takes the role of the characters it
covers (the first non-space one: a token like " Answer" belongs to the word).
Task-template sentences (`l2t.templates`) inside user turns get their own role.

Loss modes, as sets of roles in the loss:

    response                 response + response end       (standard visual instruction tuning)
    l2t                      + instruction                 (default: minus system and task templates)
    l2t_keep_task_templates  + instruction + task template (minus system templates only)
    l2t_full                 every token but image and padding (a.k.a. train_on_prompt)
    l2t_relevance            as l2t, each instruction token weighted by its visual relevance (`l2t.relevance`)

Labels are the input ids where a token is in the loss and -100 elsewhere; the
model shifts them itself. Weights carry `loss.instruction_weight` on prompt-side
tokens (instruction, task template, and system in l2t_full) and
`loss.response_weight` on response tokens; `l2t.trainer` divides the weighted sum
of token losses by the number of tokens in the loss, so with both weights at 1
the loss is the usual mean over labelled tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from PIL import Image

from l2t import chat
from l2t.config import Config, load_config
from l2t.templates import TaskTemplate, mine_with_settings, template_spans

IGNORE = -100


class Role(IntEnum):
    PAD = 0
    SYSTEM = 1
    IMAGE = 2
    TASK_TEMPLATE = 3
    INSTRUCTION = 4
    RESPONSE = 5
    RESPONSE_END = 6


SPAN_ROLES = {
    chat.SYSTEM: Role.SYSTEM,
    chat.IMAGE_ROLE: Role.IMAGE,
    chat.INSTRUCTION: Role.INSTRUCTION,
    chat.RESPONSE: Role.RESPONSE,
    chat.RESPONSE_END: Role.RESPONSE_END,
}

LOSS_ROLES = {
    "response": (Role.RESPONSE, Role.RESPONSE_END),
    "l2t": (Role.INSTRUCTION, Role.RESPONSE, Role.RESPONSE_END),
    "l2t_keep_task_templates": (Role.INSTRUCTION, Role.TASK_TEMPLATE, Role.RESPONSE, Role.RESPONSE_END),
    "l2t_full": (Role.SYSTEM, Role.INSTRUCTION, Role.TASK_TEMPLATE, Role.RESPONSE, Role.RESPONSE_END),
    "l2t_relevance": (Role.INSTRUCTION, Role.RESPONSE, Role.RESPONSE_END),
}
RESPONSE_ROLES = (Role.RESPONSE, Role.RESPONSE_END)
PROMPT_ROLES = (Role.SYSTEM, Role.INSTRUCTION, Role.TASK_TEMPLATE)


@dataclass
class Encoded:
    input_ids: np.ndarray
    roles: np.ndarray
    relevance: np.ndarray | None = None
    """Per token, the weight in [0, 1] that loss mode l2t_relevance gives an instruction token (`l2t.relevance`)."""

    def __len__(self) -> int:
        return len(self.input_ids)


def _char_roles(rendered: chat.Rendered, image_replacements: list[str], task_templates: frozenset[str]) -> tuple[str, np.ndarray]:
    """The expanded text and one role per character."""
    pieces: list[str] = []
    piece_roles: list[int] = []
    templates: list[tuple[int, int]] = []
    image_index = 0
    offset = 0
    for start, end, name in rendered.spans:
        text = rendered.text[start:end]
        role = SPAN_ROLES[name]
        if role == Role.IMAGE and image_replacements:
            text = image_replacements[image_index]
            image_index += 1
        if role == Role.INSTRUCTION and task_templates:
            templates += [(offset + s, offset + e) for s, e in template_spans(text, task_templates)]
        pieces.append(text)
        piece_roles.append(role)
        offset += len(text)
    roles = np.repeat(np.asarray(piece_roles, dtype=np.int8), [len(p) for p in pieces])
    for s, e in templates:
        roles[s:e] = Role.TASK_TEMPLATE
    return "".join(pieces), roles


def token_roles(text: str, char_roles: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Role of each token: that of its first non-space character (or its first character)."""
    n = len(text)
    if len(offsets) == 0 or n == 0:
        return np.full(len(offsets), Role.SYSTEM, np.int8)
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    is_space = (codes == 32) | ((codes >= 9) & (codes <= 13))
    # next_non_space[i] = first j >= i that is not whitespace (n if none)
    positions = np.where(is_space, n, np.arange(n))
    next_non_space = np.minimum.accumulate(positions[::-1])[::-1]
    starts, ends = offsets[:, 0], offsets[:, 1]
    safe_starts = np.minimum(starts, n - 1)
    first = next_non_space[safe_starts]
    pick = np.where(first < ends, first, safe_starts)
    return np.where(ends <= starts, np.int8(Role.SYSTEM), char_roles[pick]).astype(np.int8)


class Encoder:
    """Turns messages (+ image sizes) into token ids and roles for one model's processor."""

    def __init__(self, processor, fmt: chat.PromptFormat, task_templates=()):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.fmt = fmt
        self.task_templates = frozenset(task_templates)
        self._replacements: dict = {}
        image_processor = getattr(processor, "image_processor", None)
        name = type(processor).__name__
        # Where the run of image tokens doesn't depend on the image size, one probe serves all.
        self._size_free = name == "LlavaProcessor" or (
            name == "Idefics3Processor" and not getattr(image_processor, "do_image_splitting", False)
        )

    @classmethod
    def from_config(cls, config: Config, processor, task_templates: list[TaskTemplate] = ()) -> Encoder:
        """The encoder of a run of `config`: its model's processor, its prompt format, its task templates."""
        return cls(processor, chat.FORMATS[config.model.prompt_format], [t.sentence for t in task_templates])

    def image_replacement(self, size: tuple[int, int]) -> str:
        """The text the processor puts in place of one image of this (width, height)."""
        key = None if self._size_free else tuple(size)
        if key not in self._replacements:
            probe = Image.new("RGB", tuple(size), (128, 128, 128))
            out = self.processor(
                text=[self.processor.image_token], images=[probe], return_text_replacement_offsets=True
            )
            self._replacements[key] = out["text_replacement_offsets"][0][0]["replacement"]
        return self._replacements[key]

    def _expanded_placeholder(self, size: tuple[int, int]) -> str:
        # The format's placeholder contains the processor's image token (e.g. Qwen's vision start/pad/end).
        return self.fmt.image_placeholder.replace(self.processor.image_token, self.image_replacement(size), 1)

    def image_ids(self, size: tuple[int, int]) -> np.ndarray:
        """Token ids of one expanded image placeholder."""
        key = ("ids", None if self._size_free else tuple(size))
        if key not in self._replacements:
            ids = self.tokenizer(self._expanded_placeholder(size), add_special_tokens=False)["input_ids"]
            self._replacements[key] = np.asarray(ids, dtype=np.int64)
        return self._replacements[key]

    def encode(self, messages: list[dict], image_sizes: list[tuple[int, int]] = (), add_generation_prompt: bool = False) -> Encoded:
        return self.encode_many([(messages, image_sizes)], add_generation_prompt)[0]

    def encode_many(self, items: list[tuple[list[dict], list[tuple[int, int]]]], add_generation_prompt: bool = False) -> list[Encoded]:
        """Encode (messages, image sizes) pairs; one tokenizer call for all of them.

        The text is tokenized with each image placeholder as written (its special tokens
        split the text, so nothing around it tokenizes differently), then the placeholder's
        tokens are replaced by the processor's run of image tokens: the same ids as
        tokenizing the processor's expanded text, without tokenizing hundreds of image tokens.
        """
        texts, char_roles, placements = [], [], []
        for messages, image_sizes in items:
            rendered = chat.render(messages, self.fmt, add_generation_prompt=add_generation_prompt)
            if len(rendered.image_spans) != len(image_sizes):
                raise ValueError(f"{len(rendered.image_spans)} image placeholder(s) but {len(image_sizes)} image(s)")
            text, roles = _char_roles(rendered, [], self.task_templates)
            texts.append(text)
            char_roles.append(roles)
            placements.append(list(zip(rendered.image_spans, image_sizes)))
        if not texts:
            return []
        batch = self.tokenizer(texts, return_offsets_mapping=True)
        encoded = []
        for text, roles, ids, offsets, images in zip(texts, char_roles, batch["input_ids"], batch["offset_mapping"], placements):
            offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            ids = np.asarray(ids, dtype=np.int64)
            token_role = token_roles(text, roles, offsets)
            if images:
                ids, token_role = self._splice_images(ids, token_role, offsets, images)
            encoded.append(Encoded(ids, token_role))
        return encoded

    def _splice_images(self, ids, roles, offsets, images) -> tuple[np.ndarray, np.ndarray]:
        id_parts, role_parts, position = [], [], 0
        for (start, end), size in images:
            inside = np.nonzero((offsets[:, 0] >= start) & (offsets[:, 1] <= end) & (offsets[:, 1] > offsets[:, 0]))[0]
            if len(inside) == 0 or inside[-1] - inside[0] + 1 != len(inside) or inside[0] < position:
                raise ValueError(f"the tokenizer split the image placeholder {self.fmt.image_placeholder!r} unexpectedly")
            image = self.image_ids(size)
            id_parts += [ids[position : inside[0]], image]
            role_parts += [roles[position : inside[0]], np.full(len(image), Role.IMAGE, np.int8)]
            position = inside[-1] + 1
        id_parts.append(ids[position:])
        role_parts.append(roles[position:])
        return np.concatenate(id_parts), np.concatenate(role_parts)


def _role_table(roles) -> np.ndarray:
    table = np.zeros(len(Role), dtype=bool)
    table[list(roles)] = True
    return table


_IN_LOSS = {mode: _role_table(roles) for mode, roles in LOSS_ROLES.items()}
_IS_RESPONSE = _role_table(RESPONSE_ROLES)


def labels_and_weights(encoded: Encoded, mode: str, instruction_weight: float = 1.0, response_weight: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels (-100 outside the loss) and per-token loss weights for a loss mode.

    In l2t_relevance an instruction token's weight is instruction_weight times its relevance
    weight (`encoded.relevance`); a token whose weight is 0 is out of the loss.
    """
    if mode not in LOSS_ROLES:
        raise ValueError(f"unknown loss mode {mode!r}; choose one of {', '.join(LOSS_ROLES)}")
    roles = encoded.roles
    weights = np.where(_IS_RESPONSE[roles], np.float32(response_weight), np.float32(instruction_weight))
    weights *= _IN_LOSS[mode][roles]
    if mode == "l2t_relevance":
        if encoded.relevance is None:
            raise ValueError("loss mode l2t_relevance needs the relevance of each instruction token: run the relevance pass first")
        weights = np.where(_IS_RESPONSE[roles], weights, weights * encoded.relevance).astype(np.float32)
    labels = np.where(weights > 0, encoded.input_ids, IGNORE)
    return labels, weights


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
        mode, hint = "l2t", f"\n(l2t_relevance: the tokens of l2t, weighted; see python -m l2t.relevance FILE --preset {preset} --index {index})"
    preview = mask_preview(encoder, samples[index], mode)
    header = (
        f"sample {preview.sample_id}: {len(preview.tokens)} tokens, {preview.in_loss} in the loss "
        f"(mode {preview.mode}, preset {preset}, {preview.task_templates} task templates)"
    )
    return header + "\n" + format_preview(preview.tokens) + hint
