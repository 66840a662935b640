"""Model loading: real bitsandbytes 4-bit on the language model, vision and projector kept out."""

import bitsandbytes as bnb
import pytest
import torch

from l2t.config import load_config
from l2t.models import ModelError, add_lora, load_base_model, load_for_training, load_processor


@pytest.fixture(scope="module")
def qlora_model(tiny_config):
    model, _ = load_for_training(tiny_config, device="cpu")
    return model


@pytest.fixture(scope="module")
def bf16_qlora_model():
    """QLoRA with a compute dtype other than the CPU's float32 default, so a dtype that is not passed on shows."""
    model, _ = load_for_training(load_config("tiny", overrides=["model.dtype=bf16"]), device="cpu")
    return model


def _modules(model, cls):
    return {name for name, m in model.named_modules() if isinstance(m, cls)}


def test_language_model_is_4bit_vision_and_projector_are_not(qlora_model):
    four_bit = _modules(qlora_model, bnb.nn.Linear4bit)
    assert four_bit, "no Linear4bit layer: the model was not quantised"
    assert all(".language_model.layers." in name for name in four_bit)
    assert not any("vision_tower" in n or "multi_modal_projector" in n or "lm_head" in n for n in four_bit)
    # Every attention and MLP projection of both language-model layers is quantised (7 per layer, 2 layers).
    base_layers = {n.split(".base_layer")[0] for n in four_bit}
    assert len(base_layers) == 14


def test_4bit_is_nf4_with_double_quantisation_in_the_compute_dtype(bf16_qlora_model):
    """QLoRA as its paper defines it, read off the layers of the model the project loads: NF4 weights,
    quantisation constants quantised again (double quantisation), matmuls in the model's compute dtype."""
    layers = [m for m in bf16_qlora_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14
    for layer in layers:
        state = layer.weight.quant_state
        assert (state.quant_type, state.nested, layer.compute_dtype) == ("nf4", True, torch.bfloat16)


def test_only_lora_and_projector_train(qlora_model):
    trainable = {n for n, p in qlora_model.named_parameters() if p.requires_grad}
    assert trainable
    for name in trainable:
        assert "lora_" in name or "multi_modal_projector.modules_to_save" in name, name
    assert any("multi_modal_projector" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in qlora_model.named_parameters() if p.requires_grad)


def test_frozen_weights_keep_the_compute_dtype(bf16_qlora_model):
    vision = [p.dtype for n, p in bf16_qlora_model.named_parameters() if "vision_tower" in n]
    assert set(vision) == {torch.bfloat16}, "frozen vision weights were upcast"
    assert all(p.dtype == torch.float32 for p in bf16_qlora_model.parameters() if p.requires_grad)


def test_qlora_step_updates_lora_and_projector_only(qlora_model, tiny_processor):
    from PIL import Image

    qlora_model.train()
    inputs = tiny_processor(text=["USER: <image>\nWhat is it?\nASSISTANT: A red circle.</s>"], images=[Image.new("RGB", (32, 32), "red")], return_tensors="pt")
    out = qlora_model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    grads = {n: p.grad for n, p in qlora_model.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n or "lora_A" in n)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "multi_modal_projector" in n)
    qlora_model.zero_grad(set_to_none=True)


def test_plain_lora_without_quantisation(tiny_config):
    config = load_config("tiny", overrides=["model.quant=none"])
    base = load_base_model(config.model, device="cpu")
    assert not _modules(base, bnb.nn.Linear4bit)
    model = add_lora(base, config.model, config.lora)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


def test_lora_target_that_matches_nothing_is_an_error(tiny_config):
    config = load_config("tiny", overrides=["model.lora_target=^nothing$", "model.quant=none"])
    base = load_base_model(config.model, device="cpu")
    with pytest.raises(ModelError, match="matches no Linear"):
        add_lora(base, config.model, config.lora)


def test_no_remote_code_unless_asked(tiny_config, monkeypatch):
    import transformers

    seen = {}
    real = transformers.LlavaForConditionalGeneration.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "from_pretrained", spy)
    load_base_model(load_config("tiny", overrides=["model.quant=none"]).model, device="cpu")
    assert seen["trust_remote_code"] is False
    assert seen["use_safetensors"] is True


def test_mismatched_chat_template_stops_loading(tiny_config, monkeypatch):
    from transformers import AutoProcessor

    real = AutoProcessor.from_pretrained

    def altered(*args, **kwargs):
        processor = real(*args, **kwargs)
        processor.chat_template = processor.chat_template.replace("ASSISTANT:", "BOT:")
        return processor

    monkeypatch.setattr(AutoProcessor, "from_pretrained", altered)
    with pytest.raises(ModelError, match="does not match prompt format 'tiny-llava-v1'"):
        load_processor(tiny_config.model)
    config = load_config("tiny", overrides=["model.check_chat_template=false"])
    assert load_processor(config.model) is not None


def test_missing_model_is_a_clear_error():
    config = load_config("tiny", overrides=["model.hub_id=/nonexistent/model"])
    with pytest.raises(ModelError, match="cannot load the processor of '/nonexistent/model'"):
        load_processor(config.model)


def test_8bit_loads_and_trains(tiny_processor):
    from PIL import Image

    config = load_config("tiny", overrides=["model.quant=8bit"])
    model, _ = load_for_training(config, device="cpu")
    eight_bit = _modules(model, bnb.nn.Linear8bitLt)
    assert eight_bit and all(".language_model.layers." in n for n in eight_bit)
    inputs = tiny_processor(text=["USER: <image>\nWhat?\nASSISTANT: A.</s>"], images=[Image.new("RGB", (32, 32))], return_tensors="pt")
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
