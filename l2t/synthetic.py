"""python -m l2t.synthetic --out data/shapes --n 1000 --seed 0 [--n-test 250] [--bias 0.8] [--size 64] [--style demo]
python -m l2t.synthetic --bundle   # rewrite the small copy in l2t/assets/shapes/

A synthetic visual-instruction dataset of simple shapes with known ground truth,
written in LLaVA JSON format. It lets the app run offline, lets the built-in
tiny model be pretrained and fine-tuned on a CPU, and measures shortcut
learning and hallucination, because every answer can be checked against the
objects that were drawn.

Output folder:
    images/<id>.png   RGB, size x size pixels: a scene (`l2t.scenes`) of one or
                      two objects (circle / square / triangle; red / green /
                      blue / yellow; small / large) on a white or gray background.
    train.json        n samples, biased split (below).
    test.json         n_test samples (default max(n // 4, 20)), balanced split.

Each sample is {"id", "image": "images/<id>.png", "conversations", "objects",
"background", "turn_kinds"}; image paths are relative to the output folder;
"objects" / "background" are the ground truth and "turn_kinds" names what each
user turn asks (caption, color, shape, size, position, count, yes_no, text).
Loaders ignore unknown keys. Text-only samples have no "image" or "background"
key and an empty "objects" list.

Two answer styles share the scenes and the questions:
- "base": how the built-in model was pretrained (`python -m l2t.tiny pretrain`):
  captions such as "A large red circle on the left, on a white background.",
  full-sentence answers ("The circle is red.", "There are 2 red objects.",
  "Yes, there is a red circle."), no task templates.
- "demo" (the default, and the bundled fine-tuning data): what LLaVA-mix asks of
  a model: a fixed task template after each question (SHORT_ANSWER_PROMPT,
  YES_NO_PROMPT), one-word answers ("red", "2", "Yes"), captions asked with
  CAPTION_PROMPTS in another phrasing ("There is a large red circle on the
  left."), a few multi-turn and text-only samples. Every word of it is a word
  the base model already writes: a LoRA adapter does not train the output
  layer, so a token the base never produced stays out of reach.
  The base model can see everything asked here; tuning teaches the format.

Language-prior bias: in the train split each object takes its shape's usual
color (circle -> red, square -> blue, triangle -> green, see USUAL_COLOR) with
probability `bias`, and one of the other three colors otherwise. In the test
split the color is uniform and independent of the shape. A model that learned
"circles are red" instead of looking at the image is right on train and wrong
on test. Yes/no questions are about a drawn object exactly as often as about an
absent one, in both splits.

The fixed sentences of the demo style (TEMPLATE_SENTENCES) each appear in about
10% of samples or more, while object questions combine size, color, shape,
position and wording, and none is asked in more than max(2, n // 250) samples of
a split: a frequency-based template miner recovers TEMPLATE_SENTENCES and
nothing else.

Everything is drawn from random.Random streams seeded by `seed` (the test split
has its own stream, so it does not change with n), so the same arguments give
byte-identical JSON and PNG files.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from l2t.scenes import (
    BACKGROUNDS,
    COLORS,
    POSITION_PHRASE,
    POSITIONS,
    SHAPES,
    SIZES,
    caption_for,
    demo_caption_for,
    draw_image,
    matches,
    noun_phrase,
    sample_objects,
)

CAPTION_PROMPTS = [
    "Provide a one-sentence caption for the provided image.",
    "Describe the image concisely.",
]
BASE_CAPTION_PROMPTS = [
    "Describe the image.",
    "What is in the picture?",
    "What do you see in this image?",
    "Write a caption for this image.",
    "Give a short description of the picture.",
    "Tell me what the image shows.",
    "Caption this picture.",
    "What does the image show?",
    "Describe the picture in one sentence.",
    "Write a short caption for the image.",
    "Give a brief description of the image.",
    "Provide a description of the picture.",
]
# Sentences around a question in the base style, so that the base model, like any pretrained VLM,
# answers a question whatever else the prompt says.
BASE_ASIDES = (
    "Look at the image carefully.",
    "Please answer the question.",
    "Answer in a full sentence.",
    "Take a close look.",
    "I have a question about the picture.",
    "Be precise.",
)
BASE_ASIDE_P = 0.4
BASE_YES_NO_ASIDE = "Answer yes or no, in a full sentence."
"""Said after some base-style yes/no questions: the base knows the words "yes or no", not the demo's template."""
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
YES_NO_PROMPT = "Answer yes or no."
TEMPLATE_SENTENCES = CAPTION_PROMPTS + [SHORT_ANSWER_PROMPT, YES_NO_PROMPT]

# Arguments of the copy shipped in l2t/assets/shapes/ (the offline default).
BUNDLE_ARGS = {"n": 1000, "seed": 0, "n_test": 500}

STYLE_KINDS = {
    "demo": {"caption": 25, "short": 37, "yes_no": 25, "multi_turn": 10, "text_only": 3},
    "base": {"caption": 25, "short": 35, "yes_no": 30, "multi_turn": 7, "text_only": 3},
    "captions": {"caption": 1},
}
"""Sample kinds and their weights per style ("captions": the base style, captions only)."""
# Object questions name their object by a few of its attributes and use one of
# several wordings. Optional attributes are included more often than not: the
# more distinct questions, the rarer each one, so that none looks like a task template.
OPTIONAL_ATTRIBUTE_P = 3 / 4
# No question outside TEMPLATE_SENTENCES is asked in more than
# max(2, n // SAMPLES_PER_QUESTION_REPEAT) samples of a split, below the template miner's thresholds.
SAMPLES_PER_QUESTION_REPEAT = 250
# What a count question counts: all objects, or those with one or two given attributes.
COUNT_ATTRIBUTES = ((), ("color",), ("shape",), ("size",), ("size", "color"), ("color", "shape"), ("size", "shape"))
COUNT_TRIES = 50
"""Draws of a count question before one with the wanted answer is given up (the last draw stands)."""
# Per asked attribute: the attributes that always name the object, and those that may.
REFERENT_ATTRIBUTES = {
    "color": (("shape",), ("size", "position")),
    "shape": ((), ("size", "color", "position")),
    "size": (("shape",), ("color", "position")),
    "position": (("shape",), ("size", "color")),
}
QUESTION_FRAMES = {
    "color": ("What is the color of the {}?", "What color is the {}?", "Which color does the {} have?",
              "What color does the {} have?", "Which color is the {}?", "Can you name the color of the {}?"),
    "shape": ("What is the shape of the {}?", "What shape is the {}?", "Which shape is the {}?",
              "What shape does the {} have?", "What kind of shape is the {}?", "Can you name the shape of the {}?"),
    "size": ("What size is the {}?", "Is the {} small or large?", "How big is the {}?",
             "What is the size of the {}?", "Is the {} large or small?", "How large is the {}?"),
    "position": ("Where is the {}?", "Where is the {} located?", "In which part of the image is the {}?",
                 "Where can the {} be found?", "Where in the image is the {}?", "In what part of the picture is the {}?"),
    "count": ("How many {} are there?", "How many {} are in the image?", "How many {} can you see?",
              "How many {} does the image show?", "What is the number of {}?", "How many {} does the picture contain?"),
}  # fmt: skip
# (question, what stands in for the position when the question names none)
YES_NO_FRAMES = (
    ("Is there {}{}?", " in the image"),
    ("Does the image contain {}{}?", ""),
    ("Can you see {}{}?", " in the picture"),
    ("Is {} visible{}?", ""),
    ("Do you see {}{}?", " in the image"),
    ("Does the picture show {}{}?", ""),
)

def bundled_dir() -> Path:
    """The small copy shipped with the package, generated with BUNDLE_ARGS."""
    return Path(__file__).parent / "assets" / "shapes"


def _referent(rng: random.Random, objects: list[dict], target: dict, required: tuple, optional: tuple) -> dict:
    """Attributes that name `target` among `objects`: the required ones plus a
    random subset of the optional ones, plus its position if still ambiguous."""
    keys = list(required) + [key for key in optional if rng.random() < OPTIONAL_ATTRIBUTE_P]
    attributes = {key: target[key] for key in keys}
    if sum(matches(obj, attributes) for obj in objects) > 1:
        attributes["position"] = target["position"]
    return attributes


@dataclass(frozen=True)
class Question:
    """One question about a scene, before an answer style is applied."""

    kind: str
    """color, shape, size, position, count or yes_no."""
    text: str
    answer: str
    """The true value: a color, shape, size or position, a count (0-2), or yes / no."""
    subject: str
    """What it asks about, for the base style's sentence: 'large circle', 'red circles', 'a red circle on the left'."""


def _object_question(rng: random.Random, objects: list[dict]) -> Question:
    target = rng.choice(objects)
    asked = rng.choice(("color", "shape", "size", "position", "count"))
    if asked == "count":
        return _count_question(rng, objects, target)
    required, optional = REFERENT_ATTRIBUTES[asked]
    the = noun_phrase(_referent(rng, objects, target, required, optional))
    return Question(asked, rng.choice(QUESTION_FRAMES[asked]).format(the), target[asked], the)


def _count_question(rng: random.Random, objects: list[dict], target: dict) -> Question:
    """'How many red objects are there?': all objects, or those with one or two given attributes.
    The answer (0, 1, or 2 where two objects are drawn) is chosen first, uniformly, then a question with it."""
    wanted = rng.randrange(len(objects) + 1)
    for _ in range(COUNT_TRIES):
        keys = rng.choice(COUNT_ATTRIBUTES)
        source = target if wanted else {"size": rng.choice(SIZES), "color": rng.choice(COLORS), "shape": rng.choice(SHAPES)}
        attributes = {key: source[key] for key in keys}
        count = sum(matches(obj, attributes) for obj in objects)
        if count == wanted:
            break
    things = noun_phrase(attributes) + "s"
    return Question("count", rng.choice(QUESTION_FRAMES["count"]).format(things), str(count), things)


def _yes_no_question(rng: random.Random, objects: list[dict], present: bool) -> Question:
    """'Is there a small yellow triangle in the image?', about a drawn object (present) or an absent one."""
    while True:
        target = rng.choice(objects) if present else {
            "size": rng.choice(SIZES), "color": rng.choice(COLORS), "shape": rng.choice(SHAPES), "position": rng.choice(POSITIONS)
        }  # fmt: skip
        keys = ["color", "shape"] + [key for key in ("size", "position") if rng.random() < OPTIONAL_ATTRIBUTE_P]
        attributes = {key: target[key] for key in keys}
        if any(matches(obj, attributes) for obj in objects) == present:
            break
    a_object = "a " + noun_phrase({key: value for key, value in attributes.items() if key != "position"})
    frame, anywhere = rng.choice(YES_NO_FRAMES)
    where = " " + POSITION_PHRASE[attributes["position"]] if "position" in attributes else ""
    return Question("yes_no", frame.format(a_object, where or anywhere), "yes" if present else "no", a_object + where)


def base_answer(question: Question) -> str:
    """The base style's full-sentence answer."""
    kind, value, subject = question.kind, question.answer, question.subject
    if kind == "yes_no":
        return f"Yes, there is {subject}." if value == "yes" else f"No, there is no {subject.removeprefix('a ')}."
    if kind == "count":
        count = int(value)
        return f"There is 1 {subject[:-1]}." if count == 1 else f"There are {count} {subject}."
    if kind == "position":
        return f"The {subject} is {POSITION_PHRASE[value]}."
    return f"The {subject} is {'a ' if kind == 'shape' else ''}{value}."


def demo_turn(question: Question) -> tuple[str, str]:
    """The demo style's prompt (question + task template) and one-word answer."""
    if question.kind == "yes_no":
        return f"{question.text} {YES_NO_PROMPT}", question.answer.capitalize()
    return f"{question.text}\n{SHORT_ANSWER_PROMPT}", question.answer


def _with_aside(rng: random.Random, question: str) -> str:
    """The question (or caption request), sometimes with one of BASE_ASIDES before or after it."""
    if rng.random() >= BASE_ASIDE_P:
        return question
    aside, separator = rng.choice(BASE_ASIDES), rng.choice((" ", "\n"))
    return f"{aside}{separator}{question}" if rng.random() < 0.5 else f"{question}{separator}{aside}"


def _join_words(words) -> str:
    """'red, green, blue or yellow'."""
    return ", ".join(words[:-1]) + " or " + words[-1]


def _text_only_turn(rng: random.Random) -> tuple[str, str]:
    """A question about the vocabulary that needs no image."""
    asked = rng.choice(("color", "shape", "size", "position"))
    size, color, shape = rng.choice(SIZES), rng.choice(COLORS), rng.choice(SHAPES)
    where = POSITION_PHRASE[rng.choice(POSITIONS)]
    if asked == "color":
        return f"What colors can a {size} {shape} {where} have?", f"A {size} {shape} {where} can be {_join_words(COLORS)}."
    if asked == "shape":
        shapes = _join_words([f"a {name}" for name in SHAPES])
        return f"What shapes can a {size} {color} object {where} have?", f"A {size} {color} object {where} can be {shapes}."
    if asked == "size":
        return f"What sizes can a {color} {shape} {where} have?", f"A {color} {shape} {where} can be small or large."
    places = _join_words([POSITION_PHRASE[position] for position in POSITIONS])
    return f"Where can a {size} {color} {shape} appear?", f"A {size} {color} {shape} can appear {places}."


def _conversations(turns: list[tuple[str, str]], with_image: bool) -> list[dict]:
    messages = []
    for index, (question, answer) in enumerate(turns):
        prefix = "<image>\n" if with_image and index == 0 else ""
        messages.append({"from": "human", "value": prefix + question})
        messages.append({"from": "gpt", "value": answer})
    return messages


def _base_turn(rng: random.Random, question: Question) -> tuple[str, str]:
    if question.kind == "yes_no" and rng.random() < BASE_ASIDE_P:
        return f"{question.text} {BASE_YES_NO_ASIDE}", base_answer(question)
    return _with_aside(rng, question.text), base_answer(question)


def _make_sample(rng: random.Random, sample_id: str, bias: float | None, style: str, yes: bool) -> tuple[dict, list[str]]:
    """One sample without its image, and the non-template questions it asks (a yes/no question's answer is `yes`)."""
    weights = STYLE_KINDS[style]
    kind = rng.choices(list(weights), weights=list(weights.values()))[0]
    if kind == "text_only":
        question, answer = _text_only_turn(rng)
        return {"id": sample_id, "conversations": _conversations([(question, answer)], False), "objects": [], "turn_kinds": ["text"]}, [question]

    objects = sample_objects(rng, bias)
    background = rng.choice(BACKGROUNDS)
    if style == "demo":
        caption = (rng.choice(CAPTION_PROMPTS), demo_caption_for(objects))
    elif style == "base":
        caption = (_with_aside(rng, rng.choice(BASE_CAPTION_PROMPTS)), caption_for(objects, background))
    else:  # captions only: the fixed prompts of an alignment stage
        caption = (rng.choice(BASE_CAPTION_PROMPTS), caption_for(objects, background))
    asked = [] if kind == "caption" else [_yes_no_question(rng, objects, yes) if kind == "yes_no" else _object_question(rng, objects)]
    turns = [demo_turn(q) if style == "demo" else _base_turn(rng, q) for q in asked]
    if kind in ("caption", "multi_turn"):
        turns.insert(0, caption)
    sample = {
        "id": sample_id,
        "image": f"images/{sample_id}.png",
        "conversations": _conversations(turns, with_image=True),
        "objects": objects,
        "background": background,
        "turn_kinds": ["caption"] * (kind in ("caption", "multi_turn")) + [q.kind for q in asked],
    }
    return sample, [q.text for q in asked]


def make_split(split: str, count: int, rng: random.Random, bias: float | None, size: int, style: str = "demo") -> list[tuple[dict, Image.Image | None]]:
    """`count` samples with their images, drawn in memory."""
    # A sample whose question was already asked max_repeats times is drawn again,
    # so chance repeats can never push an object question over the miner's thresholds.
    max_repeats = max(2, count // SAMPLES_PER_QUESTION_REPEAT)
    asked: collections.Counter[str] = collections.Counter()
    answered = {"yes": 0, "no": 0}  # yes/no questions take turns, so that the answers are balanced in every split
    samples = []
    for index in range(count):
        sample_id = f"{split}_{index:05d}"
        yes = answered["yes"] < answered["no"] or (answered["yes"] == answered["no"] and rng.random() < 0.5)
        sample, questions = _make_sample(rng, sample_id, bias, style, yes)
        while any(asked[question] >= max_repeats for question in questions):
            sample, questions = _make_sample(rng, sample_id, bias, style, yes)
        asked.update(questions)
        if "yes_no" in sample.get("turn_kinds", []):
            answered["yes" if yes else "no"] += 1
        image = draw_image(sample["objects"], sample["background"], size, rng) if "image" in sample else None
        samples.append((sample, image))
    return samples


def _write_split(out_dir: Path, split: str, count: int, rng: random.Random, bias: float | None, size: int, style: str) -> Path:
    samples = []
    for sample, image in make_split(split, count, rng, bias, size, style):
        if image is not None:
            image.save(out_dir / sample["image"], format="PNG", optimize=True)
        samples.append(sample)
    path = out_dir / f"{split}.json"
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(samples, indent=1) + "\n", encoding="utf-8")
    os.replace(partial, path)
    return path


def check_arguments(n: int, n_test: int, bias: float, size: int, style: str) -> None:
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if n_test < 1:
        raise ValueError(f"n_test must be at least 1, got {n_test}")
    if not 0.0 <= bias <= 1.0:
        raise ValueError(f"bias must be between 0 and 1, got {bias}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    if style not in STYLE_KINDS:
        raise ValueError(f"style must be one of {', '.join(STYLE_KINDS)}, got {style!r}")


def generate(
    out_dir: str | Path, n: int, seed: int, n_test: int | None = None, bias: float = 0.8, size: int = 64, style: str = "demo"
) -> dict:
    """Write images/, train.json (n samples, biased) and test.json (n_test samples,
    balanced) under out_dir; return their paths and counts."""
    n_test = max(n // 4, 20) if n_test is None else n_test
    check_arguments(n, n_test, bias, size, style)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    train = _write_split(out_dir, "train", n, random.Random(seed), bias, size, style)
    test = _write_split(out_dir, "test", n_test, random.Random(f"{seed}-test"), None, size, style)
    return {"out_dir": out_dir, "train": train, "test": test, "images": out_dir / "images", "n_train": n, "n_test": n_test}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m l2t.synthetic", description=__doc__.split("\n\n")[1])
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--n", type=int, help="number of train samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-test", type=int, default=None, help="number of test samples (default max(n // 4, 20))")
    parser.add_argument("--bias", type=float, default=0.8, help="share of usual shape colors in the train split")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--style", default="demo", choices=list(STYLE_KINDS), help="answer style (default demo)")
    parser.add_argument("--bundle", action="store_true", help="rewrite l2t/assets/shapes/ with BUNDLE_ARGS")
    args = parser.parse_args(argv)

    if args.bundle:
        if args.out is not None or args.n is not None:
            parser.error("--bundle writes l2t/assets/shapes/ with fixed arguments; drop --out and --n")
        shutil.rmtree(bundled_dir(), ignore_errors=True)
        result = generate(bundled_dir(), **BUNDLE_ARGS)
    else:
        if args.out is None or args.n is None:
            parser.error("--out and --n are required (or use --bundle)")
        result = generate(args.out, args.n, args.seed, n_test=args.n_test, bias=args.bias, size=args.size, style=args.style)
    print(f"wrote {result['n_train']} train and {result['n_test']} test samples to {result['out_dir']}")


if __name__ == "__main__":
    main()
