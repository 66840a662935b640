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


# ---------------------------------------------------------------- a hub model's first use


def test_first_use_of_a_hub_model_says_how_much_it_downloads(monkeypatch, capsys):
    """The hub can't be reached from the tests: its client is replaced by one that answers as the hub would."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.file_download import DryRunFileInfo

    from l2t.models import MODEL_FILES, fetch_model, hub_cache

    def file(name: str, size: int, cached: bool) -> DryRunFileInfo:
        return DryRunFileInfo(commit_hash="0" * 40, file_size=size, filename=name, local_path="", is_cached=cached, will_download=not cached)

    calls = []

    def snapshot_download(repo_id, allow_patterns=None, local_files_only=False, dry_run=False):
        calls.append((repo_id, tuple(allow_patterns), local_files_only, dry_run))
        if local_files_only:
            raise LocalEntryNotFoundError("not in the cache")
        if dry_run:
            return [file("model.safetensors", 512_600_000, False), file("tokenizer.json", 3_500_000, False), file("config.json", 7_000, True)]
        return "/snapshot"

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    fetch_model(load_config("smolvlm-256m"))
    assert capsys.readouterr().out == (
        f"preset smolvlm-256m: first use of HuggingFaceTB/SmolVLM-256M-Instruct: downloading 2 files, 0.52 GB, into {hub_cache()}\n"
    )
    repo = "HuggingFaceTB/SmolVLM-256M-Instruct"
    assert calls == [(repo, MODEL_FILES, True, False), (repo, MODEL_FILES, False, True), (repo, MODEL_FILES, False, False)]

    calls.clear()
    fetch_model(load_config("smolvlm-256m"), weights=False)  # the processor alone: no weights
    assert all("*.safetensors" not in patterns for _, patterns, _, _ in calls)


def test_nothing_to_fetch_for_a_builtin_model_or_a_folder(tmp_path):
    from l2t.models import fetch_model

    fetch_model(load_config("tiny"))
    fetch_model(load_config("smolvlm-256m", overrides=[f"model.hub_id={tmp_path}"]))
    fetch_model(load_config("tiny", overrides=["model.hub_id=/nonexistent/model"]))  # not a hub id: loading says what is missing


def test_a_hub_model_neither_cached_nor_reachable_is_a_model_error():
    from l2t.models import fetch_model, hub_cache

    config = load_config("smolvlm-256m", overrides=["model.hub_id=l2t-tests/not-downloaded"])  # offline: conftest
    with pytest.raises(ModelError) as error:
        fetch_model(config)
    message = str(error.value)
    assert message.startswith(
        f"preset smolvlm-256m needs the model l2t-tests/not-downloaded, which is not in the Hugging Face cache {hub_cache()}, "
        "and the hub can't be reached (HF_HUB_OFFLINE is set)."
    )
    assert "`hf download l2t-tests/not-downloaded`" in message and "models--l2t-tests--not-downloaded" in message


@pytest.mark.parametrize(
    ("setting", "fsdp", "expected"),
    [("auto", False, torch.uint8), ("auto", True, torch.bfloat16), ("uint8", True, torch.uint8), ("fp32", False, torch.float32)],
)
def test_quant_storage_follows_the_launch(setting, fsdp, expected, monkeypatch):
    from l2t.models import quantization_config

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    if fsdp:
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` exports with an FSDP config
    model = load_config("tiny", overrides=[f"model.quant_storage={setting}"]).model
    assert quantization_config(model, torch.bfloat16).bnb_4bit_quant_storage == expected


def test_unknown_quant_storage_is_refused():
    from l2t.config import ConfigError

    with pytest.raises(ConfigError, match=r"model.quant_storage='int4': must be one of auto, uint8"):
        load_config("tiny", overrides=["model.quant_storage=int4"])
