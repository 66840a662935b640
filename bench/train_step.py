"""Training-step speed: our L2T step vs a plain HF Trainer + peft baseline, in one process.

    python bench/train_step.py [--steps 30] [--configs tiny,cpu]

For each model config, the same 4-bit QLoRA model and the same samples are
trained for a few steps by:
- `ours-l2t`: `L2TTrainer`, loss mode l2t, logits only at labelled positions, length-grouped batches;
- `ours-response`: the same, loss mode response;
- `full-logits-l2t` / `full-logits-response`: our step with logits at every position (isolates what the
  L2T mask itself costs: the same work, other labels);
- `baseline`: plain `transformers.Trainer`, response-only labels, the model's own loss on full
  logits, random batches (what a generic SFT script does).
Reported: samples/s after warm-up, and the ratios l2t/response step time (goal <= 1.02) and
ours/baseline step time (goal <= 1.0). `cpu` is a CPU-sized LLaVA built from config numbers
(Llama text 256-d, 4 layers, 32k vocabulary; CLIP 64 px -> 64 image tokens).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
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


def measure(config_name: str, model_dir: str | None, steps: int, warmup: int, batch_size: int) -> dict[str, float]:
    import torch
    from transformers import Trainer, TrainingArguments

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
    encoder = Encoder.from_config(config, processor, mine_templates([s.instructions() for s in samples]))
    images = ImageSource(root)
    pad = processor.tokenizer.pad_token_id

    def args(out: str) -> TrainingArguments:
        return TrainingArguments(output_dir=out, per_device_train_batch_size=batch_size, max_steps=warmup + steps, save_strategy="no",
                                 logging_steps=10_000, report_to=[], use_cpu=True, disable_tqdm=True, remove_unused_columns=False,
                                 activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False},
                                 learning_rate=1e-4, dataloader_pin_memory=False, seed=0)  # fmt: skip

    results = {}
    with tempfile.TemporaryDirectory() as out:
        variants = (("ours-l2t", "l2t", True), ("ours-response", "response", True),
                    ("full-logits-l2t", "l2t", False), ("full-logits-response", "response", False))  # fmt: skip
        for name, mode, labelled_only in variants:
            examples = encode_samples(samples, encoder, mode, 1.0, 1.0)
            dataset = TrainingSet(examples, images, processor)
            timer = StepTimer(warmup)
            trainer = L2TTrainer(model=model, args=args(out), train_dataset=dataset, data_collator=Collator(pad), callbacks=[timer.callback],
                                 lengths=dataset.lengths, group_by_length=True, labelled_logits_only=labelled_only)  # fmt: skip
            trainer.train()
            results[name] = timer.seconds_per_step

        examples = encode_samples(samples, encoder, "response", 1.0, 1.0)
        dataset = TrainingSet(examples, images, processor)
        collate = Collator(pad)

        def baseline_collator(features):
            batch = collate(features)
            batch.pop("loss_weights")
            batch.pop("loss_kinds")
            return batch

        timer = StepTimer(warmup)
        Trainer(model=model, args=args(out), train_dataset=dataset, data_collator=baseline_collator, callbacks=[timer.callback]).train()
        results["baseline"] = timer.seconds_per_step
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--configs", default="tiny,cpu")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; batch {args.batch_size}, {args.steps} timed steps")
    for name in args.configs.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = None
            if name == "cpu":
                model_dir = str(Path(tmp) / "cpu-llava")
                build_cpu_sized(Path(model_dir))
            r = measure(name, model_dir, args.steps, args.warmup, args.batch_size)
        for key, seconds in r.items():
            print(f"[{name}] {key:<22} {1000 * seconds:8.1f} ms/step  {args.batch_size / seconds:8.1f} samples/s")
        print(f"[{name}] l2t/response step time, full logits (the cost of the mask): {r['full-logits-l2t'] / r['full-logits-response']:.3f}   (goal <= 1.02)")
        print(f"[{name}] l2t/response step time, labelled logits only: {r['ours-l2t'] / r['ours-response']:.3f}")
        print(f"[{name}] ours-l2t/baseline step time: {r['ours-l2t'] / r['baseline']:.3f}   (goal <= 1.0)")
        print(f"[{name}] baseline/ours-l2t samples/s: {r['baseline'] / r['ours-l2t']:.2f}x")


if __name__ == "__main__":
    main()
