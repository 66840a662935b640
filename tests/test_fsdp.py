"""4-bit QLoRA sharded with FSDP2 over two CPU processes trains as one process does.

`tests/fsdp_qlora_worker.py` runs the same steps twice: under `torchrun` with two
processes (gloo), the tiny model's packed 4-bit weights and LoRA sharded with
`fully_shard`, each process on half of the batch; and in a single process
without sharding. The Trainer's own FSDP path needs GPUs (accelerate falls back
to DDP on CPU), so this is the sharded model + LoRA step itself; the GPU script
(`bench/gpu.py --fsdp`) runs the Trainer path.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "fsdp_qlora_worker.py"


def run_worker(out: Path, processes: int) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_FSDP", None)
    command = [sys.executable, str(WORKER), str(out)]
    if processes > 1:
        command = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(processes), *command[1:]]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def sharded_and_single(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    return run_worker(root / "sharded", 2), run_worker(root / "single", 1), root


@pytest.mark.slow
def test_packed_4bit_weights_are_sharded_in_the_compute_dtype(sharded_and_single):
    sharded, single, _ = sharded_and_single
    assert single["storage_dtype"] == "uint8", "without FSDP the packed weights keep bitsandbytes' default"
    assert sharded["storage_dtype"] == "float32", "under FSDP, model.quant_storage=auto stores them in the compute dtype (fp32 on CPU)"
    # The same packed bits in a 4-byte container: a quarter of the rows, then half of them on each process.
    assert sharded["full_shape"] == [single["full_shape"][0] // 4, 1]
    assert sharded["local_shape"] == [sharded["full_shape"][0] // 2, 1]
    assert sharded["placements"] == ["S(0)"]


@pytest.mark.slow
def test_sharded_steps_have_the_single_process_losses(sharded_and_single):
    sharded, single, _ = sharded_and_single
    assert sharded["world_size"] == 2 and single["world_size"] == 1
    assert single["losses"][-1] < single["losses"][0] - 1.0, "the reference did not train"
    for step, (a, b) in enumerate(zip(sharded["losses"], single["losses"], strict=True)):
        assert a == pytest.approx(b, rel=1e-4), f"step {step + 1}"
    assert sharded["trained_loss"] == pytest.approx(single["trained_loss"], rel=1e-3)


@pytest.mark.slow
def test_adapter_saved_from_shards_loads_with_peft(sharded_and_single, tiny_config):
    from peft import PeftModel

    from l2t.models import load_base_model, load_processor
    from tests.fsdp_qlora_worker import fixed_batches, summed_loss

    sharded, single, root = sharded_and_single
    weights, reference = (load_file(root / name / "adapter" / "adapter_model.safetensors") for name in ("sharded", "single"))
    assert weights.keys() == reference.keys()
    for key, tensor in weights.items():
        assert tensor.shape == reference[key].shape, f"{key}: a shard was saved instead of the whole tensor"
        torch.testing.assert_close(tensor, reference[key], rtol=1e-3, atol=1e-4, msg=key)

    model = PeftModel.from_pretrained(load_base_model(tiny_config.model, device="cpu"), str(root / "sharded" / "adapter"))
    model.eval()
    with torch.no_grad():
        loss_sum, count = summed_loss(model, fixed_batches(load_processor(tiny_config.model), tiny_config, 1)[0])
    assert float(loss_sum / count) == pytest.approx(sharded["trained_loss"], rel=1e-3)
