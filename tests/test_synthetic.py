import collections
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from l2t import scenes, synthetic
from l2t.scenes import COLOR_RGB, COLORS, POSITION_PHRASE, SHAPES, USUAL_COLOR, caption_for, objects_in
from l2t.synthetic import (
    BUNDLE_ARGS,
    CAPTION_PROMPTS,
    SHORT_ANSWER_PROMPT,
    TEMPLATE_SENTENCES,
    YES_NO_PROMPT,
    bundled_dir,
    generate,
)

PHRASE_POSITION = {phrase: position for position, phrase in POSITION_PHRASE.items()}
REFERENT = re.compile(
    r"(?:(?P<size>small|large) )?(?:(?P<color>red|green|blue|yellow) )?(?P<noun>circle|square|triangle|object)"
    r"(?: (?P<where>on the left|on the right|at the top|at the bottom|in the center))?"
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("shapes")
    result = generate(out_dir, n=600, seed=0, n_test=200)
    train = json.loads(result["train"].read_text())
    test = json.loads(result["test"].read_text())
    return out_dir, train, test


def _attributes(match: re.Match) -> dict:
    attributes = {key: match[key] for key in ("size", "color") if match[key]}
    if match["noun"] != "object":
        attributes["shape"] = match["noun"]
    if match["where"]:
        attributes["position"] = PHRASE_POSITION[match["where"]]
    return attributes


def _matching(objects: list[dict], attributes: dict) -> list[dict]:
    return [obj for obj in objects if all(obj[key] == value for key, value in attributes.items())]


def _human_sentences(sample: dict) -> set[str]:
    sentences = set()
    for message in sample["conversations"]:
        if message["from"] == "human":
            for line in message["value"].replace("<image>", "").split("\n"):
                sentences.update(sentence.strip() for sentence in re.findall(r"[^.?]+[.?]", line))
    return sentences


def test_caption_for_literal():
    objects = [
        {"shape": "circle", "color": "red", "size": "large", "position": "left"},
        {"shape": "square", "color": "blue", "size": "small", "position": "right"},
    ]
    assert caption_for(objects, "white") == (
        "A large red circle on the left and a small blue square on the right, on a white background."
    )
    single = [{"shape": "triangle", "color": "yellow", "size": "small", "position": "center"}]
    assert caption_for(single, "gray") == "A small yellow triangle in the center, on a gray background."


def test_objects_in_parses_mentions():
    assert objects_in("A large red circle on the left and a small blue square on the right.") == {
        ("red", "circle"),
        ("blue", "square"),
    }
    assert objects_in("Two Green Triangles and a yellow circle, on a gray background.") == {
        ("green", "triangle"),
        ("yellow", "circle"),
    }
    assert objects_in("A white background with a gray circle.") == set()
    assert objects_in("Some red squares") == {("red", "square")}


def test_caption_literals():
    objects = [
        {"shape": "circle", "color": "red", "size": "large", "position": "left"},
        {"shape": "square", "color": "blue", "size": "small", "position": "right"},
    ]
    assert scenes.demo_caption_for(objects) == "There is a large red circle on the left and a small blue square on the right."
    assert scenes.first_object_in("There is a large red circle on the left and a small blue square.") == ("red", "circle")
    assert scenes.first_object_in("Nothing here.") is None


def test_caption_round_trip(dataset):
    _, train, test = dataset
    captions = 0
    for sample in train + test:
        if "image" in sample:
            truth = {(obj["color"], obj["shape"]) for obj in sample["objects"]}
            assert objects_in(caption_for(sample["objects"], sample["background"])) == truth
            for kind, answer in zip(sample["turn_kinds"], sample["conversations"][1::2]):
                if kind == "caption":
                    captions += 1
                    assert objects_in(answer["value"]) == truth
                    assert scenes.first_object_in(answer["value"]) == (sample["objects"][0]["color"], sample["objects"][0]["shape"])
    assert captions > 100


def test_template_sentences():
    assert TEMPLATE_SENTENCES == CAPTION_PROMPTS + [SHORT_ANSWER_PROMPT, YES_NO_PROMPT]
    assert SHORT_ANSWER_PROMPT == "Answer the question using a single word or phrase."
    assert YES_NO_PROMPT == "Answer yes or no."
    for sentence in TEMPLATE_SENTENCES:
        assert re.fullmatch(r"[A-Z][^.?\n]*[.?]", sentence), sentence


@pytest.mark.parametrize("n, seed", [(200, 0), (1000, 0), (200, 1), (200, 2)])
def test_template_sentences_frequent_and_object_questions_rare(tmp_path, n, seed):
    result = generate(tmp_path, n=n, seed=seed)
    train = json.loads(result["train"].read_text())
    counts = collections.Counter()
    for sample in train:
        counts.update(_human_sentences(sample))
    for sentence in TEMPLATE_SENTENCES:
        assert counts[sentence] / n >= 0.05, sentence
    others = {sentence: count for sentence, count in counts.items() if sentence not in TEMPLATE_SENTENCES}
    assert max(others.values()) <= max(2, n // synthetic.SAMPLES_PER_QUESTION_REPEAT)
    assert max(others.values()) / n < 0.015


def test_format_and_counts(dataset):
    out_dir, train, test = dataset
    assert len(train) == 600 and len(test) == 200
    ids = [sample["id"] for sample in train + test]
    assert len(set(ids)) == len(ids)
    for sample in train + test:
        messages = sample["conversations"]
        assert len(messages) in (2, 4)
        assert [m["from"] for m in messages] == ["human", "gpt"] * (len(messages) // 2)
        assert all(isinstance(m["value"], str) and m["value"] for m in messages)
        assert all("<image>" not in m["value"] for m in messages[1:])
        if "image" in sample:
            assert sample["image"] == f"images/{sample['id']}.png"
            assert messages[0]["value"].startswith("<image>\n")
            assert messages[0]["value"].count("<image>") == 1
            assert 1 <= len(sample["objects"]) <= 2
            assert len({obj["shape"] for obj in sample["objects"]}) == len(sample["objects"])
            image = Image.open(out_dir / sample["image"])
            assert image.mode == "RGB" and image.size == (64, 64)
        else:
            assert "<image>" not in messages[0]["value"]
            assert sample["objects"] == [] and "background" not in sample
    kinds = collections.Counter(len(s["conversations"]) if "image" in s else "text" for s in train)
    assert kinds["text"] > 0 and kinds[4] > 0


def test_default_test_size(tmp_path):
    assert generate(tmp_path / "a", n=100, seed=0)["n_test"] == 25
    result = generate(tmp_path / "b", n=8, seed=0)
    assert result["n_test"] == 20
    assert len(json.loads(result["test"].read_text())) == 20
    assert len(json.loads(result["train"].read_text())) == 8


def test_images_show_the_objects(dataset):
    out_dir, train, _ = dataset
    for sample in train[:100]:
        if "image" not in sample:
            continue
        image = Image.open(out_dir / sample["image"])
        for obj in sample["objects"]:
            fx, fy = scenes.CENTER_FRACTION[obj["position"]]
            assert image.getpixel((round(fx * 64), round(fy * 64))) == COLOR_RGB[obj["color"]]


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    first = generate(tmp_path / "a", n=40, seed=3)
    second = generate(tmp_path / "b", n=40, seed=3)
    other = generate(tmp_path / "c", n=40, seed=4)
    for split in ("train", "test"):
        assert first[split].read_bytes() == second[split].read_bytes()
        assert first[split].read_bytes() != other[split].read_bytes()
    names = sorted(path.name for path in first["images"].iterdir())
    assert names == sorted(path.name for path in second["images"].iterdir())
    for name in names:
        assert (first["images"] / name).read_bytes() == (second["images"] / name).read_bytes()


def test_test_split_does_not_depend_on_n(tmp_path):
    small = generate(tmp_path / "a", n=10, seed=0, n_test=30)
    large = generate(tmp_path / "b", n=50, seed=0, n_test=30)
    assert small["test"].read_bytes() == large["test"].read_bytes()


def test_bias_in_train_and_balance_in_test(dataset):
    _, train, test = dataset
    train_objects = [obj for sample in train for obj in sample["objects"]]
    test_objects = [obj for sample in test for obj in sample["objects"]]
    usual_share = sum(obj["color"] == USUAL_COLOR[obj["shape"]] for obj in train_objects) / len(train_objects)
    assert usual_share == pytest.approx(0.8, abs=0.05)
    usual_share = sum(obj["color"] == USUAL_COLOR[obj["shape"]] for obj in test_objects) / len(test_objects)
    assert usual_share == pytest.approx(0.25, abs=0.08)
    colors = collections.Counter(obj["color"] for obj in test_objects)
    for color in COLORS:
        assert colors[color] / len(test_objects) == pytest.approx(0.25, abs=0.08)


def test_bias_extremes(tmp_path):
    always = json.loads(generate(tmp_path / "a", n=60, seed=0, bias=1.0)["train"].read_text())
    never = json.loads(generate(tmp_path / "b", n=60, seed=0, bias=0.0)["train"].read_text())
    assert all(obj["color"] == USUAL_COLOR[obj["shape"]] for s in always for obj in s["objects"])
    assert not any(obj["color"] == USUAL_COLOR[obj["shape"]] for s in never for obj in s["objects"])


def _split_frame(frame: str) -> list[str]:
    return [re.escape(part) for part in frame.split("{}")]


def test_yes_no_answers_match_objects(dataset):
    _, train, test = dataset
    where = "|".join(" " + phrase for phrase in POSITION_PHRASE.values())
    for split in (train, test):
        answers = collections.Counter()
        for sample in split:
            for question, answer in zip(sample["conversations"][::2], sample["conversations"][1::2]):
                if not question["value"].endswith(" " + YES_NO_PROMPT):
                    continue
                text = question["value"].removeprefix("<image>\n").removesuffix(" " + YES_NO_PROMPT)
                for frame, anywhere in synthetic.YES_NO_FRAMES:
                    before, between, after = _split_frame(frame)
                    match = re.fullmatch(
                        f"{before}a (?P<object>.+?){between}(?P<where>{where}|{re.escape(anywhere)}){after}", text
                    )
                    if match:
                        break
                assert match, text
                position = "" if match["where"] == anywhere else match["where"]
                attributes = _attributes(REFERENT.fullmatch(match["object"] + position))
                expected = "Yes" if _matching(sample["objects"], attributes) else "No"
                assert answer["value"] == expected, (text, sample["objects"])
                answers[expected] += 1
        # yes and no take turns within a split
        assert abs(answers["Yes"] - answers["No"]) <= 1 and sum(answers.values()) > 40


def test_short_answers_match_objects(dataset):
    _, train, test = dataset
    checked = collections.Counter()
    counts = collections.Counter()
    for sample in train + test:
        for question, answer in zip(sample["conversations"][::2], sample["conversations"][1::2]):
            if not question["value"].endswith("\n" + SHORT_ANSWER_PROMPT):
                continue
            text = question["value"].removeprefix("<image>\n").removesuffix("\n" + SHORT_ANSWER_PROMPT)
            parsed = [
                (asked, match["referent"])
                for asked, frames in synthetic.QUESTION_FRAMES.items()
                for before, after in map(_split_frame, frames)
                if (match := re.fullmatch(f"{before}(?P<referent>.+){after}", text))
                and REFERENT.fullmatch(match["referent"].removesuffix("s") if asked == "count" else match["referent"])
            ]
            assert len(parsed) == 1, text
            asked, referent = parsed[0]
            if asked == "count":
                found = _matching(sample["objects"], _attributes(REFERENT.fullmatch(referent.removesuffix("s"))))
                assert answer["value"] == str(len(found)), text
                counts[answer["value"]] += 1
            else:
                found = _matching(sample["objects"], _attributes(REFERENT.fullmatch(referent)))
                assert len(found) == 1, (text, sample["objects"])
                assert answer["value"] == found[0][asked], text
            checked[asked] += 1
    assert set(checked) == {"color", "shape", "size", "position", "count"}
    assert min(checked.values()) > 20
    # the answer of a count question is chosen first: no answer dominates
    assert set(counts) == {"0", "1", "2"} and max(counts.values()) / sum(counts.values()) < 0.55


def test_turn_kinds_name_what_each_turn_asks(dataset):
    _, train, test = dataset
    for sample in train + test:
        questions = sample["conversations"][::2]
        assert len(sample["turn_kinds"]) == len(questions)
        for kind, question in zip(sample["turn_kinds"], questions):
            text = question["value"].removeprefix("<image>\n")
            if kind == "caption":
                assert text in CAPTION_PROMPTS
            elif kind == "yes_no":
                assert text.endswith(YES_NO_PROMPT)
            elif kind == "text":
                assert "image" not in sample
            else:
                assert kind in scenes.QUESTION_KINDS and text.endswith(SHORT_ANSWER_PROMPT)


@pytest.mark.parametrize(
    ("question", "answer"),
    [
        (synthetic.Question("color", "What color is the large circle?", "red", "large circle"), "The large circle is red."),
        (synthetic.Question("shape", "What shape is the red object?", "circle", "red object"), "The red object is a circle."),
        (synthetic.Question("size", "How big is the circle?", "small", "circle"), "The circle is small."),
        (synthetic.Question("position", "Where is the circle?", "top", "circle"), "The circle is at the top."),
        (synthetic.Question("count", "How many red objects are there?", "2", "red objects"), "There are 2 red objects."),
        (synthetic.Question("count", "How many circles are there?", "1", "circles"), "There is 1 circle."),
        (synthetic.Question("count", "How many squares are there?", "0", "squares"), "There are 0 squares."),
        (synthetic.Question("yes_no", "Is there a red circle?", "yes", "a red circle on the left"), "Yes, there is a red circle on the left."),
        (synthetic.Question("yes_no", "Is there a red circle?", "no", "a red circle"), "No, there is no red circle."),
    ],
)
def test_base_style_answers_in_full_sentences_and_demo_style_in_one_word(question, answer):
    assert synthetic.base_answer(question) == answer
    prompt, short = synthetic.demo_turn(question)
    assert prompt.startswith(question.text) and prompt.endswith(YES_NO_PROMPT if question.kind == "yes_no" else SHORT_ANSWER_PROMPT)
    assert short == (question.answer.capitalize() if question.kind == "yes_no" else question.answer)
    # both styles name the same value, which is how evaluation reads "right about the image"
    assert scenes.named_value(question.kind, answer) == scenes.named_value(question.kind, short) == question.answer


def test_named_value_needs_exactly_one_value():
    assert scenes.named_value("color", "The circle is red.") == "red"
    assert scenes.named_value("color", "Red or blue.") is None
    assert scenes.named_value("position", "The circle is on the left.") == "left"
    assert scenes.named_value("count", "two") == "2"
    assert scenes.named_value("yes_no", "No, there is no red circle.") == "no"
    assert scenes.named_value("shape", "I cannot tell.") is None


def test_every_word_of_the_demo_answers_is_one_the_base_writes():
    """A LoRA adapter leaves the output layer as it is, so the demo data asks for no word the base never produced."""
    import random

    def answer_words(style: str) -> set[str]:
        samples = synthetic.make_split("words", 3000, random.Random(0), None, 16, style)
        return {w for record, _ in samples for m in record["conversations"][1::2] for w in re.findall(r"\w+", m["value"].lower())}

    assert answer_words("demo") <= answer_words("base")


def test_the_base_style_asks_every_kind_with_other_prompts_and_asides():
    import random

    samples = [record for record, _ in synthetic.make_split("base", 2000, random.Random(0), None, 16, "base")]
    kinds = collections.Counter(kind for record in samples for kind in record["turn_kinds"])
    assert set(kinds) == {"caption", "text", *scenes.QUESTION_KINDS}
    prompts = [m["value"].removeprefix("<image>\n") for record in samples for m in record["conversations"][::2]]
    assert not any(template in prompt for prompt in prompts for template in synthetic.TEMPLATE_SENTENCES)
    assert sum(any(aside in p for aside in synthetic.BASE_ASIDES) for p in prompts) > 0.2 * len(prompts)
    captions_only = [record for record, _ in synthetic.make_split("c", 200, random.Random(0), None, 16, "captions")]
    assert {kind for record in captions_only for kind in record["turn_kinds"]} == {"caption"}


def test_bundled_copy_matches_fresh_generation(tmp_path):
    fresh = generate(tmp_path, **BUNDLE_ARGS)
    bundle = bundled_dir()
    for split in ("train", "test"):
        assert (bundle / f"{split}.json").read_text() == fresh[split].read_text()
    names = sorted(path.name for path in fresh["images"].iterdir())
    assert sorted(path.name for path in (bundle / "images").iterdir()) == names
    for name in names:
        # Pixels, not bytes: another zlib build may compress the same image differently.
        with Image.open(bundle / "images" / name) as shipped, Image.open(fresh["images"] / name) as made:
            assert shipped.mode == "RGB" and shipped.tobytes() == made.tobytes()


def test_cli_writes_dataset(tmp_path, capsys):
    synthetic.main(["--out", str(tmp_path), "--n", "12", "--seed", "1", "--n-test", "5", "--size", "32"])
    assert "12 train and 5 test" in capsys.readouterr().out
    train = json.loads((tmp_path / "train.json").read_text())
    assert len(train) == 12
    with_image = next(sample for sample in train if "image" in sample)
    assert Image.open(tmp_path / with_image["image"]).size == (32, 32)


@pytest.mark.parametrize(
    "arguments, key",
    [
        ({"n": 0}, "n"),
        ({"n": 5, "n_test": 0}, "n_test"),
        ({"n": 5, "bias": 1.5}, "bias"),
        ({"n": 5, "size": 8}, "size"),
    ],
)
def test_invalid_arguments_name_the_key(tmp_path, arguments, key):
    with pytest.raises(ValueError, match=rf"^{key} "):
        generate(tmp_path, seed=0, **arguments)


def test_vocabulary():
    assert SHAPES == ("circle", "square", "triangle")
    assert COLORS == ("red", "green", "blue", "yellow")
    assert set(USUAL_COLOR) == set(SHAPES)
    assert Path(bundled_dir()).parts[-3:] == ("l2t", "assets", "shapes")
