"""Every GPU measurement in one go: real architectures, random weights, 4-bit as in training.

    python bench/gpu.py                   # CUDA: the four presets below, then --fsdp's check
    python bench/gpu.py --cpu-smoke       # the same code path on CPU with shrunken configs (CI runs this)
    python bench/gpu.py --fsdp            # CUDA only: the Trainer under configs/accelerate/fsdp_qlora.yaml

For each preset the real architecture is built from `presets/configs/<name>.json`
with random weights (nothing is downloaded), saved, and loaded back through
`l2t.models.load_base_model` — NF4 with double quantisation, the preset's skip
list, LoRA on the preset's target regex, a trainable projector — exactly as a
training run loads it, with activation checkpointing. Each batch holds
--seq-len tokens per sample (default 1,024): one image's tokens, the rest text,
of which the last 30 are the answer and 60 after the image the instruction.

Arms, each on the same model and batch:
- `ours`: the L2T loss, logits only at labelled positions (l2t and response labels);
- `full-logits`: our loss with logits everywhere (l2t and response): the cost of the mask itself;
- `trainer`: the model's own loss on full logits, response labels (what a plain `transformers.Trainer` computes);
- `trl`: TRL `SFTTrainer.training_step` under its bf16 autocast (its chunked LM head with entropy and token accuracy; it casts the trainable weights to bf16, so it runs last): response labels
  (what its assistant-only masks give) and every token (`full`).
Measured: samples/s, tokens/s, peak GPU memory (`torch.cuda.max_memory_allocated`, per arm)
and model FLOPs utilisation (6 x parameters x tokens per step, input embeddings left out, 4-bit
weights counted as the parameters they stand for) against a bf16 matmul peak measured on the same card.

Needs torch, transformers, peft, accelerate, bitsandbytes and trl (no gradio, no network).
A GPU machine without network takes the pinned wheels downloaded elsewhere: see
docs/BENCHMARKS.md, "GPU".
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from l2t.config import load_config  # noqa: E402
from l2t.models import add_lora, load_base_model  # noqa: E402
from l2t.presets import load_architecture_config  # noqa: E402
from l2t.trainer import L2TTrainer  # noqa: E402

PRESETS = ("llava-interleave-0.5b", "smolvlm-500m", "qwen2-vl-2b", "llava-1.5-7b")
ANSWER_TOKENS, INSTRUCTION_TOKENS = 30, 60
SMOKE_VOCAB = 2048
QWEN_IMAGE_SIDE = 448
"""Qwen2-VL takes images at their own size; 448 x 448 px gives 256 image tokens."""


def shrink(config) -> None:
    """CPU smoke test: same families and token layout, toy sizes."""
    text, vision = config.text_config, config.vision_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = 64, 128, 2
    text.num_attention_heads, text.num_key_value_heads = 4, 4
    if hasattr(text, "head_dim"):
        text.head_dim = 16
    if getattr(text, "layer_types", None):
        text.layer_types = text.layer_types[:2]
    if "mrope_section" in (getattr(text, "rope_parameters", None) or {}):
        text.rope_parameters["mrope_section"] = [2, 3, 3]  # sums to head_dim / 2
    # A small vocabulary (full logits over 150k entries dominate a toy model); the special tokens move into it.
    text.vocab_size = SMOKE_VOCAB
    config.image_token_id = SMOKE_VOCAB - 2
    if config.model_type == "qwen2_vl":
        config.vision_start_token_id = SMOKE_VOCAB - 1
        vision.depth, vision.embed_dim, vision.num_heads, vision.hidden_size = 2, 32, 2, text.hidden_size
    else:
        vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.num_attention_heads = 32, 64, 2, 2


def image_inputs(config, batch_size: int) -> tuple[int, dict]:
    """(image tokens per sample, the model's image inputs) for one image per sample, by family."""
    vision = config.vision_config
    if config.model_type == "qwen2_vl":
        side = QWEN_IMAGE_SIDE // vision.patch_size
        patch = vision.in_chans * vision.temporal_patch_size * vision.patch_size**2
        grid = torch.tensor([[1, side, side]] * batch_size)
        return side * side // vision.spatial_merge_size**2, {"pixel_values": torch.randn(batch_size * side * side, patch), "image_grid_thw": grid}
    pixels = torch.randn(batch_size, 3, vision.image_size, vision.image_size)
    patches = (vision.image_size // vision.patch_size) ** 2
    if config.model_type == "idefics3":
        mask = torch.ones(batch_size, 1, vision.image_size, vision.image_size, dtype=torch.bool)
        return patches // config.scale_factor**2, {"pixel_values": pixels[:, None], "pixel_attention_mask": mask}
    # LLaVA: one token per patch, plus CLIP's class token, minus the first token under "default"
    has_class_token = "clip" in vision.model_type
    return patches + int(has_class_token) - int(config.vision_feature_select_strategy == "default"), {"pixel_values": pixels}


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


def make_batch(config, batch_size: int, seq_len: int, labels_for: str, device: str) -> dict:
    """A batch of `seq_len` tokens per sample; labels_for: response, l2t (instruction too) or full (every token)."""
    n_image, images = image_inputs(config, batch_size)
    image_id = config.image_token_id
    # Text tokens below every special token (the image and vision-start ids sit at the top of the vocabulary).
    ids = torch.randint(10, min(config.text_config.vocab_size - 8, 30000), (batch_size, seq_len))
    ids[:, 0] = 1
    start = 1
    if config.model_type == "qwen2_vl":
        ids[:, 1] = config.vision_start_token_id
        start = 2
    ids[:, start : start + n_image] = image_id
    labels = torch.full_like(ids, -100)
    answer_start = seq_len - ANSWER_TOKENS
    labels[:, answer_start:] = ids[:, answer_start:]
    kinds = torch.zeros_like(ids)
    kinds[:, answer_start:] = 2
    if labels_for == "l2t":
        first = start + n_image + 4
        labels[:, first : first + INSTRUCTION_TOKENS] = ids[:, first : first + INSTRUCTION_TOKENS]
        kinds[:, first : first + INSTRUCTION_TOKENS] = 1
    elif labels_for == "full":
        labels = ids.clone()
    floating = torch.bfloat16 if device == "cuda" else torch.float32
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "loss_weights": (labels != -100).float(), "loss_kinds": kinds}
    batch.update(images)
    if config.model_type == "qwen2_vl":
        batch["mm_token_type_ids"] = (ids == image_id).int()  # what its processor returns: where the image tokens are (for M-RoPE)
    return {k: v.to(device, floating) if v.is_floating_point() and k != "loss_weights" else v.to(device) for k, v in batch.items()}


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


def trainer_loss(model, batch):
    inputs = {k: v for k, v in batch.items() if k not in ("loss_weights", "loss_kinds")}
    return model(**inputs).loss


def time_steps(model, batch, loss_fn, steps: int, warmup: int, device: str, backward_inside: bool = False) -> dict:
    """Seconds per optimiser step after `warmup` steps, peak GPU memory, last loss (`backward_inside`: loss_fn ran backward)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            start = time.perf_counter()
        loss = loss_fn(model, batch)
        if not backward_inside:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 1024**3 if device == "cuda" else float("nan")
    return {"seconds_per_step": seconds, "peak_gb": peak, "loss": float(loss.detach())}


def trl_trainer(model, batch_size: int, device: str, out: str):
    """TRL's SFTTrainer around our LoRA model, as a user would set it up for QLoRA (its defaults: bf16, checkpointing)."""
    import datasets
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    # The batches are made here; the trainer only needs some tokenizer and data to start.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "x": 1}, unk_token="x")), pad_token="<pad>", eos_token="x")
    args = SFTConfig(output_dir=out, per_device_train_batch_size=batch_size, bf16=True, max_length=None, report_to=[], use_cpu=device == "cpu",
                     gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}, save_strategy="no")  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list([{"text": "x x"}]), processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1  # set by its training loop, which the steps here stand in for
    return trainer


def model_parameters(model) -> int:
    """Parameters the model multiplies with (not the input embeddings): a packed 4-bit weight counts as the matrix it stands for."""
    total = -model.get_input_embeddings().weight.numel()
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        total += math.prod(state.shape) if state is not None else param.numel()
    return total


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
        dtype = "model.dtype=bf16" if device == "cuda" else "model.dtype=fp32"
        config = load_config(name, overrides=[f"model.hub_id={folder}", "model.check_chat_template=false", dtype])
        base = load_base_model(config.model, device=device)
        model = add_lora(base, config.model, config.lora)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.train()
        parameters = model_parameters(model)
        variants = [("ours", our_loss, "l2t"), ("ours", our_loss, "response"), ("full-logits", our_loss_full_logits, "l2t"),
                    ("full-logits", our_loss_full_logits, "response"), ("trainer", trainer_loss, "response")]  # fmt: skip
        trl = []  # made when its arms come, last: TRL casts the trainable weights to bf16

        def trl_step(model, batch):
            with trl[0].accelerator.autocast():  # what its training loop wraps the prepared model in
                return trl[0].training_step(model, batch)

        if not args.no_trl:
            variants += [("trl", trl_step, "response"), ("trl", trl_step, "full")]
        for impl, loss_fn, labels_for in variants:
            batch = make_batch(arch, args.batch_size, args.seq_len, labels_for, device)
            if impl == "trl":
                trl = trl or [trl_trainer(model, args.batch_size, device, tmp)]
                batch = {k: v for k, v in batch.items() if k not in ("loss_weights", "loss_kinds")}
            result = time_steps(model, batch, loss_fn, args.steps, args.warmup, device, backward_inside=impl == "trl")
            tokens = batch["input_ids"].numel()
            row = {
                "preset": name,
                "impl": impl,
                "mode": labels_for,
                "batch": args.batch_size,
                "seq_len": args.seq_len,
                "loss_tokens": int((batch["labels"] != -100).sum()),
                "samples_per_s": args.batch_size / result["seconds_per_step"],
                "tokens_per_s": tokens / result["seconds_per_step"],
                "peak_gb": result["peak_gb"],
                "mfu": 6 * parameters * tokens / result["seconds_per_step"] / (peak_tflops * 1e12),
                "loss": result["loss"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model, base
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def summary(rows: list[dict], presets: list[str]) -> None:
    print("\npreset                 impl         labels    samples/s  tokens/s   peak GB   MFU")
    for r in rows:
        print(f"{r['preset']:<22} {r['impl']:<12} {r['mode']:<9} {r['samples_per_s']:9.2f} {r['tokens_per_s']:9.0f} {r['peak_gb']:9.2f} {r['mfu']:6.1%}")
    for name in presets:
        by = {(r["impl"], r["mode"]): r for r in rows if r["preset"] == name}
        ours = by[("ours", "l2t")]
        line = [f"ours(l2t)/trainer samples/s {ours['samples_per_s'] / by[('trainer', 'response')]['samples_per_s']:.2f}x"]
        if ("trl", "response") in by:
            line.append(f"ours(l2t)/trl(response) {ours['samples_per_s'] / by[('trl', 'response')]['samples_per_s']:.2f}x")
        line.append(f"l2t/response step time: labelled logits {by[('ours', 'response')]['samples_per_s'] / ours['samples_per_s']:.3f} (goal <= 1.02), "
                    f"full logits {by[('full-logits', 'response')]['samples_per_s'] / by[('full-logits', 'l2t')]['samples_per_s']:.3f}")  # fmt: skip
        print(f"{name}: " + "; ".join(line))


def fsdp_trainer_check(out: Path, processes: int) -> None:
    """The recipe under accelerate's FSDP2 config vs the same run without it: per-step losses, and the adapter loads."""
    common = ["--preset", "tiny", "train.max_steps=5", "train.logging_steps=1", "train.preview_samples=0", "--overwrite"]
    plain = [sys.executable, "-m", "l2t.train", "--output", str(out / "plain"), *common]
    fsdp = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs/accelerate/fsdp_qlora.yaml"),
            "--num_processes", str(processes), "-m", "l2t.train", "--output", str(out / "fsdp"), *common]  # fmt: skip
    for command in (plain, fsdp):
        subprocess.run(command, cwd=REPO, check=True)
    from l2t import runs

    losses = {name: [r["loss"] for r in runs.read_metrics(out / name)] for name in ("plain", "fsdp")}
    print(f"fsdp: per-step loss without FSDP {losses['plain']}, under FSDP ({processes} process(es)) {losses['fsdp']}")
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base_model(load_config("tiny").model), str(out / "fsdp" / runs.ADAPTER))
    print(f"fsdp: the adapter saved under FSDP loads with PeftModel.from_pretrained ({type(model).__name__})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sample, image tokens included")
    parser.add_argument("--no-trl", action="store_true", help="leave out the TRL arm")
    parser.add_argument("--fsdp", action="store_true", help="only the Trainer under configs/accelerate/fsdp_qlora.yaml (CUDA)")
    parser.add_argument("--json", default="", help="also write every row to this file")
    parser.add_argument("--cpu-smoke", action="store_true", help="run on CPU with toy sizes to check the script")
    args = parser.parse_args()
    device = "cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.cpu_smoke:
        sys.exit("no CUDA device: run with --cpu-smoke to check the script on CPU")
    if args.fsdp:
        if device == "cpu":
            sys.exit("--fsdp needs CUDA: accelerate runs an FSDP config as DDP on CPU (tests/test_fsdp.py shards on CPU directly)")
        with tempfile.TemporaryDirectory() as tmp:
            fsdp_trainer_check(Path(tmp), torch.cuda.device_count())
        return
    import bitsandbytes
    import peft
    import transformers

    card = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    peak = matmul_peak_tflops(device)
    print(f"device: {card}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}")
    print(f"measured matmul peak: {peak:.1f} TFLOP/s ({'bf16' if device == 'cuda' else 'fp32'})")
    presets = args.presets.split(",")
    rows = [row for name in presets for row in run_preset(name, args, device, peak)]
    summary(rows, presets)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": card, "matmul_peak_tflops": peak, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
