"""Fault injection, end to end: bad data, hostile archives, bad config, killed processes, a full
disk and hostile UI requests, each through the entry point a user runs (`python -m l2t.data check`,
`python -m l2t.train`, `python -m l2t.merge`, the web UI).

Every case checks three things: the message names the file, sample or key and the reason; the
command exits non-zero where the job can't go on; nothing the user had is lost or changed (input
files byte-identical, an earlier run folder or checkpoint untouched). The unit tests of each module
(tests/test_data.py, test_images.py, test_train.py, ...) pin the exact messages; these prove the
same faults surface through the commands. docs/RELIABILITY.md lists every case and what it found.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from l2t import files, runs
from l2t.data import main as data_main
from l2t.images import ImageSource
from l2t.merge import main as merge_main
from l2t.runs import checkpoint_complete
from l2t.train import main as train_main

REPO = Path(__file__).resolve().parent.parent
TINY = ["--preset", "tiny", "train.preview_samples=0", "train.logging_steps=1", "train.save_steps=2"]
"""Tiny-preset runs that log every step and save a checkpoint every 2 steps."""
SUBPROCESS_ENV = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------- helpers


def snapshot(*roots: Path) -> dict[str, object]:
    """Every file (its bytes), folder and link under `roots`: equal snapshots mean nothing changed."""
    found: dict[str, object] = {}
    for root in roots:
        for path in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            if path.is_symlink():
                found[str(path)] = f"-> {os.readlink(path)}"
            elif path.is_dir():
                found[str(path)] = "<folder>"
            elif path.exists():
                found[str(path)] = path.read_bytes()
    return found


def image_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


RED_PNG = image_bytes(Image.new("RGB", (8, 8), (255, 0, 0)))


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height pixels (nothing that large is ever built)."""
    data = bytearray(RED_PNG)
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def llava(sample_id: str, human: str, gpt: str = "A red square.", image=None) -> dict:
    record = {"id": sample_id, "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}
    if image is not None:
        record["image"] = image
    return record


GOOD = llava("good", "What is the capital of France?", "Paris.")


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def cli(main, argv: list[str], capsys) -> SimpleNamespace:
    """Run an entry point's main() in this process: exit code, stdout, stderr."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return SimpleNamespace(code=code, out=out, err=err)


def train_cli(capsys, *argv) -> SimpleNamespace:
    return cli(train_main, list(argv), capsys)


def check_cli(capsys, *argv) -> SimpleNamespace:
    return cli(data_main, ["check", *argv], capsys)


def error_text(result: SimpleNamespace) -> str:
    """stderr from its `error:` line on (progress bars share stderr)."""
    assert "error: " in result.err, result.err[-2000:]
    return result.err[result.err.index("error: ") :]


def metric_steps(run_dir: Path) -> list[int]:
    return [row["step"] for row in runs.read_metrics(run_dir)]


def status_of(run_dir: Path) -> dict:
    return files.read_json(run_dir / runs.STATUS)


def wait_for(condition, timeout: float, what: str, process: subprocess.Popen | None = None, poll: float = 0.01) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            pytest.fail(f"the process ended (exit {process.returncode}) before {what}")
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(poll)


def popen_python(*args: str, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-W", "ignore", *args], cwd=REPO, env={**os.environ, **SUBPROCESS_ENV},
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def four_step_run(tmp_path_factory) -> Path:
    """A finished 4-step tiny run with checkpoint-2 and checkpoint-4; tests copy it before changing anything."""
    from l2t.config import load_config
    from l2t.train import train

    run_dir = tmp_path_factory.mktemp("four") / "run"
    train(load_config("tiny", overrides=[*TINY[2:], "train.max_steps=4", f"output={run_dir}"]))
    return run_dir


def copy_run(run_dir: Path, target: Path) -> Path:
    shutil.copytree(run_dir, target, symlinks=True)
    return target


# ---------------------------------------------------------------- data files, through `l2t.data check` and `l2t.train`

TRUNCATED = json.dumps([GOOD, GOOD])[:-9]  # cut inside the last string
TRUNCATED_AT = TRUNCATED.rindex('"') + 1

# name -> (file name, bytes, the error after "<path>: ")
FILE_FAULTS = {
    "empty": ("data.json", b"", "[invalid_json] the file is empty"),
    "binary": ("data.json", RED_PNG, "[invalid_encoding] not UTF-8 text (bad byte at offset 0); save the file as UTF-8"),
    "nul-bytes": ("data.jsonl", b"\0" * 64, "no usable samples"),
    "truncated-json": (
        "data.json",
        TRUNCATED.encode(),
        f"[invalid_json] Unterminated string starting at line 1, column {TRUNCATED_AT}",
    ),
    "number": ("data.json", b"42", "[not_a_list] a JSON data file must hold a list of samples, found int"),
    "string": ("data.json", b'"my samples"', "[not_a_list] a JSON data file must hold a list of samples, found str"),
    "latin-1": (
        "data.json",
        json.dumps([llava("é", "Ça va ?")], ensure_ascii=False).encode("latin-1"),
        "[invalid_encoding] not UTF-8 text (bad byte at offset 9); save the file as UTF-8",
    ),
}


@pytest.mark.parametrize("entry", ["check", "train"])
@pytest.mark.parametrize("fault", sorted(FILE_FAULTS))
def test_unusable_data_file_stops_with_its_name_and_reason(tmp_path, capsys, fault, entry):
    name, content, message = FILE_FAULTS[fault]
    data = tmp_path / name
    data.write_bytes(content)
    before = snapshot(tmp_path)
    if entry == "check":
        result = check_cli(capsys, data)
    else:
        result = train_cli(capsys, "--preset", "tiny", "--data", data, "--output", tmp_path / "run")
        (tmp_path / "run").rmdir()  # made (empty) before the data is read; nothing in it
    assert result.code == 1
    assert f"error: {data}: {message}" in result.err
    assert "Traceback" not in result.err
    assert snapshot(tmp_path) == before


def test_nul_bytes_are_reported_line_by_line(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b"\0" * 64)
    result = check_cli(capsys, data)
    assert result.code == 1
    assert "invalid_json (1): not valid JSON" in result.err and "sample line 1: Expecting value at column 1" in result.err


def test_one_bad_jsonl_line_is_named_and_the_good_ones_load(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(
        json.dumps(GOOD) + "\n" + '{"id": "torn", "conversations": [{"from": "hu\n' + json.dumps(llava("also-good", "Hi?")) + "\n"
    )
    before = snapshot(tmp_path)
    result = check_cli(capsys, data, "--json", tmp_path / "report.json")
    assert result.code == 0
    assert result.out.startswith(f"{data}: 2 of 3 samples usable, 1 skipped")
    assert "sample line 2: Unterminated string starting at column 43" in result.out
    report = json.loads((tmp_path / "report.json").read_text())
    assert [(p["file"], p["sample"], p["code"]) for p in report["problems"]] == [(str(data), "line 2", "invalid_json")]
    assert check_cli(capsys, data, "--strict").code == 1
    after = snapshot(tmp_path)
    assert after.pop(str(tmp_path / "report.json"))
    assert after == before


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_utf8_bom_is_accepted(tmp_path, capsys, suffix):
    data = tmp_path / f"data{suffix}"
    text = json.dumps([GOOD]) if suffix == ".json" else json.dumps(GOOD) + "\r\n"
    data.write_bytes(b"\xef\xbb\xbf" + text.encode())
    result = check_cli(capsys, data, "--strict")
    assert result.code == 0
    assert result.out.startswith(f"{data}: 1 of 1 samples usable, 0 skipped")


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """tmp/data/img/* (good and bad images) and, outside the data folder, tmp/outside.png (a good image)."""
    root = tmp_path / "data"
    img = root / "img"
    img.mkdir(parents=True)
    (img / "red.png").write_bytes(RED_PNG)
    (img / "zero.png").write_bytes(b"")
    noise = image_bytes(Image.frombytes("RGB", (32, 32), bytes(range(256)) * 12))
    (img / "cut.png").write_bytes(noise[: len(noise) // 2])
    (img / "notes.jpg").write_text("these are my notes, not a photo\n")
    (img / "huge.png").write_bytes(png_claiming(20_000, 20_000))
    (tmp_path / "outside.png").write_bytes(RED_PNG)
    (img / "link.png").symlink_to(tmp_path / "outside.png")
    return root


def messages_record(sample_id: str, *turns, images=None) -> dict:
    record = {"id": sample_id, "messages": [{"role": role, "content": text} for role, text in turns]}
    if images is not None:
        record["images"] = images
    return record


# name -> (record, reason code, message); "{outside}" is an image outside the image folder
SAMPLE_FAULTS = {
    "no-conversations-or-messages": ({"id": "s", "dialogue": []}, "unknown_format", "has neither 'conversations' (LLaVA) nor 'messages'"),
    "value-is-a-list": (
        {"id": "s", "conversations": [{"from": "human", "value": ["Hi"]}, {"from": "gpt", "value": "Hello."}]},
        "wrong_type",
        "conversations[0].value must be a string, got list",
    ),
    "images-is-a-string": (
        messages_record("s", ("user", "<image>What?"), ("assistant", "Red."), images="img/red.png"),
        "wrong_type",
        "'images' must be a list of path strings, got 'img/red.png'",
    ),
    "roles-out-of-order": (
        {"id": "s", "conversations": [{"from": "gpt", "value": "Paris."}, {"from": "human", "value": "Capital?"}]},
        "roles_not_alternating",
        "turn 1 is 'assistant' where 'user' was expected (a system message may only come first)",
    ),
    "only-a-user-turn": (
        {"id": "s", "conversations": [{"from": "human", "value": "Anyone there?"}]},
        "no_final_response",
        "the last turn is 'user'; the conversation must end with an assistant answer",
    ),
    "empty-response": (llava("s", "What is it?", "   "), "empty_text", "turn 2 (assistant) is empty"),
    "absolute-image-path": (
        llava("s", "<image>\nWhat?", image="{outside}"),
        "image_path_unsafe",
        "image path '{outside}' is absolute; paths must be relative to the image folder",
    ),
    "etc-passwd": (
        llava("s", "<image>\nWhat?", image="../../etc/passwd"),
        "image_path_unsafe",
        "image path '../../etc/passwd' leaves the image folder ('..')",
    ),
    "path-escaping-to-a-real-image": (
        llava("s", "<image>\nWhat?", image="../outside.png"),
        "image_path_unsafe",
        "image path '../outside.png' leaves the image folder ('..')",
    ),
    "symlink-out-of-the-folder": (
        llava("s", "<image>\nWhat?", image="img/link.png"),
        "image_path_unsafe",
        "image path 'img/link.png' resolves outside the image folder",
    ),
    "missing-image": (
        llava("s", "<image>\nWhat?", image="img/nope.png"),
        "image_missing",
        "image file 'img/nope.png' not found under {root}",
    ),
    "zero-byte-image": (llava("s", "<image>\nWhat?", image="img/zero.png"), "image_unreadable", "image 'img/zero.png' is an empty file"),
    "truncated-png": (
        llava("s", "<image>\nWhat?", image="img/cut.png"),
        "image_unreadable",
        "image 'img/cut.png' is not a readable image (",
    ),
    "text-file-named-jpg": (
        llava("s", "<image>\nWhat?", image="img/notes.jpg"),
        "image_unreadable",
        "image 'img/notes.jpg' is not a readable image (UnidentifiedImageError: not an image format Pillow knows)",
    ),
    "20000x20000-image": (
        llava("s", "<image>\nWhat?", image="img/huge.png"),
        "image_too_large",
        "image 'img/huge.png' is too large: Image size (400000000 pixels) exceeds limit",
    ),
    "more-image-tags-than-images-llava": (
        llava("s", "<image> Compare it with <image>.", image="img/red.png"),
        "image_count_mismatch",
        "2 <image> placeholder(s) but 1 image(s)",
    ),
    "more-image-tags-than-images-messages": (
        messages_record("s", ("user", "<image> or <image>?"), ("assistant", "Left."), images=["img/red.png"]),
        "image_count_mismatch",
        "2 <image> placeholder(s) but 1 image(s)",
    ),
    "fewer-image-tags-than-images": (
        llava("s", "<image>\nWhich is redder?", image=["img/red.png", "img/red.png"]),
        "image_count_mismatch",
        "1 <image> placeholder(s) but 2 image(s)",
    ),
}


@pytest.mark.parametrize("fault", list(SAMPLE_FAULTS))
def test_bad_sample_is_skipped_and_named(image_folder, capsys, fault):
    record, code, message = SAMPLE_FAULTS[fault]
    outside = str(image_folder.parent / "outside.png")
    record = json.loads(json.dumps(record).replace("{outside}", outside))
    message = message.replace("{outside}", outside).replace("{root}", str(image_folder))
    data = write_json(image_folder / "data.json", [GOOD, record])
    before = snapshot(image_folder.parent)

    result = check_cli(capsys, data)
    assert result.code == 0  # the good sample is still usable
    assert result.out.startswith(f"{data}: 1 of 2 samples usable, 1 skipped")
    assert f"  {code} (1): " in result.out
    assert f"    sample s (#1): {message}" in result.out
    assert " at 0x" not in result.out  # no memory addresses: the same data gives the same report
    assert check_cli(capsys, data, "--strict").code == 1
    assert snapshot(image_folder.parent) == before


def test_grayscale_cmyk_and_rgba_images_train(tmp_path, capsys):
    img = tmp_path / "img"
    img.mkdir()
    (img / "gray.png").write_bytes(image_bytes(Image.new("L", (8, 8), 128)))
    (img / "cmyk.jpg").write_bytes(image_bytes(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"))
    (img / "clear.png").write_bytes(image_bytes(Image.new("RGBA", (8, 8), (0, 0, 255, 0))))
    records = [
        llava(name, "<image>\nWhat color is it?", "A colour.", image=f"img/{name}") for name in ("gray.png", "cmyk.jpg", "clear.png")
    ]
    data = write_json(tmp_path / "data.json", records)
    before = snapshot(img, data)

    source = ImageSource(tmp_path)
    pixels = {name: source.open(f"img/{name}").getpixel((0, 0)) for name in ("gray.png", "cmyk.jpg", "clear.png")}
    assert pixels["gray.png"] == (128, 128, 128)
    assert pixels["cmyk.jpg"][0] > 240 and max(pixels["cmyk.jpg"][1:]) < 15  # red, after JPEG rounding
    assert pixels["clear.png"] == (255, 255, 255)  # fully transparent on white

    out = tmp_path / "run"
    result = train_cli(capsys, *TINY, "--data", data, "--output", out, "train.max_steps=1", "train.batch_size=3")
    assert result.code == 0, result.err[-2000:]
    assert "3 of 3 samples usable, 0 skipped" in result.out and "training 3 samples" in result.out
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert snapshot(img, data) == before


def test_a_10000_turn_sample_is_dropped_as_too_long_and_the_rest_train(tmp_path, capsys):
    turns = [{"from": "human" if i % 2 == 0 else "gpt", "value": f"Turn {i}."} for i in range(10_000)]
    records = [{"id": "endless", "conversations": turns}] + [llava(f"q{i}", f"What is {i} + {i}?", f"{2 * i}.") for i in range(4)]
    data = write_json(tmp_path / "data.json", records)
    before = snapshot(data)
    out = tmp_path / "run"
    result = train_cli(capsys, *TINY, "--data", data, "--output", out, "train.max_steps=1", "train.batch_size=4")
    assert result.code == 0, result.err[-2000:]
    assert "1 sample(s) exceed train.max_length=128 with their image tokens and are skipped" in result.out
    assert "training 4 samples" in result.out
    [problem] = files.read_json(out / runs.DATA_REPORT)["problems"]
    assert (problem["file"], problem["sample"], problem["code"]) == (str(data), "endless", "too_long")
    assert problem["message"].endswith(
        "tokens (image tokens included) > max_length 128; raise train.max_length or lower the image size cap"
    )
    assert snapshot(data) == before


def test_a_sample_far_over_max_length_alone_stops_with_no_sample_left(tmp_path, capsys):
    data = write_json(tmp_path / "data.json", [llava("essay", "Summarise: " + "words " * 3000, "Short.")])
    out = tmp_path / "run"
    result = train_cli(capsys, *TINY, "--data", data, "--output", out)
    assert result.code == 1
    assert "error: no sample is left to train on after the checks above" in result.err
    assert "too_long (1)" in result.err and "sample essay: " in result.err and "> max_length 128" in result.err
    assert not any(out.iterdir()), "a run that never started must leave no config behind"


def test_max_length_below_one_images_tokens_drops_every_sample(tmp_path, capsys):
    out = tmp_path / "run"
    result = train_cli(capsys, *TINY, "--output", out, "train.max_length=12")  # the tiny model's image is 16 tokens
    assert result.code == 1
    assert "error: no sample is left to train on after the checks above" in result.err
    assert "too_long (1000)" in result.err and "> max_length 12; raise train.max_length or lower the image size cap" in result.err
    assert not any(out.iterdir())


# ---------------------------------------------------------------- image archives, `--images x.zip`


def make_zip(path: Path, members: dict[str, bytes], links: dict[str, str] = {}) -> Path:  # noqa: B006 (read only)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        for name, target in links.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16  # a symbolic link, as `zip --symlinks` stores it
            archive.writestr(info, target)
    return path


def declare_sizes(path: Path, sizes: dict[str, int]) -> Path:
    """Rewrite the central directory so members declare `sizes` uncompressed bytes (a zip bomb's header)."""
    raw = bytearray(path.read_bytes())
    at = raw.index(b"PK\x01\x02")
    while at != -1:
        name_length = struct.unpack_from("<H", raw, at + 28)[0]
        name = raw[at + 46 : at + 46 + name_length].decode()
        if name in sizes:
            struct.pack_into("<I", raw, at + 24, sizes[name])
        at = raw.find(b"PK\x01\x02", at + 46)
    path.write_bytes(bytes(raw))
    return path


def zip_slip(path):
    return make_zip(path, {"a/red.png": RED_PNG, "../evil.png": RED_PNG})


def zip_absolute(path):
    return make_zip(path, {"a/red.png": RED_PNG, "/tmp/evil.png": RED_PNG})


def zip_symlink(path):
    return make_zip(path, {"a/red.png": RED_PNG}, links={"a/link.png": "/etc/passwd"})


def zip_bomb(path):
    members = {f"bomb/{i}.png": b"\0" * 16 for i in range(17)}
    return declare_sizes(make_zip(path, {"a/red.png": RED_PNG, **members}), {name: 0xFFFF_FFF0 for name in members})


def zip_corrupt(path):
    whole = make_zip(path, {"a/red.png": RED_PNG, "a/more.png": RED_PNG}).read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    return path


# name -> (builder, the error after "<path>: ")
ARCHIVE_FAULTS = {
    "zip-slip-member": (zip_slip, "[archive_unsafe_member] {zip}: member '../evil.png' has an absolute path or '..'; archive refused"),
    "absolute-member": (
        zip_absolute,
        "[archive_unsafe_member] {zip}: member '/tmp/evil.png' has an absolute path or '..'; archive refused",
    ),
    "symlink-member": (zip_symlink, "[archive_unsafe_member] {zip}: member 'a/link.png' is a symbolic link; archive refused"),
    "zip-bomb": (zip_bomb, "[archive_too_large] {zip}: members would unpack to 68.0 GiB, more than the limit of 64 GiB"),
    "corrupt-zip": (zip_corrupt, "[archive_corrupt] {zip}: not a readable .zip archive (File is not a zip file)"),
}


@pytest.mark.parametrize("entry", ["check", "train"])
@pytest.mark.parametrize("fault", list(ARCHIVE_FAULTS))
def test_hostile_archive_is_refused_whole(tmp_path, capsys, fault, entry):
    build, message = ARCHIVE_FAULTS[fault]
    archive = build(tmp_path / "images.zip")
    data = write_json(tmp_path / "data.json", [GOOD, llava("pic", "<image>\nWhat color?", "Red.", image="a/red.png")])
    before = snapshot(tmp_path)
    if entry == "check":
        result = check_cli(capsys, data, "--images", archive)
    else:
        result = train_cli(capsys, "--preset", "tiny", "--data", data, "--images", archive, "--output", tmp_path / "run")
        (tmp_path / "run").rmdir()  # made (empty) before the data is read; nothing in it
    assert result.code == 1
    assert result.err.strip() == f"error: {data}: {message.format(zip=archive)}"
    assert snapshot(tmp_path) == before  # nothing extracted, nothing written
    assert not list(tmp_path.parent.rglob("evil.png"))


def test_one_member_declaring_4_gib_is_refused_unread(tmp_path, capsys):
    archive = declare_sizes(
        make_zip(tmp_path / "images.zip", {"a/red.png": RED_PNG, "a/bomb.png": b"\0" * 16}), {"a/bomb.png": 0xFFFF_FFF0}
    )
    data = write_json(
        tmp_path / "data.json", [llava("ok", "<image>\nColor?", image="a/red.png"), llava("bomb", "<image>\nColor?", image="a/bomb.png")]
    )
    before = snapshot(tmp_path)
    result = check_cli(capsys, data, "--images", archive)
    assert result.code == 0
    assert result.out.startswith(f"{data}: 1 of 2 samples usable, 1 skipped")
    # image_too_large, not image_unreadable: the 16 stored bytes would fail their CRC if they were read
    assert "sample bomb (#1): image 'a/bomb.png' is a 4,096 MiB file, over the limit of 1,024 MiB" in result.out
    assert snapshot(tmp_path) == before


def test_nested_zip_is_not_opened(tmp_path, capsys):
    inner = make_zip(tmp_path / "inner.zip", {"b/blue.png": RED_PNG}).read_bytes()
    (tmp_path / "inner.zip").unlink()
    archive = make_zip(tmp_path / "images.zip", {"inner.zip": inner})
    records = [GOOD, llava("inside", "<image>\nColor?", image="b/blue.png"), llava("the-zip", "<image>\nColor?", image="inner.zip")]
    data = write_json(tmp_path / "data.json", records)
    before = snapshot(tmp_path)
    result = check_cli(capsys, data, "--images", archive)
    assert result.code == 0
    assert "sample inside (#1): image 'b/blue.png' is not in archive images.zip" in result.out
    assert "sample the-zip (#2): image 'inner.zip' is not a readable image (UnidentifiedImageError" in result.out
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- config and command line


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "nope"], "error: unknown preset 'nope'. Available presets: "),
        (
            ["--preset", "tiny", "train.learnin_rate=1e-4"],
            "error: override 'train.learnin_rate=1e-4': unknown key 'train.learnin_rate'. Valid keys in 'train': ",
        ),
        (
            ["--preset", "tiny", "train.batch_size=four"],
            "error: override 'train.batch_size=four': train.batch_size: expected int, got str 'four'",
        ),
        (["--preset", "tiny", "train.learning_rate=-1e-3"], "error: train.learning_rate=-0.001: must be positive"),
        (["--preset", "tiny", "lora.r=0"], "error: lora.r=0: must be at least 1"),
    ],
    ids=["unknown-preset", "unknown-key", "wrong-type", "negative-lr", "rank-0"],
)
def test_bad_config_stops_before_anything_is_written(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    result = train_cli(capsys, *args, "--output", out)
    assert result.code == 1
    assert result.err.startswith(message)
    assert "Traceback" not in result.err
    assert not out.exists()


def test_overrides_on_both_sides_of_an_option_are_all_applied(tmp_path, capsys):
    """`--preset tiny loss.mode=response --output X train.max_length=12`: argparse alone rejects the second half."""
    result = train_cli(capsys, "--preset", "tiny", "loss.mode=response", "--output", tmp_path / "run", "train.max_length=12")
    assert result.code == 1, result.err
    assert "not used by loss mode response" in result.out
    assert "> max_length 12" in result.err and "no sample is left" in result.err


def test_unknown_key_in_a_config_file_names_the_file(tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_text("trian:\n  epochs: 2\n")
    result = train_cli(capsys, "--preset", "tiny", "--config", config, "--output", tmp_path / "run")
    assert result.code == 1
    assert result.err.startswith(f"error: {config}: unknown key 'trian'. Valid top-level keys: ")
    assert config.read_text() == "trian:\n  epochs: 2\n" and not (tmp_path / "run").exists()


def test_output_inside_a_regular_file_is_refused(tmp_path, capsys):
    """Not writable whoever runs it (root ignores chmod): a folder can't be made inside a file."""
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\n")
    result = train_cli(capsys, "--preset", "tiny", "--output", notes / "run")
    assert result.code == 1
    assert result.err.strip() == f"error: output folder {notes / 'run'} is not writable: Not a directory"
    assert notes.read_text() == "keep me\n"


def test_output_that_is_a_regular_file_is_refused(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\n")
    result = train_cli(capsys, "--preset", "tiny", "--output", notes)
    assert result.code == 1
    assert result.err.strip() == f"error: output {notes} is a file, not a folder; choose another --output"
    assert notes.read_text() == "keep me\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; see test_output_inside_a_regular_file_is_refused")
def test_read_only_output_folder_is_refused(tmp_path, capsys):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        result = train_cli(capsys, "--preset", "tiny", "--output", parent / "run")
    finally:
        parent.chmod(0o755)
    assert result.code == 1
    assert result.err.strip() == f"error: output folder {parent / 'run'} is not writable: Permission denied"
    assert not any(parent.iterdir())


def test_output_holding_another_run_is_refused_and_untouched(four_step_run, tmp_path, capsys):
    run = copy_run(four_step_run, tmp_path / "run")
    before = snapshot(run)
    result = train_cli(capsys, *TINY, "--output", run, "train.max_steps=2")
    assert result.code == 1
    assert result.err.strip() == f"error: {run} already holds files; pass --resume to continue that run or --overwrite to replace it"
    assert snapshot(run) == before


# ---------------------------------------------------------------- killed processes and torn checkpoints


@pytest.mark.slow
def test_sigkill_during_training_then_resume_loses_nothing(tmp_path, capsys):
    """Killed the moment checkpoint-4 appears (usually mid-save); --resume finishes with every step logged once."""
    run = tmp_path / "run"
    args = [*TINY, "train.max_steps=8", "--output", str(run)]
    process = popen_python("-m", "l2t.train", *args, log=tmp_path / "train.log")
    try:
        wait_for(lambda: (run / "checkpoints" / "checkpoint-4").exists(), 240, "checkpoint-4", process)
    finally:
        kill(process)
    assert not (run / runs.ADAPTER).exists(), "the run finished before it was killed; the test proves nothing"
    assert checkpoint_complete(run / "checkpoints" / "checkpoint-2")
    kept = runs.read_metrics(run)

    result = train_cli(capsys, *args, "--resume")
    assert result.code == 0, result.err[-2000:]
    resumed_at = re.search(r"^resumed at step (\d+) of 8$", result.out, re.M)
    # From checkpoint-4, or checkpoint-2 if the kill tore checkpoint-4: not from the beginning.
    assert resumed_at and int(resumed_at.group(1)) in (2, 4), "the resumed run did not start at step 2 or 4"
    assert metric_steps(run) == list(range(1, 9)), "a step is missing or logged twice"
    step = int(resumed_at.group(1))
    for old, new in zip(kept[:step], runs.read_metrics(run)[:step], strict=True):
        assert old == new  # rows up to the checkpoint are the ones logged before the kill
    assert status_of(run)["state"] == "finished"
    assert (run / runs.ADAPTER / "adapter_model.safetensors").exists()


def tear_missing_state(checkpoint: Path) -> None:
    (checkpoint / "trainer_state.json").unlink()  # killed before the Trainer wrote it (it writes it last)


def tear_truncated_state(checkpoint: Path) -> None:
    state = checkpoint / "trainer_state.json"
    state.write_bytes(state.read_bytes()[:100])  # killed while it was being written


def tear_missing_weights(checkpoint: Path) -> None:
    (checkpoint / "adapter_model.safetensors").unlink()  # lost from the folder


@pytest.mark.parametrize("tear", [tear_missing_state, tear_truncated_state, tear_missing_weights], ids=lambda f: f.__name__[5:])
def test_resume_passes_over_a_torn_checkpoint(four_step_run, tmp_path, capsys, tear):
    run = copy_run(four_step_run, tmp_path / "run")
    tear(run / "checkpoints" / "checkpoint-4")
    intact = snapshot(run / "checkpoints" / "checkpoint-2")
    result = train_cli(capsys, *TINY, "train.max_steps=4", "--output", run, "--resume")
    assert result.code == 0, result.err[-3000:]
    assert "--resume: checkpoint-4 is incomplete (interrupted while it was saved); using an earlier checkpoint" in result.out
    assert snapshot(run / "checkpoints" / "checkpoint-2") == intact
    assert metric_steps(run) == [1, 2, 3, 4]
    for straight, resumed in zip(runs.read_metrics(four_step_run), runs.read_metrics(run), strict=True):
        assert abs(straight["loss"] - resumed["loss"]) < 1e-4, (straight["step"], straight["loss"], resumed["loss"])
    assert checkpoint_complete(run / "checkpoints" / "checkpoint-4")


SLOW_EXPORT = """
import sys, time
import l2t.merge as merge

finish_files = merge.finish_files

def finish_then_wait(folder, mode):
    finish_files(folder, mode)
    time.sleep(300)  # the kill lands here: every file written, nothing renamed into place yet

merge.finish_files = finish_then_wait
sys.exit(merge.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_during_merge_leaves_no_half_written_model(trained_run, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "previous-export.txt").write_text("an export the user already had\n")
    run_before, out_before = snapshot(trained_run), snapshot(out)
    process = popen_python("-c", SLOW_EXPORT, str(trained_run), "--out", str(out), "--overwrite", "--no-check", log=tmp_path / "merge.log")
    try:
        wait_for(lambda: list(tmp_path.glob(".merged.merging-*/merge_report.json")), 240, "the temp folder of the export", process)
    finally:
        kill(process)
    assert snapshot(out) == out_before, "the killed merge changed --out"
    assert [p.name[:16] for p in tmp_path.glob(".merged.*")] == [".merged.merging-"]

    result = cli(merge_main, [trained_run, "--out", out, "--overwrite", "--no-check"], capsys)
    assert result.code == 0, result.err
    assert {"config.json", "merge_report.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert any(out.glob("*.safetensors")) and not (out / "previous-export.txt").exists()
    assert not list(tmp_path.glob(".merged.*")), "the rerun must clear what the killed merge left"
    assert snapshot(trained_run) == run_before


# ---------------------------------------------------------------- a full disk


def fail_fsync_of(monkeypatch, name: str) -> None:
    """os.fsync raises ENOSPC for the temp file of `name` (an atomic write's last step before its rename)."""
    real_fsync = os.fsync

    def fsync(fd):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(f".{name}."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("name", [runs.CONFIG, runs.TEMPLATES])
def test_disk_full_during_an_atomic_write_keeps_the_old_file(four_step_run, tmp_path, capsys, monkeypatch, name):
    run = copy_run(four_step_run, tmp_path / "run")
    before = snapshot(run)
    fail_fsync_of(monkeypatch, name)
    result = train_cli(capsys, *TINY, "train.max_steps=4", "--output", run, "--resume")
    assert result.code == 1
    assert result.err.startswith("error: the disk is full: [Errno 28] No space left on device")
    assert "continue with --resume" in result.err
    assert (run / name).read_bytes() == before[str(run / name)]
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    if name == runs.CONFIG:  # the first write of a run: nothing else was touched
        assert snapshot(run) == before


def test_disk_full_while_saving_a_checkpoint_then_resume(four_step_run, tmp_path, capsys, monkeypatch):
    run = copy_run(four_step_run, tmp_path / "run")
    earlier = snapshot(run / "checkpoints" / "checkpoint-4", run / runs.ADAPTER)
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if "checkpoint-6" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    args = [*TINY, "train.max_steps=6", "--output", run, "--resume"]
    result = train_cli(capsys, *args)
    assert result.code == 1
    assert error_text(result).startswith("error: the disk is full: [Errno 28] No space left on device: ") and "checkpoint-6" in result.err
    assert status_of(run)["state"] == "failed" and status_of(run)["error"] == "the disk is full"
    assert snapshot(run / "checkpoints" / "checkpoint-4", run / runs.ADAPTER) == earlier

    monkeypatch.undo()  # space freed
    result = train_cli(capsys, *args)
    assert result.code == 0, result.err[-2000:]
    assert "checkpoint-6 is incomplete" in result.out
    assert metric_steps(run) == [1, 2, 3, 4, 5, 6] and status_of(run)["state"] == "finished"


def test_disk_full_while_saving_the_adapter_keeps_the_old_one(four_step_run, tmp_path, capsys, monkeypatch):
    from peft import PeftModel
    from safetensors import SafetensorError

    run = copy_run(four_step_run, tmp_path / "run")
    adapter = snapshot(run / runs.ADAPTER)
    real_save = PeftModel.save_pretrained

    def save_pretrained(self, folder, *args, **kwargs):
        if str(folder).endswith(".adapter.tmp"):
            Path(folder).mkdir()
            (Path(folder) / "adapter_config.json").write_text("{")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")  # what safetensors raises
        return real_save(self, folder, *args, **kwargs)

    monkeypatch.setattr(PeftModel, "save_pretrained", save_pretrained)
    result = train_cli(capsys, *TINY, "train.max_steps=4", "--output", run, "--resume")
    assert result.code == 1
    assert error_text(result).startswith(
        "error: the disk is full: Error while serializing: I/O error: No space left on device (os error 28)"
    )
    assert snapshot(run / runs.ADAPTER) == adapter
    assert not (run / ".adapter.tmp").exists(), "a half-written adapter was left behind"
    assert status_of(run)["state"] == "failed"


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: room for a tiny run's first checkpoint, not its second."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_really_full_disk_stops_with_a_message_then_resume(small_disk, capsys):
    """torch.save and safetensors don't raise ENOSPC as an OSError on a full disk; the message must still say so."""
    run = small_disk / "run"
    args = [*TINY, "train.max_steps=4", "--output", run]
    result = train_cli(capsys, *args)
    assert result.code == 1
    assert error_text(result).startswith("error: the disk is full: ")
    assert "Traceback" not in result.err
    assert checkpoint_complete(run / "checkpoints" / "checkpoint-2") and not (run / runs.ADAPTER).exists()

    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)  # space freed
    result = train_cli(capsys, *args, "--resume")
    assert result.code == 0, result.err[-2000:]
    assert metric_steps(run) == [1, 2, 3, 4] and status_of(run)["state"] == "finished"


# ---------------------------------------------------------------- the web UI


def start_kwargs(client, **by_label) -> dict:
    """/start_training's arguments: every widget at its default, then the ones named by their label."""
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/start_training"]["parameters"]
    kwargs = {p["parameter_name"]: p.get("parameter_default") for p in params}
    names = {p["label"]: p["parameter_name"] for p in params}
    return {**kwargs, **{names[label]: value for label, value in by_label.items()}}


def state_of(status_html: str) -> str:
    return re.search(r'data-state="(\w+)"', status_html).group(1)


def wait_for_state(client, timeout: float) -> tuple[str, str, str]:
    """Poll /train_progress until the run is neither preparing nor running: (state, status HTML, log)."""
    deadline = time.time() + timeout
    while True:
        status, _, log = client.predict(api_name="/train_progress")
        if state_of(status) not in ("preparing", "running", "stopping") or time.time() > deadline:
            return state_of(status), status, log
        time.sleep(1)


@pytest.mark.slow
def test_two_starts_at_once_from_two_clients_one_is_refused(app):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    clients = [Client(app.url, verbose=False) for _ in range(2)]
    for client in clients:
        client.predict("tiny", "l2t", api_name="/use_demo_data")

    def start(i: int):
        kwargs = start_kwargs(clients[i], **{"Run name": f"race-{i}", "Max steps (0: use epochs)": 2})
        try:
            return clients[i].predict(**kwargs, api_name="/start_training")
        except AppError as exc:
            return exc

    try:
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(start, [0, 1]))
        refused = [i for i, r in enumerate(results) if isinstance(r, AppError)]
        assert len(refused) == 1, results
        assert "A train job is already running (race-" in str(results[refused[0]])
        started = 1 - refused[0]
        assert (app.context.runs_dir / f"race-{started}").is_dir()
        assert not (app.context.runs_dir / f"race-{refused[0]}").exists(), "the refused start left a folder"
    finally:
        app.context.jobs.stop_all()


@pytest.mark.slow
def test_killed_ui_training_shows_failed_and_resume_finishes(app):
    client = app.client
    client.predict("tiny", "l2t", api_name="/use_demo_data")
    extra = "train.save_steps=2\ntrain.logging_steps=1\ntrain.preview_samples=0"
    kwargs = start_kwargs(client, **{"Run name": "killed", "Max steps (0: use epochs)": 6, "key=value, one per line": extra})
    client.predict(**kwargs, api_name="/start_training")
    run = app.context.runs_dir / "killed"
    job = app.context.jobs.get("train")
    wait_for(lambda: checkpoint_complete(run / "checkpoints" / "checkpoint-2"), 240, "checkpoint-2", job.process)
    os.kill(job.pid, signal.SIGKILL)
    job.wait(30)
    assert not (run / runs.ADAPTER).exists(), "the run finished before it was killed; the test proves nothing"

    state, status, _ = wait_for_state(client, 10)
    assert state == "failed", status
    assert "Press Resume" in status or "press Resume" in status
    from app.run_view import train_state

    assert train_state(None, run).state == "interrupted"  # what a restarted server shows for the same folder

    client.predict(api_name="/resume_training")
    state, status, log = wait_for_state(client, 240)
    assert state == "finished", log
    assert metric_steps(run) == [1, 2, 3, 4, 5, 6]
    assert (run / runs.ADAPTER / "adapter_model.safetensors").exists()


def test_killed_job_is_reported_as_killed(tmp_path):
    """A SIGKILLed training must say it was killed, not quote whatever line its log happened to end with."""
    from app.jobs import JobManager
    from app.run_view import train_state

    run = tmp_path / "run"
    run.mkdir()
    jobs = JobManager()
    job = jobs.start("train", [sys.executable, "-c", "print('step', 1 + 2, flush=True); import time; time.sleep(60)"], run, run / runs.LOG)
    files.atomic_write_json(run / runs.STATUS, {"state": "running", "pid": job.pid, "updated": time.time(), "step": 3, "total": 6})
    wait_for(lambda: "step 3" in (run / runs.LOG).read_text(), 30, "the job's first line")
    os.kill(job.pid, signal.SIGKILL)
    job.wait(30)
    state = train_state(job, run)
    assert state.state == "failed"
    assert "killed" in state.error.lower(), f"the page shows {state.error!r}"


@pytest.mark.slow
def test_files_outside_the_runs_and_uploads_folders_are_refused(app, tmp_path):
    import httpx

    secret = app.root / "secret.txt"  # beside the runs and uploads folders
    secret.write_text("not for the browser")
    (app.context.runs_dir / "mine").mkdir(exist_ok=True)
    (app.context.runs_dir / "mine" / "config.yaml").write_text("preset: tiny\n")
    before = snapshot(app.root)

    def get(path: str) -> httpx.Response:
        return httpx.get(f"{app.url}gradio_api/file={path}", timeout=30)

    assert get(str(app.context.runs_dir / "mine" / "config.yaml")).status_code == 200  # the runs folder is served
    for path in [
        "/etc/passwd",
        str(secret),
        f"{app.context.runs_dir}/../secret.txt",
        f"{app.context.uploads_dir}/../secret.txt",
        "../secret.txt",
    ]:
        response = get(path)
        assert response.status_code in (403, 404), path
        assert "not for the browser" not in response.text and "root:" not in response.text

    def call(api: str, data: list) -> str:
        """A raw API call, as a client that skips the upload and names a server path would make."""
        event = httpx.post(f"{app.url}gradio_api/call/{api}", json={"data": data}, timeout=30).json()["event_id"]
        return httpx.get(f"{app.url}gradio_api/call/{api}/{event}", timeout=60).text

    server_file = {"path": str(secret), "meta": {"_type": "gradio.FileData"}}
    for api, data in [("check_image", ["mine", server_file]), ("load_upload", [server_file, None, "tiny", "l2t"])]:
        answer = call(api, data)
        assert "event: error" in answer and "not for the browser" not in answer, (api, answer)
    for api, data in [("held_out_sample", ["../ui", 0, None]), ("adapter_zip", ["../../etc"]), ("compare", ["..", None, "Hi"])]:
        answer = call(api, data)
        assert "event: error" in answer and "is not a run name" in answer, (api, answer)
    assert snapshot(app.root) == before  # no copy of the secret anywhere under the app's folders

    from app.common import AppContext
    from app.data_tab import load_server_paths

    public = AppContext(app.context.runs_dir, app.context.uploads_dir, app.context.jobs, allow_server_paths=False)
    with pytest.raises(Exception, match="Reading files on the server is off"):
        load_server_paths(public, str(secret), "", "tiny", "l2t")


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on `port`, read from /proc/net/tcp and tcp6."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            rows = [line.split() for line in Path(table).read_text().splitlines()[1:]]
        except OSError:
            continue
        for row in rows:
            address, hex_port = row[1].split(":")
            if row[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)  # printed as 32-bit words in host (little-endian) order
                found.add(socket.inet_ntop(family, b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the listening sockets from /proc (Linux)")
def test_python_m_app_listens_on_localhost_only(tmp_path, monkeypatch):
    import app.ui
    from app.__main__ import main as app_main

    launched = {}
    real_serve = app.ui.serve

    def serve_in_background(demo, context, **kwargs):
        launched.update(demo=demo, context=context, **kwargs)
        return real_serve(demo, context, **{**kwargs, "block": False})

    monkeypatch.setattr(app.ui, "serve", serve_in_background)
    from conftest import free_port

    port = free_port()
    assert app_main(["--port", str(port), "--runs-dir", str(tmp_path / "runs"), "--uploads-dir", str(tmp_path / "uploads")]) == 0
    try:
        assert launched["host"] == "127.0.0.1" and launched["share"] is False and launched["auth"] is None
        assert listening_addresses(port) == {"127.0.0.1"}
    finally:
        launched["demo"].close()
