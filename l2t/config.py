"""One configuration schema for a run: defaults here, presets override them.

A run's config is built in layers, each checked before it is merged:
defaults (the dataclasses below) -> `presets/<name>.yaml` -> an optional
`--config file.yaml` -> `key=value` overrides from the command line, with the
same dotted names as the YAML (`train.learning_rate=1e-4`). An unknown key or a
value of the wrong type is an error that names the key; nothing is silently
dropped. `validate()` then checks ranges before any weights load.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from l2t.chat import FORMATS
from l2t.errors import L2TError
from l2t.files import atomic_write_text
from l2t.images import DEFAULT_MAX_PIXELS

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
BUILTIN_MODELS = {
    "builtin:tiny": Path(__file__).resolve().parent / "assets" / "tiny" / "base",
    "builtin:tiny-stage1": Path(__file__).resolve().parent / "assets" / "tiny" / "stage1",
}
"""Model ids that name a folder shipped with the package (built by `python -m l2t.tiny pretrain`)."""

LOSS_MODE_DESCRIPTIONS = {
    "response": "response tokens only (standard visual instruction tuning)",
    "l2t": "L2T: instruction + response tokens, minus system templates and task templates",
    "l2t_keep_task_templates": "L2T keeping task templates: instruction + response tokens, minus system templates",
    "l2t_full": "every prompt and response token (train on prompt)",
    "l2t_relevance": "L2T with each instruction token weighted by how much the base model's prediction of it depends on the image",
}
LOSS_MODES = tuple(LOSS_MODE_DESCRIPTIONS)
QUANT_MODES = ("4bit", "8bit", "none")
DTYPES = {"auto": "", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""model.dtype names -> the torch dtype each stands for (auto: chosen per device, see l2t.models)."""
QUANT_STORAGE = ("auto", "uint8", "bf16", "fp16", "fp32")
"""model.quant_storage names (auto: chosen per launch, see l2t.models.quant_storage_dtype)."""
MODEL_CLASSES = (
    "LlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration",
    "Idefics3ForConditionalGeneration",
    "Qwen2VLForConditionalGeneration",
)


class ConfigError(L2TError, ValueError):
    """A config key or value that cannot be used; the message names the key."""


@dataclass
class ModelConfig:
    hub_id: str = ""
    """Hub id or local folder of the base model."""
    model_class: str = "LlavaForConditionalGeneration"
    """transformers class that loads the model (one of MODEL_CLASSES)."""
    prompt_format: str = "llava-1.5"
    """Name of the prompt format in l2t.chat.FORMATS."""
    parameters: str = ""
    """Model size shown to users, e.g. "1.4B"."""
    processor_overrides: dict = field(default_factory=dict)
    """Attributes set on the processor after loading (facts the hub files miss)."""
    image_max_pixels: int = 0
    """Cap on image pixels given to the processor (0: the processor's own)."""
    quant: str = "4bit"
    """Weights of the language model: 4bit (NF4, QLoRA), 8bit, or none (plain LoRA)."""
    dtype: str = "auto"
    """Compute/storage dtype of the non-quantised weights; auto = bf16 where supported, else fp32."""
    quant_storage: str = "auto"
    """Container dtype of the packed 4-bit weights: auto = the compute dtype under FSDP or DeepSpeed ZeRO-3 (so they shard with the rest), else uint8."""
    skip_modules: list = field(default_factory=list)
    """Full module-name prefixes kept out of quantisation (vision tower, projector, lm_head)."""
    vision_modules: list = field(default_factory=list)
    """Module prefixes of the vision tower (frozen unless train_vision)."""
    projector_modules: list = field(default_factory=list)
    """Module prefixes of the vision-language projector (trained if train_projector)."""
    lora_target: str = (
        r"^model\.(language_model|text_model)\.layers\.\d+\."
        r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"
    )
    """Regex over full module names: the Linears that get LoRA adapters."""
    train_projector: bool = True
    """Train the projector in full (as LLaVA recipes do)."""
    train_vision: bool = False
    """Train the vision tower in full (off: it stays frozen)."""
    trust_remote_code: bool = False
    """Run model code shipped with the weights; only when you trust the source."""
    check_chat_template: bool = True
    """Stop if the processor's own chat template renders a probe prompt differently from prompt_format."""
    estimated_peak_gpu_gb: float = 0.0
    """Expected peak GPU memory at the preset's defaults, in GB (0: unknown)."""
    peak_gpu_gb_measured: bool = False
    """True once estimated_peak_gpu_gb was measured on a GPU rather than computed."""


@dataclass
class LoraConfig:
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""


@dataclass
class TrainConfig:
    learning_rate: float = 2e-4
    """Peak learning rate (AdamW)."""
    epochs: float = 1.0
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Optimiser steps to run; 0 means use epochs."""
    batch_size: int = 4
    """Samples per device per step."""
    grad_accum: int = 4
    """Steps whose gradients add up before one optimiser update."""
    max_length: int = 2048
    """Longest sample in tokens, image tokens included; longer samples are dropped, never truncated."""
    warmup_ratio: float = 0.03
    """Share of steps spent warming the learning rate up."""
    scheduler: str = "cosine"
    """Learning-rate schedule name understood by transformers."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    seed: int = 42
    """Seed for data order, LoRA init and the held-out split."""
    logging_steps: int = 10
    """Optimiser steps between metrics.jsonl lines."""
    save_steps: int = 200
    """Optimiser steps between checkpoints."""
    save_total_limit: int = 2
    """Checkpoints kept in the run folder."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass to save memory."""
    eval_fraction: float = 0.05
    """Share of the data held out for evaluation (never trained on)."""
    eval_max_samples: int = 200
    """Upper bound on the held-out split."""
    preview_samples: int = 4
    """Held-out images captioned before/after at the end of training."""
    group_by_length: bool = True
    """Batch samples of similar length together to cut padding."""
    labelled_logits_only: bool = True
    """Compute vocabulary logits only at positions that carry a label (same loss, far less memory)."""
    report_to: str = "none"
    """Also log to tensorboard or wandb."""
    dataloader_workers: int = 0
    """Processes that read and decode images while the model trains (0: in the training process)."""


@dataclass
class LossConfig:
    mode: str = "l2t"
    """Which tokens carry the loss: response, l2t, l2t_keep_task_templates, l2t_full or l2t_relevance."""
    instruction_weight: float = 1.0
    """Weight of each instruction token in the loss (lambda_I)."""
    response_weight: float = 1.0
    """Weight of each response token in the loss (lambda_A)."""
    relevance_nats: float = 1.0
    """l2t_relevance: an instruction token the image makes this many nats more likely gets full weight (linear below, 0 at or under 0)."""


@dataclass
class TemplatesConfig:
    # Why these thresholds: the "Selection defaults, and why" part of l2t.templates.
    min_fraction: float = 0.005
    """A sentence is a task template if it occurs in at least this share of samples ..."""
    min_count: int = 10
    """... and in at least this many samples ..."""
    min_words: int = 3
    """... and has at least this many words."""
    top_k: int = 50
    """At most this many templates, the most frequent first."""
    add: list = field(default_factory=list)
    """Sentences to treat as task templates whatever their count."""
    remove: list = field(default_factory=list)
    """Mined sentences to keep in the instruction loss after all."""


@dataclass
class DataConfig:
    path: str = ""
    """Training data: LLaVA or messages JSON/JSONL (empty: the bundled synthetic set)."""
    images: str = ""
    """Image folder or .zip that image paths are relative to (empty: the data file's folder)."""
    strict: bool = False
    """Stop on the first bad sample instead of skipping bad samples with a report."""
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more pixels are rejected (decompression-bomb guard)."""
    cache: str = ""
    """Folder of the encoded-data cache, reused while its inputs are unchanged (empty: $L2T_CACHE, else ~/.cache/l2t)."""


@dataclass
class Config:
    preset: str = "tiny"
    """Preset the run started from (presets/<name>.yaml)."""
    output: str = ""
    """Run folder (empty: runs/<preset>-<loss mode>)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    templates: TemplatesConfig = field(default_factory=TemplatesConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def run_dir(self) -> Path:
        return Path(self.output or f"runs/{self.preset}-{self.loss.mode}")


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def field_docs(cls) -> dict[str, str]:
    """Field name -> its one-line docstring, read from this module's source."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
            if isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
                docs[node.target.id] = following.value.value
    return docs


def _coerce(key: str, value: Any, expected: Any) -> Any:
    """Check (and where lossless, convert) one value against its field type."""
    origin = typing.get_origin(expected) or expected
    if origin is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif origin is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e-4" as a string
            except ValueError:
                pass
    elif origin is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    raise ConfigError(
        f"{key}: expected {getattr(origin, '__name__', origin)}, got {type(value).__name__} {value!r}"
    )


def _merge_section(obj, values: dict, prefix: str, source: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        if key not in hints:
            valid = ", ".join(sorted(hints))
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'. Valid keys in '{prefix[:-1]}': {valid}")
        setattr(obj, key, _coerce(f"{source}: {prefix}{key}", value, hints[key]))


def merge(config: Config, values: dict, source: str) -> Config:
    """Merge a nested dict (as read from YAML) into `config`, checking every key."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(values).__name__}")
    for key, value in values.items():
        if key in ("preset", "output"):
            setattr(config, key, _coerce(f"{source}: {key}", value, str))
        elif key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{key}' must be a mapping, got {type(value).__name__}")
            _merge_section(getattr(config, key), value, f"{key}.", source)
        else:
            valid = ", ".join(sorted(SECTIONS) + ["output", "preset"])
            raise ConfigError(f"{source}: unknown key '{key}'. Valid top-level keys: {valid}")
    return config


def parse_override(text: str) -> dict:
    """`train.learning_rate=1e-4` -> {"train": {"learning_rate": "1e-4" as YAML}}."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value, e.g. train.learning_rate=1e-4")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    parts = key.strip().split(".")
    if len(parts) == 1:
        return {parts[0]: value}
    if len(parts) != 2:
        raise ConfigError(f"override '{text}': keys look like section.name, e.g. loss.mode")
    return {parts[0]: {parts[1]: value}}


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def read_yaml(path: Path) -> dict:
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return values or {}


def load_config(preset: str = "tiny", config_file: str | None = None, overrides: list[str] = ()) -> Config:
    """Defaults -> preset -> config file -> overrides, then validated."""
    path = PRESETS_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset '{preset}'. Available presets: {', '.join(list_presets())}")
    config = merge(Config(preset=preset), read_yaml(path), str(path.relative_to(PRESETS_DIR.parent)))
    if config_file:
        config = merge(config, read_yaml(Path(config_file)), str(config_file))
    for text in overrides:
        config = merge(config, parse_override(text), f"override '{text}'")
    validate(config)
    return config


def config_from_dict(values: dict, source: str = "config.yaml") -> Config:
    """Rebuild a resolved config (as saved in a run folder)."""
    config = merge(Config(), values, source)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Range checks that need no weights; each error names the key and the value."""

    def check(ok: bool, key: str, value: Any, why: str) -> None:
        if not ok:
            raise ConfigError(f"{key}={value!r}: {why}")

    m, t, lo, lr = config.model, config.train, config.loss, config.lora
    check(bool(m.hub_id), "model.hub_id", m.hub_id, "set the hub id or local folder of the model")
    check(m.model_class in MODEL_CLASSES, "model.model_class", m.model_class, f"must be one of {', '.join(MODEL_CLASSES)}")
    check(m.quant in QUANT_MODES, "model.quant", m.quant, f"must be one of {', '.join(QUANT_MODES)}")
    check(m.dtype in DTYPES, "model.dtype", m.dtype, f"must be one of {', '.join(DTYPES)}")
    check(m.quant_storage in QUANT_STORAGE, "model.quant_storage", m.quant_storage, f"must be one of {', '.join(QUANT_STORAGE)}")
    check(m.image_max_pixels >= 0, "model.image_max_pixels", m.image_max_pixels, "must be >= 0")
    check(m.prompt_format in FORMATS, "model.prompt_format", m.prompt_format, f"must be one of {', '.join(sorted(FORMATS))}")
    try:
        re.compile(m.lora_target)
    except re.error as exc:
        raise ConfigError(f"model.lora_target={m.lora_target!r}: not a valid regex: {exc}") from None
    check(lr.r >= 1, "lora.r", lr.r, "must be at least 1")
    check(lr.alpha > 0, "lora.alpha", lr.alpha, "must be positive")
    check(0.0 <= lr.dropout < 1.0, "lora.dropout", lr.dropout, "must be in [0, 1)")
    check(t.learning_rate > 0, "train.learning_rate", t.learning_rate, "must be positive")
    check(t.epochs > 0 or t.max_steps > 0, "train.epochs", t.epochs, "must be positive (or set train.max_steps)")
    check(t.max_steps >= 0, "train.max_steps", t.max_steps, "must be >= 0")
    check(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be at least 1")
    check(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "must be at least 1")
    check(t.max_length >= 8, "train.max_length", t.max_length, "must be at least 8 tokens")
    check(0.0 <= t.warmup_ratio < 1.0, "train.warmup_ratio", t.warmup_ratio, "must be in [0, 1)")
    check(t.logging_steps >= 1, "train.logging_steps", t.logging_steps, "must be at least 1")
    check(t.save_steps >= 1, "train.save_steps", t.save_steps, "must be at least 1")
    check(0.0 <= t.eval_fraction < 1.0, "train.eval_fraction", t.eval_fraction, "must be in [0, 1)")
    check(t.report_to in ("none", "tensorboard", "wandb"), "train.report_to", t.report_to, "must be none, tensorboard or wandb")
    check(t.dataloader_workers >= 0, "train.dataloader_workers", t.dataloader_workers, "must be >= 0")
    check(lo.mode in LOSS_MODES, "loss.mode", lo.mode, f"must be one of {', '.join(LOSS_MODES)}")
    check(lo.instruction_weight >= 0, "loss.instruction_weight", lo.instruction_weight, "must be >= 0")
    check(lo.response_weight >= 0, "loss.response_weight", lo.response_weight, "must be >= 0")
    check(lo.relevance_nats > 0, "loss.relevance_nats", lo.relevance_nats, "must be positive")
    check(lo.instruction_weight + lo.response_weight > 0, "loss.response_weight", lo.response_weight, "both weights are 0: nothing to learn")
    tp = config.templates
    check(0.0 <= tp.min_fraction <= 1.0, "templates.min_fraction", tp.min_fraction, "must be in [0, 1]")
    check(tp.min_count >= 1, "templates.min_count", tp.min_count, "must be at least 1")
    check(tp.top_k >= 0, "templates.top_k", tp.top_k, "must be >= 0")
    check(config.data.max_image_pixels > 0, "data.max_image_pixels", config.data.max_image_pixels, "must be positive")


def save_config(config: Config, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True))
