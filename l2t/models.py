"""Loading a VLM for QLoRA training (or inference) from a preset's model section.

The language model is quantised (4-bit NF4 with double quantisation by default,
or 8-bit, or not at all); the vision tower and projector are kept out of
quantisation by full module-name prefixes (`model.skip_modules`), since
bitsandbytes matches prefixes and suffixes, not bare names. LoRA adapters go on
the language-model Linears matched by `model.lora_target`; the projector is
trained in full through peft's `modules_to_save`, so it is saved inside the
adapter and `PeftModel.from_pretrained` restores it.

We don't call `prepare_model_for_kbit_training`: it upcasts every non-4-bit
weight (vision tower, projector, embeddings) to fp32. Frozen weights stay in
the compute dtype; only trainable weights are fp32.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from l2t import chat
from l2t.config import BUILTIN_MODELS, DTYPES, Config, LoraConfig, ModelConfig
from l2t.errors import L2TError


class ModelError(L2TError, RuntimeError):
    """A model that can't be loaded as configured; the message says what to change."""


def source(model: ModelConfig) -> str:
    """Hub id or folder to load from (built-in ids name a folder shipped with the package)."""
    if model.hub_id in BUILTIN_MODELS:
        return str(BUILTIN_MODELS[model.hub_id])
    return model.hub_id


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a dtype name other than auto (bf16, fp16, fp32: `l2t.config.DTYPES`)."""
    return getattr(torch, DTYPES[name])


def dtype_name(dtype: torch.dtype) -> str | None:
    """The name in `l2t.config.DTYPES` of a torch dtype (None for one without a name there)."""
    return next((name for name, attribute in DTYPES.items() if attribute and getattr(torch, attribute) == dtype), None)


def compute_dtype(model: ModelConfig, device: str | None = None) -> torch.dtype:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model.dtype == "auto":
        if device == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return torch_dtype(model.dtype)


MODEL_FILES = ("*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer.model")
"""What loading a model takes from its hub repository: configs, weights, tokenizer, processor, chat template."""


def download_plan(config: Config, weights: bool = True) -> list:
    """The hub files a first use of the preset's model would download (empty: built-in, a local folder, or cached).

    Asks the hub only when the cache lacks the files. When the hub can't be reached,
    the ModelError names the preset, the model and the cache folder to fill by hand.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    hub_id = config.model.hub_id
    if hub_id in BUILTIN_MODELS or Path(hub_id).expanduser().is_dir():
        return []
    patterns = _patterns(weights)
    try:
        cached = Path(snapshot_download(hub_id, allow_patterns=patterns, local_files_only=True))
        if not weights or any(cached.glob("*.safetensors")):
            return []
    except HFValidationError:
        return []  # not a hub id (a folder that isn't there): loading says so
    except LocalEntryNotFoundError:
        pass
    try:
        return [f for f in snapshot_download(hub_id, allow_patterns=patterns, dry_run=True) if f.will_download]
    except GatedRepoError:
        raise ModelError(f"preset {config.preset}: {hub_id} is gated on the hub: accept its terms on huggingface.co and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise ModelError(f"preset {config.preset}: the hub has no model '{hub_id}' (model.hub_id), or it is private: log in (hf auth login)") from None
    except OSError as exc:  # no connection, offline mode (huggingface_hub's errors are OSErrors)
        raise ModelError(unreachable(config, exc)) from None


def in_cache(config: Config) -> bool:
    """Whether the preset's model is here without a download (built in, a local folder, or in the cache); never asks the hub."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    hub_id = config.model.hub_id
    if hub_id in BUILTIN_MODELS or Path(hub_id).expanduser().is_dir():
        return True
    try:
        return any(Path(snapshot_download(hub_id, allow_patterns=_patterns(True), local_files_only=True)).glob("*.safetensors"))
    except (HFValidationError, LocalEntryNotFoundError):
        return False


def approx_download_gb(model: ModelConfig) -> float | None:
    """The size of a model's weights at 2 bytes per parameter (bf16), from `model.parameters` ("7B", "256M"); None if unknown."""
    found = re.fullmatch(r"\s*([\d.]+)\s*([MB])\s*", model.parameters or "")
    if not found:
        return None
    return float(found.group(1)) * (1e6 if found.group(2) == "M" else 1e9) * 2 / 1e9


def _patterns(weights: bool) -> list[str]:
    return [p for p in MODEL_FILES if weights or p != "*.safetensors"]


def fetch_model(config: Config, weights: bool = True) -> None:
    """Bring a hub model's files into the Hugging Face cache on its first use, saying how much.

    Nothing happens for a built-in model, a local folder, or a model already in the
    cache (`download_plan`). Otherwise the total size is printed, and huggingface_hub
    shows the download's progress. Without `weights`, only what the processor needs comes.
    """
    from huggingface_hub import snapshot_download

    missing = download_plan(config, weights)
    if not missing:
        return
    size = sum(f.file_size or 0 for f in missing)
    hub_id = config.model.hub_id
    print(f"preset {config.preset}: first use of {hub_id}: downloading {len(missing)} files, {size / 1e9:.2f} GB, into {hub_cache()}", flush=True)
    try:
        snapshot_download(hub_id, allow_patterns=_patterns(weights))
    except OSError as exc:  # a download cut off
        raise ModelError(unreachable(config, exc)) from None


def hub_cache() -> Path:
    """The folder huggingface_hub keeps downloaded models in (HF_HUB_CACHE, by default HF_HOME/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def unreachable(config: Config, error: Exception) -> str:
    """What to do when a preset's model is neither in the cache nor downloadable."""
    from huggingface_hub import constants

    hub_id, cache = config.model.hub_id, hub_cache()
    cause = error.__cause__ or error
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    return (
        f"preset {config.preset} needs the model {hub_id}, which is not in the Hugging Face cache {cache}, "
        f"and the hub can't be reached ({why}).\n"
        f"Fill the cache by hand: where the hub can be reached, run `hf download {hub_id}` and copy the folder "
        f"models--{hub_id.replace('/', '--')} it makes into {cache} (the cache is $HF_HOME/hub, or $HF_HUB_CACHE when set). "
        "Or set model.hub_id to a local folder that holds the model."
    )


def load_processor(model: ModelConfig):
    """The model's processor with the preset's overrides, checked against our prompt format."""
    from l2t.processors import processor_class

    try:
        processor = processor_class(model.model_class).from_pretrained(source(model), trust_remote_code=model.trust_remote_code)
    except OSError as exc:
        raise ModelError(
            f"cannot load the processor of '{model.hub_id}': {exc}\n"
            "Check the hub id or local folder (model.hub_id), and that it is downloaded if you are offline."
        ) from None
    for key, value in model.processor_overrides.items():
        target = processor
        if key.startswith("image_processor."):
            target, key = processor.image_processor, key.split(".", 1)[1]
        setattr(target, key, value)
    if model.image_max_pixels:
        image_processor = processor.image_processor
        if hasattr(image_processor, "max_pixels"):
            image_processor.max_pixels = model.image_max_pixels
        size = getattr(image_processor, "size", None)
        if isinstance(size, dict) and "longest_edge" in size and "shortest_edge" in size:
            image_processor.size = {**size, "longest_edge": model.image_max_pixels}
    if model.check_chat_template:
        problem = chat.check_processor_template(processor, chat.FORMATS[model.prompt_format])
        if problem:
            raise ModelError(f"{model.hub_id}: {problem}")
    return processor


def checkpoint_dtype(model: ModelConfig) -> torch.dtype | None:
    """The dtype the base model's weights are stored in (its config.json says), or None if it doesn't say."""
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(source(model), trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError):
        return None
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def launch_shards_weights() -> bool:
    """Whether `accelerate launch` started this process with FSDP or DeepSpeed ZeRO-3 (it exports these variables)."""

    def flag(name: str) -> bool:
        return os.environ.get(name, "false").strip().lower() in ("true", "1", "yes")

    return flag("ACCELERATE_USE_FSDP") or (flag("ACCELERATE_USE_DEEPSPEED") and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3")


def quant_storage_dtype(model: ModelConfig, dtype: torch.dtype) -> torch.dtype:
    """The container dtype of the packed 4-bit weights (`model.quant_storage`).

    FSDP1 flattens each wrapped module's parameters into one tensor of one dtype,
    and ZeRO-3 partitions them as if they were one dtype, so packed weights in
    uint8 beside bf16 ones cannot be sharded; stored in the compute dtype they can
    (the same bits, another container). FSDP2 shards each parameter on its own and
    takes either. Single-process and DDP runs keep bitsandbytes' uint8 default.
    """
    if model.quant_storage == "auto":
        return dtype if launch_shards_weights() else torch.uint8
    if model.quant_storage == "uint8":
        return torch.uint8
    return torch_dtype(model.quant_storage)


def quantization_config(model: ModelConfig, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    # A non-empty skip list replaces bitsandbytes' default protection of lm_head: keep it.
    skip = list(dict.fromkeys([*model.skip_modules, "lm_head"]))
    if model.quant == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=quant_storage_dtype(model, dtype),
            llm_int8_skip_modules=skip,
        )
    if model.quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return None


def load_base_model(model: ModelConfig, quant: str | None = None, device: str | None = None, dtype: torch.dtype | None = None):
    """The base model, quantised as `quant` (default: the preset's), on `device`."""
    import transformers

    quant = quant or model.quant
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or compute_dtype(model, device)
    cls = getattr(transformers, model.model_class)
    spec = ModelConfig(**{**model.__dict__, "quant": quant})
    kwargs = dict(
        dtype=dtype,
        use_safetensors=True,
        trust_remote_code=model.trust_remote_code,
        attn_implementation="sdpa",
    )
    qconfig = quantization_config(spec, dtype)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        # Each process of a multi-GPU launch loads onto its own card (before the Trainer sets the device).
        kwargs["device_map"] = {"": device if device != "cuda" else int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    try:
        base = cls.from_pretrained(source(model), **kwargs)
    except ImportError as exc:
        raise ModelError(f"{quant} quantisation needs bitsandbytes with a backend for this machine ({exc}). Set model.quant=none to train plain LoRA.") from None
    except (RuntimeError, ValueError) as exc:
        if "bitsandbytes" in str(exc) or "quantiz" in str(exc).lower():
            raise ModelError(f"{quant} quantisation is not available here: {exc}\nSet model.quant=none to train plain LoRA.") from None
        raise
    except OSError as exc:
        raise ModelError(f"cannot load model weights of '{model.hub_id}': {exc}") from None
    if qconfig is None:
        base.to(device)
    return base


def lora_target_names(base, pattern: str) -> list[str]:
    regex = re.compile(pattern)
    return [name for name, module in base.named_modules() if regex.fullmatch(name) and _is_linear(module)]


def _is_linear(module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, (torch.nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def add_lora(base, model: ModelConfig, lora: LoraConfig):
    """Wrap `base` in a peft model with LoRA on the language model and a trainable projector."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = lora_target_names(base, model.lora_target)
    if not targets:
        raise ModelError(f"model.lora_target={model.lora_target!r} matches no Linear layer of {model.model_class}")
    modules_to_save = []
    if model.train_projector:
        modules_to_save += model.projector_modules
    if model.train_vision:
        modules_to_save += model.vision_modules
    module_names = {name for name, _ in base.named_modules()}
    # peft's modules_to_save holds modules only; a bare parameter (LLaVA-NeXT's image_newline) stays frozen.
    modules_to_save = [m for m in modules_to_save if m in module_names]
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        modules_to_save=modules_to_save or None,
        task_type=None,
    )
    for param in base.parameters():
        param.requires_grad_(False)
    peft_model = get_peft_model(base, peft_config)
    # Trainable weights in fp32 (stable optimiser state); frozen ones stay in the compute dtype.
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return peft_model


def load_for_training(config: Config, device: str | None = None):
    processor = load_processor(config.model)
    base = load_base_model(config.model, device=device)
    return add_lora(base, config.model, config.lora), processor


def load_with_adapter(config: Config, adapter_dir, quant: str | None = None, device: str | None = None, dtype=None):
    """Base model (quantised as in training unless `quant` says otherwise) + a saved adapter."""
    from peft import PeftModel

    base = load_base_model(config.model, quant=quant, device=device, dtype=dtype)
    try:
        return PeftModel.from_pretrained(base, str(adapter_dir))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the adapter in {adapter_dir}: {exc}") from None
