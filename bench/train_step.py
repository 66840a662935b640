"""Training-step speed and memory: our L2T step vs TRL's SFTTrainer and a plain HF Trainer, in one process.

    python bench/train_step.py [--steps 20] [--configs tiny,cpu] [--no-trl]

For each model config, the same 4-bit QLoRA model (NF4 through `l2t.models`, LoRA on the
language model, trainable projector, activation checkpointing) and the same samples
(the bundled ones with one image each) are trained for a few steps, batch 8, by:
- `ours-l2t`: `L2TTrainer`, loss mode l2t, logits only at labelled positions, length-grouped batches;
- `ours-response`: the same, loss mode response;
- `full-logits-l2t` / `full-logits-response`: our step with logits at every position (isolates what the
  L2T mask itself costs: the same work, other labels);
- `baseline`: plain `transformers.Trainer`, response-only labels, the model's own loss on full
  logits, random batches (what a generic SFT script does);
- `trl-completion`: TRL's `SFTTrainer` with its vision collator on prompt/completion data
  (`completion_only_loss`: the last answer in the loss; the tiny model's chat template has no
  generation markers, so `assistant_only_loss` is not available), TRL's defaults otherwise: trainable
  weights cast to bf16 with bf16 autocast, its chunked LM head with entropy and token accuracy;
- `trl-full`: the same on conversations, no masking (every token but padding in the loss).
Reported per arm: ms/step and samples/s after warm-up, tokens/s (samples/s times the mean sample
length), tokens in the loss per batch, and peak memory: the process's resident memory, sampled
during the arm, above what it held when the arm began (CPU). Ratios: l2t/response step time (goal
<= 1.02), ours/baseline and ours/TRL. `cpu` is a CPU-sized LLaVA built from config numbers (Llama
text 256-d, 4 layers, 32k vocabulary; CLIP 64 px -> 64 image tokens).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_cpu_sized(path: Path) -> None:
    """A LLaVA between the tiny model and a real one, with the tiny tokenizer (random weights)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from l2t import tiny
    from l2t.chat import FORMATS, to_jinja
    from l2t.config import load_config
    from l2t.models import load_processor

    small = load_processor(load_config("tiny").model)
    tokenizer = small.tokenizer
    image_processor = small.image_processor
    image_processor.size = {"shortest_edge": 64}
    image_processor.crop_size = {"height": 64, "width": 64}
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=to_jinja(FORMATS[tiny.PROMPT_FORMAT]))  # fmt: skip
    config = LlavaConfig(
        text_config=LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                                num_key_value_heads=8, max_position_embeddings=1024, tie_word_embeddings=False,
                                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        vision_config=CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=8),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default", vision_feature_layer=-1,
    )  # fmt: skip
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)


class StepTimer:
    """Times optimiser steps after a warm-up, as a Trainer callback."""

    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == warmup:
                    timer.start = time.perf_counter()
                timer.end = time.perf_counter()
                timer.steps = state.global_step - warmup

        self.callback = Callback()
        self.start = self.end = 0.0
        self.steps = 0

    @property
    def seconds_per_step(self) -> float:
        return (self.end - self.start) / max(self.steps, 1)


class PeakMemory:
    """Peak resident memory of this process while the block runs, above what it held when the block began."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = self.start = 0

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._done.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        gc.collect()
        self.start = self.peak = self.process.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    @property
    def growth_gb(self) -> float:
        return (self.peak - self.start) / 1024**3


def training_args(out: str, batch_size: int, max_steps: int, **extra):
    from transformers import TrainingArguments

    settings = dict(output_dir=out, per_device_train_batch_size=batch_size, max_steps=max_steps, save_strategy="no", logging_steps=10_000,
                    report_to=[], use_cpu=True, disable_tqdm=True, remove_unused_columns=False, activation_checkpointing=True,
                    activation_checkpointing_kwargs={"use_reentrant": False}, learning_rate=1e-4, dataloader_pin_memory=False, seed=0)  # fmt: skip
    settings.update(extra)
    return TrainingArguments(**settings)


def trl_arm(name: str, config, samples, images, processor, out: str, batch_size: int, max_steps: int, timer: StepTimer):
    """TRL's SFTTrainer on a fresh 4-bit base with the same LoRA and trainable projector as ours."""
    import datasets
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from l2t.chat import _typed
    from l2t.models import load_base_model, lora_target_names

    base = load_base_model(config.model, device="cpu")
    peft_config = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                             target_modules=lora_target_names(base, config.model.lora_target), modules_to_save=config.model.projector_modules)  # fmt: skip
    rows = []
    for sample in samples:
        typed = _typed(sample.messages)
        pictures = [images.open(p) for p in sample.images]
        rows.append({"prompt": typed[:-1], "completion": typed[-1:], "images": pictures} if name == "trl-completion" else {"messages": typed, "images": pictures})
    dataset = datasets.Dataset.from_list(rows)
    args = SFTConfig(**training_args(out, batch_size, max_steps, bf16=True).to_dict() | {"max_length": None})
    trainer = SFTTrainer(model=base, args=args, train_dataset=dataset, processing_class=processor, peft_config=peft_config, callbacks=[timer.callback])
    batch = trainer.data_collator([dataset[i] for i in range(batch_size)])
    return trainer, int((batch["labels"] != -100).sum())


def measure(config_name: str, model_dir: str | None, steps: int, warmup: int, batch_size: int, with_trl: bool) -> dict[str, dict]:
    import torch
    from transformers import Trainer

    from l2t.batch import Collator, TrainingSet, encode_samples
    from l2t.config import load_config
    from l2t.data import load_samples
    from l2t.images import ImageSource
    from l2t.masking import Encoder
    from l2t.models import load_for_training
    from l2t.synthetic import bundled_dir
    from l2t.templates import mine_templates
    from l2t.trainer import L2TTrainer

    overrides = ["model.check_chat_template=false"] + ([f"model.hub_id={model_dir}"] if model_dir else [])
    config = load_config("tiny", overrides=overrides)
    torch.manual_seed(0)
    model, processor = load_for_training(config, device="cpu")
    root = bundled_dir()
    samples, _ = load_samples(root / "train.json")
    samples = [s for s in samples if len(s.images) == 1]  # TRL's collator takes a batch whose samples all have images
    encoder = Encoder.from_config(config, processor, mine_templates([s.instructions() for s in samples]))
    images = ImageSource(root)
    pad = processor.tokenizer.pad_token_id
    results: dict[str, dict] = {}

    def record(name: str, timer: StepTimer, memory: PeakMemory, loss_tokens: int) -> None:
        results[name] = {"seconds": timer.seconds_per_step, "peak_gb": memory.growth_gb, "loss_tokens": loss_tokens}

    with tempfile.TemporaryDirectory() as out:
        variants = (("ours-l2t", "l2t", True), ("ours-response", "response", True),
                    ("full-logits-l2t", "l2t", False), ("full-logits-response", "response", False))  # fmt: skip
        for name, mode, labelled_only in variants:
            examples = encode_samples(samples, encoder, mode, 1.0, 1.0)
            dataset = TrainingSet(examples, images, processor)
            timer = StepTimer(warmup)
            trainer = L2TTrainer(model=model, args=training_args(out, batch_size, warmup + steps), train_dataset=dataset, data_collator=Collator(pad),
                                 callbacks=[timer.callback], lengths=dataset.lengths, group_by_length=True, labelled_logits_only=labelled_only)  # fmt: skip
            with PeakMemory() as memory:
                trainer.train()
            record(name, timer, memory, int(sum((e.labels != -100).sum() for e in examples[:batch_size])))
        mean_length = sum(dataset.lengths) / len(dataset)

        examples = encode_samples(samples, encoder, "response", 1.0, 1.0)
        dataset = TrainingSet(examples, images, processor)
        collate = Collator(pad)

        def baseline_collator(features):
            batch = collate(features)
            batch.pop("loss_weights")
            batch.pop("loss_kinds")
            return batch

        timer = StepTimer(warmup)
        trainer = Trainer(model=model, args=training_args(out, batch_size, warmup + steps), train_dataset=dataset, data_collator=baseline_collator,
                          callbacks=[timer.callback])  # fmt: skip
        with PeakMemory() as memory:
            trainer.train()
        record("baseline", timer, memory, int(sum((e.labels != -100).sum() for e in examples[:batch_size])))

        del model, trainer
        for name in ("trl-completion", "trl-full") if with_trl else ():
            timer = StepTimer(warmup)
            trainer, loss_tokens = trl_arm(name, config, samples, images, processor, out, batch_size, warmup + steps, timer)
            with PeakMemory() as memory:
                trainer.train()
            record(name, timer, memory, loss_tokens)
            del trainer
    for row in results.values():
        row["samples_per_s"] = batch_size / row["seconds"]
        row["tokens_per_s"] = row["samples_per_s"] * mean_length
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--configs", default="tiny,cpu")
    parser.add_argument("--no-trl", action="store_true", help="leave out the TRL arms")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; batch {args.batch_size}, {args.steps} timed steps; "
          f"load average before: {os.getloadavg()[0]:.2f}")  # fmt: skip
    for name in args.configs.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = None
            if name == "cpu":
                model_dir = str(Path(tmp) / "cpu-llava")
                build_cpu_sized(Path(model_dir))
            r = measure(name, model_dir, args.steps, args.warmup, args.batch_size, not args.no_trl)
        print(f"[{name}] {'arm':<21} {'ms/step':>8} {'samples/s':>9} {'tokens/s':>9} {'loss tokens':>11} {'peak GB':>8}")
        for key, row in r.items():
            print(f"[{name}] {key:<21} {1000 * row['seconds']:8.1f} {row['samples_per_s']:9.1f} {row['tokens_per_s']:9.0f} {row['loss_tokens']:11d} {row['peak_gb']:8.3f}")
        print(f"[{name}] l2t/response step time, full logits (the cost of the mask): {r['full-logits-l2t']['seconds'] / r['full-logits-response']['seconds']:.3f}   (goal <= 1.02)")
        print(f"[{name}] l2t/response step time, labelled logits only: {r['ours-l2t']['seconds'] / r['ours-response']['seconds']:.3f}")
        for other in ("baseline", "trl-completion", "trl-full"):
            if other in r:
                print(f"[{name}] ours-l2t/{other} step time: {r['ours-l2t']['seconds'] / r[other]['seconds']:.3f}; "
                      f"samples/s ours-l2t vs {other}: {r[other]['seconds'] / r['ours-l2t']['seconds']:.2f}x")  # fmt: skip
        print(f"[{name}] load average after: {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
