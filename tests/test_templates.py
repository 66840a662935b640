import json
import os
import random

import pytest

from l2t import synthetic
from l2t.templates import (
    DEFAULT_MIN_COUNT,
    DEFAULT_MIN_FRACTION,
    DEFAULT_MIN_WORDS,
    TaskTemplate,
    apply_edits,
    load_templates,
    mine_templates,
    mine_templates_twice,
    normalize_sentence,
    save_templates,
    split_sentences,
    template_matcher,
    template_spans,
)

SHORT = "Answer the question using a single word or phrase."
OPTION = "Answer with the option's letter from the given choices directly."
CAPTION = "Provide a one-sentence caption for the provided image."


def sentences(text: str) -> list[str]:
    return [text[s:e] for s, e in split_sentences(text)]


def mine_all(instructions, **kwargs) -> dict[str, int]:
    """Every sentence with its sample count, no thresholds."""
    settings = {"min_fraction": 0.0, "min_count": 1, "top_k": 10**9, "min_words": 0} | kwargs
    return {t.sentence: t.count for t in mine_templates(instructions, **settings)}


def mine_all_twice(instructions) -> dict[str, int]:
    """`mine_all` by the streamed, two-pass miner."""
    everything = {"min_fraction": 0.0, "min_count": 1, "top_k": 10**9, "min_words": 0}
    return {t.sentence: t.count for t in mine_templates_twice(lambda: instructions, **everything)}


# ---------------------------------------------------------------- splitting


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<image>\nWhat is the man doing?", ["What is the man doing?"]),
        ("Look at <image> and describe it.", ["Look at", "and describe it."]),
        ("Is it red?<image>Is it blue?", ["Is it red?", "Is it blue?"]),
        (
            "<image>\nWhat is 3.5 plus 1.25?\nAnswer the question using a single word or phrase.",
            ["What is 3.5 plus 1.25?", "Answer the question using a single word or phrase."],
        ),
        ("Really?! Are you sure... Yes", ["Really?!", "Are you sure...", "Yes"]),
        ("  Describe   the image.  \n\n  a trailing fragment   ", ["Describe   the image.", "a trailing fragment"]),
        ("First line\r\nSecond line.", ["First line", "Second line."]),
        ("Version 2. 5 apples.", ["Version 2.", "5 apples."]),
        ("Pick one .", ["Pick one ."]),
        ('He said "stop." Then he left.', ['He said "stop."', "Then he left."]),
        ("Is a<b or <imag> here?", ["Is a<b or <imag> here?"]),
        ("?", ["?"]),
        (
            "Qu'est-ce que c'est ? Décrivez l'image.\n这是什么？请简要回答。",
            ["Qu'est-ce que c'est ?", "Décrivez l'image.", "这是什么？", "请简要回答。"],
        ),
        ("Name the emoji 🙂 here! Thanks", ["Name the emoji 🙂 here!", "Thanks"]),
        ("", []),
        ("<image>", []),
        (" \n\t <image> \n", []),
    ],
)
def test_split_sentences(text, expected):
    assert sentences(text) == expected


def test_split_sentences_spans():
    assert split_sentences("<image>\nWhat is this?") == [(8, 21)]
    assert split_sentences("Look at <image> and describe it.") == [(0, 7), (16, 32)]
    assert split_sentences("Costs 3.5 euros. Ok?!  ") == [(0, 16), (17, 21)]


def test_normalize_sentence_collapses_whitespace_and_keeps_case():
    assert normalize_sentence("  Answer\tthe  question\u00a0now.\n") == "Answer the question now."
    assert normalize_sentence("ANSWER the Question.") == "ANSWER the Question."


def test_mining_finds_the_same_sentences_as_split_then_normalize():
    # Mining uses a faster path than split_sentences + normalize_sentence; on
    # random texts made of the awkward pieces both must give the same set.
    pieces = ["a", "Bc", "3", ".", "?", "!", "。", "…", '"', ")", " ", "  ", "\t", "\xa0",
              "\n", "\r\n", "\u2028", "<image>", "<", "image>", "é", "语"]
    rng = random.Random(0)
    samples = []
    for _ in range(3000):
        turns = ["".join(rng.choices(pieces, k=rng.randint(0, 25))) for _ in range(rng.randint(1, 3))]
        spans = [(text, s, e) for text in turns for s, e in split_sentences(text)]
        for text, s, e in spans:
            piece = text[s:e]
            assert piece and piece == piece.strip() and "<image>" not in piece
            assert len(piece.splitlines()) == 1
        expected = {normalize_sentence(text[s:e]) for text, s, e in spans}
        assert set(mine_all([turns])) == expected, turns
        samples.append(turns)
    assert mine_all_twice(samples) == mine_all(samples)  # the streamed, two-pass miner


def test_the_template_matcher_finds_what_template_spans_finds():
    # The matcher rules texts out with one regex search and remembers recent texts; on random
    # texts made of the awkward pieces and of template words, it must find the same spans.
    words = ["Answer", "the", "question", "using", "a", "single", "word", "or", "phrase", "Yes"]
    pieces = [*words, ".", "?", " ", "  ", "\t", "\xa0", "\n", "<image>", "é"]
    templates = frozenset({SHORT, "Yes.", "word or phrase?"})
    find = template_matcher(templates)
    rng = random.Random(1)
    texts = ["".join(rng.choices(pieces, k=rng.randint(0, 30))) for _ in range(3000)] + [SHORT, f"x {SHORT}", "Yes. Yes."]
    texts += [SHORT.replace(" ", "  ", 1), SHORT.replace(" ", "\t", 2), SHORT.replace(" ", "\xa0"), "word \t or\xa0 phrase?"]  # spaced as people type
    for text in texts + texts[:50]:  # the second time from memory
        assert list(find(text)) == template_spans(text, templates), text
    assert sum(bool(find(text)) for text in texts) > 20  # the random texts do hold templates
    assert template_matcher(frozenset())(SHORT) == ()


# ---------------------------------------------------------------- template spans


def test_template_spans_at_start_middle_and_end():
    templates = {SHORT}
    start = f"{SHORT}\nWhat is this?"
    middle = f"<image>\nWhat color is the car? {SHORT} Be brief."
    end = f"What color is the car?\n{SHORT}"
    assert template_spans(start, templates) == [(0, 50)]
    assert template_spans(middle, templates) == [(31, 81)]
    assert template_spans(end, templates) == [(23, 73)]
    for text in (start, middle, end):
        (s, e), = template_spans(text, templates)
        assert text[s:e] == SHORT


def test_template_spans_repeated_within_a_turn():
    text = f"{SHORT} Is it red? {SHORT}"
    assert [text[s:e] for s, e in template_spans(text, {SHORT})] == [SHORT, SHORT]
    assert template_spans(text, {SHORT}) == [(0, 50), (62, 112)]


def test_template_spans_match_whole_normalised_sentences_only():
    spaced = "Answer  the question using a single word\tor phrase.\nIs it red?"
    assert [spaced[s:e] for s, e in template_spans(spaced, frozenset({SHORT}))] == [
        "Answer  the question using a single word\tor phrase."
    ]
    assert template_spans(SHORT.lower(), {SHORT}) == []  # case is kept
    assert template_spans(f"Please {SHORT}", {SHORT}) == []  # part of a longer sentence
    assert template_spans(SHORT, set()) == []


def test_template_spans_unicode():
    template = "请用一个词或短语回答问题。"
    text = f"<image>\n图中是什么动物？{template}"
    assert [text[s:e] for s, e in template_spans(text, {template})] == [template]


# ---------------------------------------------------------------- mining


def test_counted_once_per_sample_across_turns():
    instructions = [
        [f"What is it? {SHORT} {SHORT}", f"Where is it?\n{SHORT}", "What  is\tit?"],
        ["What is it?"],
        ["  What is it?  "],
    ]
    assert mine_all(instructions) == {"What is it?": 3, SHORT: 1, "Where is it?": 1}


def test_min_count_boundary():
    instructions = [["Describe the red car."]] * 3 + [["Describe the blue car."]] * 2 + [["Other words here."]] * 5
    mined = mine_templates(instructions, min_fraction=0.0, min_count=3)
    assert mined == [
        TaskTemplate("Other words here.", 5, 0.5),
        TaskTemplate("Describe the red car.", 3, 0.3),
    ]


def test_min_fraction_boundary():
    instructions = [["Look at this picture."]] * 2 + [[f"Question number {i}?"] for i in range(8)]
    kept = mine_templates(instructions, min_fraction=0.2, min_count=1)
    assert kept == [TaskTemplate("Look at this picture.", 2, 0.2)]
    assert mine_templates(instructions, min_fraction=0.21, min_count=1) == []


def test_sorted_by_count_then_sentence_and_top_k():
    instructions = [["Bravo bravo bravo. Alpha alpha alpha. Charlie charlie charlie."]] * 2 + [
        ["Delta delta delta."]
    ] * 3
    everything = mine_templates(instructions, min_fraction=0.0, min_count=1)
    assert [t.sentence for t in everything] == [
        "Delta delta delta.",
        "Alpha alpha alpha.",
        "Bravo bravo bravo.",
        "Charlie charlie charlie.",
    ]
    assert mine_templates(instructions, min_fraction=0.0, min_count=1, top_k=2) == everything[:2]
    assert mine_templates(instructions, min_fraction=0.0, min_count=1, top_k=0) == []


def test_min_words():
    instructions = [["Yes. Why not? Is it red? ?"]] * 20
    assert [t.sentence for t in mine_templates(instructions)] == ["Is it red?"]
    assert DEFAULT_MIN_WORDS == 3
    assert [t.sentence for t in mine_templates(instructions, min_words=2)] == ["Is it red?", "Why not?"]
    # "?" holds no word at all; each CJK character counts as a word.
    assert [t.sentence for t in mine_templates(instructions, min_words=1)] == ["Is it red?", "Why not?", "Yes."]
    assert [t.sentence for t in mine_templates([["是吗？"]] * 20)] == []
    assert [t.sentence for t in mine_templates([["是不是？"]] * 20)] == ["是不是？"]


def test_defaults_on_llava_mix_shaped_data():
    # 2,000 samples: the short-answer sentence in a third, the option-letter one
    # in 3%, the caption prompt in 1%; region prompts vary with their box; an
    # ordinary question repeats in 0.1%; everything else is distinct.
    instructions = []
    for i in range(2000):
        turns = [f"<image>\nWhat is object number {i}?"]
        if i % 3 == 0:
            turns.append(f"Where is the thing {i}?\n{SHORT}")
        if i % 33 == 0:
            turns.append(f"Which one?\nA. cat\nB. dog\n{OPTION}")
        if i % 100 == 0:
            turns.append(CAPTION)
        if i % 10 == 0:
            turns.append(f"Please provide a short description for this region: [0.{i:04d}, 0.25, 0.5, 0.75].")
        if i in (7, 8):
            turns.append("What is the man doing?")
        instructions.append(turns)
    assert (DEFAULT_MIN_FRACTION, DEFAULT_MIN_COUNT) == (0.005, 10)
    assert mine_templates(instructions) == [
        TaskTemplate(SHORT, 667, 667 / 2000),
        TaskTemplate(OPTION, 61, 61 / 2000),
        TaskTemplate(CAPTION, 20, 0.01),
    ]


def test_min_count_guards_small_datasets():
    # 0.5% of 40 samples is one sample; a sentence seen in 9 of them is still
    # below the default count of 10.
    instructions = [["Tell me about it please."]] * 9 + [[f"Item {i} here."] for i in range(31)]
    assert mine_templates(instructions) == []
    assert mine_templates(instructions + [["Tell me about it please."]]) == [
        TaskTemplate("Tell me about it please.", 10, 10 / 41)
    ]


def test_unicode_sentences_are_mined():
    template = "请用一个词或短语回答问题。"
    instructions = [[f"<image>\n第{i}张图里有什么？{template}"] for i in range(20)]
    assert mine_templates(instructions) == [TaskTemplate(template, 20, 1.0)]


def test_mine_empty_and_bad_settings():
    assert mine_templates([]) == []
    assert mine_templates(iter([[SHORT]] * 10)) == [TaskTemplate(SHORT, 10, 1.0)]
    with pytest.raises(ValueError, match="min_fraction = 1.5"):
        mine_templates([[SHORT]], min_fraction=1.5)
    with pytest.raises(ValueError, match="min_count = 0"):
        mine_templates([[SHORT]], min_count=0)
    with pytest.raises(ValueError, match="top_k = -1"):
        mine_templates([[SHORT]], top_k=-1)
    with pytest.raises(ValueError, match="min_words = -1"):
        mine_templates([[SHORT]], min_words=-1)


@pytest.mark.parametrize("n", [200, 1000])
def test_synthetic_set_yields_exactly_its_template_sentences(tmp_path, n):
    synthetic.generate(tmp_path, n=n, seed=0)
    records = json.loads((tmp_path / "train.json").read_text(encoding="utf-8"))
    instructions = [[turn["value"] for turn in r["conversations"] if turn["from"] == "human"] for r in records]
    mined = mine_templates(instructions)
    assert {t.sentence for t in mined} == set(synthetic.TEMPLATE_SENTENCES)


# ---------------------------------------------------------------- user edits

MINED = [TaskTemplate(SHORT, 30, 0.3), TaskTemplate(OPTION, 5, 0.05)]


def test_apply_edits_remove_and_add():
    edited = apply_edits(MINED, add=["  Answer   briefly, please. ", SHORT], remove=[OPTION, "Not mined at all."])
    assert edited == [TaskTemplate(SHORT, 30, 0.3), TaskTemplate("Answer briefly, please.", 0, 0.0)]


def test_apply_edits_removal_wins_and_nothing_changes_without_edits():
    assert apply_edits(MINED, add=[OPTION], remove=[OPTION]) == [MINED[0]]
    assert apply_edits(MINED) == MINED
    assert apply_edits([], add=["Décris l'image."]) == [TaskTemplate("Décris l'image.", 0, 0.0)]


@pytest.mark.parametrize("bad", ["", "   ", "<image>", "Answer briefly. Use one word.", "Look at\nthis."])
def test_apply_edits_rejects_anything_but_one_sentence(bad):
    with pytest.raises(ValueError, match="exactly one sentence"):
        apply_edits(MINED, add=[bad])


# ---------------------------------------------------------------- templates.json

SETTINGS = {"min_fraction": 0.005, "min_count": 10, "min_words": 3, "top_k": 50, "add": [], "remove": []}


def test_save_load_round_trip(tmp_path):
    path = tmp_path / "run" / "templates.json"
    templates = MINED + [TaskTemplate("请用一个词或短语回答问题。", 0, 0.0)]
    save_templates(path, templates, SETTINGS)
    assert load_templates(path) == templates
    on_disk = json.loads(path.read_text(encoding="utf-8"))
    assert on_disk["settings"] == SETTINGS
    assert on_disk["templates"][0] == {"sentence": SHORT, "count": 30, "fraction": 0.3}
    assert "请用一个词或短语回答问题。" in path.read_text(encoding="utf-8")


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "templates.json"
    save_templates(path, MINED, SETTINGS)
    before = path.read_bytes()

    with pytest.raises(TypeError):  # a setting json cannot encode
        save_templates(path, MINED[:1], {"min_fraction": object()})
    assert path.read_bytes() == before

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        save_templates(path, MINED[:1], SETTINGS)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["templates.json"]  # no temp file left behind


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"settings": {}}', "'templates' must be a list"),
        ('{"settings": {}, "templates": [{"sentence": "Hi there you."}]}', r"templates\[0\]"),
        ('{"templates": [{"sentence": "A b c.", "count": "many", "fraction": 0.1}]}', r"templates\[0\]"),
    ],
)
def test_load_rejects_malformed_files(tmp_path, content, message):
    path = tmp_path / "templates.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_templates(path)
