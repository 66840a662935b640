"""Synthetic scenes: one or two shapes on a plain background, drawn, described in words, and read back from text.

A scene is a list of objects ({"shape", "color", "size", "position"}) and a
background. One object sits on the left, right, top, bottom or center; two
objects sit left + right or top + bottom and always have different shapes, so
"the circle" names exactly one object. `l2t.synthetic` asks questions about
scenes and writes data sets of them; evaluation reads answers back with
`objects_in`, `first_object_in` and `named_value`.
"""

from __future__ import annotations

import random
import re

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = ("white", "gray")
USUAL_COLOR = {"circle": "red", "square": "blue", "triangle": "green"}
QUESTION_KINDS = ("color", "shape", "size", "position", "count", "yes_no")
"""What a question about a scene can ask; `named_value` reads each kind's answer back from text."""

COLOR_RGB = {"red": (220, 30, 30), "green": (20, 150, 40), "blue": (30, 70, 220), "yellow": (235, 190, 0)}
BACKGROUND_RGB = {"white": (255, 255, 255), "gray": (200, 200, 200)}
POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
PAIR_LAYOUTS = (("left", "right"), ("top", "bottom"))

# Object centers and half-widths as fractions of the image side. With the jitter
# the two objects of a pair never touch and nothing leaves the canvas.
CENTER_FRACTION = {"left": (0.26, 0.5), "right": (0.74, 0.5), "top": (0.5, 0.26), "bottom": (0.5, 0.74), "center": (0.5, 0.5)}
HALF_WIDTH_FRACTION = {"small": 0.11, "large": 0.19}
JITTER_FRACTION = 0.03

_OBJECT_MENTION = re.compile(rf"\b({'|'.join(COLORS)}) ({'|'.join(SHAPES)})s?\b", flags=re.IGNORECASE)


def _described(objects: list[dict]) -> str:
    return " and ".join(f"a {obj['size']} {obj['color']} {obj['shape']} {POSITION_PHRASE[obj['position']]}" for obj in objects)


def caption_for(objects: list[dict], background: str) -> str:
    """The base model's caption, e.g. 'A large red circle on the left and a small
    blue square on the right, on a white background.'"""
    text = _described(objects)
    return f"{text[0].upper()}{text[1:]}, on a {background} background."


def demo_caption_for(objects: list[dict]) -> str:
    """The demo data's caption, e.g. 'There is a large red circle on the left and a small blue square on the right.'"""
    return f"There is {_described(objects)}."


def objects_in(text: str) -> set[tuple[str, str]]:
    """The (color, shape) pairs a text mentions, e.g. {('red', 'circle')}."""
    return {(color.lower(), shape.lower()) for color, shape in _OBJECT_MENTION.findall(text)}


def first_object_in(text: str) -> tuple[str, str] | None:
    """The first (color, shape) a text mentions: a caption's main object."""
    match = _OBJECT_MENTION.search(text)
    return (match[1].lower(), match[2].lower()) if match else None


_VALUE_WORDS = {
    "color": {color: color for color in COLORS},
    "shape": {shape: shape for shape in SHAPES},
    "size": {size: size for size in SIZES},
    "position": {word: position for position in POSITIONS for word in (position, POSITION_PHRASE[position].split()[-1])},
    "count": {**{str(n): str(n) for n in range(3)}, "zero": "0", "one": "1", "two": "2"},
    "yes_no": {"yes": "yes", "no": "no"},
}


def named_value(kind: str, text: str) -> str | None:
    """The one value of a question kind that an answer names, in any wording ("The circle is red." -> "red");
    None if it names none or several. Yes/no answers are read off their first word."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    if kind == "yes_no":
        return words[0] if words and words[0] in ("yes", "no") else None
    named = {_VALUE_WORDS[kind][w] for w in words if w in _VALUE_WORDS[kind]}
    return named.pop() if len(named) == 1 else None


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


def pick_color(rng: random.Random, shape: str, bias: float | None) -> str:
    if bias is None:
        return rng.choice(COLORS)
    usual = USUAL_COLOR[shape]
    if rng.random() < bias:
        return usual
    return rng.choice([color for color in COLORS if color != usual])


def sample_objects(rng: random.Random, bias: float | None) -> list[dict]:
    count = rng.choice((1, 2))
    shapes = rng.sample(SHAPES, count)
    positions = [rng.choice(POSITIONS)] if count == 1 else list(rng.choice(PAIR_LAYOUTS))
    return [
        {"shape": shape, "color": pick_color(rng, shape, bias), "size": rng.choice(SIZES), "position": position}
        for shape, position in zip(shapes, positions)
    ]


def matches(obj: dict, attributes: dict) -> bool:
    return all(obj[key] == value for key, value in attributes.items())


def noun_phrase(attributes: dict) -> str:
    """'large red circle on the left' from any subset of an object's attributes."""
    words = [attributes[key] for key in ("size", "color") if key in attributes]
    words.append(attributes.get("shape", "object"))
    if "position" in attributes:
        words.append(POSITION_PHRASE[attributes["position"]])
    return " ".join(words)
