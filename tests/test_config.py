"""Config layering and validation: every error names the key and the value."""

import pytest
import yaml

from l2t.config import Config, ConfigError, config_from_dict, field_docs, list_presets, load_config, save_config


def test_layers_defaults_preset_file_overrides(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("train:\n  batch_size: 3\nloss:\n  mode: response\n")
    config = load_config("tiny", str(extra), ["train.learning_rate=1e-4", "loss.instruction_weight=0.5"])
    assert config.model.hub_id == "builtin:tiny"  # from the preset
    assert config.train.batch_size == 3  # from the file
    assert config.loss.mode == "response"
    assert config.train.learning_rate == 1e-4  # YAML reads "1e-4" as a string: converted
    assert config.loss.instruction_weight == 0.5
    assert config.lora.dropout == 0.0  # preset
    assert config.train.scheduler == "cosine"  # default


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match="unknown preset 'nope'. Available presets: .*tiny"):
        load_config("nope")


def test_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides=["train.learnig_rate=1e-4"])
    assert "unknown key 'train.learnig_rate'" in str(err.value)
    assert "learning_rate" in str(err.value)


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown key 'trainer'"):
        load_config("tiny", overrides=["trainer.x=1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.batch_size=two", "train.batch_size: expected int"),
        ("train.gradient_checkpointing=maybe", "train.gradient_checkpointing: expected bool"),
        ("model.skip_modules=lm_head", "model.skip_modules: expected list"),
        ("train.learning_rate=-0.1", "train.learning_rate=-0.1: must be positive"),
        ("lora.r=0", "lora.r=0: must be at least 1"),
        ("loss.mode=everything", "loss.mode='everything': must be one of response, l2t"),
        ("model.quant=3bit", "model.quant='3bit'"),
        ("model.lora_target=(", "not a valid regex"),
        ("train.max_length=2", "train.max_length=2"),
    ],
)
def test_bad_values_name_key_and_value(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config("tiny", overrides=[override])


def test_both_weights_zero_is_refused():
    with pytest.raises(ConfigError, match="nothing to learn"):
        load_config("tiny", overrides=["loss.instruction_weight=0", "loss.response_weight=0"])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config("tiny", overrides=["train.learning_rate"])


def test_saved_config_reloads_identically(tmp_path):
    config = load_config("tiny", overrides=["loss.mode=l2t_full", "templates.add=['Say it.']"])
    save_config(config, tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == config


def test_every_field_has_a_docstring():
    import dataclasses

    from l2t import config as module

    for section in (module.ModelConfig, module.LoraConfig, module.TrainConfig, module.LossConfig, module.TemplatesConfig, module.DataConfig):
        docs = field_docs(section)
        missing = [f.name for f in dataclasses.fields(section) if f.name not in docs]
        assert not missing, f"{section.__name__}: fields without a docstring: {missing}"


def test_presets_are_listed():
    assert {"tiny", "tinyllava", "llava-1.5-7b"} <= set(list_presets())
    assert Config().preset == "tiny"
