"""Evaluation: what the base model and the tuned model answer, side by side.

`caption_pair` is the one function that produces a before/after pair; the
training command's end-of-run preview and the UI's Compare tab call it (and
`generate`, its batched form).
"""

from __future__ import annotations

import contextlib

import torch

from l2t import chat
from l2t.batch import process_images
from l2t.data import Sample
from l2t.masking import Encoder

DEFAULT_MAX_NEW_TOKENS = 48


def prompt_and_reference(sample: Sample) -> tuple[list[dict], str]:
    """The conversation up to the first user turn, and the answer the data gives to it."""
    messages = []
    for m in sample.messages:
        messages.append(m)
        if m["role"] == "user":
            break
    answer = next((m["content"] for m in sample.messages[len(messages):] if m["role"] == "assistant"), "")
    return messages, answer


def _batch_inputs(encoder: Encoder, prompts: list[tuple[list[dict], list]], device) -> dict:
    """Left-padded ids for generation, with the images' tensors."""
    encoded = [encoder.encode(messages, [img.size for img in images], add_generation_prompt=True) for messages, images in prompts]
    longest = max(len(e) for e in encoded)
    pad_id = encoder.tokenizer.pad_token_id if encoder.tokenizer.pad_token_id is not None else encoder.tokenizer.eos_token_id
    ids = torch.full((len(encoded), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), longest), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, longest - len(e):] = torch.from_numpy(e.input_ids)
        mask[i, longest - len(e):] = 1
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    tensors: dict[str, list] = {}
    for _, images in prompts:
        for key, value in process_images(encoder.processor, images).items():
            tensors.setdefault(key, []).append(value)
    for key, values in tensors.items():
        batch[key] = torch.cat(values).to(device)
    return batch


@torch.no_grad()
def generate(model, encoder: Encoder, prompts: list[tuple[list[dict], list]], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = 16) -> list[str]:
    """Greedy answers for (messages, PIL images) prompts, batched and left-padded."""
    model.eval()
    device = next(model.parameters()).device
    vision_dtype = _vision_dtype(model)
    answers = []
    tokenizer = encoder.tokenizer
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        batch = _batch_inputs(encoder, chunk, device)
        if "pixel_values" in batch and vision_dtype is not None:
            batch["pixel_values"] = batch["pixel_values"].to(vision_dtype)
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        answers += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


def _vision_dtype(model):
    for name, param in model.named_parameters():
        if "vision" in name or "visual" in name:
            if param.dtype.is_floating_point:
                return param.dtype
    return None


def base_model_context(model):
    """Run the peft-wrapped model as the base model (adapter and trained projector off)."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if disable is not None else contextlib.nullcontext()


def generate_pairs(model, encoder: Encoder, prompts, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> tuple[list[str], list[str]]:
    """(base answers, tuned answers) for the same prompts and decoding."""
    with base_model_context(model):
        before = generate(model, encoder, prompts, max_new_tokens)
    after = generate(model, encoder, prompts, max_new_tokens)
    return before, after


def caption_pair(model, encoder: Encoder, image, prompt: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> tuple[str, str]:
    """Base and tuned answer to one prompt about one image."""
    messages = [{"role": "user", "content": (chat.IMAGE if image is not None else "") + prompt}]
    before, after = generate_pairs(model, encoder, [(messages, [image] if image is not None else [])], max_new_tokens)
    return before[0], after[0]
