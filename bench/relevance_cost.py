"""The cost of the l2t_relevance pass: the base model's two teacher-forced passes over the training set,
against training the same preset, in one process.

    python bench/relevance_cost.py [--preset tiny] [--threads 2]

Times (best of --repeats) the relevance pass over the preset's training data,
uncached, then one training run of the preset in l2t mode (the same data, no
end-of-run evaluation), and prints the ratio. Goal on the tiny preset: the
pass takes at most 20% of the training time.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from l2t import relevance
    from l2t.config import load_config
    from l2t.generation import pad_token_id
    from l2t.masking import Encoder
    from l2t.models import load_base_model, load_processor
    from l2t.prepare import prepare_data
    from l2t.train import train

    config = load_config(args.preset, overrides=["loss.mode=l2t_relevance"])
    data = prepare_data(config)
    processor = load_processor(config.model)
    encoder = Encoder.from_config(config, processor, data.templates)
    encoded = encoder.encode_many([(s.messages, s.image_sizes) for s in data.train])
    model = load_base_model(config.model)
    passes = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        relevance.relevance_pass(model, processor, encoded, data.train, data.images, pad_token_id(processor.tokenizer), None, "", say=lambda _: None)
        passes.append(time.perf_counter() - started)
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        train(load_config(args.preset, overrides=[f"output={out}/run", "loss.mode=l2t", "train.preview_samples=0"]))
        training = time.perf_counter() - started
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, torch {torch.__version__}")
    print(f"relevance pass over {len(encoded)} samples: {min(passes):.2f} s (best of {args.repeats})")
    print(f"training run (loss.mode=l2t, weights loaded, no end-of-run evaluation): {training:.2f} s")
    print(f"pass / training: {min(passes) / training:.3f} (goal <= 0.20)")


if __name__ == "__main__":
    main()
