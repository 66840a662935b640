"""The merge's parity check: the merged model must answer and score as base + adapter did.

`ParityCheck` is made before the full-precision model loads (it picks the
prompts, and runs the training-time model, 4-bit base + adapter, and frees it),
records base + adapter's greedy answers and logits just before the merge
(`record`), and compares the merged model with them after it (`compare`).
The tolerances, and why they are what they are: docs/MERGE.md, "Parity check".
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from l2t import chat, runs
from l2t.config import Config
from l2t.data import DataError, load_samples, open_images
from l2t.errors import L2TError
from l2t.generation import generate, prompt_and_reference, teacher_forced_logits
from l2t.images import ImageError
from l2t.masking import Encoder
from l2t.models import ModelError, compute_dtype, dtype_name, load_with_adapter, torch_dtype

RELATIVE_TOLERANCE = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 6e-2}
"""Allowed max |logit difference| merged vs base+adapter, as a share of max(1, largest |logit|)."""
DEFAULT_CHECK_SAMPLES = 8
PROBE_QUESTIONS = ("Describe the image briefly.", "What is in the picture?", "What color is the object on the left?")


class ParityError(L2TError, RuntimeError):
    """The merged model doesn't match base+adapter; carries the merge report."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


class ParityCheck:
    """Merged vs base+adapter (the verdict) and vs the training-time model (reported), on the same prompts."""

    def __init__(self, config: Config, run_dir: Path, encoder: Encoder, dtype: str, device: str, samples: int, tolerance: float | None):
        self.encoder = encoder
        self.dtype = dtype
        self.tolerance = tolerance
        self.ids, self.prompts, self.prompt_source = check_prompts(config, run_dir, samples)
        # Trained without quantisation at this dtype, base + adapter is the training-time model itself.
        self.training_is_reference = config.model.quant == "none" and compute_dtype(config.model, device) == torch_dtype(dtype)
        self.training_answers, self.training_info = (
            (None, {}) if self.training_is_reference else training_model_answers(config, run_dir / runs.ADAPTER, encoder, self.prompts, device)
        )
        self.reference_answers: list[str] = []
        self.reference_logits: list[torch.Tensor] = []

    def record(self, model) -> None:
        """base+adapter's greedy answers, and its logits over each prompt followed by its answer: before the merge."""
        self.reference_answers = generate(model, self.encoder, self.prompts)
        self.reference_logits = list(self._logits(model))
        if self.training_is_reference:
            self.training_answers = self.reference_answers
            self.training_info = {"quant": "none", "dtype": self.dtype, "note": "the training-time model is base+adapter"}

    def _logits(self, model):
        conversations = [(messages, answer) for (messages, _), answer in zip(self.prompts, self.reference_answers, strict=True)]
        return teacher_forced_logits(model, self.encoder, conversations, [pictures for _, pictures in self.prompts])

    def compare(self, merged) -> dict:
        """The merged model on the same prompts and answers: the merge report's `parity` section."""
        merged_answers = generate(merged, self.encoder, self.prompts)
        # An iterator: only one sample's merged logits exist at a time.
        verdict = logit_verdict(self.dtype, self.tolerance, (self.reference_answers, self.reference_logits), (merged_answers, self._logits(merged)))
        self.reference_logits = []
        training_answers, training = self.training_answers, dict(self.training_info)
        if training_answers is not None:
            training["token_agreement"] = token_agreement(self.encoder.tokenizer, training_answers, merged_answers)
            training["identical_answers"] = sum(a == b for a, b in zip(training_answers, merged_answers, strict=True))
        answers = [
            {"id": i, "adapter": a, "merged": m, **({"training_model": t} if training_answers is not None else {})}
            for i, a, m, t in zip(self.ids, self.reference_answers, merged_answers, training_answers or [None] * len(self.ids), strict=True)
        ]
        return {"samples": len(self.prompts), "prompt_source": self.prompt_source, "merged_vs_adapter": verdict,
                "merged_vs_training_model": training, "answers": answers, "passed": verdict["passed"]}  # fmt: skip


def check_prompts(config: Config, run_dir: Path, count: int) -> tuple[list[str], list[tuple[list[dict], list]], str]:
    """(ids, (messages, PIL images) prompts, where they came from) for the parity check."""
    path = run_dir / runs.HELD_OUT
    images_root = config.data.images or None
    ids, prompts = [], []
    try:
        samples, _ = load_samples(path, images_root, max_pixels=config.data.max_image_pixels)
        source = open_images(images_root, path, config.data.max_image_pixels)
    except (DataError, ImageError):
        samples = []
    for sample in samples[: count * 4]:
        if len(prompts) == count:
            break
        messages, _ = prompt_and_reference(sample)
        shown = sum(m["content"].count(chat.IMAGE) for m in messages)
        try:
            pictures = [source.open(p) for p in sample.images[:shown]]
        except ImageError:
            continue
        ids.append(sample.id)
        prompts.append((messages, pictures))
    if prompts:
        return ids, prompts, runs.HELD_OUT
    # The check compares two models on the same inputs, so made-up prompts serve when no data is at hand.
    rng = np.random.default_rng(0)
    for i in range(count):
        noise = Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))
        ids.append(f"probe-{i}")
        prompts.append(([{"role": "user", "content": chat.IMAGE + PROBE_QUESTIONS[i % len(PROBE_QUESTIONS)]}], [noise]))
    return ids, prompts, f"probe prompts on noise images ({runs.HELD_OUT} has no usable samples)"


def token_agreement(tokenizer, reference: list[str], other: list[str]) -> float:
    """Share of answer-token positions (over the longer answer of each pair) holding the same token."""
    same = total = 0
    for a, b in zip(reference, other, strict=True):
        ta = tokenizer(a, add_special_tokens=False)["input_ids"]
        tb = tokenizer(b, add_special_tokens=False)["input_ids"]
        total += max(len(ta), len(tb))
        same += sum(x == y for x, y in zip(ta, tb, strict=False))
    return same / total if total else 1.0


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def training_model_answers(config: Config, adapter_dir: Path, encoder: Encoder, prompts, device: str) -> tuple[list[str] | None, dict]:
    """Greedy answers of base (in the run's quantisation) + adapter, as after training; None if it can't load."""
    info = {"quant": config.model.quant, "dtype": dtype_name(compute_dtype(config.model, device))}
    try:
        model = load_with_adapter(config, adapter_dir, device=device)
    except ModelError as exc:
        return None, {**info, "skipped": str(exc)}
    answers = generate(model, encoder, prompts)
    del model
    free_memory()  # before the full-precision model loads
    return answers, info


def logit_verdict(dtype: str, tolerance: float | None, adapter: tuple[list[str], list], merged: tuple[list[str], object]) -> dict:
    """Merged vs base+adapter: answers and the largest logit difference, with the verdict.

    `merged` holds an iterator of logits, so only one sample's merged logits exist at a time.
    """
    (adapter_answers, adapter_logits), (merged_answers, merged_logits) = adapter, merged
    largest = max(float(t.float().abs().max()) for t in adapter_logits)
    diff = max(float((a.float() - m.float()).abs().max()) for a, m in zip(adapter_logits, merged_logits, strict=True))
    if tolerance is None:
        tolerance = RELATIVE_TOLERANCE[dtype] * max(1.0, largest)
    identical = sum(a == m for a, m in zip(adapter_answers, merged_answers, strict=True))
    answers_must_match = dtype == "fp32"
    passed = diff <= tolerance and (identical == len(adapter_answers) or not answers_must_match)
    return {
        "passed": passed,
        "dtype": dtype,
        "identical_answers": identical,
        "answers_must_match": answers_must_match,
        "max_logit_diff": diff,
        "tolerance": tolerance,
        "largest_logit": largest,
        "positions": sum(t.shape[0] for t in adapter_logits),
    }
