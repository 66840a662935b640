"""The architecture behind each model preset, buildable without the hub.

`presets/configs/<name>.json` holds the shape-giving numbers of the hub model's
config.json (sizes, layers, heads, token ids). From it the real model class is
built on the meta device: every module and parameter name and shape, no memory
and no download, even for a 7B model. Tests use it to check a preset's
skip list and LoRA regex against the modules they are meant to hit:

    from l2t.presets import build_on_meta
    model = build_on_meta("llava-1.5-7b")
"""

from __future__ import annotations

import json

import torch
import transformers
from transformers import AutoConfig, PretrainedConfig

from l2t.config import PRESETS_DIR, ConfigError, load_config

ARCHITECTURES_DIR = PRESETS_DIR / "configs"


def load_architecture_config(name: str) -> PretrainedConfig:
    """The transformers config of preset `name`, from presets/configs/<name>.json."""
    path = ARCHITECTURES_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in ARCHITECTURES_DIR.glob("*.json")))
        raise ConfigError(f"preset '{name}' has no architecture config {path}. Known: {known}")
    values = json.loads(path.read_text(encoding="utf-8"))
    return AutoConfig.for_model(values.pop("model_type"), **values)


def build_on_meta(name: str) -> torch.nn.Module:
    """The preset's model class built from its architecture config on the meta device."""
    model_class = getattr(transformers, load_config(name).model.model_class)
    config = load_architecture_config(name)
    with torch.device("meta"):
        return model_class(config)
