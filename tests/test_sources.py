"""Hugging Face datasets as a data source: save_to_disk folders, parquet and arrow files,
`hf:` specs; image columns of every kind; bad files and bad rows named like bad JSON samples;
each source trains the tiny preset end to end."""

import io
import json

import datasets
import pytest
from PIL import Image

from l2t.config import load_config
from l2t.data import DataError, load_data, load_samples, main
from l2t.sources import is_dataset, parse_hub_spec

SAMPLES = 12  # enough for a held-out sample and two training steps


def png(size=(8, 6), color=(255, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shapes(shapes_dir):
    """The first bundled samples as LLaVA records, each with its image's bytes."""
    records = json.loads((shapes_dir / "train.json").read_text())[:SAMPLES]
    return [{"id": r["id"], "conversations": r["conversations"], "bytes": (shapes_dir / r["image"]).read_bytes()} for r in records]


def llava_dataset(shapes) -> datasets.Dataset:
    rows = {"id": [r["id"] for r in shapes], "conversations": [r["conversations"] for r in shapes],
            "image": [{"bytes": r["bytes"], "path": None} for r in shapes]}  # fmt: skip
    return datasets.Dataset.from_dict(rows, features=datasets.Features({
        "id": datasets.Value("string"),
        "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
        "image": datasets.Image(),
    }))  # fmt: skip


def messages_dataset(shapes) -> datasets.Dataset:
    """TRL's layout: content as parts, an `images` list column."""
    rows = []
    for r in shapes:
        question = r["conversations"][0]["value"].replace("<image>\n", "")
        rows.append({
            "messages": [
                {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": r["conversations"][1]["value"]}]},
            ],
            "images": [Image.open(io.BytesIO(r["bytes"]))],
        })  # fmt: skip
    return datasets.Dataset.from_list(rows)


def train_on(data: str, tmp_path, capsys, *overrides) -> dict:
    from l2t.train import train

    config = load_config("tiny", overrides=[f"data.path={json.dumps(data)}", f"output={tmp_path / 'run'}", "train.max_steps=2",
                                            "train.preview_samples=0", "train.eval_fraction=0.1", *overrides])  # fmt: skip
    run_dir = train(config)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    out = capsys.readouterr().out
    assert f"training {SAMPLES - 1} samples" in out
    return json.loads((run_dir / "data_report.json").read_text())


# ---------------------------------------------------------------- each source trains the tiny preset


def test_a_save_to_disk_folder_trains(shapes, tmp_path, capsys):
    llava_dataset(shapes).save_to_disk(str(tmp_path / "shapes_hf"))
    report = train_on(str(tmp_path / "shapes_hf"), tmp_path, capsys, "train.dataloader_workers=1")  # images decoded in a worker
    assert report["ok"] == SAMPLES and report["problems"] == []


def test_a_parquet_file_with_embedded_image_bytes_trains(shapes, tmp_path, capsys):
    llava_dataset(shapes).to_parquet(str(tmp_path / "shapes.parquet"))
    samples, _, images = load_data(tmp_path / "shapes.parquet")
    assert samples[0].id == shapes[0]["id"] and samples[0].images == ["embedded:0:0"]
    assert samples[0].messages[0]["content"].startswith("<image>Does the picture")
    assert images.open(samples[3].images[0]).tobytes() == Image.open(io.BytesIO(shapes[3]["bytes"])).convert("RGB").tobytes()
    train_on(str(tmp_path / "shapes.parquet"), tmp_path, capsys)
    # the held-out sample's image is embedded too: evaluation reads it from the dataset by row
    from l2t.evaluate import load_test_samples
    from l2t.runs import open_trained_run

    [held_out], images, _ = load_test_samples(open_trained_run(tmp_path / "run"), None, None)
    assert held_out.images[0].startswith("embedded:") and images.open(held_out.images[0]).size == (64, 64)


def test_a_messages_format_parquet_trains(shapes, tmp_path, capsys):
    messages_dataset(shapes).to_parquet(str(tmp_path / "messages.parquet"))
    samples, _ = load_samples(tmp_path / "messages.parquet")
    assert samples[0].messages == [
        {"role": "user", "content": "<image>" + shapes[0]["conversations"][0]["value"].replace("<image>\n", "")},
        {"role": "assistant", "content": shapes[0]["conversations"][1]["value"]},
    ]
    train_on(str(tmp_path / "messages.parquet"), tmp_path, capsys)


# ---------------------------------------------------------------- the ways to name a source


def test_a_glob_of_parquet_files_and_arrow_files_read_every_row(shapes, tmp_path):
    dataset = llava_dataset(shapes)
    dataset.select(range(5)).to_parquet(str(tmp_path / "part-0.parquet"))
    dataset.select(range(5, SAMPLES)).to_parquet(str(tmp_path / "part-1.parquet"))
    samples, report = load_samples(str(tmp_path / "part-*.parquet"))
    assert [s.id for s in samples] == [r["id"] for r in shapes] and report.ok == SAMPLES
    dataset.save_to_disk(str(tmp_path / "saved"))
    [arrow] = (tmp_path / "saved").glob("*.arrow")
    assert [s.id for s in load_samples(arrow)[0]] == [r["id"] for r in shapes]


def test_an_hf_spec_loads_with_load_dataset(shapes, tmp_path):
    """No hub here: load_dataset reads a local folder of parquet files the way it reads a hub repo."""
    (tmp_path / "repo" / "data").mkdir(parents=True)
    llava_dataset(shapes).to_parquet(str(tmp_path / "repo" / "data" / "train-00000.parquet"))
    samples, report = load_samples(f"hf:{tmp_path / 'repo'}@train")
    assert len(samples) == SAMPLES and report.file == f"hf:{tmp_path / 'repo'}@train"
    assert parse_hub_spec("hf:org/name:cfg@validation") == ("org/name", "cfg", "validation")
    assert parse_hub_spec("hf:org/name") == ("org/name", None, "train")


def test_what_counts_as_a_dataset(tmp_path):
    llava_dataset([]).save_to_disk(str(tmp_path / "saved"))
    assert is_dataset(tmp_path / "saved") and is_dataset("x.parquet") and is_dataset("d/*.arrow") and is_dataset("hf:a/b")
    assert not is_dataset(tmp_path) and not is_dataset("data.json") and not is_dataset("data.jsonl")


def test_image_paths_in_a_dataset_are_relative_to_the_image_folder(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.png").write_bytes(png())
    datasets.Dataset.from_list([
        {"messages": [{"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": "Red."}], "images": ["red.png"]},
        {"messages": [{"role": "user", "content": "<image>And here?"}, {"role": "assistant", "content": "Red."}], "images": ["../red.png"]},
    ]).to_parquet(str(tmp_path / "paths.parquet"))  # fmt: skip
    samples, report, images = load_data(tmp_path / "paths.parquet", tmp_path / "img")
    assert samples[0].image_sizes == [(8, 6)] and images.open("red.png").size == (8, 6)
    assert [p.code for p in report.problems] == ["image_path_unsafe"]


# ---------------------------------------------------------------- bad files and bad rows


def test_a_corrupt_parquet_is_a_named_error(tmp_path, capsys):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"broken.parquet: \[file_unreadable\] not a readable parquet file"):
        load_samples(tmp_path / "broken.parquet")
    assert main(["check", str(tmp_path / "broken.parquet")]) == 1
    err = capsys.readouterr().err
    assert "[file_unreadable]" in err and "Traceback" not in err


def test_a_missing_column_is_a_named_error(tmp_path):
    datasets.Dataset.from_list([{"question": "Hi?", "answer": "Hello."}]).to_parquet(str(tmp_path / "qa.parquet"))
    with pytest.raises(DataError, match=r"qa.parquet: \[missing_field\] no 'messages' or 'conversations' column \(columns: question, answer\)"):
        load_samples(tmp_path / "qa.parquet")


def test_bad_image_values_are_skipped_and_counted(shapes, tmp_path):
    good = [r["conversations"] for r in shapes[:3]]
    datasets.Dataset.from_dict({
        "id": ["ok", "number", "undecodable"],
        "conversations": good,
        "image": [{"bytes": shapes[0]["bytes"], "path": None}, None, {"bytes": b"not an image at all", "path": "x.png"}],
    }, features=datasets.Features({
        "id": datasets.Value("string"),
        "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
        "image": datasets.Image(),
    })).to_parquet(str(tmp_path / "mixed.parquet"))  # fmt: skip
    samples, report = load_samples(tmp_path / "mixed.parquet")
    assert [s.id for s in samples] == ["ok"]
    problems = {p.sample: (p.code, p.message) for p in report.problems}
    # A missing image where the text has <image> is a count mismatch, as in JSON.
    assert problems["number (row 1)"][0] == "image_count_mismatch"
    assert problems["undecodable (row 2)"] == ("image_unreadable", problems["undecodable (row 2)"][1])
    assert "image 'row 2, image 0' is not a readable image" in problems["undecodable (row 2)"][1]
    assert report.file == str(tmp_path / "mixed.parquet") and report.total == 3 and report.ok == 1


def test_a_non_image_value_in_the_image_column_is_named(shapes, tmp_path, capsys):
    datasets.Dataset.from_dict({"conversations": [r["conversations"] for r in shapes[:2]], "image": [7, 8]}).to_parquet(str(tmp_path / "ints.parquet"))
    with pytest.raises(DataError, match="no usable samples") as caught:
        load_samples(tmp_path / "ints.parquet")
    [problem, _] = caught.value.report.problems
    assert problem.sample == "row 0" and problem.code == "wrong_type"
    assert problem.message == "image 0 is 7, not an image (datasets.Image, PIL image or path string)"
    assert main(["check", str(tmp_path / "ints.parquet")]) == 1
    err = capsys.readouterr().err
    assert "wrong_type (2)" in err and "Traceback" not in err


def test_bad_rows_are_skipped_or_stop_a_strict_load(tmp_path):
    rows = [[{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}], [{"from": "gpt", "value": "No question."}]]
    datasets.Dataset.from_dict({"conversations": rows}).to_parquet(str(tmp_path / "text.parquet"))
    samples, report = load_samples(tmp_path / "text.parquet")
    assert [s.id for s in samples] == ["row 0"] and [(p.sample, p.code) for p in report.problems] == [("row 1", "roles_not_alternating")]
    with pytest.raises(DataError, match=r"1 bad sample\(s\) \(strict mode\)"):
        load_samples(tmp_path / "text.parquet", strict=True)


def test_the_data_tab_reads_a_dataset_on_the_server(shapes, tmp_path):
    from app.common import AppContext
    from app.data_tab import load_server_paths

    llava_dataset(shapes).save_to_disk(str(tmp_path / "shapes_hf"))
    context = AppContext(tmp_path / "runs", tmp_path / "uploads", jobs=None, data_roots=(tmp_path,))
    selection, report, gallery, *_ = load_server_paths(context, str(tmp_path / "shapes_hf"), "", "tiny", "l2t")
    assert selection.path == str((tmp_path / "shapes_hf").resolve())
    assert f"{SAMPLES} of {SAMPLES} samples usable" in report
    assert len(gallery) > 0 and gallery[0][0].size[0] > 0
    with pytest.raises(Exception, match="No data file, dataset folder"):
        load_server_paths(context, str(tmp_path / "nothing"), "", "tiny", "l2t")


def test_a_parquet_or_arrow_upload_is_stored_and_read(shapes, tmp_path):
    from app.uploads import UploadError, store_data_file

    llava_dataset(shapes).to_parquet(str(tmp_path / "mine.parquet"))
    llava_dataset(shapes).save_to_disk(str(tmp_path / "saved"))  # its data file: what a user picks from such a folder
    (tmp_path / "session").mkdir()
    stored = store_data_file(tmp_path / "mine.parquet", tmp_path / "session")
    assert stored.name == "mine.parquet" and len(load_samples(stored)[0]) == SAMPLES  # kept under its own name
    arrow = store_data_file(next((tmp_path / "saved").glob("*.arrow")), tmp_path / "session")
    assert arrow.suffix == ".arrow" and len(load_samples(arrow)[0]) == SAMPLES
    (tmp_path / "mine.csv").write_text("a,b\n")
    with pytest.raises(UploadError, match="is not a .json, .jsonl, .parquet or .arrow data file"):
        store_data_file(tmp_path / "mine.csv", tmp_path / "session")


# ---------------------------------------------------------------- a JSON list streamed in chunks

VALID_LISTS = [
    '[{"id": 1, "conversations": []}, {"id": "two", "x": [1, 2, {"y": "]"}]}]',
    '\ufeff[\r\n  {"a": "line\\nbreak, \\"quoted\\" ]"} ,\r\n  12345 , "text", true, null, [1, 2]\r\n]\r\n',
    "[]",
    "  [ ]  \n",
    '[{"deep": {"er": {"est": 1.5e3}}}, 3.25]',
]
INVALID_LISTS = ['[{"a": 1}, ]', '[{"a": 1} {"b": 2}]', '[{"a": 1}, {"b": ', '[{"a": 1}] extra', '[{"a": 1}, 12', "[1, 2] [3]"]


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 20])
def test_a_streamed_list_reads_as_the_whole_file_does(tmp_path, monkeypatch, chunk):
    from l2t import sources

    monkeypatch.setattr(sources, "STREAM_CHARS", chunk)
    for i, text in enumerate(VALID_LISTS):
        path = tmp_path / f"valid{i}.json"
        path.write_bytes(text.encode("utf-8"))
        assert list(sources.read_json_records(path, stream=True)) == sources.read_json_records(path), text
    for i, text in enumerate(INVALID_LISTS):
        path = tmp_path / f"invalid{i}.json"
        path.write_text(text)
        with pytest.raises(sources.SourceError) as whole:
            sources.read_json_records(path)
        with pytest.raises(sources.SourceError) as streamed:
            list(sources.read_json_records(path, stream=True))
        assert str(streamed.value) == str(whole.value) and "[invalid_json]" in str(whole.value), text
