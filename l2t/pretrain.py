"""Full-parameter training of the built-in tiny LLaVA on synthetic scenes.

`python -m l2t.tiny pretrain` uses it to build the shipped base in two stages,
the LLaVA way; `bench/l2t_study.py` uses it to repeat stage 2 with every loss
mode (the paper's setting). Nothing here is for hub models: they come
pretrained, and the product tunes them with QLoRA (`l2t.train`).

The loop is plain PyTorch (AdamW, cosine schedule with warm-up, gradient
clipping), on one process, in fp32. The tiny model takes ~20 ms a step on a
CPU, where the `Trainer`'s per-step bookkeeping would cost as much as the step.
Samples are encoded once with the product's own `Encoder` and loss masks
(`l2t.masking`), images are processed once into one tensor, and the loss is
the product's weighted token mean (`l2t.loss`), so a loss mode means here
exactly what it means in `l2t.train`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from l2t import relevance, synthetic
from l2t.batch import process_images
from l2t.config import LossConfig
from l2t.data import Sample, parse_record
from l2t.loss import labelled_token_loss
from l2t.masking import IGNORE, Encoder, labels_and_weights


@dataclass
class Scenes:
    """Synthetic samples with their images, encoded for one model."""

    samples: list[Sample]
    input_ids: list[torch.Tensor]
    labels: list[torch.Tensor]
    weights: list[torch.Tensor]
    pixel_values: torch.Tensor  # one row per sample with an image
    pixel_row: list[int]  # index into pixel_values, -1 for text-only samples


def scenes(
    split: str, count: int, seed: int, style: str, bias: float | None = None, size: int = 64
) -> list[tuple[Sample, object]]:
    """`count` synthetic samples of one style, as Samples with their PIL images."""
    made = synthetic.make_split(split, count, random.Random(f"{seed}-{split}-{style}"), bias, size, style)
    out = []
    for record, picture in made:
        sample = parse_record(record, record["id"])
        sample.image_sizes = [picture.size] if picture is not None else []
        out.append((sample, picture))
    return out


def encode_scenes(pairs: list[tuple[Sample, object]], encoder: Encoder, loss: LossConfig, relevance_values: list[np.ndarray] | None = None) -> Scenes:
    """The samples' tokens, labels and weights under `loss` (l2t_relevance: from `l2t.relevance` values), and their pixels."""
    samples = [s for s, _ in pairs]
    pictures = [p for _, p in pairs]
    encoded = encoder.encode_many([(s.messages, s.image_sizes) for s in samples])
    if relevance_values is not None:
        relevance.apply_weights(encoded, relevance_values, loss.relevance_nats)
    input_ids, labels, weights = [], [], []
    for e in encoded:
        lab, w = labels_and_weights(e, loss.mode, loss.instruction_weight, loss.response_weight)
        input_ids.append(torch.from_numpy(e.input_ids))
        labels.append(torch.from_numpy(lab))
        weights.append(torch.from_numpy(w))
    with_image = [p for p in pictures if p is not None]
    pixel_values = process_images(encoder.processor, with_image)["pixel_values"] if with_image else torch.zeros(0)
    rows, next_row = [], 0
    for p in pictures:
        rows.append(next_row if p is not None else -1)
        next_row += p is not None
    return Scenes(samples, input_ids, labels, weights, pixel_values, rows)


def collate(data: Scenes, indices: list[int], pad_id: int) -> dict:
    """A right-padded batch of the given samples (images in sample order)."""
    longest = max(len(data.input_ids[i]) for i in indices)
    n = len(indices)
    ids = torch.full((n, longest), pad_id, dtype=torch.long)
    labels = torch.full((n, longest), IGNORE, dtype=torch.long)
    weights = torch.zeros((n, longest), dtype=torch.float32)
    mask = torch.zeros((n, longest), dtype=torch.long)
    for row, i in enumerate(indices):
        length = len(data.input_ids[i])
        ids[row, :length] = data.input_ids[i]
        labels[row, :length] = data.labels[i]
        weights[row, :length] = data.weights[i]
        mask[row, :length] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "loss_weights": weights}
    rows = [data.pixel_row[i] for i in indices if data.pixel_row[i] >= 0]
    if rows:
        batch["pixel_values"] = data.pixel_values[rows]
    return batch


@dataclass
class Schedule:
    steps: int
    batch_size: int
    learning_rate: float
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0


def set_trainable(model, parts: tuple[str, ...]) -> None:
    """Train the named parts ("vision", "projector", "language") and freeze the rest."""
    prefixes = {"vision": "model.vision_tower", "projector": "model.multi_modal_projector", "language": ("model.language_model", "lm_head")}
    chosen = tuple(p for part in parts for p in ((prefixes[part],) if isinstance(prefixes[part], str) else prefixes[part]))
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(chosen))


def fit(model, data: Scenes, schedule: Schedule, seed: int, pad_id: int, log_every: int = 0, say=print) -> list[float]:
    """Train the model's trainable parameters on `data`; returns the loss of every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=schedule.learning_rate, weight_decay=schedule.weight_decay)
    warmup = max(1, int(schedule.steps * schedule.warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, schedule.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    order_rng = np.random.default_rng(seed)
    order: list[int] = []
    losses = []
    model.train()
    for step in range(schedule.steps):
        if len(order) < schedule.batch_size:
            order += order_rng.permutation(len(data.input_ids)).tolist()
        indices, order = order[: schedule.batch_size], order[schedule.batch_size :]
        batch = collate(data, indices, pad_id)
        token_loss, in_loss, _ = labelled_token_loss(model, batch)
        loss = (token_loss * batch["loss_weights"][:, 1:][in_loss]).sum() / max(1, len(token_loss))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, schedule.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            recent = losses[-log_every:]
            say(f"  step {step + 1:>5}/{schedule.steps}  loss {sum(recent) / len(recent):.4f}")
    model.eval()
    return losses
