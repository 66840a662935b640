import pytest

from l2t import scoring
from l2t.answers import ModelAnswers


@pytest.mark.parametrize(
    ("reference", "has_image", "kind"),
    [
        ("Yes", True, "yes_no"),
        ("No, there is not.", True, "yes_no"),
        ("left", True, "short_answer"),
        ("two red circles", True, "short_answer"),
        ("A large red circle at the top, on a gray background.", True, "caption"),
        ("A small circle can be red, green, blue or yellow.", False, "text_only"),
    ],
)
def test_sample_kind_is_read_off_the_reference(reference, has_image, kind):
    assert scoring.sample_kind(reference, has_image) == kind


def test_named_objects_are_parsed_as_whole_words():
    items = [scoring.EvalItem("a", "caption", [], "", [], ["dog", "frisbee"]), scoring.EvalItem("b", "caption", [], "", [], ["cat"])]
    parse = scoring.object_parser(items)
    assert parse("Two Dogs chase a frisbee; no cats, no doghouse.") == {"dog", "frisbee", "cat"}
    assert scoring.ground_truth_objects(["Dog"]) == {"dog"}
    assert scoring.ground_truth_objects([{"color": "red", "shape": "circle", "size": "small"}]) == {("red", "circle")}


def _item(reference: str, question_type: str, kind: str = "short_answer"):
    return scoring.EvalItem("x", kind, [], reference, [], [], question_type)


def test_question_scores_are_exact_match_per_type_beside_the_majority_answer():
    items = [
        _item("red", "color"), _item("red", "color"), _item("blue", "color"),
        _item("2", "count"), _item("1", "count"),
        _item("Yes", "yes_no", "yes_no"), _item("No", "yes_no", "yes_no"), _item("No", "yes_no", "yes_no"),
    ]  # fmt: skip
    answers = ["red", "The circle is red.", "blue", "two", "2", "yes", "No", "Yes"]
    scores = scoring.question_scores(items, answers)
    # "two" normalises to "2"; "The circle is red." is right about the image but not an exact answer.
    assert scores["exact_per_sample"] == [True, False, True, True, False, True, True, False]
    assert scores["exact_match"] == 5 / 8
    assert scores["by_type"]["color"] == {
        "samples": 3, "exact_match": 2 / 3, "majority_answer": "red", "majority_baseline": 2 / 3, "content_accuracy": 1.0,
    }  # fmt: skip
    assert scores["by_type"]["count"]["majority_baseline"] == 1 / 2
    assert scores["by_type"]["yes_no"]["majority_answer"] == "no"
    assert scores["majority_baseline"] == (2 + 1 + 2) / 8
    # content: red, red (any wording), blue; 2, 1 vs "2"; yes, no, yes vs no
    assert scores["content_accuracy"] == (3 + 1 + 2) / 8


def test_questions_of_user_data_get_exact_match_and_no_content_accuracy():
    items = [_item("a cat", "short_answer"), _item("a dog", "short_answer")]
    scores = scoring.question_scores(items, ["cat", "A cat"])
    assert scores["exact_match"] == 0.5  # the VQA normalisation drops articles: "cat" matches "a cat"
    assert "content_accuracy" not in scores and "content_accuracy" not in scores["by_type"]["short_answer"]


def test_yes_no_summary_has_the_constant_answer_baselines():
    items = [_item(r, "yes_no", "yes_no") for r in ("Yes", "Yes", "Yes", "No")]
    result = ModelAnswers("m", ["Yes"] * 4, [None] * 4, [None] * 4, 0.0)
    summary, _ = scoring.score_answers(items, result)
    assert summary["yes_no"]["always_yes_accuracy"] == 0.75 == summary["yes_no"]["accuracy"]
    assert summary["yes_no"]["always_no_accuracy"] == 0.25
    assert summary["yes_no"]["best_constant_accuracy"] == 0.75


def test_caption_main_object_accuracy_reads_the_first_named_object():
    objects = [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"}]
    items = [scoring.EvalItem(str(i), "caption", [], "There is a red circle on the left and a blue square.", [], objects, "caption") for i in range(3)]
    answers = ["A red circle and a blue square.", "A blue square and a red circle.", "A green triangle."]
    result = ModelAnswers("m", answers, [None] * 3, [None] * 3, 0.0)
    summary, per_sample = scoring.score_answers(items, result)
    assert summary["caption"]["main_object_accuracy"] == 1 / 3
    assert [s["main_object_right"] for s in per_sample] == [True, False, False]
