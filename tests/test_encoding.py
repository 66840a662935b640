"""The cached encoding step: the same training items as encoding in memory, a cache reused while its
inputs are unchanged and rebuilt when any changes, and never a half-written cache after a killed run."""

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from l2t.batch import TrainingSet, encode_samples
from l2t.checked import data_key
from l2t.config import load_config
from l2t.data import load_data
from l2t.encoding import MANIFEST, CachedTrainingSet, cache_key, encoded_dataset
from l2t.masking import Encoder
from l2t.prepare import token_lengths

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bundled(shapes_dir):
    samples, _, images = load_data(shapes_dir / "train.json")
    return samples[:40], images


def config_in(tmp_path, *overrides):
    return load_config("tiny", overrides=[f"data.cache={tmp_path / 'cache'}", *overrides])


def key_of(config, encoder, shapes_dir):
    return cache_key(config, data_key(config, shapes_dir / "train.json", shapes_dir), encoder)


def test_cached_items_are_the_in_memory_items(bundled, tiny_processor, tmp_path, shapes_dir):
    samples, images = bundled
    config = config_in(tmp_path)
    encoder = Encoder.from_config(config, tiny_processor)
    encoder.task_templates = frozenset({"Answer yes or no."})
    table = encoded_dataset(samples, encoder, config, key_of(config, encoder, shapes_dir), say=lambda _: None)
    cached = CachedTrainingSet(table, np.arange(len(samples)), images, tiny_processor, encoder)
    memory = TrainingSet(encode_samples(samples, encoder, "l2t", 1.0, 1.0), images, tiny_processor)
    assert cached.lengths == memory.lengths
    assert list(token_lengths(samples, encoder).values()) == cached.lengths  # the counts the Data and Train tabs show
    for index in range(len(samples)):
        a, b = cached[index], memory[index]
        for name in ("input_ids", "labels", "loss_weights", "loss_kinds"):
            assert torch.equal(a[name], b[name]), (index, name)
        assert a["image_inputs"].keys() == b["image_inputs"].keys()
        assert all(torch.equal(a["image_inputs"][k], b["image_inputs"][k]) for k in a["image_inputs"])
    # 16 image tokens per sample are stored as one id, and expanded again per item
    assert len(table[0]["input_ids"]) == len(memory[0]["input_ids"]) - 15 and -1 in table[0]["input_ids"]


def test_a_second_run_reuses_the_cache(bundled, tiny_processor, tmp_path, shapes_dir):
    samples, _ = bundled
    config = config_in(tmp_path)
    encoder = Encoder.from_config(config, tiny_processor)
    said = []
    key = key_of(config, encoder, shapes_dir)
    first = encoded_dataset(samples, encoder, config, key, say=said.append)
    second = encoded_dataset(samples, encoder, config, key, say=said.append)
    assert said[0].startswith("encoded data: cached in") and said[1].startswith("encoded data: reusing the cache")
    assert first["input_ids"] == second["input_ids"]
    assert [p.name for p in (tmp_path / "cache" / "encoded").iterdir()] == [key]


def test_the_cache_key_follows_every_input(tiny_processor, tmp_path, shapes_dir):
    config = config_in(tmp_path)
    encoder = Encoder.from_config(config, tiny_processor)
    base = key_of(config, encoder, shapes_dir)
    assert key_of(config_in(tmp_path), Encoder.from_config(config, tiny_processor), shapes_dir) == base  # same inputs, same key

    templated = Encoder.from_config(config, tiny_processor)
    templated.task_templates = frozenset({"Answer yes or no."})
    assert key_of(config, templated, shapes_dir) != base
    assert key_of(config_in(tmp_path, "loss.mode=response"), encoder, shapes_dir) != base
    assert key_of(config_in(tmp_path, "loss.instruction_weight=0.5"), encoder, shapes_dir) != base
    assert key_of(config_in(tmp_path, "train.max_length=512"), encoder, shapes_dir) != base
    assert key_of(config_in(tmp_path, "model.prompt_format=chatml"), Encoder.from_config(config_in(tmp_path, "model.prompt_format=chatml"), tiny_processor), shapes_dir) != base

    other_tokenizer = copy.deepcopy(tiny_processor)
    other_tokenizer.tokenizer.add_tokens(["zebra"])
    assert key_of(config, Encoder.from_config(config, other_tokenizer), shapes_dir) != base

    data = tmp_path / "train.json"
    data.write_text((shapes_dir / "train.json").read_text())
    before = cache_key(config, data_key(config, data, shapes_dir), encoder)
    data.write_text(data.read_text().replace("Answer yes or no.", "Answer yes or no!"))
    assert cache_key(config, data_key(config, data, shapes_dir), encoder) != before
    assert key_of(config_in(tmp_path, "train.seed=1"), encoder, shapes_dir) != base  # another held-out split


def test_a_changed_input_encodes_again(bundled, tiny_processor, tmp_path, shapes_dir):
    samples, _ = bundled
    said, in_loss = [], {}
    for mode in ("l2t", "response", "l2t"):
        config = config_in(tmp_path, f"loss.mode={mode}")
        encoder = Encoder.from_config(config, tiny_processor)
        in_loss[mode] = sum(encoded_dataset(samples, encoder, config, key_of(config, encoder, shapes_dir), say=said.append)["in_loss"])
    assert in_loss["response"] < in_loss["l2t"]  # the response-only labels, not the cached l2t ones
    assert [s.split(" in ")[0].split(" the ")[0] for s in said] == ["encoded data: cached", "encoded data: cached", "encoded data: reusing"]


KILLED_RUN = """
import sys, time
from l2t import encoding
from l2t.config import load_config
from l2t.data import load_data
from l2t.masking import Encoder
from l2t.prepare import token_lengths
from l2t.models import load_processor

config = load_config("tiny", overrides=[f"data.cache={sys.argv[1]}"])
samples, _, _ = load_data(sys.argv[2])
encoder = Encoder.from_config(config, load_processor(config.model))
original = encoding.encode_rows

def slow(batch, **kwargs):
    out = original(batch, **kwargs)
    print("batch", flush=True)
    time.sleep(0.5)
    return out

encoding.encode_rows = slow
encoding.WRITE_BATCH = 8
encoding.encoded_dataset(samples, encoder, config, sys.argv[3])
"""


def test_a_run_killed_during_the_map_leaves_no_usable_cache(bundled, tiny_processor, tmp_path, shapes_dir):
    samples, _ = bundled
    config = config_in(tmp_path)
    encoder = Encoder.from_config(config, tiny_processor)
    key = key_of(config, encoder, shapes_dir)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tmp_path / "cache"), str(shapes_dir / "train.json"), key],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        for _ in range(3):  # a few batches are written: the map is well under way
            assert proc.stdout.readline().strip() == "batch", "the encoding process ended before it was killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    root = tmp_path / "cache" / "encoded"
    leftovers = list(root.iterdir())
    assert leftovers and all(".tmp-" in p.name for p in leftovers), leftovers
    assert any(p.stat().st_size > 0 for p in leftovers[0].rglob("*")), "nothing was written before the kill"

    said = []
    table = encoded_dataset(samples, encoder, config, key, say=said.append)
    assert said[0].startswith("encoded data: cached in")  # encoded again, not read from the torn folder
    assert (root / key / MANIFEST).is_file() and len(table) == len(samples)
    expected = encode_samples(samples, encoder, "l2t", 1.0, 1.0)
    assert table["length"] == [len(e.input_ids) for e in expected]
    assert json.loads((root / key / MANIFEST).read_text())["samples"] == len(samples)
