"""Tokens with a role each, and the L2T labels read off those roles.

The rendered conversation (`l2t.chat`) is tokenized whole — never piece by
piece, since BPE merges across piece boundaries — and every token takes the
role of the characters it covers (the first non-space one: a token like
" Answer" belongs to the word). Each image placeholder is tokenized as written
(its special tokens split the text, so nothing around it tokenizes
differently) and stands as one image token until it is expanded into the
processor's run of image tokens: the same ids as tokenizing the processor's
expanded text. Task-template sentences (`l2t.templates`) inside user turns get
their own role. A batch of conversations is encoded at once, the roles of all
its tokens read in one vectorised pass.

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

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import IntEnum
from itertools import chain

import numpy as np
from PIL import Image

from l2t import chat
from l2t.config import Config
from l2t.templates import TaskTemplate, template_matcher

IGNORE = -100
ENCODE_CHUNK = 512
"""Conversations per tokenizer call in `Encoder.encode_batch` (the next chunk is rendered while one is tokenized)."""


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


@dataclass
class Encoded:
    input_ids: np.ndarray
    roles: np.ndarray
    relevance: np.ndarray | None = None
    """Per token, the weight in [0, 1] that loss mode l2t_relevance gives an instruction token (`l2t.relevance`)."""

    def __len__(self) -> int:
        return len(self.input_ids)


_ROLE_CODES = {name: int(role) for name, role in SPAN_ROLES.items()}


@dataclass
class EncodedBatch:
    """Samples' tokens end to end, each image as one token: sample k is positions bounds[k]:bounds[k + 1].

    An image's token has a negative id (-1 for the sample's first image, -2 for its
    second, ...) and role IMAGE; `Encoder.expand_images` puts the processor's run of
    image tokens in its place.
    """

    input_ids: np.ndarray
    roles: np.ndarray
    bounds: np.ndarray
    image_sizes: list[list[tuple[int, int]]]

    @classmethod
    def join(cls, parts: list[EncodedBatch]) -> EncodedBatch:
        """One batch of the samples of `parts`, in order."""
        if len(parts) == 1:
            return parts[0]
        shifts = np.cumsum([0] + [len(p.input_ids) for p in parts])[:-1]
        return cls(
            np.concatenate([np.zeros(0, np.int64)] + [p.input_ids for p in parts]),
            np.concatenate([np.zeros(0, np.int8)] + [p.roles for p in parts]),
            np.concatenate([[0]] + [p.bounds[1:] + shift for p, shift in zip(parts, shifts, strict=True)]).astype(np.int64),
            [sizes for p in parts for sizes in p.image_sizes],
        )

    def per_sample(self, flags: np.ndarray) -> np.ndarray:
        """How many of each sample's positions are set in `flags` (one flag per position)."""
        counts = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
        return counts[self.bounds[1:]] - counts[self.bounds[:-1]]


@dataclass
class _Laid:
    """Rendered conversations before tokenizing: their texts, where each starts in the joined text, and per
    character of the joined text its role and its image (-1 outside image placeholders, numbered across the texts)."""

    texts: list[str]
    starts: np.ndarray
    char_roles: np.ndarray
    char_images: np.ndarray
    image_counts: list[int]
    sizes: list[list[tuple[int, int]]]


def first_characters(text: str, offsets: np.ndarray) -> np.ndarray:
    """Per token, the index of its first non-space character (or its first character); -1 for an empty token."""
    n = len(text)
    if n == 0:
        return np.full(len(offsets), -1, np.int64)
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    is_space = (codes == 32) | ((codes >= 9) & (codes <= 13))
    # next_non_space[i] = first j >= i that is not whitespace (n if none)
    positions = np.where(is_space, n, np.arange(n))
    next_non_space = np.minimum.accumulate(positions[::-1])[::-1]
    starts, ends = offsets[:, 0], offsets[:, 1]
    safe_starts = np.minimum(starts, n - 1)
    first = next_non_space[safe_starts]
    return np.where(ends <= starts, -1, np.where(first < ends, first, safe_starts))


class Encoder:
    """Turns messages (+ image sizes) into token ids and roles for one model's processor."""

    def __init__(self, processor, fmt: chat.PromptFormat, task_templates=()):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.fmt = fmt
        self.task_templates = task_templates
        self._replacements: dict = {}
        image_processor = getattr(processor, "image_processor", None)
        name = type(processor).__name__
        # Where the run of image tokens doesn't depend on the image size, one probe serves all.
        self._size_free = name == "LlavaProcessor" or (
            name == "Idefics3Processor" and not getattr(image_processor, "do_image_splitting", False)
        )

    @property
    def task_templates(self) -> frozenset[str]:
        """The task-template sentences whose tokens take role TASK_TEMPLATE."""
        return self._task_templates

    @task_templates.setter
    def task_templates(self, sentences) -> None:
        self._task_templates = frozenset(sentences)
        self._find_templates = template_matcher(self._task_templates)

    @classmethod
    def from_config(cls, config: Config, processor, task_templates: list[TaskTemplate] = ()) -> Encoder:
        """The encoder of a run of `config`: its model's processor, its prompt format, its task templates."""
        return cls(processor, chat.FORMATS[config.model.prompt_format], [t.sentence for t in task_templates])

    def image_replacement(self, size: tuple[int, int]) -> str:
        """The text the processor puts in place of one image of this (width, height)."""
        key = None if self._size_free else tuple(size)
        if key not in self._replacements:
            probe = Image.new("RGB", tuple(size), (128, 128, 128))
            out = self.processor(text=[self.processor.image_token], images=[probe], return_text_replacement_offsets=True)
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
        """Encode (messages, image sizes) pairs, each image expanded into the processor's run of image tokens."""
        batch = self.encode_batch(items, add_generation_prompt)
        encoded = []
        for k, sizes in enumerate(batch.image_sizes):
            ids, roles = batch.input_ids[batch.bounds[k] : batch.bounds[k + 1]], batch.roles[batch.bounds[k] : batch.bounds[k + 1]]
            encoded.append(Encoded(*self.expand_images(ids, sizes, roles)) if sizes else Encoded(ids, roles))
        return encoded

    def expand_images(self, ids: np.ndarray, sizes: list[tuple[int, int]], *columns: np.ndarray) -> tuple[np.ndarray, ...]:
        """One sample's ids with each image token (-1, -2, ...) replaced by its run of image tokens, and
        each of `columns` (one value per token) with the image token's value repeated over the run."""
        at = np.flatnonzero(ids < 0)
        runs = [self.image_ids(sizes[-int(ids[i]) - 1]) for i in at]
        repeats = np.ones(len(ids), np.int64)
        repeats[at] = [len(run) for run in runs]
        expanded = np.repeat(ids.astype(np.int64), repeats)
        starts = np.cumsum(repeats) - repeats
        for i, run in zip(at, runs, strict=True):
            expanded[starts[i] : starts[i] + len(run)] = run
        return (expanded, *(np.repeat(c, repeats) for c in columns))

    def lengths(self, batch: EncodedBatch) -> np.ndarray:
        """Each sample's token count with its images expanded: what the model is fed."""
        extra = [sum(len(self.image_ids(size)) - 1 for size in sizes) for sizes in batch.image_sizes]
        return np.diff(batch.bounds) + np.asarray(extra, np.int64)

    def encode_batch(self, items: list[tuple[list[dict], list[tuple[int, int]]]], add_generation_prompt: bool = False) -> EncodedBatch:
        """Encode (messages, image sizes) pairs at once, each image kept as one token (`EncodedBatch`).

        Every conversation is rendered, and its characters take the role of their span;
        the texts are tokenized with each image placeholder as written (its special tokens
        split the text, so nothing around it tokenizes differently), and every token
        takes the role of its first non-space character, a chunk of conversations at a
        time. The placeholder's tokens then make one image token: expanded, the same ids
        as tokenizing the processor's expanded text. While the tokenizer (which releases
        the interpreter) works on one chunk, the next one is rendered.
        """
        chunks = [items[i : i + ENCODE_CHUNK] for i in range(0, len(items), ENCODE_CHUNK)]
        laid_out = (self._lay_out(chunk, add_generation_prompt) for chunk in chunks)
        if len(chunks) <= 1:
            return EncodedBatch.join([self._read(laid, self._tokenize(laid.texts)) for laid in laid_out])
        parts, pending = [], None
        with ThreadPoolExecutor(1) as tokenizer:
            for laid in laid_out:
                tokens = tokenizer.submit(self._tokenize, laid.texts)
                if pending:
                    parts.append(self._read(pending[0], pending[1].result()))
                pending = laid, tokens
            parts.append(self._read(pending[0], pending[1].result()))
        return EncodedBatch.join(parts)

    def _lay_out(self, items, add_generation_prompt: bool) -> _Laid:
        """Render each conversation; the role and image (or -1) of every character, the texts joined."""
        texts, starts, span_lengths, span_names, templates, image_counts = [], [], [], [], [], []
        base, find_templates = 0, self._find_templates if self.task_templates else None
        for messages, sizes in items:
            rendered = chat.render(messages, self.fmt, add_generation_prompt=add_generation_prompt)
            if rendered.roles.count(chat.IMAGE_ROLE) != len(sizes):
                raise ValueError(f"{rendered.roles.count(chat.IMAGE_ROLE)} image placeholder(s) but {len(sizes)} image(s)")
            lengths = list(map(len, rendered.pieces))
            if find_templates:
                at = base
                for piece, name, length in zip(rendered.pieces, rendered.roles, lengths):
                    if name == chat.INSTRUCTION:
                        templates += [(at + s, at + e) for s, e in find_templates(piece)]
                    at += length
            span_lengths += lengths
            span_names += rendered.roles
            texts.append("".join(rendered.pieces))
            starts.append(base)
            image_counts.append(len(sizes))
            base += len(texts[-1])
        span_roles = np.fromiter(map(_ROLE_CODES.__getitem__, span_names), np.int8, len(span_names))
        is_image = span_roles == Role.IMAGE
        char_roles = np.repeat(span_roles, span_lengths)
        for s, e in templates:
            char_roles[s:e] = Role.TASK_TEMPLATE
        char_images = np.repeat(np.where(is_image, np.cumsum(is_image) - 1, -1), span_lengths)
        sizes = [[tuple(size) for size in item_sizes] for _, item_sizes in items]
        return _Laid(texts, np.asarray(starts, np.int64), char_roles, char_images, image_counts, sizes)

    def _read(self, laid: _Laid, tokens: tuple[np.ndarray, np.ndarray, np.ndarray]) -> EncodedBatch:
        """The tokens of laid-out texts, each with the role of its first non-space character, images made one token."""
        ids, offsets, counts = tokens
        offsets += np.repeat(laid.starts, counts)[:, None]
        first = first_characters("".join(laid.texts), offsets)
        picked = np.maximum(first, 0)
        roles = np.where(first < 0, np.int8(Role.SYSTEM), laid.char_roles[picked]).astype(np.int8)
        token_images = np.where(first < 0, -1, laid.char_images[picked])
        bounds = np.concatenate([[0], np.cumsum(counts)])
        if sum(laid.image_counts):
            keep = self._image_tokens(ids, offsets, token_images, laid.char_images, laid.image_counts)
            kept = np.concatenate([[0], np.cumsum(keep)])
            ids, roles, bounds = ids[keep], roles[keep], kept[bounds]
        return EncodedBatch(ids, roles, bounds, laid.sizes)

    def _image_tokens(self, ids, offsets, token_images, char_images, image_counts) -> np.ndarray:
        """Which tokens to keep: of each image placeholder's tokens, the first, which takes the image's id
        (-1, -2, ... within its sample) in `ids`. Checks that each placeholder is made of whole tokens."""
        count = int(np.sum(image_counts))
        image_chars = np.flatnonzero(char_images >= 0)  # the placeholders' characters, image by image
        lengths = np.bincount(char_images[image_chars], minlength=count)
        first_char = image_chars[np.cumsum(lengths) - lengths]
        is_image = token_images >= 0
        which = token_images[is_image]
        starts, ends = offsets[is_image, 0], offsets[is_image, 1]
        covered = np.bincount(which, weights=ends - starts, minlength=count)
        if (starts < first_char[which]).any() or (ends > first_char[which] + lengths[which]).any() or (covered != lengths).any():
            raise ValueError(f"the tokenizer split the image placeholder {self.fmt.image_placeholder!r} unexpectedly")
        first_token = is_image & np.concatenate([[True], token_images[1:] != token_images[:-1]])
        sample_first = np.repeat(np.cumsum(image_counts) - image_counts, image_counts)  # each image's sample's first image
        images = token_images[first_token]
        ids[first_token] = -(images - sample_first[images] + 1)
        return ~is_image | first_token

    def _tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, character offsets (one row per token), tokens per text) of `texts`, as `tokenizer(texts)` splits them."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # a tokenizer without a Rust backend
            batch = self.tokenizer(texts, return_offsets_mapping=True)
            pairs = [(ids, offsets) for ids, offsets in zip(batch["input_ids"], batch["offset_mapping"], strict=True)]
        else:
            split_special = getattr(self.tokenizer, "split_special_tokens", False)
            if backend.padding is not None or backend.truncation is not None or backend.encode_special_tokens != split_special:
                self.tokenizer("")  # the backend keeps the settings of the last call; a plain call sets the plain ones
            pairs = [(e.ids, e.offsets) for e in backend.encode_batch(texts)]
        counts = np.fromiter((len(ids) for ids, _ in pairs), np.int64, len(pairs))
        ids = np.fromiter(chain.from_iterable(ids for ids, _ in pairs), np.int64, int(counts.sum()))
        offsets = np.fromiter(chain.from_iterable(chain.from_iterable(o for _, o in pairs)), np.int64, 2 * int(counts.sum()))
        return ids, offsets.reshape(-1, 2), counts


def _role_table(roles) -> np.ndarray:
    table = np.zeros(len(Role), dtype=bool)
    table[list(roles)] = True
    return table


_IN_LOSS = {mode: _role_table(roles) for mode, roles in LOSS_ROLES.items()}
_IS_RESPONSE = _role_table(RESPONSE_ROLES)


def labels_and_weights(
    encoded: Encoded, mode: str, instruction_weight: float = 1.0, response_weight: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
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


def loss_kinds(roles: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per token: 0 outside the loss, 1 on the prompt side, 2 on the response side (the trainer logs each side's loss)."""
    return np.where(weights > 0, np.where(_IS_RESPONSE[roles], 2, 1), 0).astype(np.int8)
