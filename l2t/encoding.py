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
from l2t.checked import SampleRows, cache_root, features, paused_gc, rows_batch
from l2t.config import Config
from l2t.masking import IGNORE, Encoded, Encoder, labels_and_weights, loss_kinds

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


def encode_rows(batch, encoder: Encoder, mode: str, instruction_weight: float, response_weight: float):
    """One `Dataset.map` batch (an Arrow table of checked rows) -> the same rows' images and token columns:
    compact ids (one per image), weights, kinds, the full length and the tokens in the loss."""
    import pyarrow as pa

    sizes = batch.column("image_sizes").to_pylist()
    items = list(zip(batch.column("messages").to_pylist(), sizes, strict=True))
    encoded = encoder.encode_batch(items)
    _, weights = labels_and_weights(Encoded(encoded.input_ids, encoded.roles), mode, instruction_weight, response_weight)
    kinds = loss_kinds(encoded.roles, weights)
    bounds = pa.array(encoded.bounds.astype(np.int32))

    def lists(values):
        return pa.ListArray.from_arrays(bounds, pa.array(values))

    return pa.table({
        "images": batch.column("images"),
        "image_sizes": batch.column("image_sizes"),
        "input_ids": lists(encoded.input_ids.astype(np.int32)),
        "loss_weights": lists(weights.astype(np.float32)),
        "loss_kinds": lists(kinds),
        "length": pa.array(encoder.lengths(encoded)),
        "in_loss": pa.array(encoded.per_sample(weights > 0)),
    })  # fmt: skip


def _source(samples) -> "datasets.Dataset":  # noqa: F821
    import datasets

    if isinstance(samples, SampleRows):
        return samples.columns(["messages", "images", "image_sizes"])
    return datasets.Dataset.from_dict(rows_batch(samples), features=features()).select_columns(["messages", "images", "image_sizes"])


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
    with paused_gc():
        encoded = _source(samples).with_format("arrow").map(
            encode_rows, batched=True, batch_size=WRITE_BATCH, writer_batch_size=WRITE_BATCH, num_proc=workers,
            fn_kwargs={"encoder": encoder, "mode": lo.mode, "instruction_weight": lo.instruction_weight, "response_weight": lo.response_weight},
            cache_file_name=str(temporary / "encoded.arrow"), new_fingerprint=key,
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
            ids, weights, kinds = self.encoder.expand_images(ids, sizes, weights, kinds)
        labels = np.where(weights > 0, ids, IGNORE)
        pictures = [self.images.open(str(p)) for p in row["images"]] if len(row["images"]) else []
        return {
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            "loss_weights": torch.from_numpy(weights.astype(np.float32)),
            "loss_kinds": torch.from_numpy(kinds.astype(np.int64)),
            "image_inputs": process_images(self.processor, pictures),
        }
