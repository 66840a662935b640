"""The launch configs in configs/accelerate: what `accelerate launch` makes of each, and the 4-bit storage it leads to.

Each file is read by accelerate's own launcher code into the environment its
processes get; under that environment `l2t.models` picks the packed 4-bit
weights' storage dtype. (The processes themselves need GPUs: on CPU accelerate
runs FSDP and DeepSpeed configs as plain DDP. `tests/test_fsdp.py` runs the
sharded step itself on two CPU processes.)
"""

from pathlib import Path

import pytest
import torch

from l2t.config import load_config
from l2t.models import quant_storage_dtype

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "accelerate"


def launch_environment(name: str) -> dict[str, str]:
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "-m", "l2t.train"])
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == 2
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = []  # set by accelerate's launcher before it builds the environment
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize(
    ("name", "expected", "storage"),
    [
        ("ddp.yaml", {"ACCELERATE_MIXED_PRECISION": "no"}, torch.uint8),
        ("fsdp_qlora.yaml", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
                             "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}, torch.bfloat16),
        ("deepspeed_zero3.yaml", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, torch.bfloat16),
    ],
)  # fmt: skip
def test_launch_config_sets_up_its_processes(name, expected, storage, monkeypatch):
    environment = launch_environment(name)
    assert {key: environment.get(key) for key in expected} == expected
    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    assert quant_storage_dtype(load_config("tiny").model, torch.bfloat16) == storage


def test_every_config_is_named_in_the_readme():
    readme = (CONFIGS.parent.parent / "README.md").read_text(encoding="utf-8")
    for path in sorted(CONFIGS.glob("*.yaml")):
        assert f"configs/accelerate/{path.name}" in readme
        assert path.read_text().startswith(f"# accelerate launch --config_file configs/accelerate/{path.name} -m l2t.train")
