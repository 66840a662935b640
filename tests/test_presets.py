"""Presets: every YAML loads, and each model preset's skip list and LoRA regex hit
exactly the modules they are meant to.

The real architecture of each model preset is built on the meta device from
presets/configs/<name>.json (no memory, no download, 7B included) and put through
what `from_pretrained(quantization_config=...)` and peft do to it: the bitsandbytes
quantizer's own module replacement, then `get_peft_model`.
"""

import functools
import re

import peft
import pytest
import torch
from bitsandbytes.nn import Linear4bit
from peft.tuners.tuners_utils import check_target_module_exists
from transformers.quantizers.auto import AutoHfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module

from l2t.config import list_presets, load_config
from l2t.models import quantization_config
from l2t.presets import ARCHITECTURES_DIR, build_on_meta

# Language-model layers x 7 Linears (q, k, v, o, gate, up, down): the LoRA targets,
# and the only Linears that may go to 4-bit.
LANGUAGE_LINEARS = {
    "tinyllava": 22 * 7,
    "llava-interleave-0.5b": 24 * 7,
    "smolvlm-256m": 30 * 7,
    "smolvlm-500m": 32 * 7,
    "qwen2-vl-2b": 28 * 7,
    "llava-1.5-7b": 32 * 7,
    "llava-next-7b": 32 * 7,
}
# Most image tokens one image can take at the preset's processor settings.
IMAGE_TOKENS = {
    "tinyllava": 576,  # (336 / 14)^2
    "llava-interleave-0.5b": 729,  # (384 // 14)^2
    "smolvlm-256m": 67,  # (512 / 16)^2 / 4^2 = 64, + <fake_token_around_image><global-img>...<fake_token_around_image>
    "smolvlm-500m": 67,
    "qwen2-vl-2b": 258,  # (448 / 28)^2 = 256, + <|vision_start|><|vision_end|>
    "llava-1.5-7b": 576,
    "llava-next-7b": 2928,  # base 24^2 + anyres 48 x (48 + 1 newline) at 672 x 672
}
MODEL_PRESETS = sorted(LANGUAGE_LINEARS)
LANGUAGE_MODEL = ("model.language_model.", "model.text_model.")
WEIGHT_MODULES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


@functools.cache
def meta_model(name):
    """One unmodified meta build per preset, shared by the read-only tests."""
    return build_on_meta(name)


def under(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def language_linears(model):
    return {
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(LANGUAGE_MODEL)
    }


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_loads_and_validates(name):
    config = load_config(name)
    assert config.preset == name
    assert config.model.hub_id
    # A non-empty skip list drops transformers' default protection of lm_head.
    if config.model.skip_modules:
        assert "lm_head" in config.model.skip_modules


def test_every_hub_preset_has_an_architecture_and_counts_here():
    with_architecture = {p.stem for p in ARCHITECTURES_DIR.glob("*.json")}
    assert with_architecture == set(MODEL_PRESETS)
    assert set(list_presets()) - {"tiny"} == set(MODEL_PRESETS)


@pytest.mark.parametrize("name", MODEL_PRESETS)
def test_stated_size_matches_the_architecture(name):
    stated = load_config(name).model.parameters
    number, unit = float(stated[:-1]), {"M": 1e6, "B": 1e9}[stated[-1]]
    counted = sum(p.numel() for p in meta_model(name).parameters())
    assert abs(counted - number * unit) / counted < 0.05, (stated, counted)


@pytest.mark.parametrize("name", MODEL_PRESETS)
def test_max_length_leaves_room_for_text_after_the_image(name):
    assert load_config(name).train.max_length - IMAGE_TOKENS[name] >= 1024


@pytest.mark.parametrize("name", MODEL_PRESETS)
def test_skip_list_keeps_everything_but_language_linears_out_of_4bit(name):
    """Under transformers' own matching rule, vision/projector weights and lm_head are skipped."""
    skip = load_config(name).model.skip_modules
    for module_name, module in meta_model(name).named_modules():
        if not isinstance(module, WEIGHT_MODULES):
            continue
        converted = should_convert_module(module_name, skip)
        if module_name.startswith(LANGUAGE_MODEL):
            assert converted, f"{module_name} is kept out of 4-bit by {skip}"
        else:
            assert not converted, f"{module_name} is outside the language model but not covered by {skip}"
    assert not should_convert_module("lm_head", skip)


@pytest.mark.parametrize("name", MODEL_PRESETS)
def test_vision_and_projector_modules_partition_the_non_language_weights(name):
    """Every parameter outside the language model and lm_head is vision or projector, never both."""
    m = load_config(name).model
    names = [n for n, _ in meta_model(name).named_parameters()]
    for prefix in m.vision_modules + m.projector_modules:
        assert any(under(n, [prefix]) for n in names), f"{prefix} names no parameter"
    for n in names:
        if n.startswith(LANGUAGE_MODEL) or n.startswith("lm_head."):
            continue
        in_vision, in_projector = under(n, m.vision_modules), under(n, m.projector_modules)
        assert in_vision != in_projector, f"{n}: vision {in_vision}, projector {in_projector}"


@pytest.mark.parametrize("name", MODEL_PRESETS)
def test_lora_regex_hits_exactly_the_language_linears(name):
    m = load_config(name).model
    model = meta_model(name)
    lora_config = peft.LoraConfig(target_modules=m.lora_target)
    hits = {n for n, _ in model.named_modules() if check_target_module_exists(lora_config, n)}
    assert len(hits) == LANGUAGE_LINEARS[name]
    assert hits == language_linears(model)
    assert not [n for n in hits if under(n, m.vision_modules + m.projector_modules)]
    assert all(re.search(r"\.layers\.\d+\.(self_attn|mlp)\.\w+_proj$", n) for n in hits)


@pytest.mark.parametrize("name", MODEL_PRESETS)
def test_qlora_on_meta_quantises_and_adapts_only_language_linears(name):
    """The project's quantisation config through the bitsandbytes quantizer's real replacement
    (as from_pretrained runs it), then peft: NF4 with double quantisation, in the compute dtype."""
    m = load_config(name).model
    model = build_on_meta(name)  # fresh: both steps below change the model in place
    bnb_config = quantization_config(m, torch.bfloat16)
    AutoHfQuantizer.from_config(bnb_config, pre_quantized=False).preprocess_model(model, device_map={"": "cpu"})
    quantised = {n: mod for n, mod in model.named_modules() if isinstance(mod, Linear4bit)}
    assert len(quantised) == LANGUAGE_LINEARS[name]
    assert set(quantised) == language_linears(model)
    assert not isinstance(model.get_submodule("lm_head"), Linear4bit)
    for layer in quantised.values():
        assert (layer.weight.quant_type, layer.weight.compress_statistics, layer.compute_dtype) == ("nf4", True, torch.bfloat16)

    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=m.lora_target))
    adapted = {
        n.removeprefix("base_model.model.")
        for n, mod in model.named_modules()
        if isinstance(mod, peft.tuners.lora.LoraLayer)
    }
    assert adapted == set(quantised)
