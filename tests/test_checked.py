"""Checked samples as Arrow rows: the same samples and report as a plain load, template mining
streamed from the rows with exactly the same counts, a cache reused while the data is unchanged,
and the held-out split of a run as before."""

import json
import random

import pytest

from l2t import checked, templates
from l2t.checked import SampleRows, checked_rows
from l2t.config import load_config
from l2t.data import DataError, load_samples
from l2t.prepare import prepare_data, split_held_out
from l2t.templates import mine_templates, mine_templates_twice, mine_with_settings

PROMPTS = ["Answer the question using a single word or phrase.", "Answer  with the option's letter\tfrom the given choices directly.",
           "Provide a one-sentence caption for the provided image.", "What is this?"]  # fmt: skip


def llava_mix_like(path, n: int, seed: int = 0) -> str:
    """Text-only LLaVA records: fixed prompts (one with irregular spaces), multi-turn questions, free-form ones, a few bad records."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        turns = []
        for _ in range(rng.randint(1, 3)):
            question = f"How many {rng.choice(['dogs', 'cats', 'cars'])} are {rng.choice(['here', 'there'])}? {rng.choice(PROMPTS)}"
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": str(rng.randint(0, 9))}]
        records.append({"id": f"s{i}", "conversations": turns, "source": "synthetic"})
    records[5]["conversations"] = records[5]["conversations"][:1]  # no answer
    records[9] = "not an object"
    path.write_text(json.dumps(records, indent=1))
    return path


def config_for(tmp_path, data, *overrides):
    return load_config("tinyllava", overrides=[f"data.path={data}", f"data.cache={tmp_path / 'cache'}", "train.eval_fraction=0.1", *overrides])


def test_rows_hold_the_same_samples_and_report_as_a_plain_load(tmp_path, shapes_dir, monkeypatch):
    monkeypatch.setattr(checked, "READ_BATCH", 7)  # rows are written a batch at a time: every batch is kept
    said = []
    rows, report, images, _ = checked_rows(config_for(tmp_path, shapes_dir / "train.json"), shapes_dir / "train.json", shapes_dir, say=said.append)
    samples, plain = load_samples(shapes_dir / "train.json")
    assert isinstance(rows, SampleRows) and len(rows) == len(samples)
    assert rows[:] == samples and rows[-1] == samples[-1]
    assert report.to_dict() == plain.to_dict()
    assert images.open(rows[0].images[0]).size == (64, 64)


def test_streamed_mining_counts_exactly_as_mining_a_list(tmp_path, monkeypatch):
    monkeypatch.setattr(checked, "READ_BATCH", 700)  # several record batches, each read in turn
    data = llava_mix_like(tmp_path / "mix.json", 3000)
    rows, report, _, _ = checked_rows(config_for(tmp_path, data), data, None, say=lambda _: None)
    samples, _ = load_samples(data)
    assert report.total == 3000 and report.ok == 2998 and {p.code for p in report.problems} == {"no_final_response", "not_an_object"}
    everything = {"min_fraction": 0.0, "min_count": 1, "top_k": 10**6, "min_words": 0}
    streamed = mine_templates(rows.instructions(), **everything)
    assert streamed == mine_templates([s.instructions() for s in samples], **everything)
    assert len(streamed) == 6 + len(PROMPTS)  # every sentence with its count: 6 questions, 4 prompts
    by_sentence = {t.sentence: t.count for t in streamed}
    assert by_sentence["Answer with the option's letter from the given choices directly."] > 100  # normalised whitespace


def test_a_run_prepares_the_split_and_templates_it_did_from_lists(tmp_path):
    data = llava_mix_like(tmp_path / "mix.json", 1000)
    config = config_for(tmp_path, data)
    prepared = prepare_data(config, say=lambda _: None)
    samples, _ = load_samples(data)
    train, held_out = split_held_out(samples, 0.1, 200, config.train.seed)
    assert prepared.train[:] == train and prepared.held_out == held_out
    assert prepared.templates == mine_with_settings([s.instructions() for s in train], config.templates)
    assert prepared.train.ids() == [s.id for s in train]


def test_the_check_is_cached_until_the_data_changes(tmp_path):
    data = llava_mix_like(tmp_path / "mix.json", 200)
    said = []
    config = config_for(tmp_path, data)
    first = checked_rows(config, data, None, say=said.append)
    second = checked_rows(config, data, None, say=said.append)
    assert said == [f"checked data: reusing the cache {tmp_path / 'cache' / 'checked' / first[3]}"] and first[3] == second[3]
    assert second[0][:] == first[0][:] and second[1].to_dict() == first[1].to_dict()
    llava_mix_like(data, 200, seed=1)
    third = checked_rows(config, data, None, say=said.append)
    assert third[3] != first[3] and third[0][0] != first[0][0]


def test_strict_mode_stops_from_the_cache_too_and_a_failed_check_leaves_no_cache(tmp_path):
    data = llava_mix_like(tmp_path / "mix.json", 50)
    checked_rows(config_for(tmp_path, data), data, None, say=lambda _: None)
    with pytest.raises(DataError, match=r"2 bad sample\(s\) \(strict mode\)"):
        checked_rows(config_for(tmp_path, data, "data.strict=true"), data, None, say=lambda _: None)
    broken = tmp_path / "broken.json"
    broken.write_text(data.read_text()[:-200])
    with pytest.raises(DataError, match=r"\[invalid_json\]"):
        checked_rows(config_for(tmp_path, broken), broken, None, say=lambda _: None)
    assert len(list((tmp_path / "cache" / "checked").iterdir())) == 1  # the first file's, and no torn one


def test_mined_templates_are_kept_per_split_and_settings(tmp_path):
    data = llava_mix_like(tmp_path / "mix.json", 1000)
    first = prepare_data(config_for(tmp_path, data), say=lambda _: None)
    [kept] = (tmp_path / "cache" / "checked").glob("*/templates-*.json")
    assert [t["sentence"] for t in json.loads(kept.read_text())["templates"]] == [t.sentence for t in first.templates]
    assert prepare_data(config_for(tmp_path, data), say=lambda _: None).templates == first.templates
    fewer = prepare_data(config_for(tmp_path, data, "templates.top_k=1"), say=lambda _: None)
    assert fewer.templates == first.templates[:1]
    other_split = prepare_data(config_for(tmp_path, data, "train.seed=3"), say=lambda _: None)
    samples, _ = load_samples(data)
    train, _ = split_held_out(samples, 0.1, 200, 3)
    assert other_split.templates == mine_with_settings([s.instructions() for s in train], config_for(tmp_path, data).templates)
    assert len(list((tmp_path / "cache" / "checked").glob("*/templates-*.json"))) == 3


@pytest.mark.parametrize("buckets", [1, 7, 1 << 22])
@pytest.mark.parametrize("settings", [{}, {"min_fraction": 0.0, "min_count": 1, "top_k": 10**6, "min_words": 0}, {"min_fraction": 0.2, "min_count": 50}])
def test_mining_in_two_passes_finds_the_same_templates_and_counts(tmp_path, monkeypatch, buckets, settings):
    """Few buckets force collisions: sentences that share one with a template are counted too, and dropped by the same rule."""
    monkeypatch.setattr(templates, "HASH_BUCKETS", buckets)
    rng = random.Random(1)  # thousands of distinct sentences, a few common ones, counts all around the thresholds
    records = [{"conversations": [{"from": "human", "value": f"Where is object {int(rng.paretovariate(0.7))}? {rng.choice(PROMPTS)}"},
                                  {"from": "gpt", "value": "Here."}]} for _ in range(2000)]  # fmt: skip
    data = tmp_path / "mix.json"
    data.write_text(json.dumps(records))
    rows, _, _, _ = checked_rows(config_for(tmp_path, data), data, None, say=lambda _: None)
    assert mine_templates_twice(rows.instructions, **settings) == mine_templates(rows.instructions(), **settings)
    assert len(mine_templates(rows.instructions(), min_fraction=0.0, min_count=1, min_words=0, top_k=10**6)) > 100
