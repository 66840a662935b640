"""Time task-template mining on 665k LLaVA-mix-like instructions.

    python bench/template_mining.py [--samples 665000] [--seed 0]

Builds the user turns of a LLaVA-mix-665k-shaped set in memory: short-answer
VQA and OCR-VQA book questions (35% of samples, several questions each),
multiple choice with the option-letter sentence (8%), one-sentence captions
(3%), region descriptions with coordinates (10%), free-form conversation
with many distinct questions, and text-only multi-sentence turns. Then it times `mine_templates` on one core and, in the
same process, two references over the same texts:

- baseline: split each sample's turns at line breaks and count the stripped
  lines once per sample. The ratio says what sentence splitting and
  normalisation cost on top of the counting itself.
- per-span path: `split_sentences` + `normalize_sentence` per sentence (what
  `template_spans` does per turn), to show what mining's batched path saves.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from l2t.templates import mine_templates, normalize_sentence, split_sentences

SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
CAPTION = "Provide a one-sentence caption for the provided image."
BOOK_QUESTIONS = [
    "Who wrote this book?",
    "What is the title of this book?",
    "What type of book is this?",
    "Is this a comedy book?",
    "Is this book related to History?",
]
ADJECTIVES = (
    "red", "blue", "green", "yellow", "small", "large", "old", "young", "wooden", "metal",
    "striped", "tall", "short", "white", "black", "brown",
)
NOUNS = (
    "man", "woman", "child", "dog", "cat", "horse", "car", "bus", "train", "plane", "boat", "bike",
    "table", "chair", "sign", "clock", "tree", "building", "kite", "umbrella", "pizza", "cake",
    "bowl", "cup", "bottle", "phone", "laptop", "bed", "couch", "giraffe", "elephant", "zebra",
    "bird", "sheep", "cow", "truck", "motorcycle", "skateboard", "surfboard", "frisbee", "bench",
)
VERBS = (
    "holding", "wearing", "eating", "riding", "looking at", "sitting on", "standing next to",
    "carrying", "pulling", "watching",
)
PLACES = (
    "in the kitchen", "on the street", "at the beach", "in the park", "on the table",
    "near the window", "in the field",
)


def _question(rng: random.Random) -> str:
    kind = rng.randrange(5)
    adj, noun, other = rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(NOUNS)
    if kind == 0:
        return f"What color is the {noun} {rng.choice(PLACES)}?"
    if kind == 1:
        return f"Is the {adj} {noun} {rng.choice(VERBS)} the {other}?"
    if kind == 2:
        return f"How many {noun}s are {rng.choice(PLACES)}?"
    if kind == 3:
        return f"What is the {noun} {rng.choice(VERBS)} {rng.choice(PLACES)}?"
    return f"Where is the {adj} {noun} that is {rng.choice(VERBS)} the {other}?"


def _statement(rng: random.Random) -> str:
    return f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} is {rng.choice(VERBS)} the {rng.choice(NOUNS)} {rng.choice(PLACES)}."


def _box(rng: random.Random) -> str:
    return "[" + ", ".join(f"{rng.random():.2f}" for _ in range(4)) + "]"


def build_instructions(n_samples: int, seed: int) -> list[list[str]]:
    """Per sample, its user-turn texts, mixed like LLaVA-mix-665k."""
    rng = random.Random(seed)
    samples = []
    for _ in range(n_samples):
        r = rng.random()
        if r < 0.27:  # VQAv2 / GQA: several short-answer questions about one image
            turns = [f"{_question(rng)}\n{SHORT_ANSWER}" for _ in range(rng.randint(1, 6))]
        elif r < 0.35:  # OCR-VQA
            turns = [f"{q}\n{SHORT_ANSWER}" for q in rng.sample(BOOK_QUESTIONS, rng.randint(2, 5))]
        elif r < 0.43:  # A-OKVQA-style multiple choice
            options = "\n".join(f"{letter}. {rng.choice(NOUNS)}" for letter in "ABCD")
            turns = [f"{_question(rng)}\n{options}\n{OPTION_LETTER}"]
        elif r < 0.46:  # TextCaps-style captions
            turns = [CAPTION]
        elif r < 0.56:  # RefCOCO / VG regions: the prompt varies with the box
            turns = [
                f"Please provide a short description for this region: {_box(rng)}."
                for _ in range(rng.randint(1, 4))
            ]
        elif r < 0.94:  # LLaVA-Instruct: free-form questions, some with context first
            turns = [
                f"{_statement(rng)} {_question(rng)}" if rng.random() < 0.3 else _question(rng)
                for _ in range(rng.randint(1, 5))
            ]
        else:  # ShareGPT: text only, long multi-sentence turns
            turns = [
                " ".join(_statement(rng) for _ in range(rng.randint(3, 12))) + f"\n\n{_question(rng)}"
                for _ in range(rng.randint(1, 3))
            ]
            samples.append(turns)
            continue
        turns[0] = "<image>\n" + turns[0]
        samples.append(turns)
    return samples


def count_lines(instructions: list[list[str]]) -> Counter:
    counts: Counter = Counter()
    for turns in instructions:
        counts.update({line.strip() for text in turns for line in text.split("\n")})
    return counts


def count_per_span(instructions: list[list[str]]) -> Counter:
    counts: Counter = Counter()
    for turns in instructions:
        counts.update(
            {normalize_sentence(text[s:e]) for text in turns for s, e in split_sentences(text)}
        )
    return counts


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=665_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    instructions, build_s = timed(build_instructions, args.samples, args.seed)
    n_turns = sum(len(turns) for turns in instructions)
    n_chars = sum(len(text) for turns in instructions for text in turns)
    print(f"built {args.samples:,} samples, {n_turns:,} user turns, {n_chars / 1e6:.1f}M chars in {build_s:.1f}s")

    templates, mine_s = timed(mine_templates, instructions)
    _, baseline_s = timed(count_lines, instructions)
    _, per_span_s = timed(count_per_span, instructions)

    print(f"mine_templates:        {mine_s:6.2f}s  {args.samples / mine_s:>10,.0f} samples/s")
    print(f"baseline (line count): {baseline_s:6.2f}s  {args.samples / baseline_s:>10,.0f} samples/s")
    print(f"per-span path:         {per_span_s:6.2f}s  {args.samples / per_span_s:>10,.0f} samples/s")
    print(f"ratio mine / baseline: {mine_s / baseline_s:.2f}x")
    print(f"ratio per-span / mine: {per_span_s / mine_s:.2f}x")
    print(f"{len(templates)} templates (defaults):")
    for template in templates:
        print(f"  {template.count:>8,}  {template.fraction:7.2%}  {template.sentence}")


if __name__ == "__main__":
    main()
