"""Merge a run's adapter into its base model, check the result, and export a plain transformers folder.

    python -m l2t.merge runs/tiny-l2t --out merged/tiny-l2t
    python -m l2t.merge runs/llava-1.5-7b-l2t --out merged/llava-1.5-7b-l2t --dtype bf16 --device cuda
    python -m l2t.merge RUN_DIR --out DIR [--dtype auto|bf16|fp16|fp32] [--device cpu|cuda]
                        [--overwrite] [--no-check] [--check-samples N] [--tolerance T]

The base model is loaded again at full precision (`--dtype`; auto = the dtype its
checkpoint is stored in), never in the 4-bit form used for training: folding LoRA
into NF4 weights rounds the sum back to 4 bits (logits moved by up to 1.9 on the
tiny model). The run's adapter goes on top with `PeftModel.from_pretrained`, which
also restores the trained projector (peft `modules_to_save`), and
`merge_and_unload()` adds each B·A·scale into its Linear in place. The output
folder holds safetensors weights (2 GB shards, no pickle), config and generation
config, the processor with the run's prompt format as its chat template, a model
card (README.md) and merge_report.json. It loads with
`AutoModelForImageTextToText.from_pretrained(out)` and `AutoProcessor.from_pretrained(out)`,
without l2t installed.

Parity check (on unless --no-check), on the first N held-out samples of the run
(held_out.json; made-up prompts on noise images if it has none):
- merged vs base+adapter at the same dtype: greedy answers (`l2t.evaluate.generate`)
  and the largest logit difference over prompt + answer (one teacher-forced
  forward pass per sample). Allowed: `RELATIVE_TOLERANCE[dtype] x max(1, largest
  |logit|)`, i.e. 1e-5 of the logit range in fp32, 1e-2 in fp16 and 6e-2 in bf16.
  These are 3.5 to 8 times the differences measured between a merged and an
  unmerged random 12-layer, 512-wide Llama with a random r=16 LoRA (3.4e-5 /
  0.055 / 0.44 at logits up to 26; not measured on a 7B model): storing W+BA in
  16 bits rounds every weight once more. In fp32 the answers must also be
  identical. In fp16/bf16 a greedy answer may flip where two tokens are within
  rounding of each other (2 of 8 tiny-model answers did in bf16), so there the
  answers are reported and the logit bound decides: it also limits any flip to a
  near-tie (a top-token margin under 2x the tolerance).
- merged vs the training-time model (base in the run's quantisation + adapter):
  the share of answer tokens that agree. Reported, never a failure: the 4-bit
  base the adapter was trained on is not the base it is merged into.
A failed check exits with status 1, prints the numbers and writes no model.

Memory: the base is loaded once through meta-device init (transformers 5 always
loads that way; safetensors are memory-mapped) and the merge is in place, so peak
RAM is about one copy of the model. (The adapter is loaded without peft's
`low_cpu_mem_usage=True`, which would keep the projector copy in the fp32 it was
saved in, a dtype clash in a bf16 model, to save initialising 61M parameters.)
For the llava-1.5-7b preset at bf16 on the CPU, computed, not measured:
    weights 7.063B x 2 B                                        14.13 GB
    LoRA 40.0M x 4 B (fp32) + projector copy 21.0M x 2 B         0.20 GB
    reference logits of the check, 8 x ~700 tokens x 32064 x 2 B 0.36 GB
    largest merge delta, 4096 x 11008 x 4 B                      0.18 GB
    Python, torch, tokenizer                                    ~1.5  GB
    peak                                                        ~16.4 GB
The check first runs the 4-bit training-time model (~4.6 GB) and frees it, so it
doesn't add to the peak. With --device cuda the ~15 GB sit in GPU memory; the CPU
holds the weights while they load, then one 2 GB shard at a time while saving.

Writes: everything goes to a temp folder beside --out (`.<name>.merging-*`) and
is renamed into place when complete. An existing non-empty --out needs
--overwrite, and the old folder is moved aside only once the new one is complete.
An interrupted merge leaves at most the temp folder, which the next merge into
the same --out removes (so don't run two merges into one --out at once).
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from l2t import chat, runs
from l2t.batch import process_images
from l2t.config import Config
from l2t.data import DataError, load_samples, open_images
from l2t.evaluate import generate, prompt_and_reference
from l2t.images import ImageError
from l2t.masking import Encoder
from l2t.models import ModelError, checkpoint_dtype, compute_dtype, load_base_model, load_processor, load_with_adapter

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RELATIVE_TOLERANCE = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 6e-2}
"""Allowed max |logit difference| merged vs base+adapter, as a share of max(1, largest |logit|)."""
DEFAULT_CHECK_SAMPLES = 8
MAX_SHARD_SIZE = "2GB"
REPORT = "merge_report.json"
PROBE_QUESTIONS = ("Describe the image briefly.", "What is in the picture?", "What color is the object on the left?")
LOSS_MODES = {
    "response": "response tokens only (standard visual instruction tuning)",
    "l2t": "L2T: instruction + response tokens, minus system templates and task templates",
    "l2t_keep_task_templates": "L2T keeping task templates: instruction + response tokens, minus system templates",
    "l2t_full": "every prompt and response token (train on prompt)",
}


class MergeError(RuntimeError):
    """A run folder or output folder that can't be used; the message says what to change."""


class ParityError(RuntimeError):
    """The merged model doesn't match base+adapter; carries the report."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def say(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------- inputs and output folder


def read_run(run_dir: Path) -> Config:
    """The run's resolved config, after checking the run has an adapter to merge."""
    try:
        return runs.read_trained_run(run_dir)
    except runs.RunFolderError as exc:
        raise MergeError(str(exc)) from None


def check_out(out: Path, run_dir: Path, overwrite: bool) -> None:
    """Refuse an --out that would replace the run, holds files (without --overwrite), or can't be written."""
    target, run = out.resolve(), run_dir.resolve()
    if target == run or target in run.parents:
        raise MergeError(f"--out {out} is (or contains) the run folder {run_dir}; choose another folder")
    if out.exists() and not out.is_dir():
        raise MergeError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MergeError(
            f"--out {out} already holds files; pass --overwrite to replace it (the old folder stays until the new one is complete)"
        )
    parent = out.parent
    if parent.exists() and not parent.is_dir():
        raise MergeError(f"--out {out}: {parent} is a file, not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.probe-")).rmdir()
    except OSError as exc:
        raise MergeError(f"--out {out}: cannot write in {parent}: {exc.strerror or exc}") from None


def clean_stale(out: Path) -> None:
    """Remove what an interrupted merge into `out` left behind."""
    pattern = str(out.parent / f".{glob.escape(out.name)}")
    for stale in glob.glob(pattern + ".merging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in glob.glob(pattern + ".replaced-*"):
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:  # interrupted between moving the old folder aside and the new one in: put the old one back
            os.replace(old, out)


def resolve_dtype(name: str, config: Config) -> str:
    if name != "auto":
        return name
    stored = checkpoint_dtype(config.model)
    return next((key for key, value in DTYPES.items() if value == stored), "bf16")


# ---------------------------------------------------------------- parity check


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
    from PIL import Image

    for i in range(count):
        noise = Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))
        ids.append(f"probe-{i}")
        prompts.append(([{"role": "user", "content": chat.IMAGE + PROBE_QUESTIONS[i % len(PROBE_QUESTIONS)]}], [noise]))
    return ids, prompts, f"probe prompts on noise images ({runs.HELD_OUT} has no usable samples)"


@torch.no_grad()
def answer_logits(model, encoder: Encoder, prompts, answers: list[str], dtype: torch.dtype):
    """Logits over each prompt followed by its answer (teacher-forced), one sample at a time, on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    for (messages, pictures), answer in zip(prompts, answers, strict=True):
        encoded = encoder.encode([*messages, {"role": "assistant", "content": answer}], [p.size for p in pictures])
        ids = torch.from_numpy(encoded.input_ids)[None].to(device)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        for key, value in process_images(encoder.processor, pictures).items():
            inputs[key] = (value.to(dtype) if value.is_floating_point() else value).to(device)
        yield model(**inputs).logits[0].cpu()


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
    training_dtype = compute_dtype(config.model, device)
    info = {"quant": config.model.quant, "dtype": next(name for name, value in DTYPES.items() if value == training_dtype)}
    try:
        model = load_with_adapter(config, adapter_dir, device=device)
    except ModelError as exc:
        return None, {**info, "skipped": str(exc)}
    answers = generate(model, encoder, prompts)
    del model
    free_memory()  # before the full-precision model loads
    return answers, info


def compare(dtype: str, tolerance: float | None, adapter: tuple[list[str], list], merged: tuple[list[str], object]) -> dict:
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


# ---------------------------------------------------------------- writing


def model_card(config: Config, run_dir: Path, out: Path, report: dict) -> str:
    """README.md of the exported folder: what was trained on what, and how it checked out."""
    m, lora, loss = config.model, config.lora, config.loss
    hub = m.hub_id if "/" in m.hub_id and not m.hub_id.startswith(("builtin:", "/", ".")) and not Path(m.hub_id).exists() else None
    front = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text", "tags: [l2t, qlora, lora, merged]"]
    if hub:
        front.append(f"base_model: {hub}")
    front.append("---")
    quant = {"4bit": "QLoRA (4-bit NF4 base)", "8bit": "LoRA on an 8-bit base", "none": "LoRA"}[m.quant]
    lines = [
        *front,
        f"# {out.name}",
        "",
        f"`{m.hub_id}` ({m.model_class}, {m.parameters or 'size not given'}) fine-tuned with {quant} and the "
        f"L2T loss (learning to instruct), then merged into a {report['dtype']} copy of the base model with `python -m l2t.merge`.",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{m.hub_id}` (preset `{config.preset}`) |",
        f"| prompt format | `{m.prompt_format}` (saved as the processor's chat template) |",
        f"| loss mode | `{loss.mode}`: {LOSS_MODES.get(loss.mode, loss.mode)}; instruction weight {loss.instruction_weight:g}, response weight {loss.response_weight:g} |",
    ]
    templates_path = run_dir / runs.TEMPLATES
    if templates_path.exists():
        count = len(runs.read_json(templates_path).get("templates", []))
        used = "kept out of the loss" if loss.mode == "l2t" else "mined, not used by this loss mode"
        lines.append(f"| task templates | {count} ({used}; listed in the run's templates.json) |")
    data_path = run_dir / runs.DATA_REPORT
    if data_path.exists():
        data = runs.read_json(data_path)
        skipped = ", ".join(f"{code} {n}" for code, n in data.get("counts", {}).items()) or "none"
        lines.append(
            f"| data | `{Path(data.get('file', '')).name}`: {data.get('ok')} of {data.get('total')} samples used; skipped: {skipped} |"
        )
    t = config.train
    status_path = run_dir / runs.STATUS
    steps = runs.read_json(status_path).get("step") if status_path.exists() else None
    length = f"{steps} optimiser steps" if steps is not None else (f"{t.max_steps} steps" if t.max_steps else f"{t.epochs:g} epochs")
    lines += [
        f"| schedule | {length}, learning rate {t.learning_rate:g} ({t.scheduler}), batch {t.batch_size} x {t.grad_accum} accumulation |",
        f"| LoRA | r={lora.r}, alpha={lora.alpha}, on `{m.lora_target}`; projector trained in full: {m.train_projector} |",
        "",
        "## Evaluation",
        "",
        *evaluation_lines(run_dir),
        "",
        "## Merge check",
        "",
        *parity_lines(report),
        "",
        "## Use",
        "",
        "```python",
        usage_snippet(str(out)),
        "```",
        "",
    ]
    return "\n".join(lines)


def evaluation_lines(run_dir: Path) -> list[str]:
    """The table of the run's eval/report.json, as `python -m l2t.evaluate` renders it."""
    from l2t.evaluate import markdown_table

    path = run_dir / runs.EVAL / "report.json"
    if not path.exists():
        return [f"The run folder holds no evaluation report ({runs.EVAL}/report.json); `python -m l2t.evaluate {run_dir.name}` writes one."]
    report = runs.read_json(path)
    try:
        table = markdown_table(report)
    except (KeyError, TypeError, ValueError) as exc:  # a report from another version of l2t
        say(f"note: {path} could not be read into the model card ({type(exc).__name__}: {exc})")
        return [f"The run's {runs.EVAL}/report.json could not be read by this version of l2t."]
    s = report.get("settings", {})
    where = f"{len(report.get('sample_ids', []))} samples of `{Path(s.get('data', '')).name}`, greedy decoding"
    return [f"From the run's {runs.EVAL}/report.json ({where}):", "", table]


def usage_snippet(model_dir: str) -> str:
    """Plain transformers code that loads the exported folder and answers about one image."""
    return f'''from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model_dir = "{model_dir}"
model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype="auto")
processor = AutoProcessor.from_pretrained(model_dir)
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Describe the image briefly."}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
image = Image.open("photo.jpg").convert("RGB")
inputs = processor(images=[image], text=prompt, return_tensors="pt").to(model.device, model.dtype)
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))'''


def parity_lines(report: dict) -> list[str]:
    parity = report.get("parity")
    if parity is None:
        return ["Not checked (merged with --no-check)."]
    a = parity["merged_vs_adapter"]
    verdict = "passed" if a["passed"] else "FAILED"
    rule = "must be identical" if a["answers_must_match"] else "reported; in 16-bit a near-tie may flip"
    lines = [
        f"Parity check {verdict} on {parity['samples']} prompts ({parity['prompt_source']}):",
        f"- merged vs base+adapter ({a['dtype']}): {a['identical_answers']}/{parity['samples']} greedy answers identical ({rule}); "
        f"max logit difference {a['max_logit_diff']:.3g} over {a['positions']} positions (tolerance {a['tolerance']:.3g})",
    ]
    t = parity["merged_vs_training_model"]
    if "skipped" in t:
        lines.append(f"- merged vs training-time model ({t['quant']}): not run: {t['skipped']}")
    else:
        why = "informational: the merge uses the unquantised base" if t["quant"] != "none" else "informational"
        lines.append(
            f"- merged vs training-time model ({t['quant']}, {t['dtype']}): {t['token_agreement']:.1%} of answer tokens agree, "
            f"{t['identical_answers']}/{parity['samples']} answers identical ({why})"
        )
    return lines


def finish_files(folder: Path, mode: int) -> None:
    """Ordinary permissions (some writers create private files), and on disk before the rename."""
    for path in folder.rglob("*"):
        if path.is_file():
            os.chmod(path, mode)
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def write_export(model, processor, out: Path, report: dict, card: str) -> None:
    """Save everything into a temp folder beside `out`, then rename it into place."""
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.merging-"))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary folder
        # transformers 5 writes safetensors only; tests check that no pickle file appears.
        model.save_pretrained(tmp, max_shard_size=MAX_SHARD_SIZE)
        processor.save_pretrained(tmp)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        (tmp / REPORT).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        finish_files(tmp, 0o666 & ~umask)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.replaced-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------- the merge


def merge_run(
    run_dir: str | Path,
    out: str | Path,
    dtype: str = "auto",
    device: str | None = None,
    overwrite: bool = False,
    check: bool = True,
    check_samples: int = DEFAULT_CHECK_SAMPLES,
    tolerance: float | None = None,
) -> dict:
    """Merge, check and export one run; returns the merge report (also written to OUT/merge_report.json)."""
    from peft import PeftModel

    started = time.time()
    run_dir, out = Path(run_dir), Path(out)
    config = read_run(run_dir)
    check_out(out, run_dir, overwrite)
    clean_stale(out)
    if check_samples < 1:
        raise MergeError(f"--check-samples {check_samples}: must be at least 1 (or pass --no-check)")
    if tolerance is not None and not tolerance > 0:
        raise MergeError(f"--tolerance {tolerance}: must be positive")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise MergeError("--device cuda: no GPU is available here; use --device cpu")
    status = runs.read_json(run_dir / runs.STATUS) if (run_dir / runs.STATUS).exists() else {}
    if status.get("state") not in (None, "finished"):
        say(f"note: the run is '{status['state']}' at step {status.get('step')} of {status.get('total')}; merging the adapter it saved")
    dtype = resolve_dtype(dtype, config)
    adapter_dir = run_dir / runs.ADAPTER
    processor = load_processor(config.model)
    fmt = chat.FORMATS[config.model.prompt_format]
    encoder = Encoder(processor, fmt)
    report = {"run": str(run_dir.resolve()), "base_model": config.model.hub_id, "model_class": config.model.model_class,
              "dtype": dtype, "device": device, "parity": None}  # fmt: skip

    if check:
        ids, prompts, prompt_source = check_prompts(config, run_dir, check_samples)
        same_as_adapter = config.model.quant == "none" and compute_dtype(config.model, device) == DTYPES[dtype]
        training_answers, training_info = (
            (None, {}) if same_as_adapter else training_model_answers(config, adapter_dir, encoder, prompts, device)
        )

    say(f"loading {config.model.hub_id} at {dtype} on {device} with the adapter in {adapter_dir}")
    base = load_base_model(config.model, quant="none", device=device, dtype=DTYPES[dtype])
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    except (OSError, ValueError, RuntimeError) as exc:
        raise MergeError(f"cannot load the adapter in {adapter_dir}: {exc}") from None
    model.eval()
    if check:
        adapter_answers = generate(model, encoder, prompts)
        adapter_logits = list(answer_logits(model, encoder, prompts, adapter_answers, DTYPES[dtype]))
    model = model.merge_and_unload()
    if check:
        merged_answers = generate(model, encoder, prompts)
        merged_logits = answer_logits(model, encoder, prompts, adapter_answers, DTYPES[dtype])
        if same_as_adapter:
            training_answers, training_info = (
                adapter_answers,
                {"quant": "none", "dtype": dtype, "note": "the training-time model is base+adapter"},
            )
        parity = {"samples": len(prompts), "prompt_source": prompt_source,
                  "merged_vs_adapter": compare(dtype, tolerance, (adapter_answers, adapter_logits), (merged_answers, merged_logits))}  # fmt: skip
        del adapter_logits, merged_logits
        if training_answers is not None:
            training_info["token_agreement"] = token_agreement(encoder.tokenizer, training_answers, merged_answers)
            training_info["identical_answers"] = sum(a == b for a, b in zip(training_answers, merged_answers, strict=True))
        parity["merged_vs_training_model"] = training_info
        parity["answers"] = [
            {"id": i, "adapter": a, "merged": m, **({"training_model": t} if training_answers is not None else {})}
            for i, a, m, t in zip(ids, adapter_answers, merged_answers, training_answers or [None] * len(ids), strict=True)
        ]
        parity["passed"] = parity["merged_vs_adapter"]["passed"]
        report["parity"] = parity
        for line in parity_lines(report):
            say(line)
        if not parity["passed"]:
            raise ParityError(
                "the merged model does not match base+adapter (numbers below); nothing was written. "
                "A merge with --dtype fp32 tells 16-bit rounding from a real mismatch.",
                report,
            )

    processor.chat_template = chat.to_jinja(fmt)
    encoder.tokenizer.chat_template = processor.chat_template
    generation = model.generation_config
    if generation.pad_token_id is None:
        generation.pad_token_id = (
            encoder.tokenizer.pad_token_id if encoder.tokenizer.pad_token_id is not None else encoder.tokenizer.eos_token_id
        )
    report["seconds"] = round(time.time() - started, 1)
    say(f"writing {out}")
    write_export(model, processor, out, report, model_card(config, run_dir, out, report))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m l2t.merge",
        description="Merge a run's LoRA adapter into a full-precision copy of its base model, check parity, and export it.",
    )
    parser.add_argument("run_dir", help="the run folder (holds config.yaml and adapter/)")
    parser.add_argument("--out", required=True, help="folder to write the merged model to")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="weights of the merged model (auto: the dtype the base checkpoint is stored in)",
    )
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"], help="where to merge (default: cuda if available)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing non-empty --out (only once the new model is complete)"
    )
    parser.add_argument("--no-check", action="store_true", help="skip the parity check")
    parser.add_argument(
        "--check-samples",
        type=int,
        default=DEFAULT_CHECK_SAMPLES,
        help=f"held-out prompts in the parity check (default {DEFAULT_CHECK_SAMPLES})",
    )
    parser.add_argument(
        "--tolerance", type=float, default=None, help="max logit difference allowed, merged vs base+adapter (default: scaled per dtype)"
    )
    args = parser.parse_args(argv)
    try:
        report = merge_run(
            args.run_dir, args.out, args.dtype, args.device, args.overwrite, not args.no_check, args.check_samples, args.tolerance
        )
    except MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ParityError as exc:
        numbers = {k: v for k, v in exc.report["parity"].items() if k != "answers"}
        print(f"error: {exc}\n{json.dumps(numbers, indent=2)}", file=sys.stderr)
        return 1
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: writing the merged model failed ({exc.strerror or exc}{': ' + exc.filename if exc.filename else ''}); "
              f"nothing was written to {args.out}", file=sys.stderr)  # fmt: skip
        return 1
    verdict = "not checked" if report["parity"] is None else "passed"
    say(
        f"merged model written to {args.out} ({report['dtype']}, parity {verdict}); load it with AutoModelForImageTextToText.from_pretrained"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
