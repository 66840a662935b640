"""Encoded samples -> padded batches the model and the L2T loss take.

Each sample is encoded once, before training (that is also how its length is
known for the image-token budget and for length-grouped batching); images are
decoded and processed when a batch is drawn. Besides the model's inputs a batch
carries `labels`, `loss_weights` and `loss_kinds` (1 on prompt-side tokens in
the loss, 2 on response tokens in the loss), which `l2t.trainer` uses to compute
and log the instruction and response losses separately.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from l2t.data import Sample
from l2t.images import ImageSource
from l2t.masking import IGNORE, Encoded, Encoder, labels_and_weights, loss_kinds


@dataclass
class Example:
    sample: Sample
    input_ids: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    kinds: np.ndarray


def make_example(sample: Sample, encoded: Encoded, mode: str, instruction_weight: float, response_weight: float) -> Example:
    labels, weights = labels_and_weights(encoded, mode, instruction_weight, response_weight)
    return Example(sample, encoded.input_ids, labels, weights, loss_kinds(encoded.roles, weights))


def encode_samples(samples: list[Sample], encoder: Encoder, mode: str, instruction_weight: float, response_weight: float) -> list[Example]:
    encoded = encoder.encode_many([(s.messages, s.image_sizes) for s in samples])
    return [make_example(s, e, mode, instruction_weight, response_weight) for s, e in zip(samples, encoded)]


def process_images(processor, images: list) -> dict[str, torch.Tensor]:
    """The processor's image tensors for one sample's images (empty dict if none)."""
    if not images:
        return {}
    out = processor.image_processor(images=images, return_tensors="pt")
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


class TrainingSet(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example], images: ImageSource | None, processor):
        self.examples = examples
        self.images = images
        self.processor = processor

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def lengths(self) -> list[int]:
        return [len(e.input_ids) for e in self.examples]

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        pictures = [self.images.open(p) for p in example.sample.images] if example.sample.images else []
        return {
            "input_ids": torch.from_numpy(example.input_ids),
            "labels": torch.from_numpy(example.labels),
            "loss_weights": torch.from_numpy(example.weights),
            "loss_kinds": torch.from_numpy(example.kinds.astype(np.int64)),
            "image_inputs": process_images(self.processor, pictures),
        }


def _pad_stack(tensors: list[torch.Tensor], value) -> torch.Tensor:
    """Concatenate along dim 0, padding later dims to the largest (e.g. a varying image count)."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        if list(t.shape[1:]) != shape:
            out = t.new_full((t.shape[0], *shape), value)
            out[tuple(slice(0, s) for s in t.shape)] = t
            t = out
        padded.append(t)
    return torch.cat(padded, dim=0)


class Collator:
    """Right-pads token sequences; joins image tensors in sample order."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        longest = max(len(f["input_ids"]) for f in features)

        def pad(key, value, dtype):
            out = torch.full((len(features), longest), value, dtype=dtype)
            for i, f in enumerate(features):
                out[i, : len(f[key])] = f[key]
            return out

        batch = {
            "input_ids": pad("input_ids", self.pad_token_id, torch.long),
            "labels": pad("labels", IGNORE, torch.long),
            "loss_weights": pad("loss_weights", 0.0, torch.float32),
            "loss_kinds": pad("loss_kinds", 0, torch.long),
        }
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        for i, f in enumerate(features):
            mask[i, : len(f["input_ids"])] = 1
        batch["attention_mask"] = mask
        keys = {k for f in features for k in f["image_inputs"]}
        for key in sorted(keys):
            tensors = [f["image_inputs"][key] for f in features if key in f["image_inputs"]]
            batch[key] = _pad_stack(tensors, 0)
        return batch
