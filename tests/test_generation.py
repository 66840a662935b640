import pytest

from l2t import chat, generation, runs
from l2t.images import ImageSource
from l2t.synthetic import bundled_dir


@pytest.fixture(scope="module")
def loaded(trained_run):
    return generation.load_run(runs.open_trained_run(trained_run))


def test_caption_pair_base_answer_is_the_model_with_its_adapter_disabled(loaded):
    model, encoder = loaded
    image = ImageSource(bundled_dir()).open("images/test_00000.png")
    prompt = "Describe the image briefly."
    before, after = generation.caption_pair(model, encoder, image, prompt)
    messages = [{"role": "user", "content": chat.IMAGE + prompt}]
    with model.disable_adapter():
        expected_before = generation.generate(model, encoder, [(messages, [image])])[0]
    expected_after = generation.generate(model, encoder, [(messages, [image])])[0]
    assert isinstance(before, str) and isinstance(after, str)
    assert (before, after) == (expected_before, expected_after)
    assert before != after
