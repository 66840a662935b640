"""Visual relevance of instruction tokens, and the weights that loss mode l2t_relevance gives them.

For every instruction token of every training sample, from two teacher-forced
passes of the *base* model (before any adapter), in batches:

    r = log p(token | image, prefix) - log p(token | prefix with the image tokens removed)

The second pass is the same token sequence with the run of image tokens cut out
(and no pixels), so every instruction token is the same token at a known
position in both passes. A token that names what the image shows ("red",
"triangle") gets a large r; a function word or a template sentence gets r near 0.
The weight is linear in r and clipped to [0, 1]:

    weight = min(1, max(0, r / loss.relevance_nats))

and the loss gives the token instruction_weight * weight (`l2t.masking`);
templates and system tokens stay out of the loss, response tokens keep
response_weight. Text-only samples have no image, so their instructions weigh 0.

See one sample's weights as a heat map over its instruction tokens:

    python -m l2t.relevance l2t/assets/shapes/train.json --preset tiny --index 0

The pass is cached in the run folder, `relevance/`: key.json names what it was
computed from (a hash of the base model's files, the token ids and roles of
every sample and its image paths) and part-*.npz hold r in chunks as they are
done, so an interrupted pass resumes where it stopped and a changed input
(data, templates, tokenizer, model) starts it afresh.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

from l2t.batch import Collator, process_images
from l2t.config import load_config
from l2t.data import Sample, load_samples, open_images
from l2t.errors import L2TError, print_error
from l2t.files import atomic_write_bytes, atomic_write_json
from l2t.generation import pad_token_id, vision_dtype, with_pixels_in
from l2t.loss import labelled_token_loss
from l2t.masking import IGNORE, Encoded, Encoder, Role
from l2t.models import fetch_model, load_base_model, load_processor
from l2t.preview import format_relevance, mask_preview
from l2t.templates import mine_with_settings

CHUNK = 256
"""Samples per cached part."""


def cache_key(model_dir: str, encoded: list[Encoded], samples: list[Sample]) -> str:
    """A hash of what the relevance values depend on: the base model's files, the tokens and roles, the images."""
    digest = hashlib.sha256()
    folder = Path(model_dir)
    files = (sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors"))) if folder.is_dir() else []
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(model_dir.encode())
    for e, sample in zip(encoded, samples, strict=True):
        digest.update(e.input_ids.tobytes())
        digest.update(e.roles.tobytes())
        digest.update(json.dumps(sample.images).encode())
    return digest.hexdigest()


def _features(encoded: Encoded, image_inputs: dict, keep: np.ndarray) -> dict:
    ids = encoded.input_ids[keep]
    labels = np.where(encoded.roles[keep] == Role.INSTRUCTION, ids, IGNORE)
    zeros = torch.zeros(len(ids))
    return {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "loss_weights": zeros,
        "loss_kinds": zeros.long(),
        "image_inputs": image_inputs,
    }


@torch.no_grad()
def _chunk_relevance(model, processor, encoded: list[Encoded], samples: list[Sample], images, pad_id: int) -> list[np.ndarray]:
    """r for every instruction token of each sample, in token order."""
    device = next(model.parameters()).device
    collate, dtype = Collator(pad_id), vision_dtype(model)
    with_image, without_image = [], []
    for e, sample in zip(encoded, samples, strict=True):
        pictures = [images.open(path) for path in sample.images] if sample.images else []
        with_image.append(_features(e, process_images(processor, pictures), np.ones(len(e), dtype=bool)))
        without_image.append(_features(e, {}, e.roles != Role.IMAGE))
    losses = []
    for features in (with_image, without_image):
        batch = {k: v.to(device) for k, v in collate(features).items()}
        token_loss, _, _ = labelled_token_loss(model, with_pixels_in(batch, dtype))
        losses.append(token_loss.float().cpu().numpy())
    r = losses[1] - losses[0]  # cross-entropy is -log p
    counts = [int((e.roles == Role.INSTRUCTION).sum()) for e in encoded]
    return np.split(r, np.cumsum(counts)[:-1])


def _save_part(path: Path, values: list[np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, values=np.concatenate(values) if values else np.zeros(0, np.float32), counts=np.array([len(v) for v in values]))
    atomic_write_bytes(path, buffer.getvalue())


def _load_part(path: Path) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as part:
        return np.split(part["values"], np.cumsum(part["counts"])[:-1]) if len(part["counts"]) else []


def relevance_pass(
    model, processor, encoded: list[Encoded], samples: list[Sample], images, pad_id: int, cache: Path | None, key: str, batch_size: int = 32, say=print
) -> list[np.ndarray]:
    """r per sample (one value per instruction token), from the cache where it holds this key's parts (no cache: None)."""
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        key_file = cache / "key.json"
        if not key_file.is_file() or json.loads(key_file.read_text()).get("key") != key:
            for stale in cache.glob("part-*.npz"):
                stale.unlink()
            atomic_write_json(key_file, {"key": key, "samples": len(samples), "chunk": CHUNK})
    model.eval()
    results: list[np.ndarray] = []
    for start in range(0, len(samples), CHUNK):
        part = cache / f"part-{start // CHUNK:05d}.npz" if cache is not None else None
        if part is not None and part.is_file():
            results += _load_part(part)
            continue
        values = []
        for first in range(start, min(start + CHUNK, len(samples)), batch_size):
            last = min(first + batch_size, start + CHUNK, len(samples))
            values += _chunk_relevance(model, processor, encoded[first:last], samples[first:last], images, pad_id)
        if part is not None:
            _save_part(part, values)
        results += values
        say(f"relevance pass: {min(start + CHUNK, len(samples))} of {len(samples)} samples")
    return results


def apply_weights(encoded: list[Encoded], relevance: list[np.ndarray], nats: float) -> None:
    """Set each sample's per-token relevance weight (0 off the instruction tokens)."""
    for e, r in zip(encoded, relevance, strict=True):
        weights = np.zeros(len(e), dtype=np.float32)
        weights[e.roles == Role.INSTRUCTION] = np.clip(r / nats, 0.0, 1.0)
        e.relevance = weights


def summary(encoded: list[Encoded]) -> dict:
    """Mean weight over the instruction tokens and the share above 0.5, for the pre-flight report."""
    weights = np.concatenate([e.relevance[e.roles == Role.INSTRUCTION] for e in encoded if e.relevance is not None] or [np.zeros(0)])
    if not len(weights):
        return {"instruction_tokens": 0, "mean_weight": 0.0, "share_over_half": 0.0}
    return {
        "instruction_tokens": int(len(weights)),
        "mean_weight": round(float(weights.mean()), 4),
        "share_over_half": round(float((weights > 0.5).mean()), 4),
    }


def sample_weights(model, processor, encoder, sample: Sample, images, nats: float) -> np.ndarray:
    """One sample's per-token relevance weights (the mask preview's heat map)."""
    encoded = encoder.encode(sample.messages, sample.image_sizes)
    values = _chunk_relevance(model, processor, [encoded], [sample], images, pad_token_id(encoder.tokenizer))
    apply_weights([encoded], values, nats)
    return encoded.relevance


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m l2t.relevance", description="A sample's l2t_relevance weights, token by token.")
    parser.add_argument("data", help="LLaVA or messages JSON/JSONL")
    parser.add_argument("--images", default=None, help="image folder or .zip (default: the data file's folder)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.preset, overrides=["loss.mode=l2t_relevance"])
        samples, _ = load_samples(args.data, args.images)
        if not 0 <= args.index < len(samples):
            raise IndexError(f"--index {args.index} is out of range: the file has {len(samples)} usable samples")
        fetch_model(config)
        processor = load_processor(config.model)
        templates = mine_with_settings([s.instructions() for s in samples], config.templates)
        encoder = Encoder.from_config(config, processor, templates)
        sample = samples[args.index]
        images = open_images(args.images, Path(args.data), config.data.max_image_pixels) if sample.images else None
        model = load_base_model(config.model)
        weights = sample_weights(model, processor, encoder, sample, images, config.loss.relevance_nats)
        preview = mask_preview(encoder, sample, "l2t_relevance", weights)
    except (L2TError, ValueError, IndexError, OSError) as exc:
        return print_error(exc)
    print(f"sample {sample.id}: instruction tokens and their weight (loss.relevance_nats={config.loss.relevance_nats:g}, preset {args.preset})")
    print(format_relevance(preview))
    return 0


if __name__ == "__main__":
    sys.exit(main())
