import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import copy_run

from l2t import answers, evaluate, generation, runs
from l2t.data import load_samples
from l2t.images import ImageSource
from l2t.metrics import normalize_answer
from l2t.synthetic import bundled_dir

# With the projector zeroed, real and noise images give the same (zero) image
# features, so both passes see identical inputs.
ZERO_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def run_dir(trained_run, tmp_path_factory) -> Path:
    return copy_run(trained_run, tmp_path_factory.mktemp("eval") / "tiny-l2t")


@pytest.fixture(scope="module")
def training_items():
    """Caption and short-answer samples from the split the run was trained on."""
    samples, _ = load_samples(bundled_dir() / "train.json", bundled_dir())
    items, _ = evaluate.load_test_items(samples, ImageSource(bundled_dir()))
    return [item for item in items if item.kind in ("caption", "short_answer")][:48]


def test_noise_image_is_fixed_and_sized_like_the_image():
    first, second = answers.noise_image((64, 48)), answers.noise_image((64, 48))
    assert first.size == (64, 48) and first.mode == "RGB"
    assert first.tobytes() == second.tobytes()
    assert len(set(first.getdata())) > 1000


def test_both_kinds_of_visual_contribution_are_positive_for_the_tuned_model(loaded, training_items):
    from l2t.metrics import visual_contribution_summary

    model, encoder = loaded
    for per_token in answers.visual_contribution(model, encoder, training_items):
        summary = visual_contribution_summary(per_token)
        assert summary["num_sequences"] == len(training_items)
        assert summary["mean_per_token"] > 0.3  # the built-in base sees, and tuning keeps it looking


def test_visual_contribution_with_the_image_removed_is_the_log_prob_difference(loaded, training_items):
    """An independent computation on one item: two forward passes, the answer tokens' log-probabilities."""
    from l2t.chat import without_images
    from l2t.masking import labels_and_weights

    model, encoder = loaded
    item = training_items[0]

    def answer_log_probs(messages, pictures):
        encoded = encoder.encode([*messages, {"role": "assistant", "content": item.reference}], [p.size for p in pictures])
        labels = torch.from_numpy(labels_and_weights(encoded, "response")[0])
        inputs = {"input_ids": torch.from_numpy(encoded.input_ids)[None]}
        if pictures:
            inputs["pixel_values"] = encoder.processor.image_processor(images=pictures, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            logits = model(**inputs).logits[0, :-1].float().log_softmax(-1)
        answer = (labels[1:] != -100).nonzero().squeeze(1)
        return logits[answer, labels[1:][answer]]

    expected = answer_log_probs(item.messages, item.images) - answer_log_probs(without_images(item.messages), [])
    removed, _ = answers.visual_contribution(model, encoder, [item])
    assert removed[0] == pytest.approx(expected.tolist(), abs=1e-4)


def test_only_the_noise_kind_is_zero_when_the_vision_input_is_disconnected(trained_run, training_items):
    """With the projector zeroed every image gives the same features: a noise image changes nothing,
    while removing the image tokens still changes the input."""
    model, encoder = generation.load_run(runs.open_trained_run(trained_run))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "multi_modal_projector" in name:
                param.zero_()
    removed, noise = answers.visual_contribution(model, encoder, training_items[:16])
    with generation.base_model_context(model):
        base_removed, base_noise = answers.visual_contribution(model, encoder, training_items[:16])
    for per_token in (noise, base_noise):
        assert max(abs(v) for values in per_token for v in values) < ZERO_TOLERANCE
    for per_token in (removed, base_removed):
        assert max(abs(v) for values in per_token for v in values) > 100 * ZERO_TOLERANCE


def test_report_files_have_every_number_and_one_gallery_row_per_sample(run_dir, loaded):
    assert evaluate.main([str(run_dir), "--n", "12", "--max-new-tokens", "24"]) == 0
    eval_dir = run_dir / runs.EVAL
    report = json.loads((eval_dir / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["base", "tiny-l2t"]
    assert len(report["sample_ids"]) == 12 == sum(report["kinds"].values())
    tuned = report["models"][1]["metrics"]
    assert {"caption", "short_answer", "visual_contribution"} <= set(tuned)
    assert tuned["visual_contribution"]["num_sequences"] == 12 - report["kinds"]["text_only"]
    assert report["settings"]["max_new_tokens"] == 24 and report["versions"]["torch"] == torch.__version__
    page = (eval_dir / "report.html").read_text()
    assert page.count('<tr class="sample"') == 12
    assert all(f'id="{sample_id}"' in page for sample_id in report["sample_ids"])
    assert "http://" not in page and "https://" not in page
    assert page.count('src="data:image/png;base64,') == 12 - report["kinds"]["text_only"] + 2
    for chart in ("metrics.png", "visual_contribution.png"):
        assert (eval_dir / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (eval_dir / "report.md").read_text()
    assert "| metric | samples | base | tiny-l2t |" in table and "CIDEr-D" in table
    assert not list(eval_dir.glob("*.tmp"))

    # The answers, computed again here: the base model's column is the base model's.
    model, encoder = loaded
    samples, source, _ = evaluate.load_test_samples(runs.open_trained_run(run_dir), None, None)
    items, _ = evaluate.load_test_items(samples, source, 12)
    base, tuned_answers = generation.generate_pairs(model, encoder, [(item.messages, item.images) for item in items], 24)
    assert [s["answers"]["base"] for s in report["samples"]] == base
    assert [s["answers"]["tiny-l2t"] for s in report["samples"]] == tuned_answers
    assert base != tuned_answers
    # The numbers, counted again here from each model's answers and the references.
    short = [s for s in report["samples"] if s["kind"] == "short_answer"]
    questions = [s for s in report["samples"] if s["kind"] in ("short_answer", "yes_no")]
    assert short and len(questions) > len(short), "the first 12 held-out samples hold short-answer and yes/no questions"
    for entry in report["models"]:
        name, numbers = entry["name"], entry["metrics"]
        right = [normalize_answer(s["answers"][name]) == normalize_answer(s["reference"]) for s in questions]
        right_short = [r for r, s in zip(right, questions, strict=True) if s["kind"] == "short_answer"]
        assert numbers["short_answer"] == {"samples": len(short), "accuracy": sum(right_short) / len(short)}
        assert numbers["questions"]["samples"] == len(questions)
        assert numbers["questions"]["exact_match"] == pytest.approx(sum(right) / len(questions))
        assert numbers["caption"]["samples"] == report["kinds"]["caption"]
    assert report["models"][0]["metrics"]["short_answer"] != report["models"][1]["metrics"]["short_answer"]


def test_compare_puts_every_run_in_one_table(run_dir, response_run, tmp_path):
    """Two different runs in one table: each run's answers and numbers are the ones it gets when evaluated alone."""
    other = copy_run(response_run, tmp_path / "tiny-response")
    settings = ["--n", "6", "--max-new-tokens", "16"]
    alone = {}
    for folder in (run_dir, other):
        assert evaluate.main([str(folder), *settings]) == 0
        alone[folder.name] = json.loads((folder / runs.EVAL / "report.json").read_text())
    assert evaluate.main([str(run_dir), "--compare", str(other), *settings]) == 0
    report = json.loads((run_dir / runs.EVAL / "report.json").read_text())
    models = {m["name"]: m for m in report["models"]}
    assert list(models) == ["base", "tiny-l2t", "tiny-response"]
    assert models["base"]["metrics"] == alone["tiny-l2t"]["models"][0]["metrics"]
    for name, folder, mode in (("tiny-l2t", run_dir, "l2t"), ("tiny-response", other, "response")):
        own = alone[name]
        assert (models[name]["run_dir"], models[name]["loss_mode"]) == (str(folder.resolve()), mode)
        assert models[name]["metrics"] == own["models"][1]["metrics"], name
        for sample, own_sample in zip(report["samples"], own["samples"], strict=True):
            assert (sample["answers"][name], sample["scores"][name]) == (own_sample["answers"][name], own_sample["scores"][name])
    assert any(s["answers"]["tiny-l2t"] != s["answers"]["tiny-response"] for s in report["samples"]), "the runs must answer differently"
    assert "| metric | samples | base | tiny-l2t | tiny-response |" in (run_dir / runs.EVAL / "report.md").read_text()
    assert (run_dir / runs.EVAL / "report.html").read_text().count('<tr class="sample"') == 6


def test_a_run_without_an_adapter_is_refused(run_dir, tmp_path, capsys):
    unfinished = copy_run(run_dir, tmp_path / "unfinished", adapter=False)
    assert evaluate.main([str(unfinished)]) == 1
    error = capsys.readouterr().err
    assert f"{unfinished} has no adapter" in error and "Traceback" not in error


def test_a_test_file_without_usable_samples_is_refused(run_dir, tmp_path, capsys):
    bad = tmp_path / "test.json"
    bad.write_text(json.dumps([{"id": "q1", "conversations": [{"from": "human", "value": "Hi?"}]}, {"id": "q2"}]))
    assert evaluate.main([str(run_dir), "--data", str(bad)]) == 1
    error = capsys.readouterr().err
    assert str(bad) in error and "no usable samples" in error and "Traceback" not in error


def test_a_sample_whose_image_fails_to_load_is_skipped_with_a_note(run_dir, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    records = json.loads((bundled_dir() / "test.json").read_text())[:3]
    for record in records:
        shutil.copy(bundled_dir() / record["image"], images)
    (images / Path(records[1]["image"]).name).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    test_file = tmp_path / "test.json"
    test_file.write_text(json.dumps(records))
    assert evaluate.main([str(run_dir), "--data", str(test_file), "--max-new-tokens", "8"]) == 0
    assert f"skipping sample {records[1]['id']}" in capsys.readouterr().err
    report = json.loads((run_dir / runs.EVAL / "report.json").read_text())
    assert report["sample_ids"] == [records[0]["id"], records[2]["id"]]
    assert [note["sample"].split()[0] for note in report["skipped"]] == [records[1]["id"]]
    assert "not a readable image" in report["skipped"][0]["reason"]
    assert "## Skipped samples (1)" in (run_dir / runs.EVAL / "report.md").read_text()


@pytest.mark.slow
def test_the_command_exits_with_a_message_not_a_traceback(tmp_path):
    missing = tmp_path / "no-such-run"
    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-m", "l2t.evaluate", str(missing)], cwd=repo, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"error: run folder {missing} does not exist" in result.stderr
    assert "Traceback" not in result.stderr
