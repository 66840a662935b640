"""The Data tab through its API (gradio_client): failed loads, zips of the image folder, server paths, quiet user errors."""

from __future__ import annotations

import json
import re
import shutil
import zipfile

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from test_app import llava_record, png_bytes

from l2t.synthetic import BUNDLE_ARGS

BUNDLED = BUNDLE_ARGS["n"]

pytestmark = pytest.mark.slow


def upload(app, data, archive=None):
    return app.client.predict(handle_file(str(data)), handle_file(str(archive)) if archive else None, "tiny", "l2t", api_name="/load_upload")


def test_a_failed_load_says_why_in_the_report_and_keeps_the_data_in_use(app, tmp_path):
    app.client.predict("tiny", "l2t", api_name="/use_demo_data")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "a", "conversations": [')
    report, *_ = upload(app, broken)
    assert "l2t-error" in report and "broken.json" in report and "invalid_json" in report
    assert "Still using: demo data (synthetic shapes)." in report
    assert str(app.context.uploads_dir) not in report

    # The report's HTML keeps the "<image>" of the library's message.
    two = tmp_path / "two.json"
    record = llava_record("two", "a/red.png")
    record["conversations"][0]["value"] = "<image>\n<image>\nWhat is in the pictures?"
    two.write_text(json.dumps([record]))
    archive = tmp_path / "pictures.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a/red.png", png_bytes())
    report, *_ = upload(app, two, archive)
    assert "the number of &lt;image&gt; placeholders differs" in report
    assert "two.json" in report and "Still using: demo data (synthetic shapes)." in report


def test_a_zip_of_the_image_folder_itself_is_read_from_that_folder(app, tmp_path):
    data = tmp_path / "mix.json"
    data.write_text(json.dumps([llava_record(f"s{i}", f"{i}.png") for i in range(3)]))
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(3):
            z.writestr(f"images/{i}.png", png_bytes())
    report, *_ = upload(app, data, archive)
    assert "3 of 3 samples usable" in report
    assert "inside the folder &#x27;images/&#x27; of images.zip" in report

    report, *_ = upload(app, data)
    assert "upload the images as a .zip" in report


def test_server_paths_are_read_only_inside_the_allowed_folders(app, tmp_path, monkeypatch, shapes_dir):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    monkeypatch.setattr(app.context, "data_roots", (allowed,))  # as `python -m app --data-root allowed` run elsewhere
    (allowed / "passwd.json").symlink_to("/etc/passwd")
    for path in ("/etc/passwd", str(allowed / "passwd.json"), str(allowed / ".." / "escape.json")):
        report, *_ = app.client.predict(path, "", "tiny", "l2t", api_name="/load_server_paths")
        assert "is outside the folders this server reads data from" in report and "--data-root" in report, path
        assert "root:" not in report

    data = allowed / "train.json"
    data.write_text((shapes_dir / "train.json").read_text())
    report, *_ = app.client.predict(str(data), str(shapes_dir), "tiny", "l2t", api_name="/load_server_paths")
    assert "outside the folders" in report and str(shapes_dir) in report
    (allowed / "shapes").symlink_to(shapes_dir)
    report, *_ = app.client.predict(str(data), str(allowed / "shapes"), "tiny", "l2t", api_name="/load_server_paths")
    assert "outside the folders" in report  # a symlink is followed before the check
    monkeypatch.setattr(app.context, "data_roots", (allowed, shapes_dir))
    report, *_ = app.client.predict(str(data), str(shapes_dir), "tiny", "l2t", api_name="/load_server_paths")
    assert f"{BUNDLED} of {BUNDLED} samples usable" in report


def test_ordinary_user_errors_print_no_traceback_on_the_server(capfd, tmp_path):
    from conftest import free_port
    from gradio_client import Client

    from app.ui import create, serve

    demo, context = create(tmp_path / "runs", tmp_path / "uploads")  # a server of its own: no run yet, nothing running
    port = free_port()
    serve(demo, context, port=port, block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=tmp_path / "downloads")
        capfd.readouterr()
        report, *_ = client.predict(None, None, "tiny", "l2t", api_name="/load_upload")
        assert "Choose a data file" in report
        report, *_ = client.predict(str(tmp_path / "nothing.json"), "", "tiny", "l2t", api_name="/load_server_paths")
        assert "outside the folders" in report
        with pytest.raises(AppError, match="No training is running"):
            client.predict(api_name="/stop_training")
        with pytest.raises(AppError, match="no run to resume"):
            client.predict(api_name="/resume_training")
        captured = capfd.readouterr()
        assert "Traceback" not in captured.err + captured.out
    finally:
        demo.close()


def long_record(sample_id: str, image: str) -> dict:
    question = "<image>\nDescribe everything in the picture: " + "the colour, the shape, the size and where it is. " * 12
    return {"id": sample_id, "image": image, "conversations": [
        {"from": "human", "value": question}, {"from": "gpt", "value": "A red square in the middle."}]}  # fmt: skip


@pytest.fixture(scope="module")
def long_data(tmp_path_factory):
    """60 samples, 12 of them longer than the tiny preset's max_length once the image tokens are counted."""
    root = tmp_path_factory.mktemp("long-data")
    records = [llava_record(f"short{i}", f"{i % 4}.png") for i in range(48)]
    records += [long_record(f"long{i}", f"{i % 4}.png") for i in range(12)]
    data = root / "long.json"
    data.write_text(json.dumps(records))
    archive = root / "long-images.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(4):
            z.writestr(f"{i}.png", png_bytes(color=(60 * i, 30, 200)))
    return data, archive


@pytest.fixture(scope="module")
def long_run(app, long_data):
    """A finished UI run on long_data, started with "Start anyway" (the long samples skipped): (name, status, command)."""
    from gradio_client import Client
    from test_app import ended, poll_until, start_kwargs

    client = Client(app.url, verbose=False, download_files=app.root / "downloads")  # a session of its own
    client.predict(handle_file(str(long_data[0])), handle_file(str(long_data[1])), "tiny", "l2t", api_name="/load_upload")
    settings = {"Run name": "long-run", "Max steps (0: use epochs)": 4, "Start anyway, skipping the long samples": True}
    _, _, command = client.predict(**start_kwargs(client, **settings), api_name="/start_training")
    status, _, log = poll_until(client, ended)
    return "long-run", status, command, log


def test_samples_over_max_length_are_shown_refused_at_start_and_counted_when_finished(app, long_data, long_run):
    from test_app import start_kwargs, state_of

    report, *_ = upload(app, *long_data)
    assert "60 of 60 samples usable" in report  # valid samples; their length is the next check
    plot, summary = app.client.predict("tiny", api_name="/data_lengths")
    assert "12 of 60 samples (20%) are longer than max_length and training would skip them" in summary
    assert "long0 (" in summary and "short0" not in summary
    longest = int(re.search(r"raise Max length to (\d+)", summary).group(1))
    assert longest > 128
    assert {row[2] for row in plot["value"]["data"]} == {"within max_length", "over max_length: skipped"}

    with pytest.raises(AppError, match=r"of 57 training samples \(\d+%\) are longer than Max length 128") as refused:
        app.client.predict(**start_kwargs(app.client, **{"Run name": "too-long"}), api_name="/start_training")
    too_long = int(re.search(r"(\d+) of 57 training samples", str(refused.value)).group(1))  # 3 of the 60 are held out
    assert not (app.context.runs_dir / "too-long").exists()

    # Started anyway, the long samples are skipped and the finished status counts them.
    _, status, command, log = long_run
    assert "train.eval_fraction=0.05" in command  # a UI run of data this big holds out a split for Compare
    assert state_of(status) == "finished", log
    assert f"trained on <b>{57 - too_long}</b> samples, {too_long} skipped" in status


def test_compare_works_on_the_held_out_split_of_a_ui_run(app, long_run):
    picture, prompt, reference = app.client.predict(long_run[0], api_name="/held_out_sample")
    assert prompt.startswith("What is in the picture") or prompt.startswith("Describe everything")
    assert "reference answer" in reference


def test_compare_takes_test_data_when_a_run_held_out_none(app, long_data, long_run, monkeypatch):
    from app.compare_tab import SERVER, UPLOAD

    shutil.copytree(app.context.runs_dir / long_run[0], app.context.runs_dir / "none-held", ignore=shutil.ignore_patterns("checkpoints"))
    (app.context.runs_dir / "none-held" / "held_out.json").write_text("[]")
    with pytest.raises(AppError, match="held out no samples to test on. Choose other test data") as refused:
        app.client.predict("none-held", api_name="/held_out_sample")
    assert "--data" not in str(refused.value)

    data, archive = (handle_file(str(path)) for path in long_data)
    note = app.client.predict(UPLOAD, data, archive, "", "", api_name="/choose_test_data")
    assert "Test samples: long.json, 60 of 60 usable." in note
    picture, prompt, reference = app.client.predict("none-held", api_name="/held_out_sample")
    assert picture and prompt and "Test sample" in reference

    monkeypatch.setattr(app.context, "data_roots", (long_data[0].parent,))
    note = app.client.predict(SERVER, None, None, str(long_data[0]), str(long_data[1]), api_name="/choose_test_data")
    assert "60 of 60 usable" in note
    status, log, report = app.client.predict("none-held", [], api_name="/run_evaluation")
    assert "Evaluated in" in status, log
    assert "<iframe" in report


def test_a_sample_with_two_images_previews_both(app, tmp_path):
    from PIL import Image

    record = {"id": "pair", "messages": [{"role": "user", "content": "<image><image>Which one is red?"},
                                         {"role": "assistant", "content": "The first."}], "images": ["red.png", "blue.png"]}  # fmt: skip
    data = tmp_path / "pair.json"
    data.write_text(json.dumps([record]))
    archive = tmp_path / "pair.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("red.png", png_bytes(color=(220, 20, 20)))
        z.writestr("blue.png", png_bytes(color=(20, 20, 220)))
    report, gallery, index, templates, picture, conversation, mask = upload(app, data, archive)
    assert "1 of 1 samples usable" in report
    with Image.open(picture) as shown:
        left, right = shown.convert("RGB").getpixel((5, 5)), shown.convert("RGB").getpixel((shown.width - 5, 5))
    assert left[0] > 150 > left[2] and right[2] > 150 > right[0]  # red on the left, blue on the right
