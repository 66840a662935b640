"""The Data tab through its API (gradio_client): failed loads, zips of the image folder, server paths, quiet user errors."""

from __future__ import annotations

import json
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


def test_ordinary_user_errors_print_no_traceback_on_the_server(app, capfd, tmp_path):
    capfd.readouterr()
    report, *_ = app.client.predict(None, None, "tiny", "l2t", api_name="/load_upload")
    assert "Choose a data file" in report
    report, *_ = app.client.predict(str(tmp_path / "nothing.json"), "", "tiny", "l2t", api_name="/load_server_paths")
    assert "outside the folders" in report
    with pytest.raises(AppError, match="No training is running"):
        app.client.predict(api_name="/stop_training")
    with pytest.raises(AppError, match="no run to resume"):
        app.client.predict(api_name="/resume_training")
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out
