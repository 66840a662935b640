"""A few QLoRA steps of the tiny model with the L2T loss, sharded with FSDP2 or in one process.

    torchrun --standalone --nproc_per_node 2 tests/fsdp_qlora_worker.py OUT   # two CPU processes, gloo, FSDP2
    python tests/fsdp_qlora_worker.py OUT                                      # the single-process reference

What `tests/test_fsdp.py` compares. On CPU the Hugging Face Trainer cannot shard:
accelerate turns FSDP on only for GPU-type launches and otherwise runs DDP
without a word. So the model is sharded here the way accelerate's FSDP2 path
does it on GPUs, with torch's `fully_shard` on each decoder layer and then on
the whole model, after loading it through `l2t.models` exactly as training
does (with ACCELERATE_USE_FSDP set, as `accelerate launch` sets it, so the
packed 4-bit weights take the compute dtype). Every process takes its half of
one fixed batch; the loss is the L2T token mean over the whole batch.

Writes OUT/result.json (the loss of every step, the loss of the trained model,
how the packed weights were stored and sharded) and OUT/adapter/ (gathered
from the shards, saved by the main process with `l2t.runs.save_adapter`).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SAMPLES = 8
STEPS = 4
LEARNING_RATE = 3e-3


def fixed_batches(processor, config, world: int) -> list[dict]:
    """The first SAMPLES bundled samples in L2T mode, split into one padded batch per process."""
    from l2t.batch import Collator, TrainingSet, encode_samples
    from l2t.data import load_samples
    from l2t.images import ImageSource
    from l2t.masking import Encoder
    from l2t.synthetic import bundled_dir
    from l2t.templates import mine_templates

    samples, _ = load_samples(bundled_dir() / "train.json")
    encoder = Encoder.from_config(config, processor, mine_templates([s.instructions() for s in samples]))
    dataset = TrainingSet(encode_samples(samples[:SAMPLES], encoder, "l2t", 1.0, 1.0), ImageSource(bundled_dir()), processor)
    collate = Collator(processor.tokenizer.pad_token_id)
    per_process = SAMPLES // world
    return [collate([dataset[i] for i in range(r * per_process, (r + 1) * per_process)]) for r in range(world)]


def load_model(config):
    from transformers import set_seed

    from l2t.models import add_lora, load_base_model, load_processor

    processor = load_processor(config.model)
    base = load_base_model(config.model, device="cpu")
    set_seed(0)  # the same LoRA initialisation in every process: fully_shard does not broadcast it
    return add_lora(base, config.model, config.lora), processor


def summed_loss(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the weighted token losses, number of tokens in the loss) of one process's batch."""
    from l2t.loss import labelled_token_loss

    token_loss, in_loss, _ = labelled_token_loss(model, batch)
    return (token_loss * batch["loss_weights"][:, 1:][in_loss]).sum(), in_loss.sum().double()


def all_sum(value: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        value = value.detach().clone()
        torch.distributed.all_reduce(value)
    return value


def four_bit_weight(model):
    import bitsandbytes as bnb

    return next(m.weight for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


def run(out: Path) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from l2t import runs
    from l2t.config import load_config

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        os.environ["ACCELERATE_USE_FSDP"] = "true"
        torch.distributed.init_process_group("gloo")
    config = load_config("tiny")
    model, processor = load_model(config)
    weight = four_bit_weight(model)
    stored = {"storage_dtype": str(weight.dtype).removeprefix("torch."), "full_shape": list(weight.shape)}
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.language_model.layers:
            fully_shard(layer)
        fully_shard(model)
        weight = four_bit_weight(model)
        stored["local_shape"] = list(weight.to_local().shape)
        stored["placements"] = [str(p) for p in weight.placements]
    batch = fixed_batches(processor, config, world)[rank]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    model.train()
    losses = []
    for _ in range(STEPS):
        loss_sum, count = summed_loss(model, batch)
        count = all_sum(count, world)
        # FSDP averages gradients over processes; times `world` makes them those of the whole batch's token mean.
        (loss_sum * world / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(all_sum(loss_sum.detach().double(), world) / count))
    model.eval()
    with torch.no_grad():
        loss_sum, count = summed_loss(model, batch)
    trained_loss = float(all_sum(loss_sum.double(), world) / all_sum(count, world))
    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)) if world > 1 else None
    result = {"world_size": world, "losses": losses, "trained_loss": trained_loss, **stored}
    if rank == 0:
        runs.save_adapter(model, out, state_dict)
        (out / "result.json").write_text(json.dumps(result, indent=1))
    if world > 1:
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    run(target)
