"""The built-in `tiny` model: a LLaVA small enough to pretrain and fine-tune on a laptop CPU.

    python -m l2t.tiny                      # print where the shipped model is
    python -m l2t.tiny pretrain             # rebuild it from scratch (~5 minutes on 2 cores)
    python -m l2t.tiny pretrain --out DIR --seed 1

A Llama-style text model (64-d, 2 layers) and a CLIP-style vision model
(32x32 images, 8x8 patches -> 16 image tokens) joined by LLaVA's projector,
with a byte-level BPE tokenizer trained on the synthetic shapes vocabulary:
168,640 parameters. The pretrained weights ship in `l2t/assets/tiny/` (0.7 MB
each) and load through the same `from_pretrained` path as any hub model:

    builtin:tiny         l2t/assets/tiny/base    stage 2: captions and every question kind
    builtin:tiny-stage1  l2t/assets/tiny/stage1  stage 1: captions only (the study repeats stage 2 from here)

(`l2t.config.BUILTIN_MODELS` maps the ids to the folders.)

`pretrain` trains it from random weights, in fp32, the way LLaVA is trained,
on synthetic scenes in the "base" answer style (`l2t.synthetic`):
stage 1 learns to caption (nothing is pretrained here, so every part trains:
the vision tower and the language model learn along with the projector);
stage 2 is instruction tuning on captions and every question kind (colour,
shape, size, position, count, yes/no), answered in full sentences, with the
loss on the answers. Then it checks the result on a balanced held-out split
(caption accuracy and visual contribution, with and without the image) and
writes `pretrain_report.json` beside the weights. Runs are seeded, but a
multi-threaded CPU does not add floating-point numbers in a fixed order, so a
rebuild is close to, not bit-identical with, the shipped files: that is why
they ship.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from l2t import chat, scenes, synthetic
from l2t import pretrain as loop
from l2t.answers import visual_contribution
from l2t.chat import FORMATS, to_jinja
from l2t.config import BUILTIN_MODELS, LossConfig
from l2t.generation import generate
from l2t.masking import Encoder
from l2t.scoring import EvalItem, content_right

ASSETS_DIR = BUILTIN_MODELS["builtin:tiny"].parent
SEED = 1234
IMAGE_SIZE = 32
PATCH_SIZE = 8
PROMPT_FORMAT = "tiny-llava-v1"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
VOCAB_SIZE = 640
TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "projection_dim": 32}

# The recipe (python -m l2t.tiny pretrain): scenes, steps and learning rates of both stages.
TRAIN_SCENES = 20000
CHECK_SCENES = 200
STAGE1_STEPS = 1200
STAGE2_STEPS = 10000
LEARNING_RATE = 2e-3
BATCH_SIZE = 32


def _corpus() -> list[str]:
    """Every kind of text the tokenizer will see: both answer styles and the prompt format."""
    texts = []
    for style in ("base", "demo"):
        for record, _ in synthetic.make_split("corpus", 1500, random.Random(SEED), None, 16, style):
            texts += [m["value"].replace("<image>\n", "") for m in record["conversations"]]
    fmt = FORMATS[PROMPT_FORMAT]
    texts += [fmt.user_start, fmt.assistant_start, *synthetic.TEMPLATE_SENTENCES, *synthetic.BASE_CAPTION_PROMPTS]
    return texts


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="right",
    )


def build_random(seed: int = SEED):
    """The untrained model and its processor (deterministic for a seed)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = build_tokenizer()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=to_jinja(FORMATS[PROMPT_FORMAT]),
    )
    config = LlavaConfig(
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            **TEXT,
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        ),
        vision_config=CLIPVisionConfig(**VISION, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    return model, processor


def save(model, processor, path: Path, report: dict | None = None) -> None:
    """Write the model folder whole: into a temp folder beside `path`, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        if report is not None:
            (tmp / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def pretrain(out: Path, seed: int = 0, say=print) -> dict:
    """Stage 1 and stage 2 from random weights into out/stage1 and out/base; returns the report."""
    started = time.time()
    model, processor = build_random(SEED + seed)
    encoder = Encoder(processor, FORMATS[PROMPT_FORMAT])
    stages = {}
    for name, style, steps in (("stage1", "captions", STAGE1_STEPS), ("base", "base", STAGE2_STEPS)):
        data = loop.encode_scenes(loop.scenes("train", TRAIN_SCENES, seed, style), encoder, LossConfig(mode="response"))
        say(f"{name}: {len(data.samples)} scenes ({style}), {steps} steps of {BATCH_SIZE}, every part trained")
        loop.set_trainable(model, ("vision", "projector", "language"))
        torch.manual_seed(seed)
        losses = loop.fit(model, data, loop.Schedule(steps, BATCH_SIZE, LEARNING_RATE), seed, processor.tokenizer.pad_token_id, 500, say)
        stages[name] = {"style": style, "scenes": TRAIN_SCENES, "steps": steps, "final_loss": round(sum(losses[-100:]) / 100, 4)}
        save(model, processor, out / name)
    say("checking the base on balanced held-out scenes")
    report = {"seed": seed, "seconds": round(time.time() - started, 1), "stages": stages, "check": check(model, encoder)}
    save(model, processor, out / "base", report)
    return report


def check(model, encoder: Encoder, count: int = CHECK_SCENES) -> dict:
    """What a model of the base style sees, on balanced held-out scenes: its caption accuracy (main
    object) with and without the image, the visual contribution of both kinds on the reference
    captions, and how often its answers name the right value, per question kind."""
    captions = loop.scenes("check", count, 0, "captions")
    items = [EvalItem(s.id, "caption", s.messages[:1], s.messages[1]["content"], [p], s.meta["objects"]) for s, p in captions]
    with_image = generate(model, encoder, [(item.messages, item.images) for item in items])
    without = generate(model, encoder, [(chat.without_images(item.messages), []) for item in items])
    removed, noise = visual_contribution(model, encoder, items)
    result = {
        "caption_accuracy": _main_object_accuracy(with_image, items),
        "caption_accuracy_without_image": _main_object_accuracy(without, items),
        "visual_contribution": round(float(np.mean([v for values in removed for v in values])), 4),
        "visual_contribution_noise": round(float(np.mean([v for values in noise for v in values])), 4),
        "content_accuracy": {},
    }
    questions = [(s, p) for s, p in loop.scenes("check", 2 * count, 0, "base") if s.meta["turn_kinds"][0] != "caption" and p]
    answers = generate(model, encoder, [(s.messages[:1], [p]) for s, p in questions])
    for kind in scenes.QUESTION_KINDS:
        right = [content_right(kind, a, s.messages[1]["content"]) for (s, _), a in zip(questions, answers) if s.meta["turn_kinds"][0] == kind]
        result["content_accuracy"][kind] = round(sum(right) / len(right), 4) if right else None
    return result


def _main_object_accuracy(captions: list[str], items) -> float:
    main = [(o["color"], o["shape"]) for o in (item.objects[0] for item in items)]
    return round(sum(scenes.first_object_in(c) == m for c, m in zip(captions, main, strict=True)) / len(items), 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m l2t.tiny", description="The built-in tiny model: where it is, or rebuild it.")
    parser.add_argument("command", nargs="?", choices=["path", "pretrain"], default="path")
    parser.add_argument("--out", type=Path, default=ASSETS_DIR, help=f"where pretrain writes stage1/ and base/ (default {ASSETS_DIR})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scenes, the init and the data order")
    args = parser.parse_args(argv)
    if args.command == "path":
        print(BUILTIN_MODELS["builtin:tiny"])
        return 0
    report = pretrain(args.out, args.seed)
    print(json.dumps(report["check"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
