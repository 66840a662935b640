"""The built-in `tiny` model: a LLaVA small enough to train on a laptop CPU.

A Llama-style text model (64-d, 2 layers) and a CLIP-style vision model
(32x32 images, 8x8 patches -> 16 image tokens) joined by LLaVA's projector,
with a byte-level BPE tokenizer trained on the synthetic shapes vocabulary.
It is built from the numbers below and a seed, saved once to a cache folder,
and from then on loaded through the same `from_pretrained` path as any hub
model. Nothing is downloaded. The weights are random: the point is to learn.

    python -m l2t.tiny          # build (or find) it and print where it is
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

VERSION = "v2"
SEED = 1234
IMAGE_SIZE = 32
PATCH_SIZE = 8
PROMPT_FORMAT = "tiny-llava-v1"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
VOCAB_SIZE = 640


def cache_dir() -> Path:
    root = os.environ.get("L2T_CACHE") or Path.home() / ".cache" / "l2t"
    return Path(root) / f"tiny-{VERSION}"


def _corpus() -> list[str]:
    from l2t import synthetic
    from l2t.chat import FORMATS

    words = []
    for shape in synthetic.SHAPES:
        for color in synthetic.COLORS:
            for size in ("small", "large"):
                words.append(f"A {size} {color} {shape} on the left and a {color} {shape} on the right.")
                words.append(f"Is there a {size} {color} {shape} in the image?")
                words.append(f"What color is the {size} {shape} at the top?")
    words += list(synthetic.TEMPLATE_SENTENCES)
    fmt = FORMATS[PROMPT_FORMAT]
    words += [fmt.user_start, fmt.assistant_start, "Yes", "No", "yes", "no", "one", "two", "left right top bottom center"]
    return words * 4


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


def build(path: Path) -> None:
    """Write the tiny model, tokenizer and processor to `path` (deterministic)."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from l2t.chat import FORMATS, to_jinja

    tokenizer = build_tokenizer()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
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
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        ),
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            projection_dim=32,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(config)
    # With a frozen random head after RMSNorm, logits of a 64-d model barely leave uniform
    # at the usual init scale; a wider head lets LoRA training sharpen the predictions.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)


def ensure_built() -> Path:
    """The cache folder of the tiny model, built on first use (atomically)."""
    path = cache_dir()
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        build(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished first: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


if __name__ == "__main__":
    print(ensure_built())
    sys.exit(0)
