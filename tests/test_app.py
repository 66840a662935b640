"""The web UI through its API (gradio_client), against the app launched in this process.

One server for the module, and a new browser session for each test, so that
no test depends on what another one did: load the demo data, check the report
and the mask, train a short run in a subprocess while a second start is
refused, follow it to the end, compare base and tuned answers, merge with the
parity check. Bad uploads (zip-slip, corrupt and oversized images) get
messages, not files.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
import time
import zipfile
import zlib
from pathlib import Path

import pytest
import yaml
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from l2t import runs
from l2t.synthetic import BUNDLE_ARGS, bundled_dir

BUNDLED = BUNDLE_ARGS["n"]  # samples in the bundled demo train split

pytestmark = pytest.mark.slow

TRAIN_TIMEOUT_S = 300


def state_of(status_html: str) -> str:
    return re.search(r'data-state="(\w+)"', status_html).group(1)


def step_of(status_html: str) -> int:
    found = re.search(r"step <b>(\d+)</b>", status_html)
    return int(found.group(1)) if found else 0


def poll_until(client: Client, done, timeout: float = TRAIN_TIMEOUT_S) -> tuple:
    """/train_progress until done(status_html) holds; returns (status, plot, log)."""
    deadline = time.time() + timeout
    while True:
        status, plot, log = client.predict(api_name="/train_progress")
        if done(status) or time.time() > deadline:
            return status, plot, log
        time.sleep(0.5)


def ended(status_html: str) -> bool:
    return state_of(status_html) not in ("preparing", "running", "stopping")


def start_kwargs(client: Client, endpoint: str = "/start_training", **by_label) -> dict:
    """An endpoint's arguments (/start_training's by default): every widget at its default, then the ones named by their label."""
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"][endpoint]["parameters"]
    kwargs = {p["parameter_name"]: p.get("parameter_default") for p in params}
    names = {p["label"]: p["parameter_name"] for p in params}
    return {**kwargs, **{names[label]: value for label, value in by_label.items()}}


def png_bytes(size=(16, 16), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (no need to hold them in memory)."""
    data = bytearray(png_bytes((8, 8)))
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def llava_record(sample_id: str, image: str) -> dict:
    return {"id": sample_id, "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "A red square."}]}  # fmt: skip


@pytest.fixture
def client(app) -> Client:
    """A new browser session: no data chosen, no template edited."""
    return Client(app.url, verbose=False, download_files=app.root / "downloads")


def use_demo_data(client: Client) -> dict:
    """Press "Use the demo data"; returns the template table."""
    return client.predict("tiny", "l2t", api_name="/use_demo_data")[3]


@pytest.fixture(scope="module")
def tuned_run(app, trained_run) -> str:
    """A finished run in the UI's runs folder (the session's tiny run, copied so that merging into it changes nothing shared)."""
    shutil.copytree(trained_run, app.context.runs_dir / "tuned-run", ignore=shutil.ignore_patterns(runs.CHECKPOINTS))
    return "tuned-run"


def test_binds_to_localhost_by_default(app):
    from app.__main__ import parse_args

    assert parse_args([]).host == "127.0.0.1"
    assert parse_args([]).share is False
    assert app.demo.server_name == "127.0.0.1"


def test_opening_the_ui_to_other_machines_without_a_login_warns():
    from app.__main__ import exposure_warning

    assert "without --auth" in exposure_warning("0.0.0.0", None)
    assert exposure_warning("0.0.0.0", ("alice", "secret")) is None
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("localhost", None) is None


def test_demo_data_report_and_mask(client):
    report, gallery, index, templates, picture, conversation, mask = client.predict("tiny", "l2t", api_name="/use_demo_data")
    assert f"{BUNDLED} of {BUNDLED} samples usable" in report
    assert len(gallery) > 10 and index["maximum"] == BUNDLED - 1
    sentences = {row[1]: row for row in templates["data"]}
    records = json.loads((bundled_dir() / "train.json").read_text())
    yes_no = sum(any("Answer yes or no." in m["value"] for m in r["conversations"][::2]) for r in records)
    assert sentences["Answer yes or no."][0] is True and sentences["Answer yes or no."][2] == yes_no
    # Sample 0 asks "Does the picture show a red triangle at the top? Answer yes or no."
    assert "Does the picture show a red triangle" in conversation
    assert "tok-instruction tok-in" in mask and "tok-task_template tok-out" in mask and "tok-image tok-out" in mask
    _, _, response_only = client.predict("tiny", 0, "response", api_name="/mask_preview")
    assert "tok-instruction tok-out" in response_only and "tok-instruction tok-in" not in response_only

    # Unticking a template puts it back in the loss, and the run config will say so.
    rows = [[row[1] != "Answer yes or no.", *row[1:]] for row in templates["data"]]
    _, after = client.predict({"headers": templates["headers"], "data": rows}, "tiny", 0, "l2t", api_name="/edit_templates")
    in_loss = [int(re.search(r"(\d+) in the loss", html).group(1)) for html in (mask, after)]
    assert in_loss[1] > in_loss[0] and "tok-task_template" not in after  # its tokens are instruction now

    # An added sentence is masked like a mined one; it must be exactly one sentence.
    question = "Does the picture show a red triangle at the top?"
    rows, added, _ = client.predict(question, "tiny", 0, "l2t", api_name="/add_template")
    asked = sum(any(question in m["value"] for m in r["conversations"][::2]) for r in records)
    assert asked > 0 and [question, asked, f"{asked / BUNDLED:.1%}", "added by you"] == rows["data"][-1][1:]
    assert "tok-task_template tok-out" in added
    with pytest.raises(AppError, match="exactly one sentence"):
        client.predict("Two sentences. Not one.", "tiny", 0, "l2t", api_name="/add_template")


def test_training_runs_in_a_subprocess_and_a_second_start_is_refused(app, client):
    templates = use_demo_data(client)
    rows = [[row[1] != "Answer yes or no.", *row[1:]] for row in templates["data"]]
    client.predict({"headers": templates["headers"], "data": rows}, "tiny", 0, "l2t", api_name="/edit_templates")
    client.predict("Does the picture show a red triangle at the top?", "tiny", 0, "l2t", api_name="/add_template")
    settings = {"Max steps (0: use epochs)": 30, "key=value, one per line": "train.preview_samples=0\ntrain.logging_steps=10"}
    status, _, _ = client.predict(**start_kwargs(client, **settings, **{"Run name": "ui-run"}), api_name="/start_training")
    assert state_of(status) in ("preparing", "running")
    # A second browser (a new session) sees the same job.
    other_session = Client(client.src, verbose=False, download_files=app.root / "downloads")
    status, _, _ = other_session.predict(api_name="/train_progress")
    assert state_of(status) in ("preparing", "running") and "ui-run" in status
    with pytest.raises(AppError, match="already running"):
        client.predict(**start_kwargs(client, **settings, **{"Run name": "second-run"}), api_name="/start_training")
    assert not (app.context.runs_dir / "second-run").exists()

    status, plot, log = poll_until(client, ended)
    assert state_of(status) == "finished", log
    assert "step <b>30</b> / 30" in status
    series = {row[2] for row in plot["data"]}
    assert series == {"instruction loss", "response loss"}
    assert "done. run folder" in log and "Traceback" not in log

    run = app.context.runs_dir / "ui-run"
    launch = yaml.safe_load((run / "launch.yaml").read_text())
    assert launch["train"] == {"max_steps": 30, "preview_samples": 0, "logging_steps": 10}
    assert launch["templates"] == {"remove": ["Answer yes or no."], "add": ["Does the picture show a red triangle at the top?"]}
    assert [t["sentence"] for t in json.loads((run / "templates.json").read_text())["templates"]].count("Answer yes or no.") == 0
    assert (run / "adapter" / "adapter_config.json").exists()


def test_compare_returns_base_and_tuned_answers(client, tuned_run):
    picture, prompt, reference = client.predict(tuned_run, api_name="/held_out_sample")
    assert prompt and "reference answer" in reference
    base, tuned = client.predict(tuned_run, handle_file(picture), prompt, api_name="/compare")
    assert base.strip() and tuned.strip() and base != tuned


def test_export_merges_with_a_passing_parity_check(app, client, tuned_run):
    result, log, report = client.predict(tuned_run, api_name="/merge")
    assert report["parity"]["passed"] is True, log
    assert "Parity check passed" in result
    merged = app.context.runs_dir / tuned_run / "merged"
    assert (merged / "config.json").exists() and any(merged.glob("*.safetensors"))
    archive = client.predict(tuned_run, api_name="/adapter_zip")
    assert f"{tuned_run}/adapter/adapter_config.json" in zipfile.ZipFile(archive).namelist()
    merged_archive = client.predict(tuned_run, api_name="/merged_zip")
    names = zipfile.ZipFile(merged_archive).namelist()
    assert f"{tuned_run}-merged/config.json" in names and any(name.endswith(".safetensors") for name in names)


def test_train_settings_are_saved_and_loaded_as_a_config_file(app, client, tmp_path):
    settings = {"LoRA rank r": 8, "Max steps (0: use epochs)": 12, "L2T: learn from the instruction too": False,
                "key=value, one per line": "train.logging_steps=3", "Run name": "../../saved"}  # fmt: skip
    saved = client.predict(**start_kwargs(client, "/save_settings", **settings), api_name="/save_settings")
    assert Path(saved).name == "saved-settings.yaml"
    assert [p.name for p in app.root.rglob("*saved-settings.yaml") if p.parent.name == "settings"] == ["saved-settings.yaml"]
    text = open(saved).read()
    assert yaml.safe_load(text) == {"preset": "tiny", "loss": {"mode": "response"}, "lora": {"r": 8},
                                    "train": {"max_steps": 12, "logging_steps": 3}}  # fmt: skip
    from l2t.config import load_config

    assert load_config("tiny", config_file=saved).lora.r == 8  # the same format as --config

    edited = tmp_path / "mine.yaml"
    edited.write_text(text + "data:\n  path: elsewhere.json\n")
    preset, card, l2t_on, drop, *numbers, extra, note = client.predict(handle_file(str(edited)), api_name="/load_settings")
    assert preset == "tiny" and l2t_on is False
    assert numbers[2] == 8 and numbers[6] == 12 and extra == "train.logging_steps=3"
    assert "data.path" in note and "Data tab" in note
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(AppError, match="max_stepz"):
        client.predict(handle_file(str(bad)), api_name="/load_settings")


def test_zip_slip_is_rejected_and_nothing_is_written_outside(app, client, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([llava_record("s1", "../evil.png")]))
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("../evil.png", png_bytes())
    before = {p for p in app.root.rglob("*")}
    report, *_ = client.predict(handle_file(str(data)), handle_file(str(archive)), "tiny", "l2t", api_name="/load_upload")
    assert "&#x27;../evil.png&#x27; has an absolute path or &#x27;..&#x27;" in report and "l2t-error" in report
    created = {p for p in app.root.rglob("*")} - before
    uploads = app.context.uploads_dir
    assert all(p.is_relative_to(uploads) for p in created)
    assert not [p for p in created if p.is_file()]  # the refused upload is not kept
    assert not list(app.root.parent.rglob("evil.png"))


def test_bad_images_get_a_message_naming_the_sample(app, client, tuned_run, tmp_path):
    data = tmp_path / "data.jsonl"
    records = [llava_record("good", "a/good.png"), llava_record("broken", "a/broken.png"), llava_record("huge", "a/huge.png")]
    data.write_text("\n".join(json.dumps(r) for r in records))
    archive = tmp_path / "pictures.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a/good.png", png_bytes())
        z.writestr("a/broken.png", b"\x89PNG\r\n\x1a\n this is not an image")
        z.writestr("a/huge.png", png_claiming(20_000, 20_000))
    report, *_ = client.predict(handle_file(str(data)), handle_file(str(archive)), "tiny", "l2t", api_name="/load_upload")
    assert "1 of 3 samples usable" in report
    assert "image_unreadable" in report and "broken (line 2)" in report
    assert "image_too_large" in report and "huge (line 3)" in report
    stored = list(app.context.uploads_dir.rglob("*.zip"))
    assert len(stored) == 1 and stored[0].read_bytes() == archive.read_bytes()

    corrupt = tmp_path / "photo.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(AppError, match="not a readable image"):
        client.predict(tuned_run, handle_file(str(corrupt)), api_name="/check_image")


def test_upload_caps_refuse_zip_bombs(tmp_path):
    from app.uploads import UploadError, store_archive

    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("zeros.png", b"\0" * 5_000_000)  # compresses to a few kB
        for i in range(20):
            z.writestr(f"img/{i}.png", png_bytes())
    folder = tmp_path / "session"
    folder.mkdir()
    with pytest.raises(UploadError, match="would unpack to"):
        store_archive(archive, folder, max_uncompressed=1_000_000)
    with pytest.raises(UploadError, match="one image"):
        store_archive(archive, folder, max_member_bytes=1_000_000)
    with pytest.raises(UploadError, match="members"):
        store_archive(archive, folder, max_members=10)
    assert not any(folder.iterdir())
    assert store_archive(archive, folder) == folder / "bomb.zip"  # kept under its own name


def test_stop_saves_a_checkpoint_and_resume_continues(app, client):
    use_demo_data(client)
    settings = {"Max steps (0: use epochs)": 100_000, "key=value, one per line": "train.preview_samples=0\ntrain.logging_steps=1"}
    client.predict(**start_kwargs(client, **settings, **{"Run name": "stop-run"}), api_name="/start_training")
    # A reloaded page (a new session) shows the running job's settings, not the defaults.
    form = Client(client.src, verbose=False, download_files=app.root / "downloads").predict(api_name="/running_settings")
    assert form[0] == "tiny" and form[-1] == "stop-run"
    assert 100_000 in form and "train.preview_samples=0\ntrain.logging_steps=1" in form
    poll_until(client, lambda s: state_of(s) == "running" or ended(s))
    client.predict(api_name="/stop_training")
    status, _, log = poll_until(client, ended)
    assert state_of(status) == "stopped", log
    run = app.context.runs_dir / "stop-run"
    stopped_at = step_of(status)
    assert (run / "checkpoints" / f"checkpoint-{stopped_at}" / "trainer_state.json").exists()

    client.predict(api_name="/resume_training")
    status, _, log = poll_until(client, lambda s: step_of(s) > stopped_at or ended(s))
    assert state_of(status) == "running" and step_of(status) > stopped_at, log
    client.predict(api_name="/stop_training")
    status, _, log = poll_until(client, ended)
    assert state_of(status) == "stopped" and "Traceback" not in log


def test_a_crashed_training_shows_its_error_and_keeps_the_folder(app, client):
    use_demo_data(client)
    # No run name: the time-stamped one is chosen once, and the command shown after Start names that folder.
    kwargs = start_kwargs(client, **{"key=value, one per line": f"model.hub_id={app.root / 'no-such-model'}"})
    _, _, command = client.predict(**kwargs, api_name="/start_training")
    status, _, log = poll_until(client, ended)
    assert state_of(status) == "failed"
    assert "cannot load the processor" in status and "no-such-model" in status
    assert "Traceback" not in status and "cannot load the processor" in log
    run = app.context.runs_dir / re.search(r'<span class="run-name">([^<]+)</span>', status).group(1)
    assert f"--output {run}" in command
    assert (run / "launch.yaml").exists() and (run / "train.log").exists()


def test_a_stop_while_preparing_does_not_promise_a_checkpoint(app, client):
    use_demo_data(client)
    client.predict(**start_kwargs(client, **{"Run name": "stopped-early"}), api_name="/start_training")
    status = client.predict(api_name="/stop_training")
    assert state_of(status) in ("stopping", "stopped")
    status, _, log = poll_until(client, ended)
    assert state_of(status) == "stopped", log
    assert not (app.context.runs_dir / "stopped-early" / "checkpoints").exists()
    assert "Resume starts the run from the beginning" in status and "last checkpoint" not in status


def test_a_hub_preset_neither_cached_nor_reachable_names_the_model_and_the_cache(app):
    from l2t.models import hub_cache

    # The Data tab's mask preview loads the preset's tokenizer in the server, from the server's cache.
    *_, mask = app.client.predict("smolvlm-256m", "l2t", api_name="/use_demo_data")
    assert "l2t-warn" in mask and "needs the tokenizer of preset" in mask
    assert f"preset smolvlm-256m needs the model HuggingFaceTB/SmolVLM-256M-Instruct, which is not in the Hugging Face cache {hub_cache()}" in mask

    # Start checks the cache (and the hub) before anything starts, and names the model and the cache folder.
    kwargs = start_kwargs(app.client, **{"Model preset": "smolvlm-256m", "Run name": "hub-run"})
    with pytest.raises(AppError) as refused:
        app.client.predict(**kwargs, api_name="/start_training")
    message, cache = str(refused.value), hub_cache()
    assert f"preset smolvlm-256m needs the model HuggingFaceTB/SmolVLM-256M-Instruct, which is not in the Hugging Face cache {cache}" in message
    assert f"run `hf download HuggingFaceTB/SmolVLM-256M-Instruct` and copy the folder models--HuggingFaceTB--SmolVLM-256M-Instruct it makes into {cache}" in message
    assert not (app.context.runs_dir / "hub-run").exists()


def test_presets_say_what_they_need_beyond_this_machine(app):
    dropdown = next(c for c in app.client.config["components"] if c["props"].get("elem_id") == "preset")
    labels = {value: label for label, value in dropdown["props"]["choices"]}
    assert labels["tiny"] == "tiny · 0.19M parameters"  # built in, trains on a CPU
    assert labels["smolvlm-256m"] == "smolvlm-256m · 256M parameters · download ~0.5 GB · GPU ~6.9 GB"
    assert labels["llava-1.5-7b"] == "llava-1.5-7b · 7B parameters · download ~14.0 GB · GPU ~10 GB"
