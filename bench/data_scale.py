"""Data at LLaVA-665k scale: `python -m l2t.train` start to the first optimiser step, cold and warm cache, and peak RSS.

    python bench/data_scale.py --n 100000 300000 665000
    python bench/data_scale.py --n 20000 --keep /tmp/scale      # keep the generated data and caches

For each N it writes a LLaVA-format JSON list with LLaVA-mix-like text (the
fixed prompts, multi-turn short-answer VQA, multiple choice, captions, regions,
free-form questions, text-only chat; `bench/template_mining.py` builds the user
turns) and images shared from a pool of 32, and a tiny LLaVA whose processor
and vision tower are LLaVA-1.5-shaped (336 px, patch 14: 576 image tokens per
image). Then it runs `python -m l2t.train --preset tiny` twice on it, each to one
optimiser step, with an empty cache and with the cache of the first run, and
prints the seconds from the process start to the first metrics row (written at
the end of step 1) and the peak resident memory of the whole process tree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from template_mining import build_instructions  # noqa: E402

POOL = 32
ANSWERS = ("Yes", "No", "2", "Red", "A", "A dog.", "The man is holding a kite.", "Two people are standing next to a bus on the street.")


def write_data(path: Path, n: int, seed: int = 0) -> None:
    """LLaVA records, streamed to disk a record at a time."""
    from PIL import Image

    images = path.parent / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for k in range(POOL):
        Image.new("RGB", (rng.randint(200, 640), rng.randint(200, 480)), tuple(rng.randrange(256) for _ in range(3))).save(images / f"{k}.png")
    with path.open("w", encoding="utf-8") as out:
        out.write("[\n")
        for i, turns in enumerate(build_instructions(n, seed)):
            conversation = []
            for turn in turns:
                conversation += [{"from": "human", "value": turn}, {"from": "gpt", "value": rng.choice(ANSWERS)}]
            record = {"id": f"mix-{i}", "conversations": conversation}
            if "<image>" in turns[0]:
                record["image"] = f"images/{rng.randrange(POOL)}.png"
            out.write(("," if i else "") + json.dumps(record) + "\n")
        out.write("]\n")


def llava15_shaped_model(folder: Path) -> Path:
    """The built-in tiny LLaVA with a 336 px, patch-14 vision tower and processor: 576 image tokens, random weights."""
    import torch
    from transformers import AutoConfig, LlavaForConditionalGeneration

    base = REPO / "l2t" / "assets" / "tiny" / "base"
    shutil.copytree(base, folder, dirs_exist_ok=True)
    config = AutoConfig.from_pretrained(base)
    config.vision_config.image_size, config.vision_config.patch_size = 336, 14
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor = json.loads((folder / "processor_config.json").read_text())
    processor["image_processor"]["crop_size"] = {"height": 336, "width": 336}
    processor["image_processor"]["size"] = {"shortest_edge": 336}
    processor["patch_size"] = 14
    (folder / "processor_config.json").write_text(json.dumps(processor, indent=2))
    return folder


def run_to_first_step(data: Path, model: Path, cache: Path, output: Path) -> tuple[float, float, float, int]:
    """(seconds to the first metrics row, peak RSS of the training process and of its whole tree in GB, exit code).

    The tree's figure adds up every process (the encoding map's workers too), so pages
    they share, such as a memory-mapped Arrow file, count once per process.
    """
    args = [sys.executable, "-W", "ignore", "-m", "l2t.train", "--preset", "tiny", "--data", str(data), "--output", str(output),
            f"model.hub_id={model}", "train.max_steps=1", "train.logging_steps=1", "train.max_length=2048",
            "train.preview_samples=0", "train.eval_fraction=0"]  # fmt: skip
    env = {**os.environ, "L2T_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tree, peak, main_peak, first_step = psutil.Process(proc.pid), 0, 0, None
    while proc.poll() is None:
        try:
            main_peak = max(main_peak, tree.memory_info().rss)
            members = [tree, *tree.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in members))
        except psutil.Error:
            pass
        if first_step is None and (output / "metrics.jsonl").is_file() and (output / "metrics.jsonl").stat().st_size:
            first_step = time.perf_counter() - start
        time.sleep(0.05)
    if proc.returncode:
        print(proc.stderr.read()[-2000:])
    return first_step or float("nan"), main_peak / 1024**3, peak / 1024**3, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100_000, 300_000, 665_000])
    parser.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temporary folder)")
    parser.add_argument("--cold-only", action="store_true", help="one run per N, with an empty cache")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="l2t-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 1024**3:.0f} GB, "
          f"python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    model = llava15_shaped_model(work / "llava15-shaped")
    try:
        for n in args.n:
            data = work / f"mix-{n}" / "data.json"
            start = time.perf_counter()
            write_data(data, n)
            print(f"N={n:,}: wrote {data.stat().st_size / 1024**2:.0f} MB in {time.perf_counter() - start:.0f} s")
            cache = work / f"cache-{n}"
            for kind in ("cold",) if args.cold_only else ("cold", "warm"):
                seconds, rss, tree_rss, code = run_to_first_step(data, model, cache, work / f"run-{n}-{kind}")
                print(f"N={n:,} {kind} cache: first step after {seconds:6.1f} s, peak RSS {rss:.2f} GB (process tree {tree_rss:.2f} GB)"
                      f"{'' if code == 0 else f' (exit code {code})'}  load average {os.getloadavg()[0]:.1f}")  # fmt: skip
            if not args.keep:
                shutil.rmtree(data.parent, ignore_errors=True)
                shutil.rmtree(cache, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
