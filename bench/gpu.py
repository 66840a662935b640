"""Every GPU measurement in one go: real architectures, random weights, 4-bit as in training.

    python bench/gpu.py                   # CUDA: llava-interleave-0.5b, tinyllava, llava-1.5-7b
    python bench/gpu.py --cpu-smoke       # the same code path on CPU with shrunken configs

For each preset the real architecture is built from `presets/configs/<name>.json`
with random weights (nothing is downloaded), saved, and loaded back through
`l2t.models.load_base_model` — NF4 with double quantisation, the preset's skip
list, LoRA on the preset's target regex, a trainable projector — exactly as a
training run loads it. Batches are realistic in length: one image's tokens plus
~100 text tokens, of which ~30 are the answer and ~60 the instruction.

Measured per preset, for ours (L2T loss, logits only at labelled positions) and
the baseline (the model's own loss on full logits, response-only labels), and
for loss mode l2t vs response: samples/s, tokens/s, peak GPU memory
(`torch.cuda.max_memory_allocated`) and model FLOPs utilisation against a bf16
matmul peak measured on the same card. Needs only torch, transformers, peft,
accelerate and bitsandbytes (no gradio, no datasets, no network).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from l2t.config import load_config  # noqa: E402
from l2t.models import add_lora, load_base_model  # noqa: E402
from l2t.presets import load_architecture_config  # noqa: E402
from l2t.trainer import L2TTrainer  # noqa: E402

PRESETS = ("llava-interleave-0.5b", "tinyllava", "llava-1.5-7b")
TEXT_TOKENS, ANSWER_TOKENS, INSTRUCTION_TOKENS = 100, 30, 60


def shrink(config) -> None:
    """CPU smoke test: same families and token layout, toy sizes."""
    text, vision = config.text_config, config.vision_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = 64, 128, 2
    text.num_attention_heads, text.num_key_value_heads = 4, 4
    if hasattr(text, "head_dim"):
        text.head_dim = 16
    if getattr(text, "layer_types", None):
        text.layer_types = text.layer_types[:2]
    vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.num_attention_heads = 32, 64, 2, 2


def image_token_count(config) -> int:
    """LLaVA: one token per patch, plus CLIP's class token, minus the first token under "default"."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    has_class_token = "clip" in vision.model_type
    return patches + int(has_class_token) - int(config.vision_feature_select_strategy == "default")


def build_and_save(name: str, folder: Path, device: str, smoke: bool):
    import transformers

    config = load_architecture_config(name)
    if smoke:
        shrink(config)
    cls = getattr(transformers, load_config(name).model.model_class)
    with torch.device(device):
        model = cls._from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return config


def make_batch(config, batch_size: int, mode: str, device: str) -> dict:
    vision = config.vision_config
    n_image = image_token_count(config)
    vocab = config.text_config.vocab_size
    length = 1 + n_image + TEXT_TOKENS
    ids = torch.randint(10, min(vocab, 30000), (batch_size, length))
    ids[:, 0] = 1
    ids[:, 1 : 1 + n_image] = config.image_token_id
    labels = torch.full_like(ids, -100)
    answer_start = length - ANSWER_TOKENS
    labels[:, answer_start:] = ids[:, answer_start:]
    kinds = torch.zeros_like(ids)
    kinds[:, answer_start:] = 2
    if mode == "l2t":
        start = 1 + n_image + 4
        labels[:, start : start + INSTRUCTION_TOKENS] = ids[:, start : start + INSTRUCTION_TOKENS]
        kinds[:, start : start + INSTRUCTION_TOKENS] = 1
    pixels = torch.randn(batch_size, 3, vision.image_size, vision.image_size)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": pixels.to(device, torch.bfloat16 if device == "cuda" else torch.float32),
        "labels": labels.to(device),
        "loss_weights": (labels != -100).float().to(device),
        "loss_kinds": kinds.to(device),
    }


class _Args:
    average_tokens_across_devices = False
    world_size = 1


def our_loss(model, batch, labelled_logits_only: bool = True):
    trainer = L2TTrainer.__new__(L2TTrainer)
    trainer.args = _Args()
    trainer.labelled_logits_only = labelled_logits_only
    trainer._parts = torch.zeros(6, dtype=torch.float64)
    return L2TTrainer.compute_loss(trainer, model, dict(batch))


def our_loss_full_logits(model, batch):
    return our_loss(model, batch, labelled_logits_only=False)


def baseline_loss(model, batch):
    inputs = {k: v for k, v in batch.items() if k not in ("loss_weights", "loss_kinds")}
    return model(**inputs).loss


def time_steps(model, batch, loss_fn, steps: int, warmup: int, device: str) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            start = time.perf_counter()
        loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 1024**3 if device == "cuda" else float("nan")
    return {"seconds_per_step": seconds, "peak_gb": peak, "loss": float(loss.detach())}


def matmul_peak_tflops(device: str) -> float:
    n = 8192 if device == "cuda" else 512
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    repeats = 20
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def run_preset(name: str, args, device: str, peak_tflops: float) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / name
        arch = build_and_save(name, folder, device, args.cpu_smoke)
        config = load_config(name, overrides=[f"model.hub_id={folder}", "model.check_chat_template=false", "model.dtype=bf16" if device == "cuda" else "model.dtype=fp32"])
        base = load_base_model(config.model, device=device)
        model = add_lora(base, config.model, config.lora)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.train()
        total_params = sum(p.numel() for p in model.parameters()) * (2 if device == "cuda" else 1)
        variants = (("ours", our_loss, "l2t"), ("ours", our_loss, "response"), ("full-logits", our_loss_full_logits, "l2t"),
                    ("full-logits", our_loss_full_logits, "response"), ("baseline", baseline_loss, "response"))  # fmt: skip
        for label, loss_fn, mode in variants:
            batch = make_batch(arch, args.batch_size, mode, device)
            result = time_steps(model, batch, loss_fn, args.steps, args.warmup, device)
            tokens = batch["input_ids"].numel()
            flops = 6 * total_params * tokens  # model FLOPs convention (fwd + bwd), 4-bit weights counted as parameters
            row = {
                "preset": name,
                "impl": label,
                "mode": mode,
                "batch": args.batch_size,
                "seq_len": batch["input_ids"].shape[1],
                "samples_per_s": args.batch_size / result["seconds_per_step"],
                "tokens_per_s": tokens / result["seconds_per_step"],
                "peak_gb": result["peak_gb"],
                "mfu": flops / result["seconds_per_step"] / (peak_tflops * 1e12),
                "loss": result["loss"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model, base
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--cpu-smoke", action="store_true", help="run on CPU with toy sizes to check the script")
    args = parser.parse_args()
    device = "cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.cpu_smoke:
        sys.exit("no CUDA device: run with --cpu-smoke to check the script on CPU")
    card = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    import bitsandbytes
    import peft
    import transformers

    peak = matmul_peak_tflops(device)
    print(f"device: {card}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}")
    print(f"measured matmul peak: {peak:.1f} TFLOP/s ({'bf16' if device == 'cuda' else 'fp32'})")
    rows = []
    for name in args.presets.split(","):
        rows += run_preset(name, args, device, peak)
    print("\npreset                 impl         mode      samples/s  tokens/s   peak GB   MFU")
    for r in rows:
        print(f"{r['preset']:<22} {r['impl']:<12} {r['mode']:<9} {r['samples_per_s']:9.2f} {r['tokens_per_s']:9.0f} {r['peak_gb']:9.2f} {r['mfu']:6.1%}")
    for name in args.presets.split(","):
        by = {(r["impl"], r["mode"]): r for r in rows if r["preset"] == name}
        ratio = by[("ours", "l2t")]["samples_per_s"] / by[("baseline", "response")]["samples_per_s"]
        step = by[("ours", "response")]["samples_per_s"] / by[("ours", "l2t")]["samples_per_s"]
        mask = by[("full-logits", "response")]["samples_per_s"] / by[("full-logits", "l2t")]["samples_per_s"]
        print(f"{name}: ours(l2t)/baseline samples/s = {ratio:.2f}x (goal >= 1.5); l2t/response step time: full logits {mask:.3f} (goal <= 1.02), labelled logits only {step:.3f}")


if __name__ == "__main__":
    main()
