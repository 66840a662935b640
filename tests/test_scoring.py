import pytest

from l2t import evaluate, scoring


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
    items = [evaluate.EvalItem("a", "caption", [], "", [], ["dog", "frisbee"]), evaluate.EvalItem("b", "caption", [], "", [], ["cat"])]
    parse = scoring.object_parser(items)
    assert parse("Two Dogs chase a frisbee; no cats, no doghouse.") == {"dog", "frisbee", "cat"}
    assert scoring.ground_truth_objects(["Dog"]) == {"dog"}
    assert scoring.ground_truth_objects([{"color": "red", "shape": "circle", "size": "small"}]) == {("red", "circle")}
