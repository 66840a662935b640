"""The training recipe: config -> data -> model -> trainer -> run folder.

    python -m l2t.train --preset tiny                      # offline, bundled synthetic data
    python -m l2t.train --preset tinyllava --data my.json --images my_images.zip
    python -m l2t.train --preset tiny loss.mode=response train.max_steps=50
    python -m l2t.train --preset tiny --output runs/demo --resume
    torchrun --nproc_per_node 2 -m l2t.train --preset tiny   # several GPUs (or CPU processes)

Everything before the weights load is checked first: the config, the data
(report printed and saved), the image-token budget of every sample, the mined
task templates. The Hugging Face `Trainer` runs the loop; `L2TTrainer` only
changes the loss (per-token weights, normalised by the number of tokens in the
loss across the accumulated batch and all processes) and logs the response and
instruction losses separately: the response loss is comparable across loss
modes, the total is not.
"""

from __future__ import annotations

import argparse
import copy
import errno
import io
import json
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_pt_utils import LengthGroupedSampler

from l2t import chat, runs
from l2t.batch import Collator, TrainingSet, encode_samples
from l2t.config import Config, ConfigError, load_config, save_config
from l2t.data import DataError, DataReport, Sample, check_lengths, load_samples
from l2t.images import ImageError, ImageSource
from l2t.masking import Encoder
from l2t.models import ModelError, add_lora, compute_dtype, load_base_model, load_processor
from l2t.templates import TaskTemplate, mine_with_settings, save_templates

DISK_FULL_BYTES = 16 * 1024**2
"""A write that fails with less free space than this in the run folder's file system is reported as a full disk."""


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def say(message: str) -> None:
    if is_main_process():
        print(message, flush=True)


# ---------------------------------------------------------------- data


@dataclass
class PreparedData:
    train: list[Sample]
    held_out: list[Sample]
    images: ImageSource | None
    report: DataReport
    templates: list[TaskTemplate]


def data_paths(config: Config) -> tuple[Path, Path | None, Path | None]:
    """(training file, image root, held-out file or None). The tiny preset defaults to the bundled set."""
    if config.data.path:
        path = Path(config.data.path)
        return path, Path(config.data.images) if config.data.images else None, None
    if config.preset == "tiny":
        from l2t.synthetic import bundled_dir

        root = bundled_dir()
        return root / "train.json", root, root / "test.json"
    raise ConfigError("data.path is empty: give your training data with --data FILE (LLaVA or messages JSON/JSONL)")


def split_held_out(samples: list[Sample], fraction: float, limit: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    import random

    count = min(limit, int(round(len(samples) * fraction)))
    if count == 0 or len(samples) - count < 1:
        return samples, []
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]


def prepare_data(config: Config) -> PreparedData:
    path, image_root, held_out_path = data_paths(config)
    pixels = config.data.max_image_pixels
    try:  # opened once (a zip's index is checked once) and shared by every load below
        source = ImageSource(image_root or path.parent, max_pixels=pixels)
    except ImageError:
        source = None  # fine for text-only data; load_samples reports it if a sample needs an image
    samples, report = load_samples(path, source or image_root, strict=config.data.strict, max_pixels=pixels)
    say(report.summary())
    images = source if any(s.images for s in samples) else None
    if held_out_path is not None:
        train = samples
        held_out, _ = load_samples(held_out_path, source or image_root, max_pixels=pixels)
    else:
        train, held_out = split_held_out(samples, config.train.eval_fraction, config.train.eval_max_samples, config.train.seed)
    templates = mine_with_settings([s.instructions() for s in train], config.templates)
    return PreparedData(train, held_out, images, report, templates)


def unique_names(ids: list[str]) -> list[str]:
    """Sample ids made unique (data files may repeat an id): the 2nd "x" becomes "x (2)"."""
    seen: dict[str, int] = {}
    names = []
    for sample_id in ids:
        seen[sample_id] = seen.get(sample_id, 0) + 1
        names.append(sample_id if seen[sample_id] == 1 else f"{sample_id} ({seen[sample_id]})")
    return names


def print_templates(templates: list[TaskTemplate], mode: str) -> None:
    used = "kept out of the instruction loss" if mode == "l2t" else f"not used by loss mode {mode}"
    say(f"task templates ({len(templates)}, {used}):")
    for t in templates:
        say(f"  {t.count:>7}  {t.fraction:6.1%}  {t.sentence}")


# ---------------------------------------------------------------- trainer


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Per-token cross-entropy of (N, V) logits, in fp32 a chunk of rows at a time (-100: loss 0)."""
    parts = [
        torch.nn.functional.cross_entropy(logits[i : i + chunk].float(), targets[i : i + chunk], ignore_index=-100, reduction="none")
        for i in range(0, logits.shape[0], chunk)
    ]
    return torch.cat(parts) if parts else logits.new_zeros(0, dtype=torch.float32)


class L2TTrainer(Trainer):
    """HF Trainer with the per-token weighted L2T loss and split loss logging."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args, lengths: list[int] | None = None, group_by_length: bool = False, labelled_logits_only: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self._lengths = lengths
        self._group_by_length = group_by_length
        self.labelled_logits_only = labelled_logits_only
        self._parts = torch.zeros(6, dtype=torch.float64)  # resp sum, resp n, instr sum, instr n, tokens, samples

    def _get_train_sampler(self, train_dataset=None):
        if self._group_by_length and self._lengths:
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedSampler(batch, lengths=self._lengths)
        return super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        weights = inputs.pop("loss_weights")[:, 1:]
        kinds = inputs.pop("loss_kinds")[:, 1:]
        targets = labels[:, 1:]
        if self.labelled_logits_only:
            # Logits only where the next token carries a label: most positions of a VLM batch are image
            # tokens or prompt, and full-vocabulary logits for them are the largest activation of a step.
            in_loss = targets != -100
            keep = torch.nn.functional.pad(in_loss, (0, 1), value=False)
            outputs = model(**inputs, logits_to_keep=keep)
            token_loss = token_cross_entropy(outputs.logits, targets[in_loss])
            weights, kinds = weights[in_loss], kinds[in_loss]
        else:
            outputs = model(**inputs)
            logits = outputs.logits[:, :-1, :]
            token_loss = token_cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            weights, kinds = weights.reshape(-1), kinds.reshape(-1)
        count = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
        loss = (token_loss * weights).sum() / count
        if self.args.average_tokens_across_devices and self.args.world_size > 1 and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; undo it for a global token mean
        with torch.no_grad():
            detached = token_loss.detach().double()
            self._parts += torch.stack([
                (detached * (kinds == 2)).sum(), (kinds == 2).sum().double(),
                (detached * (kinds == 1)).sum(), (kinds == 1).sum().double(),
                inputs["attention_mask"].sum().double(), torch.tensor(float(labels.shape[0]), dtype=torch.float64),
            ]).cpu()  # fmt: skip
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:
            parts = self._parts.to(self.args.device)
            if self.args.world_size > 1:
                parts = self.accelerator.reduce(parts, reduction="sum")
            parts = parts.cpu()
            if parts[1] > 0:
                logs["response_loss"] = round(float(parts[0] / parts[1]), 6)
            if parts[3] > 0:
                logs["instruction_loss"] = round(float(parts[2] / parts[3]), 6)
            logs["tokens"] = int(parts[4])
            logs["samples"] = int(parts[5])
            self._parts.zero_()
        super().log(logs, *args, **kwargs)


class RunFolderCallback(TrainerCallback):
    """metrics.jsonl (one line per logging step) and status.json, written by the main process."""

    def __init__(self, run_dir: Path, device: str):
        self.run_dir = run_dir
        self.device = device
        self.last_time = time.time()
        self.started = time.time()

    def status(self, state: str, **extra) -> None:
        if is_main_process():
            runs.atomic_write_json(self.run_dir / runs.STATUS, {"state": state, "pid": os.getpid(), "updated": time.time(), **extra})

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_time = time.time()
        self.status("running", step=state.global_step, total=state.max_steps, started=self.started)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        now = time.time()
        elapsed = max(now - self.last_time, 1e-9)
        self.last_time = now
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        for key in ("loss", "response_loss", "instruction_loss", "learning_rate", "grad_norm"):
            if key in logs:
                row[key] = logs[key]
        row["samples_per_s"] = round(logs.get("samples", 0) / elapsed, 3)
        row["tokens_per_s"] = round(logs.get("tokens", 0) / elapsed, 1)
        if self.device == "cuda":
            row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 3)
        row["time"] = round(now, 3)
        with open(self.run_dir / runs.METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        remaining = (state.max_steps - state.global_step) * (now - self.started) / max(state.global_step, 1)
        self.status("running", step=state.global_step, total=state.max_steps, started=self.started, eta_s=round(remaining, 1))


class StopOnSignal(TrainerCallback):
    """SIGTERM/SIGINT ends the run cleanly: save a checkpoint at the end of this step, then stop."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def _request(self, signum, frame):
        self.requested = True

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._request)

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True


# ---------------------------------------------------------------- run folder


def checkpoint_complete(folder: Path) -> bool:
    """Whether a Trainer checkpoint was saved whole: its weights are there and trainer_state.json,
    which the Trainer writes last, parses (a kill or a full disk mid-save leaves it missing or torn)."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "global_step" in state and any(folder.glob("*.safetensors"))


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones are named and passed over."""
    folder = run_dir / "checkpoints"
    found = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()), key=lambda p: int(p.name.split("-")[-1]))
    for checkpoint in reversed(found):
        if checkpoint_complete(checkpoint):
            return checkpoint
        say(f"--resume: {checkpoint.name} is incomplete (interrupted while it was saved); using an earlier checkpoint")
    return None


def trim_metrics(run_dir: Path, step: int) -> None:
    """Drop metric rows after `step` (they will be logged again when the run resumes)."""
    rows = [r for r in runs.read_metrics(run_dir) if r.get("step", 0) <= step]
    runs.atomic_write_text(run_dir / runs.METRICS, "".join(json.dumps(r) + "\n" for r in rows))


LAUNCH_FILES = {"launch.yaml", runs.LOG}
"""Files a launcher (the UI) writes into a run folder before the run starts."""


def open_run_dir(config: Config, resume: bool, overwrite: bool) -> tuple[Path, Path | None]:
    run_dir = config.run_dir()
    checkpoint = None
    launched_only = run_dir.is_dir() and all(p.name in LAUNCH_FILES for p in run_dir.iterdir())
    if resume and launched_only:
        say(f"--resume: {run_dir} holds no checkpoint yet; starting from the beginning")
    elif resume:
        if not (run_dir / runs.CONFIG).exists():
            raise ConfigError(f"--resume: {run_dir} holds no run to resume (no {runs.CONFIG})")
        checkpoint = last_checkpoint(run_dir)
        if checkpoint is None:
            say(f"--resume: no checkpoint in {run_dir} yet; starting from the beginning")
    elif run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output {run_dir} is a file, not a folder; choose another --output")
    elif not is_main_process():
        pass  # the main process checks and prepares the folder (and may already have written to it)
    elif run_dir.exists() and any(p.name not in LAUNCH_FILES for p in run_dir.iterdir()):
        if not overwrite:
            raise ConfigError(f"{run_dir} already holds files; pass --resume to continue that run or --overwrite to replace it")
        for path in run_dir.iterdir():
            if path.name not in LAUNCH_FILES:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    if is_main_process():
        probe = run_dir / ".write-test"
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"output folder {run_dir} is not writable: {exc.strerror}") from None
    return run_dir, checkpoint


def save_held_out(path: Path, samples: list[Sample]) -> None:
    records = [{"id": s.id, "messages": s.messages, "images": s.images, **s.meta} for s in samples]
    runs.atomic_write_json(path, records)


def plot_losses(run_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = runs.read_metrics(run_dir)
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for key, label in (("response_loss", "response"), ("instruction_loss", "instruction")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), label=f"{label} loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png")
    plt.close(fig)
    runs.atomic_write_bytes(run_dir / runs.LOSS_PLOT, image.getvalue())


# ---------------------------------------------------------------- the recipe


def train(config: Config, resume: bool = False, overwrite: bool = False) -> Path:
    """Run the whole recipe; returns the run folder."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        say("warning: no GPU found; training on the CPU (fine for the tiny preset, slow for real models)")
    run_dir, checkpoint = open_run_dir(config, resume, overwrite)

    # Data first: everything that can be wrong with it shows before any weights load.
    data = prepare_data(config)
    fmt = chat.FORMATS[config.model.prompt_format]
    print_templates(data.templates, config.loss.mode)
    processor = load_processor(config.model)
    encoder = Encoder(processor, fmt, [t.sentence for t in data.templates])
    lo = config.loss
    examples = encode_samples(data.train, encoder, lo.mode, lo.instruction_weight, lo.response_weight)
    names = unique_names([e.sample.id for e in examples])
    too_long = check_lengths(dict(zip(names, (len(e.input_ids) for e in examples))), config.train.max_length, data.report)
    if too_long:
        say(f"{len(too_long)} sample(s) exceed train.max_length={config.train.max_length} with their image tokens and are skipped")
        if config.data.strict:
            raise DataError(f"{len(too_long)} sample(s) longer than train.max_length (strict mode)\n" + data.report.summary(), data.report)
        examples = [e for e, name in zip(examples, names) if name not in too_long]
    examples = [e for e in examples if (e.labels != -100).sum() > 1]
    if not examples:
        raise DataError("no sample is left to train on after the checks above\n" + data.report.summary(), data.report)
    if is_main_process():
        resolved = copy.deepcopy(config)
        resolved.output = str(run_dir)
        path, image_root, _ = data_paths(config)
        resolved.data.path = str(path.resolve())
        resolved.data.images = str((image_root or path.parent).resolve())
        save_config(resolved, run_dir / runs.CONFIG)
        settings = {k: v for k, v in config.templates.__dict__.items()}
        save_templates(run_dir / runs.TEMPLATES, data.templates, settings)
        runs.atomic_write_json(run_dir / runs.DATA_REPORT, data.report.to_dict())
        save_held_out(run_dir / runs.HELD_OUT, data.held_out)
        resumed_step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] if checkpoint else 0
        trim_metrics(run_dir, resumed_step)  # rows after the checkpoint are logged again

    set_seed(config.train.seed)  # LoRA's initial weights come from the global RNG
    model = add_lora(load_base_model(config.model, device=device), config.model, config.lora)
    for model_config in (model.config, getattr(model.config, "text_config", None)):
        if model_config is not None:
            model_config.use_cache = False  # no generation cache while training
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    say(f"model: {config.model.hub_id} ({config.model.quant}), trainable parameters {trainable:,} of {total:,}")
    t = config.train
    bf16 = compute_dtype(config.model, device) == torch.bfloat16
    args = TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps > 0 else -1,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        bf16=bf16,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        report_to=[] if t.report_to == "none" else [t.report_to],
        remove_unused_columns=False,
        dataloader_pin_memory=device == "cuda",
        use_cpu=device == "cpu",
        ddp_find_unused_parameters=False,
        disable_tqdm=not is_main_process(),
    )
    dataset = TrainingSet(examples, data.images, processor)
    pad_id = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else processor.tokenizer.eos_token_id
    folder_callback = RunFolderCallback(run_dir, device)
    stopper = StopOnSignal()
    trainer = L2TTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=Collator(pad_id),
        callbacks=[stopper, folder_callback],  # the stop handler is in place before "running" is announced
        lengths=dataset.lengths,
        group_by_length=t.group_by_length,
        labelled_logits_only=t.labelled_logits_only,
    )
    say(f"training {len(examples)} samples, loss mode {lo.mode}; run folder {run_dir}")
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        if is_main_process():
            save_adapter(model, run_dir)
            plot_losses(run_dir)
    except torch.cuda.OutOfMemoryError:
        failed(folder_callback, "out of GPU memory")
        raise ModelError(
            "out of GPU memory. Lower train.max_length, the image size cap (model.image_max_pixels), "
            "train.batch_size (raising train.grad_accum to keep the effective batch), or pick a smaller preset. "
            f"Checkpoints so far are kept in {run_dir / 'checkpoints'}; continue with --resume."
        ) from None
    except Exception as exc:
        failed(folder_callback, "the disk is full" if disk_full(exc, run_dir) else f"{type(exc).__name__}: {exc}")
        raise
    finally:
        stopper.restore()  # on_train_end doesn't run when training raises
    stopped_early = trainer.state.global_step < trainer.state.max_steps
    if stopped_early:
        folder_callback.status("stopped", step=trainer.state.global_step, total=trainer.state.max_steps)
        say(f"stopped at step {trainer.state.global_step} of {trainer.state.max_steps}; continue with --resume")
        return run_dir
    if is_main_process() and data.held_out and config.train.preview_samples > 0:
        preview(model, encoder, data.held_out, data.images, config.train.preview_samples)
    folder_callback.status("finished", step=trainer.state.global_step, total=trainer.state.max_steps)
    say(f"done. run folder: {run_dir}  (adapter: {run_dir / runs.ADAPTER})")
    return run_dir


def save_adapter(model, run_dir: Path) -> None:
    """adapter/ in peft format (loads with PeftModel.from_pretrained), renamed into place whole."""
    tmp = run_dir / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written adapter must not outlive the failure
        raise
    final = run_dir / runs.ADAPTER
    old = run_dir / ".adapter.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def preview(model, encoder: Encoder, held_out: list[Sample], images: ImageSource | None, count: int) -> None:
    """Before/after answers on held-out samples, with caption metrics over all of them."""
    from l2t.evaluate import generate_pairs, prompt_and_reference
    from l2t.metrics import caption_scores

    chosen = [s for s in held_out if len(s.images) <= 1][:64]
    prompts, references = [], []
    for s in chosen:
        messages, reference = prompt_and_reference(s)
        try:
            pictures = [images.open(p) for p in s.images] if s.images else []
        except ImageError as exc:
            say(f"preview: skipping sample {s.id}: {exc}")
            continue
        prompts.append((messages, pictures))
        references.append(reference)
    if not prompts:
        return
    before, after = generate_pairs(model, encoder, prompts)
    say("\nbefore -> after tuning, on held-out samples:")
    for (messages, _), ref, b, a in list(zip(prompts, references, before, after))[:count]:
        question = messages[-1]["content"].replace(chat.IMAGE, "").strip().replace("\n", " ")
        say(f"  Q: {question}\n     reference: {ref}\n     before:    {b}\n     after:     {a}")
    scores_before = caption_scores(before, [[r] for r in references])
    scores_after = caption_scores(after, [[r] for r in references])
    exact_before = sum(b.strip().lower() == r.strip().lower() for b, r in zip(before, references)) / len(references)
    exact_after = sum(a.strip().lower() == r.strip().lower() for a, r in zip(after, references)) / len(references)
    say(
        f"held-out answers ({len(references)}): CIDEr-D {scores_before['cider_d']:.3f} -> {scores_after['cider_d']:.3f}, "
        f"BLEU-4 {scores_before['bleu4']:.3f} -> {scores_after['bleu4']:.3f}, exact match {exact_before:.1%} -> {exact_after:.1%}"
    )


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m l2t.train",
        description="Fine-tune a VLM with QLoRA and the L2T loss. Extra key=value arguments override config keys (e.g. loss.mode=response).",
    )
    parser.add_argument("--preset", default="tiny", help="presets/<name>.yaml (default: tiny)")
    parser.add_argument("--data", default=None, help="training data (sets data.path)")
    parser.add_argument("--images", default=None, help="image folder or .zip (sets data.images)")
    parser.add_argument("--output", default=None, help="run folder (sets output; default runs/<preset>-<mode>)")
    parser.add_argument("--config", default=None, help="a YAML file of config keys, applied after the preset")
    parser.add_argument("--resume", action="store_true", help="continue the run in the output folder from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in the output folder")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.learning_rate=1e-4")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may come before and after the options
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.path={json.dumps(args.data)}")
    if args.images:
        overrides.append(f"data.images={json.dumps(args.images)}")
    if args.output:
        overrides.append(f"output={json.dumps(args.output)}")
    return load_config(args.preset, args.config, overrides), args


def failed(callback: RunFolderCallback, error: str) -> None:
    """Mark the run failed in status.json; a write that fails too (a full disk) must not hide the first error."""
    try:
        callback.status("failed", error=error)
    except OSError:
        pass


def disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether `exc` means the disk is full. torch.save and safetensors don't raise ENOSPC as an OSError
    (a RuntimeError from torch's zip writer, a SafetensorError), so a folder with almost no space left counts too."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    if "No space left on device" in str(exc):
        return True
    try:
        return shutil.disk_usage(folder).free < DISK_FULL_BYTES
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    # transformers 5 and peft announce renamed internals on every run; they are not the user's to fix.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
    config = None
    try:
        config, args = parse_args(argv)
        train(config, resume=args.resume, overwrite=args.overwrite)
    except (ConfigError, DataError, ModelError, ImageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except Exception as exc:
        if config is None or not disk_full(exc, config.run_dir()):
            raise
        print(f"error: the disk is full: {exc}\nFree space, then continue with --resume.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
