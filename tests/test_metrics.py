import json
import math
import re

import pytest

from l2t.metrics import (
    caption_scores,
    hallucination_rate,
    normalize_answer,
    parse_yes_no,
    pope_scores,
    ptb_tokenize,
    visual_contribution_summary,
    vqa_accuracy,
)

# Three images with distinct captions, each at least 4 words long, so every
# image has 1- to 4-grams that no other image's references contain.
CAPTIONS = [
    "a man rides a red bike down the street",
    "two dogs play with a ball on the grass",
    "a plate of food with broccoli and rice",
]


def assert_plain_json(value):
    """Only Python builtins all the way down: no numpy scalars, no NaN."""
    json.dumps(value, allow_nan=False)
    if isinstance(value, dict):
        for item in value.values():
            assert_plain_json(item)
    elif isinstance(value, list):
        for item in value:
            assert_plain_json(item)
    else:
        assert type(value) in (float, int, bool, str, type(None)), type(value)


# --- tokenizer ------------------------------------------------------------

def test_ptb_tokenize_lowercases_splits_clitics_and_drops_punctuation():
    assert ptb_tokenize('A dog\'s ball (red), "Can\'t" stop -- 3.5 well-known...') == [
        "a", "dog", "'s", "ball", "red", "ca", "n't", "stop", "3.5", "well-known",
    ]


# --- captions -------------------------------------------------------------

def test_bleu4_of_identical_sentence_is_one():
    scores = caption_scores(["A man rides a red bike."], [["a man rides a red bike"]])
    # 1 - 4e-10 from pycocoevalcap's 1e-15 / 1e-9 smoothing of each precision.
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["bleu4_per_sample"] == [pytest.approx(1.0, abs=1e-6)]


def test_bleu4_without_a_4gram_match_is_smoothed_to_almost_zero():
    # All four unigrams match, no bigram does: p2 = p3 = p4 = 1e-15 / count,
    # and the scorer returns 3.6e-12 rather than exactly 0.
    scores = caption_scores(["dog a fast runs"], [["a dog runs fast"]])
    assert 0.0 < scores["bleu4"] < 1e-10


def test_bleu4_with_brevity_penalty_by_hand():
    # hypothesis "the cat sat on a mat" (6 words), reference of 7 words.
    # clipped matches / candidate n-grams:
    #   1-grams the cat sat on mat         5 / 6
    #   2-grams the-cat cat-sat sat-on     3 / 5
    #   3-grams the-cat-sat cat-sat-on     2 / 4
    #   4-grams the-cat-sat-on             1 / 3
    # brevity penalty exp(1 - 7/6)
    expected = math.exp(1 - 7 / 6) * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** (1 / 4)
    scores = caption_scores(["The cat sat on a mat."], [["the cat sat on the mat today"]])
    assert expected == pytest.approx(0.454802, abs=1e-6)
    assert scores["bleu4"] == pytest.approx(expected, rel=1e-6)
    assert scores["bleu4_per_sample"][0] == pytest.approx(expected, rel=1e-6)


def test_bleu4_corpus_level_is_not_mean_of_samples():
    # Corpus BLEU pools n-gram counts and lengths: the empty caption adds its
    # reference length (9 words) to the brevity penalty of the whole corpus.
    scores = caption_scores(["", CAPTIONS[1]], [[CAPTIONS[0]], [CAPTIONS[1]]])
    assert scores["bleu4_per_sample"] == [0.0, pytest.approx(1.0, abs=1e-6)]
    assert scores["bleu4"] == pytest.approx(math.exp(1 - 18 / 9), rel=1e-6)


def test_cider_d_of_candidates_equal_to_their_references_is_ten():
    # Each per-n cosine similarity is 1 and pycocoevalcap multiplies by 10;
    # the number of references per image does not change it.
    for references_per_image in (1, 3):
        scores = caption_scores(CAPTIONS, [[c] * references_per_image for c in CAPTIONS])
        assert scores["cider_d"] == pytest.approx(10.0)
        assert scores["cider_d_per_sample"] == [pytest.approx(10.0)] * 3


def test_cider_d_orders_identical_over_partial_over_unrelated():
    references = [[c, c.replace("a ", "one ", 1)] for c in CAPTIONS]

    def first_image_score(prediction):
        return caption_scores([prediction, *CAPTIONS[1:]], references)["cider_d_per_sample"][0]

    identical = first_image_score(CAPTIONS[0])
    partial = first_image_score("a man rides a bike")
    unrelated = first_image_score("a cat sleeps on a sofa")
    assert identical > partial > unrelated
    assert unrelated == 0.0


def test_cider_d_of_a_single_image_is_zero():
    # idf = log(number of images) - log(document frequency) = log 1 - log 1.
    scores = caption_scores([CAPTIONS[0]], [[CAPTIONS[0]]])
    assert scores["cider_d"] == 0.0


def test_empty_predictions_score_zero():
    scores = caption_scores(["", "...", CAPTIONS[2]], [[c] for c in CAPTIONS])
    assert scores["cider_d_per_sample"] == [0.0, 0.0, pytest.approx(10.0)]
    assert scores["bleu4_per_sample"][:2] == [0.0, 0.0]
    assert scores["cider_d"] == pytest.approx(10.0 / 3)
    assert_plain_json(scores)


def test_caption_scores_rejects_missing_references():
    with pytest.raises(ValueError, match=r"references\[1\]"):
        caption_scores(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="2 predictions but 1"):
        caption_scores(["a", "b"], [["a"]])


# --- VQA ------------------------------------------------------------------

@pytest.mark.parametrize(
    ("answer", "normalized"),
    [
        ("Two.", "2"),
        ("The Red", "red"),
        ("  an   apple!  ", "apple"),
        ("3.5", "3.5"),
        ("1,000", "1000"),
        ("t-shirt", "t shirt"),
    ],
)
def test_normalize_answer(answer, normalized):
    assert normalize_answer(answer) == normalized


def test_vqa_accuracy():
    scores = vqa_accuracy(
        ["Two.", "The Red", "blue", "a cat"],
        ["2", "red", "green", ["dog", "cat"]],
    )
    assert scores["correct_per_sample"] == [True, True, False, True]
    assert scores["accuracy"] == 0.75
    assert_plain_json(scores)


# --- POPE -----------------------------------------------------------------

def test_parse_yes_no():
    assert parse_yes_no("Yes, there is a dog.") == "yes"
    assert parse_yes_no('"No."') == "no"
    assert parse_yes_no("Yesterday") is None
    assert parse_yes_no("I think yes") is None
    assert parse_yes_no("") is None


def test_pope_scores_by_hand():
    predictions = [
        "Yes.", "no", "Yes, there is a dog.", "No, there isn't.", "I am not sure.", "yes",
    ]
    answers = ["yes", "yes", "no", "no", "yes", "yes"]
    # parsed     yes    no    yes   no    -     yes
    # outcome    TP     FN    FP    TN    FN    TP   (unparsed counts as not "yes")
    scores = pope_scores(predictions, answers)
    assert scores["parsed_per_sample"] == ["yes", "no", "yes", "no", None, "yes"]
    assert scores["correct_per_sample"] == [True, False, False, True, False, True]
    assert scores["no_answer"] == 1
    assert scores["accuracy"] == pytest.approx(3 / 6)
    assert scores["precision"] == pytest.approx(2 / 3)   # TP / (TP + FP)
    assert scores["recall"] == pytest.approx(2 / 4)      # TP / (TP + FN)
    assert scores["f1"] == pytest.approx(4 / 7)          # 2 * 2/3 * 1/2 / (2/3 + 1/2)
    assert scores["yes_ratio"] == pytest.approx(3 / 6)
    assert_plain_json(scores)


def test_pope_scores_without_positive_predictions_are_zero_not_nan():
    scores = pope_scores(["no", "no"], ["yes", "no"])
    assert (scores["precision"], scores["recall"], scores["f1"]) == (0.0, 0.0, 0.0)


def test_pope_scores_rejects_gold_answers_other_than_yes_no():
    with pytest.raises(ValueError, match=r"answers\[0\]"):
        pope_scores(["yes"], ["maybe"])


# --- CHAIR ----------------------------------------------------------------

def test_hallucination_rate_by_hand():
    objects = {"dog", "cat", "car", "tree"}

    def parse_objects(text):
        return {word for word in re.findall(r"[a-z]+", text.lower()) if word in objects}

    scores = hallucination_rate(
        ["A dog and a cat.", "A car near a tree, a car.", "A dog.", "An empty field."],
        [{"dog"}, {"car", "tree"}, {"cat"}, {"tree"}],
        parse_objects,
    )
    # mentioned: {cat, dog} {car, tree} {dog} {}  -> 5 mentions
    # not present: {cat}    {}          {dog} {}  -> 2 in 2 of 4 captions
    assert scores["mentioned_per_sample"] == [["cat", "dog"], ["car", "tree"], ["dog"], []]
    assert scores["hallucinated_per_sample"] == [["cat"], [], ["dog"], []]
    assert scores["chair_s"] == pytest.approx(2 / 4)
    assert scores["chair_i"] == pytest.approx(2 / 5)
    assert_plain_json(scores)


def test_hallucination_rate_with_tuple_objects():
    # The synthetic dataset names objects as (color, shape) pairs.
    def parse_objects(text):
        return set(re.findall(r"(red|blue) (circle|square)", text))

    scores = hallucination_rate(
        ["a red circle and a blue square"], [{("red", "circle")}], parse_objects
    )
    assert scores["mentioned_per_sample"] == [[["blue", "square"], ["red", "circle"]]]
    assert scores["hallucinated_per_sample"] == [[["blue", "square"]]]
    assert scores["chair_i"] == pytest.approx(1 / 2)
    assert_plain_json(scores)


def test_hallucination_rate_without_mentions_is_zero():
    scores = hallucination_rate(["a field"], [{"tree"}], lambda text: set())
    assert (scores["chair_s"], scores["chair_i"]) == (0.0, 0.0)


# --- visual contribution ----------------------------------------------------

def test_visual_contribution_summary_by_hand():
    summary = visual_contribution_summary([[1.0, 3.0], [-2.0], [0.5, 0.5, 1.0]])
    # pooled tokens: 1, 3, -2, 0.5, 0.5, 1 -> sum 4 over 6 tokens
    assert summary["mean_per_token"] == pytest.approx(4 / 6)
    # sums per sample: 4, -2, 2
    assert summary["sum_per_sample"] == [4.0, -2.0, 2.0]
    assert summary["mean_per_sequence"] == pytest.approx(4 / 3)
    # sorted: -2, 0.5, 0.5, 1, 1, 3
    assert summary["median_per_token"] == pytest.approx(0.75)
    # squared deviations from 2/3, in 36ths: 4 + 196 + 256 + 1 + 1 + 4 = 462; / 6
    assert summary["std_per_token"] == pytest.approx(math.sqrt(462 / 36 / 6))
    assert (summary["num_tokens"], summary["num_sequences"]) == (6, 3)
    # 20 bins of width 0.25 from -2 to 3; the last bin includes its right edge.
    histogram = summary["histogram"]
    assert histogram["bin_edges"] == pytest.approx([-2 + 0.25 * i for i in range(21)])
    assert histogram["counts"] == [1] + [0] * 9 + [2, 0, 2] + [0] * 6 + [1]
    assert_plain_json(summary)


def test_visual_contribution_summary_counts_empty_answers_as_zero():
    summary = visual_contribution_summary([[2.0], []])
    assert summary["mean_per_sequence"] == pytest.approx(1.0)
    assert summary["mean_per_token"] == pytest.approx(2.0)


def test_visual_contribution_summary_rejects_non_finite_values():
    with pytest.raises(ValueError, match=r"per_token\[1\]"):
        visual_contribution_summary([[0.0], [float("-inf")]])
    with pytest.raises(ValueError, match="every sample is empty"):
        visual_contribution_summary([[], []])
