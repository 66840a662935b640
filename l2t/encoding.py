"""Encoding as a cached, memory-mapped step: checked samples -> token columns on disk -> training items.

Rendering, tokenising, roles, labels and weights run through `Dataset.map`
(batched; one process per core on large data) over the checked rows
(`l2t.checked`) into an Arrow cache folder named by a hash of every input: the
data (the checked rows' key and the held-out split), the tokenizer and
processor, the prompt format, the loss mode and weights, the task templates and
max_length. A second run with the same inputs memory-maps the folder instead of
encoding again. The folder is written under a temporary name and renamed into
place once complete, so a run killed halfway leaves nothing a later run uses.

Each image is stored as one negative id (-1 for the sample's first image, -2 for
the second, ...) and expanded into the processor's run of image tokens when an
item is drawn: 576 image tokens per sample are not written to disk 665k times.
Images are decoded then too, in the dataloader workers (`train.dataloader_workers`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from l2t.batch import process_images
from l2t.checked import SampleRows, cache_root
from l2t.config import Config
from l2t.masking import IGNORE, RESPONSE_ROLES, Encoder, Role, labels_and_weights

FORMAT_VERSION = 1
"""Bumped whenever the columns or their meaning change: older caches are then not reused."""
MANIFEST = "manifest.json"
PARALLEL_FROM = 20_000
"""Samples from which the map runs in one process per core (below, starting processes costs more than it saves)."""
WRITE_BATCH = 2_000


def tokenizer_identity(encoder: Encoder) -> str:
    """A digest of the tokenizer's vocabulary and rules, and of the processor's image settings."""
    digest = hashlib.sha256()
    backend = getattr(encoder.tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else json.dumps(sorted(encoder.tokenizer.get_vocab().items())).encode())
    image_processor = getattr(encoder.processor, "image_processor", None)
    if image_processor is not None:
        digest.update(image_processor.to_json_string().encode())
    simple = {k: v for k, v in vars(encoder.processor).items() if isinstance(v, (str, int, float, bool)) or v is None}
    digest.update(json.dumps(simple, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cache_key(config: Config, data: str, encoder: Encoder) -> str:
    """`data`: the checked rows' key (`l2t.checked.data_key`); the held-out split's settings are added here."""
    lo = config.loss
    inputs = {
        "version": FORMAT_VERSION,
        "data": data,
        "split": [config.train.eval_fraction, config.train.eval_max_samples, config.train.seed],
        "tokenizer": tokenizer_identity(encoder),
        "format": asdict(encoder.fmt),
        "loss": [lo.mode, lo.instruction_weight, lo.response_weight],
        "templates": sorted(encoder.task_templates),
        "max_length": config.train.max_length,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:32]


def compact(input_ids: np.ndarray, roles: np.ndarray, run_lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Each image's run of tokens replaced by one negative id (-1, -2, ...); returns (ids, kept positions)."""
    keep = np.ones(len(input_ids), dtype=bool)
    ids = input_ids.astype(np.int32)
    is_image = roles == Role.IMAGE
    position = 0
    for k, length in enumerate(run_lengths):
        start = position + int(np.argmax(is_image[position:]))
        ids[start] = -(k + 1)
        keep[start + 1 : start + length] = False
        position = start + length
    return ids[keep], keep


def encode_batch(batch: dict, encoder: Encoder, mode: str, instruction_weight: float, response_weight: float) -> dict:
    """One `Dataset.map` batch: messages and image sizes -> compact ids, weights, kinds, full length, tokens in the loss."""
    items = [(json.loads(m), [tuple(s) for s in sizes]) for m, sizes in zip(batch["messages"], batch["image_sizes"], strict=True)]
    out = {"input_ids": [], "loss_weights": [], "loss_kinds": [], "length": [], "in_loss": []}
    for (_, sizes), encoded in zip(items, encoder.encode_many(items), strict=True):
        _, weights = labels_and_weights(encoded, mode, instruction_weight, response_weight)
        kinds = np.where(weights > 0, np.where(np.isin(encoded.roles, RESPONSE_ROLES), 2, 1), 0).astype(np.int8)
        ids, keep = compact(encoded.input_ids, encoded.roles, [len(encoder.image_ids(s)) for s in sizes])
        out["input_ids"].append(ids)
        out["loss_weights"].append(weights[keep].astype(np.float32))
        out["loss_kinds"].append(kinds[keep])
        out["length"].append(len(encoded.input_ids))
        out["in_loss"].append(int((weights > 0).sum()))
    return out


def _source(samples) -> "datasets.Dataset":  # noqa: F821
    import datasets

    if isinstance(samples, SampleRows):
        return samples.columns(["messages", "images", "image_sizes"])
    return datasets.Dataset.from_dict({
        "messages": [json.dumps(s.messages, ensure_ascii=False) for s in samples],
        "images": [list(s.images) for s in samples],
        "image_sizes": [[list(size) for size in s.image_sizes] for s in samples],
    }, features=datasets.Features({
        "messages": datasets.Value("string"),
        "images": datasets.List(datasets.Value("string")),
        "image_sizes": datasets.List(datasets.List(datasets.Value("int32"))),
    }))  # fmt: skip


def _load(folder: Path):
    import datasets

    names = json.loads((folder / MANIFEST).read_text())["files"]
    parts = [datasets.Dataset.from_file(str(folder / name)) for name in names]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def encoded_dataset(samples, encoder: Encoder, config: Config, key: str, say=print):
    """The samples' token columns, from the cache when its key matches, else encoded and cached."""
    root = cache_root(config) / "encoded"
    folder = root / key
    if (folder / MANIFEST).is_file():
        say(f"encoded data: reusing the cache {folder}")
        return _load(folder)
    workers = len(os.sched_getaffinity(0)) if len(samples) >= PARALLEL_FROM else None
    temporary = root / f"{key}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    lo = config.loss
    encoded = _source(samples).map(
        encode_batch, batched=True, batch_size=WRITE_BATCH, writer_batch_size=WRITE_BATCH, num_proc=workers,
        fn_kwargs={"encoder": encoder, "mode": lo.mode, "instruction_weight": lo.instruction_weight, "response_weight": lo.response_weight},
        remove_columns=["messages"], cache_file_name=str(temporary / "encoded.arrow"), new_fingerprint=key,
        desc=f"encoding {len(samples):,} samples",
    )  # fmt: skip
    names = [Path(f["filename"]).name for f in encoded.cache_files]
    (temporary / MANIFEST).write_text(json.dumps({"files": names, "samples": len(samples)}))
    del encoded
    try:
        temporary.rename(folder)  # atomic: the folder appears complete or not at all
    except OSError:  # another process (a second rank) put it there first
        shutil.rmtree(temporary, ignore_errors=True)
    say(f"encoded data: cached in {folder}")
    return _load(folder)


def column(table, name: str) -> np.ndarray:
    """A whole column at once, from Arrow (`table[name]` would read it row by row)."""
    return table.with_format("arrow").select_columns([name])[:][name].to_numpy()


class CachedTrainingSet(torch.utils.data.Dataset):
    """Training items read from the memory-mapped token columns; image runs expanded and images decoded per item."""

    def __init__(self, table, indices: np.ndarray, images, processor, encoder: Encoder):
        self.table = table.with_format("numpy", columns=["input_ids", "loss_weights", "loss_kinds", "images", "image_sizes"])
        self.indices = indices
        self.images = images
        self.processor = processor
        self.encoder = encoder
        self.lengths = column(table, "length")[indices].tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        row = self.table[int(self.indices[index])]
        ids, weights, kinds = row["input_ids"].astype(np.int64), row["loss_weights"], row["loss_kinds"]
        sizes = [tuple(int(v) for v in s) for s in row["image_sizes"]]
        if sizes:
            ids, weights, kinds = self._expand(ids, weights, kinds, sizes)
        labels = np.where(weights > 0, ids, IGNORE)
        pictures = [self.images.open(str(p)) for p in row["images"]] if len(row["images"]) else []
        return {
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            "loss_weights": torch.from_numpy(weights.astype(np.float32)),
            "loss_kinds": torch.from_numpy(kinds.astype(np.int64)),
            "image_inputs": process_images(self.processor, pictures),
        }

    def _expand(self, ids, weights, kinds, sizes):
        parts_ids, parts_w, parts_k, position = [], [], [], 0
        for k, size in enumerate(sizes):
            at = int(np.nonzero(ids == -(k + 1))[0][0])
            run = self.encoder.image_ids(size)
            parts_ids += [ids[position:at], run]
            parts_w += [weights[position:at], np.zeros(len(run), np.float32)]
            parts_k += [kinds[position:at], np.zeros(len(run), np.int8)]
            position = at + 1
        parts_ids.append(ids[position:])
        parts_w.append(weights[position:])
        parts_k.append(kinds[position:])
        return np.concatenate(parts_ids), np.concatenate(parts_w), np.concatenate(parts_k)
