"""The training recipe: config -> data -> model -> trainer -> run folder.

    python -m l2t.train --preset tiny                      # offline, bundled synthetic data
    python -m l2t.train --preset tinyllava --data my.json --images my_images.zip
    python -m l2t.train --preset tiny loss.mode=response train.max_steps=50
    python -m l2t.train --preset tiny --output runs/demo --resume
    torchrun --nproc_per_node 2 -m l2t.train --preset tiny   # several GPUs (or CPU processes)

Everything before the weights load is checked first: the config, the data
(report printed and saved), the image-token budget of every sample, the mined
task templates. The Hugging Face `Trainer` runs the loop; `l2t.trainer` gives
it the weighted L2T loss and writes the run folder as it goes.
"""

from __future__ import annotations

import argparse
import copy
import errno
import io
import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from transformers import TrainingArguments, set_seed

from l2t import relevance, runs
from l2t.batch import Collator, Example, TrainingSet, make_example
from l2t.config import Config, load_config, save_config
from l2t.data import DataError, Sample, check_lengths
from l2t.encoding import CachedTrainingSet, cache_key, column, encoded_dataset
from l2t.errors import L2TError, print_error
from l2t.evaluate import evaluate_loaded
from l2t.files import atomic_write_bytes, atomic_write_json
from l2t.generation import pad_token_id
from l2t.masking import IGNORE, LOSS_ROLES, Encoded, Encoder, Role
from l2t.models import ModelError, add_lora, compute_dtype, fetch_model, load_base_model, load_processor, source
from l2t.prepare import PreparedData, data_paths, held_out_records, prepare_data, unique_names
from l2t.report import markdown_table
from l2t.sources import is_hub_spec
from l2t.templates import TaskTemplate, save_templates
from l2t.trainer import L2TTrainer, RunFolderCallback, StopOnSignal, is_main_process

DISK_FULL_BYTES = 16 * 1024**2
"""A write that fails with less free space than this in the run folder's file system is reported as a full disk."""


def say(message: str) -> None:
    if is_main_process():
        print(message, flush=True)


# ---------------------------------------------------------------- the recipe


def train(config: Config, resume: bool = False, overwrite: bool = False) -> Path:
    """Run the whole recipe; returns the run folder."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        say("warning: no GPU found; training on the CPU (fine for the tiny preset, slow for real models)")
    run_dir, checkpoint = open_run_dir(config, resume, overwrite)

    # Data first: everything that can be wrong with it shows before any weights load.
    data = prepare_data(config, say=say)
    rejected = data.report.total - data.report.ok  # before the length check below adds the too-long ones
    say(data.report.summary())
    print_templates(data.templates, config.loss.mode)
    fetch_model(config)  # a hub model's first run: its size, then the download's progress
    processor = load_processor(config.model)
    encoder = Encoder.from_config(config, processor, data.templates)
    weighed = config.loss.mode == "l2t_relevance"  # its weights need the base model: encoded in memory, not cached
    encoded = encode_data(config, data, encoder) if weighed else encode_cached(config, data, encoder)
    if is_main_process():
        write_run_inputs(config, run_dir, data, checkpoint)

    base = load_base_model(config.model, device=device)
    dataset = relevance_training_set(config, run_dir, base, encoder, encoded, data) if weighed else encoded
    model = add_adapter(config, base)
    folder, stopper = RunFolderCallback(run_dir, device), StopOnSignal()
    # The stop handler is in place before "running" is announced.
    trainer = build_trainer(config, run_dir, device, model, dataset, [stopper, folder])
    say(f"training {len(dataset)} samples, loss mode {config.loss.mode}; run folder {run_dir}")
    fit(trainer, checkpoint, run_dir, folder, stopper)

    step, total = trainer.state.global_step, trainer.state.max_steps
    if step < total:
        folder.status("stopped", step=step, total=total)
        say(f"stopped at step {step} of {total}; continue with --resume")
        return run_dir
    if is_main_process() and data.held_out and config.train.preview_samples > 0:
        evaluate_held_out(run_dir, model, encoder, data, config.train.preview_samples)
    skipped = rejected + len(data.train) - len(dataset)  # bad, too long, or nothing to learn
    folder.status("finished", step=step, total=total, trained=len(dataset), skipped=skipped)
    say(f"done. run folder: {run_dir}  (adapter: {run_dir / runs.ADAPTER})")
    return run_dir


# ---------------------------------------------------------------- its steps


def open_run_dir(config: Config, resume: bool, overwrite: bool) -> tuple[Path, Path | None]:
    """The run folder, ready to write (emptied with --overwrite), and the checkpoint to resume from."""
    run_dir = config.run_dir()
    checkpoint = None
    if resume and runs.holds_only_launch_files(run_dir):
        say(f"--resume: {run_dir} holds no checkpoint yet; starting from the beginning")
    elif resume:
        if not (run_dir / runs.CONFIG).exists():
            raise runs.RunFolderError(f"--resume: {run_dir} holds no run to resume (no {runs.CONFIG})")
        checkpoint, incomplete = runs.last_checkpoint(run_dir)
        for passed_over in incomplete:
            say(f"--resume: {passed_over.name} is incomplete (interrupted while it was saved); using an earlier checkpoint")
        if checkpoint is None:
            say(f"--resume: no checkpoint in {run_dir} yet; starting from the beginning")
    elif run_dir.exists() and not run_dir.is_dir():
        raise runs.RunFolderError(f"output {run_dir} is a file, not a folder; choose another --output")
    elif is_main_process():  # the main process prepares the folder (and may already have written to it)
        runs.clear_for_new_run(run_dir, overwrite)
    if is_main_process():
        runs.make_writable_folder(run_dir)
    return run_dir, checkpoint


def print_templates(templates: list[TaskTemplate], mode: str) -> None:
    roles = LOSS_ROLES[mode]  # templates matter where the instructions are in the loss and the templates are not
    used = "kept out of the instruction loss" if Role.INSTRUCTION in roles and Role.TASK_TEMPLATE not in roles else f"not used by loss mode {mode}"
    say(f"task templates ({len(templates)}, {used}):")
    for t in templates:
        say(f"  {t.count:>7}  {t.fraction:6.1%}  {t.sentence}")


def encode_data(config: Config, data: PreparedData, encoder: Encoder) -> list[tuple[Sample, Encoded]]:
    """The training samples as token ids with a role each; samples over train.max_length are dropped and counted."""
    samples = list(data.train)  # read from the Arrow rows once: this mode keeps them in memory
    tokens = encoder.encode_many([(s.messages, s.image_sizes) for s in samples])
    lengths = dict(zip(unique_names([s.id for s in samples]), map(len, tokens), strict=True))
    too_long = skip_too_long(config, data, lengths)
    encoded = [pair for pair, name in zip(zip(samples, tokens, strict=True), lengths) if name not in too_long]
    if not encoded:
        raise nothing_left(data.report)
    return encoded


def encode_cached(config: Config, data: PreparedData, encoder: Encoder) -> CachedTrainingSet:
    """The training split as memory-mapped token columns (`l2t.encoding`); samples over train.max_length, or with
    nothing to learn, are left out (the first kind counted in the report)."""
    table = encoded_dataset(data.train, encoder, config, cache_key(config, data.key, encoder), say=say)
    lengths, in_loss = column(table, "length"), column(table, "in_loss")
    over = np.nonzero(lengths > config.train.max_length)[0]
    if len(over):
        names = unique_names(data.train.ids())
        skip_too_long(config, data, {names[i]: int(lengths[i]) for i in over})
    kept = np.nonzero((lengths <= config.train.max_length) & (in_loss > 1))[0]
    if not len(kept):
        raise nothing_left(data.report)
    return CachedTrainingSet(table, kept, data.images, encoder.processor, encoder)


def skip_too_long(config: Config, data: PreparedData, lengths: dict[str, int]) -> set[str]:
    """The samples over train.max_length, counted in the report and said; in strict mode they stop the run."""
    too_long = check_lengths(lengths, config.train.max_length, data.report)
    if too_long:
        say(f"{len(too_long)} sample(s) exceed train.max_length={config.train.max_length} with their image tokens and are skipped")
        if config.data.strict:
            raise DataError(f"{len(too_long)} sample(s) longer than train.max_length (strict mode)\n" + data.report.summary(), data.report)
    return too_long


def nothing_left(report) -> DataError:
    return DataError("no sample is left to train on after the checks above\n" + report.summary(), report)


def relevance_training_set(config: Config, run_dir: Path, base, encoder: Encoder, encoded, data: PreparedData) -> TrainingSet:
    """loss.mode=l2t_relevance: the weights come from the base model's pass over the encoded samples, held in memory."""
    weigh_by_relevance(config, run_dir, base, encoder.processor, encoded, data.images)
    return TrainingSet(build_examples(config, encoded, data.report), data.images, encoder.processor)


def weigh_by_relevance(config: Config, run_dir: Path, base, processor, encoded: list[tuple[Sample, Encoded]], images) -> None:
    """loss.mode=l2t_relevance: the base model's relevance pass (cached in the run folder), its weights and their summary."""
    samples, tokens = [s for s, _ in encoded], [e for _, e in encoded]
    key = relevance.cache_key(source(config.model), tokens, samples)
    cache = run_dir / runs.RELEVANCE if is_main_process() else None  # the main process alone writes the run folder
    values = relevance.relevance_pass(base, processor, tokens, samples, images, pad_token_id(processor.tokenizer), cache, key, say=say)
    relevance.apply_weights(tokens, values, config.loss.relevance_nats)
    found = relevance.summary(tokens)
    say(
        f"relevance: mean weight {found['mean_weight']:.3f} over {found['instruction_tokens']:,} instruction tokens, "
        f"{found['share_over_half']:.0%} of them above 0.5 (loss.relevance_nats={config.loss.relevance_nats:g})"
    )


def build_examples(config: Config, encoded: list[tuple[Sample, Encoded]], report) -> list[Example]:
    """Labels and weights of each sample under the loss mode; a sample with nothing to learn is left out."""
    lo = config.loss
    examples = [make_example(sample, e, lo.mode, lo.instruction_weight, lo.response_weight) for sample, e in encoded]
    examples = [e for e in examples if (e.labels != IGNORE).sum() > 1]
    if not examples:
        raise nothing_left(report)
    return examples


def write_run_inputs(config: Config, run_dir: Path, data: PreparedData, checkpoint: Path | None) -> None:
    """config.yaml (resolved), templates.json, data_report.json and held_out.json: what the run is made of."""
    resolved = copy.deepcopy(config)
    resolved.output = str(run_dir)
    path, image_root, _ = data_paths(config)
    resolved.data.path = str(path) if is_hub_spec(str(path)) else str(path.resolve())
    hub = is_hub_spec(str(path)) and not image_root  # a hub dataset's images are in it
    resolved.data.images = "" if hub else str((image_root or path.parent).resolve())
    save_config(resolved, run_dir / runs.CONFIG)
    save_templates(run_dir / runs.TEMPLATES, data.templates, dict(config.templates.__dict__))
    atomic_write_json(run_dir / runs.DATA_REPORT, data.report.to_dict())
    atomic_write_json(run_dir / runs.HELD_OUT, held_out_records(data.held_out))
    runs.trim_metrics(run_dir, runs.checkpoint_step(checkpoint) if checkpoint else 0)  # rows after the checkpoint are logged again


def add_adapter(config: Config, base):
    """LoRA on the base model, seeded; no generation cache while training."""
    set_seed(config.train.seed)  # LoRA's initial weights come from the global RNG
    model = add_lora(base, config.model, config.lora)
    for model_config in (model.config, getattr(model.config, "text_config", None)):
        if model_config is not None:
            model_config.use_cache = False
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    say(f"model: {config.model.hub_id} ({config.model.quant}), trainable parameters {trainable:,} of {total:,}")
    return model


def build_trainer(config: Config, run_dir: Path, device: str, model, dataset: TrainingSet | CachedTrainingSet, callbacks: list) -> L2TTrainer:
    """The Hugging Face Trainer with the L2T loss, set up from the config's `train` section."""
    t = config.train
    args = TrainingArguments(
        output_dir=str(run_dir / runs.CHECKPOINTS),
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
        bf16=compute_dtype(config.model, device) == torch.bfloat16,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        report_to=[] if t.report_to == "none" else [t.report_to],
        remove_unused_columns=False,
        dataloader_pin_memory=device == "cuda",
        use_cpu=device == "cpu",
        ddp_find_unused_parameters=False,
        dataloader_num_workers=t.dataloader_workers,
        disable_tqdm=not is_main_process(),
    )
    return L2TTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=Collator(pad_token_id(dataset.processor.tokenizer)),
        callbacks=callbacks,
        lengths=dataset.lengths,
        group_by_length=t.group_by_length,
        labelled_logits_only=t.labelled_logits_only,
    )


def fit(trainer: L2TTrainer, checkpoint: Path | None, run_dir: Path, folder: RunFolderCallback, stopper: StopOnSignal) -> None:
    """Train (from the checkpoint, if any), then save the adapter and the loss plot; a failure is marked in status.json."""
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        state_dict = gathered_state_dict(trainer)
        if is_main_process():
            runs.save_adapter(trainer.model, run_dir, state_dict)
            plot_losses(run_dir)
    except torch.cuda.OutOfMemoryError:
        failed(folder, "out of GPU memory")
        raise ModelError(
            "out of GPU memory. Lower train.max_length, the image size cap (model.image_max_pixels), "
            "train.batch_size (raising train.grad_accum to keep the effective batch), or pick a smaller preset. "
            f"Checkpoints so far are kept in {run_dir / runs.CHECKPOINTS}; continue with --resume."
        ) from None
    except Exception as exc:
        failed(folder, "the disk is full" if disk_full(exc, run_dir) else f"{type(exc).__name__}: {exc}")
        raise
    finally:
        stopper.restore()  # on_train_end doesn't run when training raises


def gathered_state_dict(trainer: L2TTrainer) -> dict | None:
    """The full weights when FSDP or DeepSpeed shard them across processes (every process takes part); else None."""
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        return trainer.accelerator.get_state_dict(trainer.model)
    return None


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
    atomic_write_bytes(run_dir / runs.LOSS_PLOT, image.getvalue())


def evaluate_held_out(run_dir: Path, model, encoder: Encoder, data: PreparedData, count: int) -> None:
    """Base vs tuned on the held-out split, written to eval/ as `python -m l2t.evaluate` would; prints a few pairs and the table."""
    say(f"\nevaluating base and tuned model on {len(data.held_out)} held-out samples")
    evaluation, items = evaluate_loaded(run_dir, model, encoder, data.held_out, data.images)
    base, tuned = (m["name"] for m in evaluation["models"])
    first_of_type: dict[str, int] = {}
    for index, item in enumerate(items):
        first_of_type.setdefault(item.question_type, index)
    say("before -> after tuning, one held-out sample of each kind:")
    for index in list(first_of_type.values())[:count]:
        sample = evaluation["samples"][index]
        say(f"  Q: {sample['question'].replace(chr(10), ' ')}\n     reference: {sample['reference']}")
        say(f"     before:    {sample['answers'][base]}\n     after:     {sample['answers'][tuned]}")
    say("\n" + markdown_table(evaluation) + f"\n\nreport: {run_dir / runs.EVAL / runs.EVAL_PAGE}")


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
    except L2TError as exc:
        return print_error(exc)
    except Exception as exc:
        if config is None or not disk_full(exc, config.run_dir()):
            raise
        return print_error(f"the disk is full: {exc}\nFree space, then continue with --resume.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
