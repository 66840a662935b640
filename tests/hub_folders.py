"""Folders shaped like each model preset's hub repository, written offline for the tests.

A user points a preset at what the hub gives them: a folder with the repository's own
file names, loaded by a fresh process with `from_pretrained`. `write_hub_folder(preset,
folder)` writes such a folder for every model preset:

- config.json: the preset's architecture (presets/configs/<name>.json), as on the hub;
  generation_config.json with the model's special token ids;
- tokenizer.json + tokenizer_config.json (+ special_tokens_map.json where the hub has it),
  naming the hub's tokenizer class: a small BPE trained on a few sentences, of the family's
  kind (byte-level for Qwen and SmolLM, SentencePiece-style with byte fallback for Llama
  and Mistral), with the family's special tokens at the hub's ids, so the token ids in
  config.json are the tokenizer's;
- the processor files under the hub's names: preprocessor_config.json,
  processor_config.json, video_preprocessor_config.json (Qwen2-VL), with the processor
  classes and image settings (sizes, patch, feature strategy) the models use, written from
  the presets' facts rather than copied; and the chat template where the hub has one
  (`HUB_TEMPLATES`, each with the public source its text was read in);
- with `weights=True` (the presets up to 0.5B parameters): model.safetensors of random
  bf16 weights, the hub's dtype, for the real architecture with `WEIGHT_LAYERS` layers in
  the language model and in the vision tower instead of all of them (config.json says so).

What the hub has and these folders leave out: the real vocabularies (tokenizer.model,
vocab.json, merges.txt), the README, and the weights of the larger presets.

The tokenizers of `tests/test_masking.py` (in memory, compact ids) are built here too,
from the same sentences: `byte_level_tokenizer`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from l2t.config import load_config
from l2t.presets import ARCHITECTURES_DIR

CORPUS = [
    "What is in the picture? A red circle on the left.",
    "Where is it? Describe the image in one sentence.",
    "Answer the question using a single word or phrase.",
    "You are a helpful assistant. User: Assistant: system user assistant",
]


def byte_level_tokenizer(special_tokens: list[str], bos: str | None = None, **kwargs) -> PreTrainedTokenizerFast:
    """An in-memory byte-level BPE with `special_tokens` first (ids 0, 1, ...), for processors built in a test."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, **kwargs)


# ---------------------------------------------------------------- chat templates, from public sources

# Each hub repository's chat template, with where its text was read. The hub files
# themselves are not in reach of the tests; these are copies made by others.
OPENVINO_TOKENIZER = "openvinotoolkit/openvino.genai, src/cpp/src/tokenizer.cpp at 0115b44d, chat_template_fallback_map"
HUB_TEMPLATES = {
    # llava-hf/llava-1.5-7b-hf chat_template.json ("llava-1.5, llava-v1.6-vicuna (chat_template.json)": OPENVINO_TOKENIZER)
    "llava-1.5": (
        "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
        "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
        "{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    # llava-hf/llava-v1.6-mistral-7b-hf chat_template.json ("tiny-random-llava-next, llava-v1.6-mistral (chat_template.json)":
    # OPENVINO_TOKENIZER); `<\\s>` is in the hub file: past answers end in the four characters <\s>, not in </s>.
    "llava-next-mistral": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images first #}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
        "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
        "{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '<\\\\s> '}}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
    ),
    # Qwen/Qwen2-VL-2B-Instruct chat_template.json and tokenizer_config.json ("Qwen2-VL-2B-Instruct (tokenizer_config.json)":
    # OPENVINO_TOKENIZER; the same text is in many fine-tuning repositories)
    "qwen2-vl": (
        "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
        "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
        "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
        "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
        "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
        "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
        "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # HuggingFaceTB/SmolVLM-256M-Instruct and -500M-Instruct chat_template.json: the SmolVLM family's template, as
    # huggingface/transformers tests/models/smolvlm/test_processing_smolvlm.py (prepare_processor_dict) writes it;
    # transformers' own default in models/smolvlm/processing_smolvlm.py is the same plus videos. No copy of these two
    # repositories' own file was found.
    "smolvlm": (
        "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
        "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
        "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
        "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    ),
    # llava-hf/llava-interleave-qwen-0.5b-hf chat_template.json: zjysteven/lmms-finetune collators/llava_interleave.py
    # prints it "slightly different from" the hub file, with the assistant's <|im_end|> moved inside its generation
    # block; moved back here. No verbatim copy was found.
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all images first #}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
        "{# Render all text next #}{% if message['role'] != 'assistant' %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}{% endfor %}"
        "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
        "{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}

# ---------------------------------------------------------------- what each hub repository holds

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
RESCALE = 0.00392156862745098


def clip_336(processor_class: str) -> dict:
    return {
        "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
        "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "image_processor_type": "CLIPImageProcessor", "processor_class": processor_class, "resample": 3,
        "rescale_factor": RESCALE, "size": {"shortest_edge": 336},
    }  # fmt: skip


def llava_processor(processor_class: str, strategy: str, additional: int) -> dict:
    return {
        "image_token": "<image>", "num_additional_image_tokens": additional, "patch_size": 14,
        "processor_class": processor_class, "vision_feature_select_strategy": strategy,
    }  # fmt: skip


LLAMA_SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2}
QWEN_SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
QWEN2_VL_SPECIALS = {
    **QWEN_SPECIALS,
    **{f"<|{name}|>": 151646 + i for i, name in enumerate(
        ["object_ref_start", "object_ref_end", "box_start", "box_end", "quad_start", "quad_end",
         "vision_start", "vision_end", "vision_pad", "image_pad", "video_pad"])},
}  # fmt: skip
SMOLVLM_SPECIALS = {
    "<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<global-img>": 49152,
    **{f"<row_{r}_col_{c}>": 49152 + (r - 1) * 6 + c for r in range(1, 7) for c in range(1, 7)},
    "<fake_token_around_image>": 49189, "<image>": 49190, "<end_of_utterance>": 49279,
}  # fmt: skip
QWEN2_VL_PIXELS = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
}  # fmt: skip
SMOLVLM_IMAGES = {
    "do_convert_rgb": True, "do_image_splitting": True, "do_normalize": True, "do_pad": True, "do_rescale": True,
    "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Idefics3ImageProcessor",
    "image_std": [0.5, 0.5, 0.5], "max_image_size": {"longest_edge": 512}, "processor_class": "Idefics3Processor",
    "resample": 1, "rescale_factor": RESCALE, "size": {"longest_edge": 2048},
}  # fmt: skip


@dataclass(frozen=True)
class HubRepo:
    """The files of one hub repository, as data."""

    tokenizer_kind: str
    """sentencepiece (Llama, Mistral), qwen or gpt2 (byte-level)."""
    tokenizer_class: str
    specials: dict
    """Special token -> its id in the hub's vocabulary."""
    tokens: dict
    """bos/eos/pad/unk token names, as tokenizer_config.json sets them."""
    preprocessor: dict
    processor: dict | None = None
    video_preprocessor: dict | None = None
    template: str | None = None
    """Key of HUB_TEMPLATES, written as chat_template.json; None: the repository has no chat template."""
    extra_tokenizer_config: dict = field(default_factory=dict)


LLAVA_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
HUB_REPOS = {
    # No chat template and no processor_config.json in this repository (the preset sets patch_size and the strategy).
    "tinyllava": HubRepo(
        "sentencepiece", "LlamaTokenizer", {**LLAMA_SPECIALS, "<image>": 32000, "<pad>": 32001}, LLAVA_TOKENS, clip_336("LlavaProcessor"),
        extra_tokenizer_config={"legacy": False, "padding_side": "right", "model_max_length": 2048},
    ),
    "llava-1.5-7b": HubRepo(
        "sentencepiece", "LlamaTokenizer", {**LLAMA_SPECIALS, "<image>": 32000, "<pad>": 32001}, LLAVA_TOKENS, clip_336("LlavaProcessor"),
        llava_processor("LlavaProcessor", "default", 1), template="llava-1.5",
        extra_tokenizer_config={"legacy": False, "padding_side": "left"},
    ),
    "llava-next-7b": HubRepo(
        "sentencepiece", "LlamaTokenizer", {**LLAMA_SPECIALS, "<image>": 32000}, {**LLAVA_TOKENS, "pad_token": "<unk>"},
        {
            **clip_336("LlavaNextProcessor"), "image_processor_type": "LlavaNextImageProcessor", "aspect_ratio_setting": "anyres",
            "do_pad": True, "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        },
        llava_processor("LlavaNextProcessor", "default", 1), template="llava-next-mistral",
        extra_tokenizer_config={"legacy": False, "padding_side": "left"},
    ),  # fmt: skip
    "llava-interleave-0.5b": HubRepo(
        "qwen", "Qwen2Tokenizer", {**QWEN_SPECIALS, "<image>": 151646},
        {"bos_token": None, "eos_token": "<|im_end|>", "unk_token": None, "pad_token": "<|endoftext|>"},
        {
            "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "image_processor_type": "SiglipImageProcessor", "processor_class": "LlavaProcessor", "resample": 3,
            "rescale_factor": RESCALE, "size": {"height": 384, "width": 384},
        },
        llava_processor("LlavaProcessor", "full", 0), template="chatml",
    ),  # fmt: skip
    "qwen2-vl-2b": HubRepo(
        "qwen", "Qwen2Tokenizer", QWEN2_VL_SPECIALS,
        {"bos_token": None, "eos_token": "<|im_end|>", "unk_token": None, "pad_token": "<|endoftext|>"},
        {**QWEN2_VL_PIXELS, "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"},
        video_preprocessor={**QWEN2_VL_PIXELS, "video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2VLProcessor"},
        template="qwen2-vl", extra_tokenizer_config={"chat_template": HUB_TEMPLATES["qwen2-vl"], "padding_side": "left"},
    ),
    **{
        name: HubRepo(
            "gpt2", "GPT2Tokenizer", SMOLVLM_SPECIALS,
            {"bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>", "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"},
            SMOLVLM_IMAGES, {"image_seq_len": 64, "processor_class": "Idefics3Processor"}, template="smolvlm",
            extra_tokenizer_config={"additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]},
        )
        for name in ("smolvlm-256m", "smolvlm-500m")
    },
}  # fmt: skip
MODEL_PRESETS = sorted(HUB_REPOS)
WEIGHT_PRESETS = ("smolvlm-256m", "smolvlm-500m", "llava-interleave-0.5b")
"""The presets up to 0.5B parameters: their folders can hold random weights."""
WEIGHT_LAYERS = 1
"""Layers of the language model and of the vision tower in a folder with weights (the width, heads,
vocabulary and image size stay the model's)."""

# ---------------------------------------------------------------- tokenizers


def _pipeline(kind: str, tok: Tokenizer, bos: str | None, bos_id: int | None) -> None:
    """The family's normalizer, pre-tokenizer, decoder and post-processor, as its tokenizer.json has them."""
    if kind == "sentencepiece":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
        return
    if kind == "qwen":
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)


def hub_tokenizer(repo: HubRepo) -> Tokenizer:
    """A small BPE of the family's kind, trained on CORPUS, with the special tokens at the hub's ids."""
    kind = repo.tokenizer_kind
    low = [t for t, i in sorted(repo.specials.items(), key=lambda item: item[1]) if i < 256]
    if kind == "sentencepiece":
        # SentencePiece's layout: <unk> <s> </s>, then the 256 byte-fallback pieces, then the merges.
        trainer_specials = low + [f"<0x{b:02X}>" for b in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=trainer_specials, show_progress=False)
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    else:
        trainer = trainers.BpeTrainer(
            vocab_size=400, special_tokens=low, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    trained = json.loads(tok.to_str())["model"]
    vocab = {**trained["vocab"], **repo.specials}
    assert len(set(vocab.values())) == len(vocab), "a special token's id collides with a trained one"
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    if kind == "sentencepiece":
        final = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    else:
        final = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None))
    bos = repo.tokens.get("bos_token")
    _pipeline(kind, final, bos, repo.specials.get(bos))
    final.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in repo.specials])
    return final


def _added_tokens_decoder(repo: HubRepo) -> dict:
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    return {str(i): {"content": t, **entry} for t, i in sorted(repo.specials.items(), key=lambda item: item[1])}


# ---------------------------------------------------------------- the folder


def _write_json(path: Path, values: dict) -> None:
    path.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def architecture(preset: str, weights: bool) -> dict:
    """config.json's values: presets/configs/<preset>.json, with WEIGHT_LAYERS layers when the folder holds weights."""
    values = json.loads((ARCHITECTURES_DIR / f"{preset}.json").read_text(encoding="utf-8"))
    values["torch_dtype"] = "bfloat16"
    if weights:
        for section in ("text_config", "vision_config"):
            if section in values:
                values[section]["num_hidden_layers"] = WEIGHT_LAYERS
        if "text_config" not in values:
            values["num_hidden_layers"] = WEIGHT_LAYERS
        if "depth" in values.get("vision_config", {}):
            values["vision_config"]["depth"] = WEIGHT_LAYERS
    return values


def generation_config(repo: HubRepo) -> dict:
    tokens = {f"{kind}_token_id": repo.specials[repo.tokens[f"{kind}_token"]] for kind in ("bos", "eos", "pad") if repo.tokens.get(f"{kind}_token")}
    return {**tokens, "transformers_version": "4.45.0"}


def write_hub_folder(preset: str, folder: Path, weights: bool = False) -> Path:
    """`folder` filled as the preset's hub repository (see the module docstring); returns it."""
    repo = HUB_REPOS[preset]
    folder.mkdir(parents=True, exist_ok=True)
    if weights:
        write_random_weights(preset, folder)
    _write_json(folder / "config.json", architecture(preset, weights))
    _write_json(folder / "generation_config.json", generation_config(repo))
    hub_tokenizer(repo).save(str(folder / "tokenizer.json"))
    special = {k: v for k, v in repo.tokens.items() if v}
    _write_json(
        folder / "tokenizer_config.json",
        {
            "added_tokens_decoder": _added_tokens_decoder(repo),
            **special, "clean_up_tokenization_spaces": False, "model_max_length": 32768,
            "tokenizer_class": repo.tokenizer_class, **repo.extra_tokenizer_config,
        },
    )  # fmt: skip
    if repo.tokenizer_kind == "sentencepiece":
        _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "preprocessor_config.json", repo.preprocessor)
    if repo.processor is not None:
        _write_json(folder / "processor_config.json", repo.processor)
    if repo.video_preprocessor is not None:
        _write_json(folder / "video_preprocessor_config.json", repo.video_preprocessor)
    if repo.template is not None:
        _write_json(folder / "chat_template.json", {"chat_template": HUB_TEMPLATES[repo.template]})
    return folder


def write_random_weights(preset: str, folder: Path) -> None:
    """model.safetensors of random bf16 weights, saved by transformers under the hub checkpoint's names."""
    import torch
    import transformers
    from transformers import AutoConfig

    values = architecture(preset, weights=True)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    model_class = getattr(transformers, load_config(preset).model.model_class)
    torch.manual_seed(0)
    model = model_class(config).to(torch.bfloat16)
    scratch = folder / ".weights"
    model.save_pretrained(scratch)
    shutil.move(str(scratch / "model.safetensors"), folder / "model.safetensors")
    shutil.rmtree(scratch)
