"""python -m l2t.synthetic --out data/shapes --n 1000 --seed 0 [--n-test 250] [--bias 0.8] [--size 64]
python -m l2t.synthetic --bundle   # rewrite the small copy in l2t/assets/shapes/

A synthetic visual-instruction dataset of simple shapes with known ground truth,
written in LLaVA JSON format. It lets the app run offline, lets a tiny model train
on CPU, and measures shortcut learning and hallucination, because every answer
can be checked against the objects that were drawn.

Output folder:
    images/<id>.png   RGB, size x size pixels, a plain white or gray background
                      with one or two objects (circle / square / triangle; red /
                      green / blue / yellow; small / large). One object sits on
                      the left, right, top, bottom or center; two objects sit
                      left + right or top + bottom and always have different
                      shapes, so "the circle" names exactly one object.
    train.json        n samples, biased split (below).
    test.json         n_test samples (default max(n // 4, 20)), balanced split.

Each sample is {"id", "image": "images/<id>.png", "conversations", "objects",
"background"}; image paths are relative to the output folder and "objects" /
"background" are the ground truth (loaders ignore unknown keys). Text-only
samples have no "image" or "background" key and an empty "objects" list.

Language-prior bias: in the train split each object takes its shape's usual
color (circle -> red, square -> blue, triangle -> green, see USUAL_COLOR) with
probability `bias`, and one of the other three colors otherwise, so the share of
usual colors is `bias`. In the test split the color is uniform and independent of
the shape (usual share 1/4). A model that learned "circles are red" instead of
looking at the image is right on train and wrong on test.

Sample kinds (weights in SAMPLE_KINDS): a caption (one of CAPTION_PROMPTS,
answered by caption_for); a short question about one object followed on its own
line by SHORT_ANSWER_PROMPT, answered with one word; a yes/no existence question
followed by YES_NO_PROMPT, half about a drawn object and half about an absent
one; a caption turn followed by a short question; and a few text-only questions
about the vocabulary. The fixed sentences (TEMPLATE_SENTENCES) each appear in
about 10% of samples or more, while object questions combine size, color, shape,
position and wording, and none is asked in more than max(2, n // 250) samples of
a split: a frequency-based template miner recovers TEMPLATE_SENTENCES and nothing
else.

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
import re
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = ("white", "gray")
USUAL_COLOR = {"circle": "red", "square": "blue", "triangle": "green"}

CAPTION_PROMPTS = [
    "Describe the image briefly.",
    "Write a short caption for this image.",
    "What objects are shown in the picture?",
    "Give a one-sentence description of the image.",
]
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
YES_NO_PROMPT = "Answer yes or no."
TEMPLATE_SENTENCES = CAPTION_PROMPTS + [SHORT_ANSWER_PROMPT, YES_NO_PROMPT]

# Arguments of the copy shipped in l2t/assets/shapes/ (the offline default).
BUNDLE_ARGS = {"n": 240, "seed": 0, "n_test": 60}

SAMPLE_KINDS = {"caption": 33, "short": 29, "yes_no": 25, "multi_turn": 10, "text_only": 3}
# Object questions name their object by a few of its attributes and use one of
# several wordings. Optional attributes are included more often than not: the
# more distinct questions, the rarer each one (at most about 0.11% of samples in
# expectation), so that none of them looks like a task template.
OPTIONAL_ATTRIBUTE_P = 3 / 4
# Chance repeats are capped too: no question outside TEMPLATE_SENTENCES is asked in
# more than max(2, n // SAMPLES_PER_QUESTION_REPEAT) samples of a split (1% at
# n=200, 0.4% from n=500 on), below the template miner's thresholds at any n.
SAMPLES_PER_QUESTION_REPEAT = 250
# Per asked attribute: the attributes that always name the object, and those that may.
REFERENT_ATTRIBUTES = {
    "color": (("shape",), ("size", "position")),
    "shape": ((), ("size", "color", "position")),
    "size": (("shape",), ("color", "position")),
    "position": (("shape",), ("size", "color")),
}
QUESTION_FRAMES = {
    "color": (
        "What is the color of the {}?",
        "What color is the {}?",
        "Which color does the {} have?",
        "What color does the {} have?",
        "Which color is the {}?",
        "Can you name the color of the {}?",
    ),
    "shape": (
        "What is the shape of the {}?",
        "What shape is the {}?",
        "Which shape is the {}?",
        "What shape does the {} have?",
        "What kind of shape is the {}?",
        "Can you name the shape of the {}?",
    ),
    "size": (
        "What size is the {}?",
        "Is the {} small or large?",
        "How big is the {}?",
        "What is the size of the {}?",
        "Is the {} large or small?",
        "How large is the {}?",
    ),
    "position": (
        "Where is the {}?",
        "Where is the {} located?",
        "In which part of the image is the {}?",
        "Where can the {} be found?",
        "Where in the image is the {}?",
        "In what part of the picture is the {}?",
    ),
    "count": (
        "How many {} are there?",
        "How many {} are in the image?",
        "How many {} can you see?",
        "How many {} does the image show?",
        "What is the number of {}?",
        "How many {} does the picture contain?",
    ),
}
# (question, what stands in for the position when the question names none)
YES_NO_FRAMES = (
    ("Is there {}{}?", " in the image"),
    ("Does the image contain {}{}?", ""),
    ("Can you see {}{}?", " in the picture"),
    ("Is {} visible{}?", ""),
    ("Do you see {}{}?", " in the image"),
    ("Does the picture show {}{}?", ""),
)

COLOR_RGB = {
    "red": (220, 30, 30),
    "green": (20, 150, 40),
    "blue": (30, 70, 220),
    "yellow": (235, 190, 0),
}
BACKGROUND_RGB = {"white": (255, 255, 255), "gray": (200, 200, 200)}
POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
PAIR_LAYOUTS = (("left", "right"), ("top", "bottom"))
NUMBER_WORDS = ("zero", "one", "two")

# Object centers and half-widths as fractions of the image side. With the jitter
# the two objects of a pair never touch and nothing leaves the canvas.
CENTER_FRACTION = {
    "left": (0.26, 0.5),
    "right": (0.74, 0.5),
    "top": (0.5, 0.26),
    "bottom": (0.5, 0.74),
    "center": (0.5, 0.5),
}
HALF_WIDTH_FRACTION = {"small": 0.11, "large": 0.19}
JITTER_FRACTION = 0.03

_OBJECT_MENTION = re.compile(rf"\b({'|'.join(COLORS)}) ({'|'.join(SHAPES)})s?\b", flags=re.IGNORECASE)


def caption_for(objects: list[dict], background: str) -> str:
    """The reference caption, e.g. 'A large red circle on the left and a small
    blue square on the right, on a white background.'"""
    described = [f"a {obj['size']} {obj['color']} {obj['shape']} {POSITION_PHRASE[obj['position']]}" for obj in objects]
    text = " and ".join(described)
    return f"{text[0].upper()}{text[1:]}, on a {background} background."


def objects_in(text: str) -> set[tuple[str, str]]:
    """The (color, shape) pairs a text mentions, e.g. {('red', 'circle')}."""
    return {(color.lower(), shape.lower()) for color, shape in _OBJECT_MENTION.findall(text)}


def bundled_dir() -> Path:
    """The small copy shipped with the package, generated with BUNDLE_ARGS."""
    return Path(__file__).parent / "assets" / "shapes"


def draw_image(objects: list[dict], background: str, size: int, rng: random.Random) -> Image.Image:
    """Draw the objects on a plain background; rng only jitters their centers."""
    image = Image.new("RGB", (size, size), BACKGROUND_RGB[background])
    draw = ImageDraw.Draw(image)
    for obj in objects:
        fx, fy = CENTER_FRACTION[obj["position"]]
        cx = (fx + rng.uniform(-JITTER_FRACTION, JITTER_FRACTION)) * size
        cy = (fy + rng.uniform(-JITTER_FRACTION, JITTER_FRACTION)) * size
        half = HALF_WIDTH_FRACTION[obj["size"]] * size
        box = (round(cx - half), round(cy - half), round(cx + half), round(cy + half))
        fill = COLOR_RGB[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse(box, fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle(box, fill=fill)
        else:
            left, top, right, bottom = box
            draw.polygon([((left + right) / 2, top), (left, bottom), (right, bottom)], fill=fill)
    return image


def _pick_color(rng: random.Random, shape: str, bias: float | None) -> str:
    if bias is None:
        return rng.choice(COLORS)
    usual = USUAL_COLOR[shape]
    if rng.random() < bias:
        return usual
    return rng.choice([color for color in COLORS if color != usual])


def _sample_objects(rng: random.Random, bias: float | None) -> list[dict]:
    count = rng.choice((1, 2))
    shapes = rng.sample(SHAPES, count)
    positions = [rng.choice(POSITIONS)] if count == 1 else list(rng.choice(PAIR_LAYOUTS))
    return [
        {"shape": shape, "color": _pick_color(rng, shape, bias), "size": rng.choice(SIZES), "position": position}
        for shape, position in zip(shapes, positions)
    ]


def _matches(obj: dict, attributes: dict) -> bool:
    return all(obj[key] == value for key, value in attributes.items())


def _noun_phrase(attributes: dict) -> str:
    """'large red circle on the left' from any subset of an object's attributes."""
    words = [attributes[key] for key in ("size", "color") if key in attributes]
    words.append(attributes.get("shape", "object"))
    if "position" in attributes:
        words.append(POSITION_PHRASE[attributes["position"]])
    return " ".join(words)


def _referent(rng: random.Random, objects: list[dict], target: dict, required: tuple, optional: tuple) -> dict:
    """Attributes that name `target` among `objects`: the required ones plus a
    random subset of the optional ones, plus its position if still ambiguous."""
    keys = list(required) + [key for key in optional if rng.random() < OPTIONAL_ATTRIBUTE_P]
    attributes = {key: target[key] for key in keys}
    if sum(_matches(obj, attributes) for obj in objects) > 1:
        attributes["position"] = target["position"]
    return attributes


def _short_question(rng: random.Random, objects: list[dict]) -> tuple[str, str]:
    """An object question answered with one word."""
    target = rng.choice(objects)
    asked = rng.choice(("color", "shape", "size", "position", "count"))
    if asked == "count":
        return _count_question(rng, objects, target)
    required, optional = REFERENT_ATTRIBUTES[asked]
    the = _noun_phrase(_referent(rng, objects, target, required, optional))
    return rng.choice(QUESTION_FRAMES[asked]).format(the), target[asked]


def _count_question(rng: random.Random, objects: list[dict], target: dict) -> tuple[str, str]:
    """'How many red circles are there?'; half about a drawn object's attributes, half about random ones."""
    if rng.random() < 0.5:
        source = target
    else:
        source = {"size": rng.choice(SIZES), "color": rng.choice(COLORS), "shape": rng.choice(SHAPES)}
    attributes = {}
    while not attributes:
        attributes = {key: source[key] for key in ("size", "color", "shape") if rng.random() < OPTIONAL_ATTRIBUTE_P}
    count = sum(_matches(obj, attributes) for obj in objects)
    return rng.choice(QUESTION_FRAMES["count"]).format(_noun_phrase(attributes) + "s"), NUMBER_WORDS[count]


def _yes_no_question(rng: random.Random, objects: list[dict]) -> tuple[str, str]:
    """'Is there a small yellow triangle in the image?', about a drawn object or an absent one."""
    if rng.random() < 0.5:
        target = rng.choice(objects)
    else:
        while True:
            target = {
                "size": rng.choice(SIZES),
                "color": rng.choice(COLORS),
                "shape": rng.choice(SHAPES),
                "position": rng.choice(POSITIONS),
            }
            if not any(_matches(obj, {"color": target["color"], "shape": target["shape"]}) for obj in objects):
                break
    keys = ["color", "shape"] + [key for key in ("size", "position") if rng.random() < OPTIONAL_ATTRIBUTE_P]
    attributes = {key: target[key] for key in keys}
    present = any(_matches(obj, attributes) for obj in objects)
    a_object = "a " + _noun_phrase({key: value for key, value in attributes.items() if key != "position"})
    frame, anywhere = rng.choice(YES_NO_FRAMES)
    where = " " + POSITION_PHRASE[attributes["position"]] if "position" in attributes else anywhere
    return frame.format(a_object, where), "Yes" if present else "No"


def _join_words(words) -> str:
    """'red, green, blue or yellow'."""
    return ", ".join(words[:-1]) + " or " + words[-1]


def _text_only_turn(rng: random.Random) -> tuple[str, str]:
    """A question about the vocabulary that needs no image."""
    asked = rng.choice(("color", "shape", "size", "position"))
    size, color, shape = rng.choice(SIZES), rng.choice(COLORS), rng.choice(SHAPES)
    where = POSITION_PHRASE[rng.choice(POSITIONS)]
    if asked == "color":
        return (
            f"What colors can a {size} {shape} {where} have?",
            f"A {size} {shape} {where} can be {_join_words(COLORS)}.",
        )
    if asked == "shape":
        shapes = [f"a {name}" for name in SHAPES]
        return (
            f"What shapes can a {size} {color} object {where} have?",
            f"A {size} {color} object {where} can be {_join_words(shapes)}.",
        )
    if asked == "size":
        return f"What sizes can a {color} {shape} {where} have?", f"A {color} {shape} {where} can be small or large."
    places = [POSITION_PHRASE[position] for position in POSITIONS]
    return f"Where can a {size} {color} {shape} appear?", f"A {size} {color} {shape} can appear {_join_words(places)}."


def _conversations(turns: list[tuple[str, str]], with_image: bool) -> list[dict]:
    messages = []
    for index, (question, answer) in enumerate(turns):
        prefix = "<image>\n" if with_image and index == 0 else ""
        messages.append({"from": "human", "value": prefix + question})
        messages.append({"from": "gpt", "value": answer})
    return messages


def _make_sample(rng: random.Random, sample_id: str, bias: float | None) -> tuple[dict, list[str]]:
    """One sample without its image, and the non-template questions it asks."""
    kind = rng.choices(list(SAMPLE_KINDS), weights=list(SAMPLE_KINDS.values()))[0]
    if kind == "text_only":
        question, answer = _text_only_turn(rng)
        conversations = _conversations([(question, answer)], with_image=False)
        return {"id": sample_id, "conversations": conversations, "objects": []}, [question]

    objects = _sample_objects(rng, bias)
    background = rng.choice(BACKGROUNDS)
    caption_turn = (rng.choice(CAPTION_PROMPTS), caption_for(objects, background))
    if kind == "caption":
        questions, turns = [], [caption_turn]
    elif kind == "yes_no":
        question, answer = _yes_no_question(rng, objects)
        questions, turns = [question], [(f"{question} {YES_NO_PROMPT}", answer)]
    else:
        question, answer = _short_question(rng, objects)
        short_turn = (f"{question}\n{SHORT_ANSWER_PROMPT}", answer)
        questions, turns = [question], [short_turn] if kind == "short" else [caption_turn, short_turn]
    sample = {
        "id": sample_id,
        "image": f"images/{sample_id}.png",
        "conversations": _conversations(turns, with_image=True),
        "objects": objects,
        "background": background,
    }
    return sample, questions


def _write_split(out_dir: Path, split: str, count: int, rng: random.Random, bias: float | None, size: int) -> Path:
    # A sample whose question was already asked max_repeats times is drawn again,
    # so chance repeats can never push an object question over the miner's thresholds.
    max_repeats = max(2, count // SAMPLES_PER_QUESTION_REPEAT)
    asked: collections.Counter[str] = collections.Counter()
    samples = []
    for index in range(count):
        sample_id = f"{split}_{index:05d}"
        sample, questions = _make_sample(rng, sample_id, bias)
        while any(asked[question] >= max_repeats for question in questions):
            sample, questions = _make_sample(rng, sample_id, bias)
        asked.update(questions)
        if "image" in sample:
            image = draw_image(sample["objects"], sample["background"], size, rng)
            image.save(out_dir / sample["image"], format="PNG", optimize=True)
        samples.append(sample)
    path = out_dir / f"{split}.json"
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(samples, indent=1) + "\n", encoding="utf-8")
    os.replace(partial, path)
    return path


def generate(
    out_dir: str | Path, n: int, seed: int, n_test: int | None = None, bias: float = 0.8, size: int = 64
) -> dict:
    """Write images/, train.json (n samples, biased) and test.json (n_test samples,
    balanced) under out_dir; return their paths and counts."""
    n_test = max(n // 4, 20) if n_test is None else n_test
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if n_test < 1:
        raise ValueError(f"n_test must be at least 1, got {n_test}")
    if not 0.0 <= bias <= 1.0:
        raise ValueError(f"bias must be between 0 and 1, got {bias}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    train = _write_split(out_dir, "train", n, random.Random(seed), bias, size)
    test = _write_split(out_dir, "test", n_test, random.Random(f"{seed}-test"), None, size)
    return {
        "out_dir": out_dir,
        "train": train,
        "test": test,
        "images": out_dir / "images",
        "n_train": n,
        "n_test": n_test,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m l2t.synthetic", description=__doc__.split("\n\n")[1])
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--n", type=int, help="number of train samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-test", type=int, default=None, help="number of test samples (default max(n // 4, 20))")
    parser.add_argument("--bias", type=float, default=0.8, help="share of usual shape colors in the train split")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
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
        result = generate(args.out, args.n, args.seed, n_test=args.n_test, bias=args.bias, size=args.size)
    print(f"wrote {result['n_train']} train and {result['n_test']} test samples to {result['out_dir']}")


if __name__ == "__main__":
    main()
