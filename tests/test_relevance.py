"""Visual-relevance weights (loss mode l2t_relevance): what they are on the built-in model, the cache, the recipe."""

import json

import numpy as np
import pytest

from l2t import relevance
from l2t.config import load_config
from l2t.data import load_samples
from l2t.generation import pad_token_id
from l2t.images import ImageSource
from l2t.masking import IGNORE, Encoded, Encoder, Role, labels_and_weights
from l2t.models import load_base_model, source
from l2t.preview import mask_preview
from l2t.synthetic import TEMPLATE_SENTENCES, bundled_dir
from l2t.templates import TaskTemplate


@pytest.fixture(scope="module")
def setting(tiny_processor):
    config = load_config("tiny", overrides=["loss.mode=l2t_relevance"])
    samples, _ = load_samples(bundled_dir() / "train.json", bundled_dir())
    encoder = Encoder.from_config(config, tiny_processor, templates(TEMPLATE_SENTENCES))
    return config, samples, encoder, ImageSource(bundled_dir()), load_base_model(config.model, device="cpu")


def templates(sentences) -> list[TaskTemplate]:
    return [TaskTemplate(sentence, 1, 1.0) for sentence in sentences]


class CountingModel:
    """The base model, counting forward passes (a cached pass makes none)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, **inputs):
        self.calls += 1
        return self.model(**inputs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_labels_and_weights_scale_instruction_tokens_by_their_relevance():
    roles = np.array([Role.SYSTEM, Role.IMAGE, Role.INSTRUCTION, Role.INSTRUCTION, Role.TASK_TEMPLATE, Role.RESPONSE, Role.RESPONSE_END])
    encoded = Encoded(np.arange(10, 17), roles.astype(np.int8), relevance=np.array([0, 0, 0.25, 0.0, 0, 0, 0], dtype=np.float32))
    labels, weights = labels_and_weights(encoded, "l2t_relevance", instruction_weight=0.5, response_weight=2.0)
    assert weights.tolist() == [0, 0, 0.125, 0, 0, 2.0, 2.0]
    assert labels.tolist() == [IGNORE, IGNORE, 12, IGNORE, IGNORE, 15, 16]  # weight 0: out of the loss
    with pytest.raises(ValueError, match="relevance pass"):
        labels_and_weights(Encoded(encoded.input_ids, encoded.roles), "l2t_relevance")


def test_weights_on_the_built_in_model(setting):
    """'What color does the small triangle on the left have?': the image makes the words that name it likely."""
    config, samples, encoder, images, model = setting
    sample = next(s for s in samples if s.messages[0]["content"].startswith("<image>What color does the small triangle on the left"))
    weights = relevance.sample_weights(model, encoder.processor, encoder, sample, images, config.loss.relevance_nats)
    preview = mask_preview(encoder, sample, "l2t_relevance", weights)
    roles = [role for _, role, _ in preview.tokens]
    by_text = {text: w for (text, role, _), w in zip(preview.tokens, preview.weights, strict=True) if role == "instruction"}
    assert all(w == 0 for w, role in zip(preview.weights, roles, strict=True) if role in ("system", "image", "task_template"))
    assert all(0 <= w <= 1 for w, role in zip(preview.weights, roles, strict=True) if role == "instruction")
    content = [by_text[" small"], by_text[" triangle"]]
    function = [by_text["What"], by_text[" the"], by_text[" have"], by_text["?"]]
    assert min(content) > max(function) + 0.5


def test_text_only_samples_weigh_nothing(setting):
    config, samples, encoder, images, model = setting
    sample = next(s for s in samples if not s.images)
    assert not relevance.sample_weights(model, encoder.processor, encoder, sample, images, 1.0).any()


def test_the_pass_is_cached_resumed_and_invalidated(setting, tmp_path):
    config, samples, encoder, images, model = setting
    chosen = samples[: relevance.CHUNK + 20]  # two parts
    encoded = encoder.encode_many([(s.messages, s.image_sizes) for s in chosen])
    key = relevance.cache_key(source(config.model), encoded, chosen)
    counting = CountingModel(model)

    def run(enc, key):
        return relevance.relevance_pass(counting, encoder.processor, enc, chosen, images, pad_token_id(encoder.tokenizer), tmp_path, key, say=lambda _: None)

    first = run(encoded, key)
    computed = counting.calls
    assert computed > 0 and sorted(p.name for p in tmp_path.glob("part-*.npz")) == ["part-00000.npz", "part-00001.npz"]
    again = run(encoded, key)
    assert counting.calls == computed  # reused whole
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))

    (tmp_path / "part-00001.npz").unlink()  # interrupted before the last part was written
    run(encoded, key)
    assert 0 < counting.calls - computed < computed  # only the missing part

    other = Encoder.from_config(config, encoder.processor, templates(TEMPLATE_SENTENCES[:1]))  # other templates: other roles
    changed = other.encode_many([(s.messages, s.image_sizes) for s in chosen])
    new_key = relevance.cache_key(source(config.model), changed, chosen)
    assert new_key != key
    before = counting.calls
    run(changed, new_key)
    assert counting.calls - before == computed  # computed afresh
    assert json.loads((tmp_path / "key.json").read_text())["key"] == new_key


@pytest.mark.slow
def test_training_with_relevance_weights_writes_the_cache_and_says_what_it_weighs(tmp_path, capsys):
    from l2t.train import main

    run = tmp_path / "rel"
    assert main(["--preset", "tiny", "--output", str(run), "loss.mode=l2t_relevance", "train.max_steps=4", "train.preview_samples=0"]) == 0
    printed = capsys.readouterr().out
    assert "relevance: mean weight" in printed and "instruction tokens" in printed
    assert (run / "relevance" / "key.json").is_file() and list((run / "relevance").glob("part-*.npz"))
    assert (run / "adapter" / "adapter_config.json").is_file()


def test_the_command_draws_the_heat_map(capsys):
    assert relevance.main([str(bundled_dir() / "train.json"), "--preset", "tiny", "--index", "12"]) == 0
    printed = capsys.readouterr().out
    assert "' small'" in printed and "█" in printed
