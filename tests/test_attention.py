"""Where the model looks: attention shares per answer token, the evaluation's summary and --attention charts."""

import json

import numpy as np
import pytest
from conftest import copy_run

from l2t import attention, evaluate, generation, runs
from l2t.data import load_samples
from l2t.images import ImageSource
from l2t.synthetic import bundled_dir


@pytest.fixture(scope="module")
def item():
    samples, _ = load_samples(bundled_dir() / "test.json", bundled_dir())
    items, _ = evaluate.load_test_items(samples[:20], ImageSource(bundled_dir()))
    return next(i for i in items if i.kind == "short_answer")


def test_the_four_shares_of_every_answer_token_sum_to_one(loaded, item):
    model, encoder = loaded
    for context in (generation.base_model_context(model), np.errstate()):
        with context:
            seen = attention.looking(model, encoder, item.messages, item.reference, item.images)
        assert set(seen.shares) == {"image", "instruction", "system", "response"}
        totals = np.sum([seen.shares[name] for name in attention.SHARES], axis=0)
        assert totals == pytest.approx(np.ones(len(seen.tokens)), abs=1e-4)
        assert seen.tokens[-1] == "</s>" and len(seen.tokens) >= 2
        assert seen.patches.shape == (len(seen.tokens), 16)  # the tiny model's 4x4 patches
        assert seen.patches.sum(1) == pytest.approx(seen.shares["image"], abs=1e-5)
        assert 0 < min(seen.shares["image"])  # it does look at the image
    # eager attention was for that pass alone
    assert model.get_base_model().config._attn_implementation == "sdpa"


def test_patch_grid():
    assert attention.patch_grid(16) == (4, 4) and attention.patch_grid(576) == (24, 24)
    assert attention.patch_grid(10) is None


def test_evaluate_reports_the_image_share_and_draws_one_sample(trained_run, tmp_path, item):
    run = copy_run(trained_run, tmp_path / "tiny-l2t")
    assert evaluate.main([str(run), "--n", "12", "--attention", "--attention-sample", item.id, "--attention-layers", "1"]) == 0
    report = json.loads((run / runs.EVAL / runs.EVAL_REPORT).read_text())
    shares = [m["metrics"]["attention"]["image_share"] for m in report["models"]]
    assert all(0 < share < 1 for share in shares)
    study = report["attention"]
    assert study["sample"] == item.id and study["layers"] == 1
    assert [m["name"] for m in study["models"]] == ["base", "tiny-l2t"]
    for model in study["models"]:
        assert model["answer"] == report["samples"][report["sample_ids"].index(item.id)]["answers"][model["name"]]
        assert len(model["shares"]["image"]) == len(model["tokens"]) == len(model["patches"])
    for chart in (runs.ATTENTION_CHART, runs.ATTENTION_MAP):
        assert (run / runs.EVAL / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Attention on the image" in (run / runs.EVAL / runs.EVAL_MARKDOWN).read_text()


def test_an_unknown_attention_sample_is_refused(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path / "tiny-l2t")
    assert evaluate.main([str(run), "--n", "4", "--attention", "--attention-sample", "no-such-sample"]) == 1
    assert "--attention-sample no-such-sample" in capsys.readouterr().err
