"""Running a model: greedy answers, the base model beside the tuned one, and teacher-forced scores.

Everything that runs a model goes through here: the training command's
end-of-run preview, `l2t.evaluate`, the merge's parity check and the UI's
Compare tab.

- `generate` answers (messages, PIL images) prompts greedily, batched and
  left-padded; `generate_pairs` and `caption_pair` give the base model's and
  the tuned model's answers to the same prompts. The base model is the same
  weights with the adapter (and the trained projector) switched off
  (`base_model_context`).
- `answer_log_probs` is log p(token | images, question, earlier answer tokens)
  for every token of a given answer (the tokens `loss.mode=response` trains on:
  the answer and its end marker), from one teacher-forced pass, batched and
  right-padded; `teacher_forced_logits` gives the whole logits of that pass.
- `load_run` loads a trained run for all of the above.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from l2t import chat, runs
from l2t.batch import process_images
from l2t.data import Sample
from l2t.loss import labelled_token_loss
from l2t.masking import IGNORE, Encoder, labels_and_weights
from l2t.models import fetch_model, load_processor, load_with_adapter

DEFAULT_MAX_NEW_TOKENS = 48
DEFAULT_BATCH_SIZE = 16


def pad_token_id(tokenizer) -> int:
    """The tokenizer's padding id; tokenizers without one pad with their end-of-sequence id."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def prompt_and_reference(sample: Sample) -> tuple[list[dict], str]:
    """The conversation up to the first user turn, and the answer the data gives to it."""
    messages = []
    for m in sample.messages:
        messages.append(m)
        if m["role"] == "user":
            break
    answer = next((m["content"] for m in sample.messages[len(messages) :] if m["role"] == "assistant"), "")
    return messages, answer


def load_run(run: runs.TrainedRun):
    """The run's model (base + adapter, quantised as in training) and an encoder for its prompt format."""
    fetch_model(run.config)
    encoder = Encoder.from_config(run.config, load_processor(run.config.model), run.task_templates)
    return load_with_adapter(run.config, run.path / runs.ADAPTER), encoder


def base_model_context(model):
    """Run the peft-wrapped model as the base model (adapter and trained projector off)."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if disable is not None else contextlib.nullcontext()


# ---------------------------------------------------------------- batches


def _image_tensors(encoder: Encoder, images_per_sample: list[list], device) -> dict:
    """The processor's tensors for every sample's images, joined in sample order."""
    tensors: dict[str, list] = {}
    for images in images_per_sample:
        for key, value in process_images(encoder.processor, images).items():
            tensors.setdefault(key, []).append(value)
    return {key: torch.cat(values).to(device) for key, values in tensors.items()}


def _padded_batch(encoder: Encoder, encoded: list, images_per_sample: list[list], device, left: bool) -> dict:
    """Encoded samples padded to one length (on the left for generation), with the images' tensors."""
    longest = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), longest), pad_token_id(encoder.tokenizer), dtype=torch.long)
    mask = torch.zeros((len(encoded), longest), dtype=torch.long)
    for i, e in enumerate(encoded):
        place = slice(longest - len(e), longest) if left else slice(0, len(e))
        ids[i, place] = torch.from_numpy(e.input_ids)
        mask[i, place] = 1
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    batch.update(_image_tensors(encoder, images_per_sample, device))
    return batch


def vision_dtype(model) -> torch.dtype | None:
    for name, param in model.named_parameters():
        if ("vision" in name or "visual" in name) and param.dtype.is_floating_point:
            return param.dtype
    return None


def with_pixels_in(batch: dict, dtype: torch.dtype | None) -> dict:
    """The batch with its pixels in `dtype` (the vision tower's), where there are pixels and a dtype."""
    if "pixel_values" in batch and dtype is not None:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return batch


def teacher_forced_batch(encoder: Encoder, conversations: list[tuple[list[dict], str]], images_per_item: list[list], device):
    """Right-padded prompt + answer ids, the images' tensors, and labels on the answer tokens."""
    encoded = [
        encoder.encode([*messages, {"role": "assistant", "content": answer}], [p.size for p in pictures])
        for (messages, answer), pictures in zip(conversations, images_per_item, strict=True)
    ]
    batch = _padded_batch(encoder, encoded, images_per_item, device, left=False)
    labels = torch.full(batch["input_ids"].shape, IGNORE, dtype=torch.long)
    for i, e in enumerate(encoded):
        labels[i, : len(e)] = torch.from_numpy(labels_and_weights(e, "response")[0])
    return batch, labels.to(device)


# ---------------------------------------------------------------- answers


@torch.no_grad()
def generate(
    model,
    encoder: Encoder,
    prompts: list[tuple[list[dict], list]],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[str]:
    """Greedy answers for (messages, PIL images) prompts, batched and left-padded."""
    model.eval()
    device = next(model.parameters()).device
    dtype = vision_dtype(model)
    answers = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        encoded = [encoder.encode(messages, [img.size for img in images], add_generation_prompt=True) for messages, images in chunk]
        batch = with_pixels_in(_padded_batch(encoder, encoded, [images for _, images in chunk], device, left=True), dtype)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id(encoder.tokenizer))
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        answers += [t.strip() for t in encoder.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


def generate_pairs(
    model, encoder: Encoder, prompts, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = DEFAULT_BATCH_SIZE
) -> tuple[list[str], list[str]]:
    """(base answers, tuned answers) for the same prompts and decoding."""
    with base_model_context(model):
        before = generate(model, encoder, prompts, max_new_tokens, batch_size)
    after = generate(model, encoder, prompts, max_new_tokens, batch_size)
    return before, after


def caption_pair(model, encoder: Encoder, image, prompt: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> tuple[str, str]:
    """Base and tuned answer to one prompt about one image."""
    messages = [{"role": "user", "content": (chat.IMAGE if image is not None else "") + prompt}]
    before, after = generate_pairs(model, encoder, [(messages, [image] if image is not None else [])], max_new_tokens)
    return before[0], after[0]


def chat_turn(history: list[dict], question: str, with_image: bool) -> list[dict]:
    """The messages of a conversation's next turn: the earlier turns, then `question`; the image goes first in the first turn."""
    messages = [{"role": m["role"], "content": m["content"]} for m in history] + [{"role": "user", "content": question}]
    if with_image:
        messages[0] = {"role": messages[0]["role"], "content": chat.IMAGE + messages[0]["content"]}
    return messages


def chat_pair(model, encoder: Encoder, base_history: list[dict], tuned_history: list[dict], question: str, image=None) -> tuple[str, str]:
    """The base and the tuned model's next answers, each in its own conversation (its own earlier answers)."""
    images = [image] if image is not None else []
    with base_model_context(model):
        base = generate(model, encoder, [(chat_turn(base_history, question, image is not None), images)])[0]
    tuned = generate(model, encoder, [(chat_turn(tuned_history, question, image is not None), images)])[0]
    return base, tuned


# ---------------------------------------------------------------- teacher-forced passes


@torch.no_grad()
def answer_log_probs(
    model, encoder: Encoder, conversations: list[tuple[list[dict], str]], images_per_item: list[list], batch_size: int = DEFAULT_BATCH_SIZE
) -> list[np.ndarray]:
    """log p(token | images, question, earlier answer tokens) for each token of each (prompt, answer)'s answer."""
    model.eval()
    device = next(model.parameters()).device
    dtype = vision_dtype(model)
    results = []
    for start in range(0, len(conversations), batch_size):
        part = slice(start, start + batch_size)
        batch, labels = teacher_forced_batch(encoder, conversations[part], images_per_item[part], device)
        # Logits only where an answer token is predicted: the vocabulary is wide (152k for Qwen), the answers short.
        token_loss, scored, _ = labelled_token_loss(model, {**with_pixels_in(batch, dtype), "labels": labels})
        results += [(-chunk).cpu().numpy() for chunk in token_loss.split(scored.sum(1).tolist())]
    return results


@torch.no_grad()
def teacher_forced_logits(model, encoder: Encoder, conversations: list[tuple[list[dict], str]], images_per_item: list[list]) -> Iterator[torch.Tensor]:
    """Logits over each prompt followed by its answer, one sample at a time, on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    dtype = vision_dtype(model)
    for conversation, pictures in zip(conversations, images_per_item, strict=True):
        batch, _ = teacher_forced_batch(encoder, [conversation], [pictures], device)
        yield model(**with_pixels_in(batch, dtype)).logits[0].cpu()
