"""Data preparation speed: the L2T mask vs bare tokenization, in one process.

    python bench/data_prep.py [--n 4000] [--llava-shaped]

Measures conversations per second for render + tokenize + roles + labels in
`l2t` mode as training prepares them (`l2t.encoding.encode_rows`, the function
the cached `Dataset.map` runs, from the checked rows' Arrow columns to the token
columns) against a bare `tokenizer(texts)` call on the same expanded texts (the
image placeholders already replaced by their image tokens, as the processor
would). Goal: ratio >= 0.8, i.e. the mask costs at most 25% over tokenizing.
Both run with the cyclic garbage collector paused, as training runs the map
(`l2t.checked.paused_gc`).
Also printed: the in-memory path (`Encoder.encode_many` + `labels_and_weights`
per sample, images expanded), which previews and the l2t_relevance mode use.
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


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--llava-shaped", action="store_true", help="expand each image to 576 tokens as LLaVA-1.5 does (336 px, patch 14)")
    args = parser.parse_args()

    import datasets

    from l2t import chat, synthetic
    from l2t.checked import features, paused_gc, rows_batch
    from l2t.config import load_config
    from l2t.data import load_samples
    from l2t.encoding import encode_rows
    from l2t.masking import Encoder, labels_and_weights
    from l2t.models import load_processor
    from l2t.templates import mine_templates

    config = load_config("tiny")
    processor = load_processor(config.model)
    if args.llava_shaped:
        processor.patch_size = 14
        processor.image_processor.crop_size = {"height": 336, "width": 336}
        processor.image_processor.size = {"shortest_edge": 336}
    with tempfile.TemporaryDirectory() as tmp:
        synthetic.generate(tmp, n=args.n, seed=0, n_test=20)
        samples, _ = load_samples(Path(tmp) / "train.json")
    templates = mine_templates([s.instructions() for s in samples])
    encoder = Encoder.from_config(config, processor, templates)
    fmt = encoder.fmt
    tokenizer = encoder.tokenizer

    def expanded_text(sample):  # the processor's expanded text
        rendered = chat.render(sample.messages, fmt)
        text = rendered.text
        for (start, end), size in reversed(list(zip(rendered.image_spans, sample.image_sizes, strict=True))):
            text = text[:start] + encoder._expanded_placeholder(size) + text[end:]  # noqa: SLF001
        return text

    texts = [expanded_text(s) for s in samples]
    rows = datasets.Dataset.from_dict(rows_batch(samples), features=features()).with_format("arrow")[:]

    def bare():
        tokenizer(texts)

    def l2t():
        encode_rows(rows, encoder, "l2t", 1.0, 1.0)

    def in_memory():
        for encoded in encoder.encode_many([(s.messages, s.image_sizes) for s in samples]):
            labels_and_weights(encoded, "l2t")

    with paused_gc():
        bare()  # warm-up
        l2t()
        in_memory()
        t_bare = best_of(args.repeats, bare)
        t_l2t = best_of(args.repeats, l2t)
        t_memory = best_of(args.repeats, in_memory)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    image_tokens = encoder.image_replacement((64, 64)).count(processor.image_token)
    print(f"{len(samples)} conversations (tiny tokenizer, synthetic shapes, {image_tokens} image tokens per image, {len(templates)} task templates)")
    print(f"bare tokenizer(texts), batched:  {len(samples) / t_bare:10.0f} conversations/s")
    print(f"render+tokenize+roles+labels:    {len(samples) / t_l2t:10.0f} conversations/s   (training's cached map step)")
    print(f"ratio (l2t / bare): {t_bare / t_l2t:.2f}   (goal >= 0.8)")
    print(f"in memory, images expanded:      {len(samples) / t_memory:10.0f} conversations/s   ratio {t_bare / t_memory:.2f}")


if __name__ == "__main__":
    main()
