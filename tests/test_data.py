"""Loading instruction data: both formats, every reason a sample is refused (named
with its file and sample), skip-and-count vs strict, images from a folder or a
zip, and the `python -m l2t.data` command."""

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from l2t import data
from l2t.data import REASONS, DataError, Sample, check_lengths, load_samples, parse_record

GOOD = {"id": "good", "conversations": [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hi."}]}


def png(size=(8, 6), color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.png").write_bytes(png())
    (tmp_path / "img" / "blue.png").write_bytes(png((4, 4), (0, 0, 255)))
    (tmp_path / "img" / "notes.png").write_text("not an image")
    return tmp_path


def write_json(path, records) -> str:
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return str(path)


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def llava(id, human, gpt="Fine.", image=None):
    record = {"id": id, "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}
    if image is not None:
        record["image"] = image
    return record


def messages(*turns, images=None, **extra):
    record = {"messages": [{"role": r, "content": c} for r, c in turns], **extra}
    if images is not None:
        record["images"] = images
    return record


# ---------------------------------------------------------------- reason codes, one sample each

# code -> (bad record, name of the sample in the report, message)
SAMPLE_REASONS = {
    "not_an_object": (["a string"], "#1", "expected an object, got list"),
    "unknown_format": ({"id": "u1", "turns": []}, "u1 (#1)", "has neither 'conversations' (LLaVA) nor 'messages'"),
    "missing_field": (
        {"id": "m1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt"}]},
        "m1 (#1)",
        "conversations[1] has no 'value'",
    ),
    "wrong_type": (
        {"id": 7, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": 42}]},
        "7 (#1)",
        "conversations[1].value must be a string, got int",
    ),
    "unknown_role": (
        {"id": "r1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yo"}]},
        "r1 (#1)",
        "conversations[1] has 'from': 'bot'; expected human, gpt or system",
    ),
    "roles_not_alternating": (
        messages(("user", "Hi"), ("user", "Again"), ("assistant", "Yes")),
        "#1",
        "turn 2 is 'user' where 'assistant' was expected (a system message may only come first)",
    ),
    "no_final_response": (
        messages(("user", "Hi"), ("assistant", "Yes"), ("user", "And?"), id="f1"),
        "f1 (#1)",
        "the last turn is 'user'; the conversation must end with an assistant answer",
    ),
    "empty_text": (messages(("user", "Hi"), ("assistant", "  \n"), id="e1"), "e1 (#1)", "turn 2 (assistant) is empty"),
    "image_in_response": (
        llava("ir", "<image>\nWhat?", gpt="Look: <image>", image=["img/red.png", "img/blue.png"]),
        "ir (#1)",
        "turn 2 (assistant) contains <image>",
    ),
    "image_in_system": (
        messages(("system", "<image> You see this."), ("user", "What?"), ("assistant", "A dot."), images=["img/red.png"], id="is"),
        "is (#1)",
        "the system message contains <image>; images go in user turns",
    ),
    "image_count_mismatch": (
        messages(("user", "<image> and <image>?"), ("assistant", "Same."), images=["img/red.png"], id="c1"),
        "c1 (#1)",
        "2 <image> placeholder(s) but 1 image(s)",
    ),
    "image_path_unsafe": (
        llava("p1", "<image>\nWhat?", image="../outside.png"),
        "p1 (#1)",
        "image path '../outside.png' leaves the image folder ('..')",
    ),
    "image_missing": (llava("p2", "<image>\nWhat?", image="img/green.png"), "p2 (#1)", None),
    "image_unreadable": (llava("p3", "<image>\nWhat?", image="img/notes.png"), "p3 (#1)", None),
}


@pytest.mark.parametrize("code", sorted(SAMPLE_REASONS))
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_sample_reason(folder, code, suffix):
    record, name, message = SAMPLE_REASONS[code]
    path = folder / f"data{suffix}"
    write = write_json if suffix == ".json" else write_jsonl
    write(path, [GOOD, record])
    if suffix == ".jsonl":
        name = name.replace("#1", "line 2")
    samples, report = load_samples(path)
    assert [s.id for s in samples] == ["good"]
    assert (report.total, report.ok) == (2, 1)
    [problem] = report.problems
    assert (problem.file, problem.sample, problem.code) == (str(path), name, code)
    if message is not None:
        assert problem.message == message
    assert str(problem) == f"{path}: sample {name}: [{code}] {problem.message}"


def test_image_missing_and_unreadable_messages(folder):
    path = write_json(folder / "d.json", [GOOD, SAMPLE_REASONS["image_missing"][0], SAMPLE_REASONS["image_unreadable"][0]])
    _, report = load_samples(path)
    assert [p.message for p in report.problems] == [
        f"image file 'img/green.png' not found under {folder}",
        "image 'img/notes.png' is not a readable image (UnidentifiedImageError: not an image format Pillow knows)",
    ]


def test_image_too_large(folder):
    path = write_json(folder / "d.json", [GOOD, llava("big", "<image>\nWhat?", image="img/red.png")])
    _, report = load_samples(path, max_pixels=47)
    [problem] = report.problems
    assert (problem.sample, problem.code, problem.message) == ("big (#1)", "image_too_large", "image 'img/red.png' is 8x6 = 48 pixels, over the limit of 47")
    assert load_samples(path, max_pixels=48)[0][1].image_sizes == [(8, 6)]


def test_invalid_json_in_a_json_file_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"id": "a",\n   "conversations": [}\n]\n')
    with pytest.raises(DataError) as info:
        load_samples(path)
    assert str(info.value) == f"{path}: [invalid_json] Expecting value at line 3, column 22"


def test_invalid_json_line_in_jsonl_is_one_bad_sample(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + '{"id": "b", "messages": [\n' + json.dumps(GOOD) + "\n")
    samples, report = load_samples(path)
    assert len(samples) == 2 and report.total == 3
    [problem] = report.problems
    assert str(problem) == f"{path}: sample line 2: [invalid_json] Expecting value at column 26"


@pytest.mark.parametrize("content, found", [('{"id": "x"}', "found one object"), ("42", "found int"), ('"text"', "found str")])
def test_not_a_list(tmp_path, content, found):
    path = tmp_path / "d.json"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_samples(path)
    assert str(info.value) == f"{path}: [not_a_list] a JSON data file must hold a list of samples, {found}"


def test_invalid_encoding(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(json.dumps([llava("é", "Ça va ?")], ensure_ascii=False).encode("latin-1"))
    with pytest.raises(DataError) as info:
        load_samples(path)
    assert str(info.value) == f"{path}: [invalid_encoding] not UTF-8 text (bad byte at offset 9); save the file as UTF-8"


def test_file_unreadable_and_empty(tmp_path):
    with pytest.raises(DataError, match=r"\[file_unreadable\] cannot read data file") as info:
        load_samples(tmp_path / "missing.json")
    assert str(tmp_path / "missing.json") in str(info.value)
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match=r"empty.jsonl: \[invalid_json\] the file is empty"):
        load_samples(tmp_path / "empty.jsonl")


def test_too_long_via_check_lengths(tmp_path):
    path = write_json(tmp_path / "d.json", [GOOD, llava("long", "Tell me everything.")])
    _, report = load_samples(path)
    assert check_lengths({"good": 20, "long": 21}, 20, report) == {"long"}
    [problem] = report.problems
    assert str(problem) == (
        f"{path}: sample long: [too_long] 21 tokens (image tokens included) > max_length 20; "
        "raise train.max_length or lower the image size cap"
    )
    assert (report.ok, report.counts()) == (1, {"too_long": 1})


def test_every_reason_code_is_tested():
    tested = set(SAMPLE_REASONS) | {"image_too_large", "invalid_json", "not_a_list", "invalid_encoding", "file_unreadable", "too_long"}
    assert tested == set(REASONS)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"conversations": "hi"}, "'conversations' must be a list, got str"),
        ({"conversations": ["hi"]}, "conversations[0] must be an object, got str"),
        ({"conversations": GOOD["conversations"], "image": 3}, "'image' must be a path string or a list of path strings"),
        ({"messages": {"role": "user"}}, "'messages' must be a list, got dict"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0] must be {'type': 'image'} or {'type': 'text', 'text': ...}"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text must be a string, got NoneType"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content must be a string, got NoneType"),
        ({"messages": [], "images": "a.png"}, "'images' must be a list of path strings, got 'a.png'"),
    ],
)
def test_wrong_type_messages(record, message):
    with pytest.raises(data._Bad) as info:
        parse_record(record, "#0")
    assert (info.value.code, str(info.value)) == ("wrong_type", message)


@pytest.mark.parametrize(
    "record, code, message",
    [
        ({"messages": [{"content": "Hi"}]}, "missing_field", "messages[0] has no 'role'"),
        ({"messages": []}, "missing_field", "the conversation has no turns"),
        ({"messages": [{"role": "system", "content": "Be nice."}]}, "missing_field", "the conversation has no turns"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "unknown_role", "messages[0] has role 'tool'; expected system, user or assistant"),
        (messages(("user", "Hi"), ("system", "Late."), ("assistant", "Yes")), "roles_not_alternating", "turn 2 is 'system' where 'assistant' was expected (a system message may only come first)"),
        (messages(("assistant", "Hi"), ("user", "Yes")), "roles_not_alternating", "turn 1 is 'assistant' where 'user' was expected (a system message may only come first)"),
        (messages(("user", ""), ("assistant", "Yes")), "empty_text", "turn 1 (user) is empty"),
        (messages(("system", " "), ("user", "Hi"), ("assistant", "Yes")), "empty_text", "turn 1 (system) is empty"),
        (llava("x", "What?", image="a.png"), "image_count_mismatch", "0 <image> placeholder(s) but 1 image(s)"),
        (messages(("user", "<image>What?"), ("assistant", "A.")), "image_count_mismatch", "1 <image> placeholder(s) but 0 image(s)"),
    ],
)
def test_structure_problems(record, code, message):
    with pytest.raises(data._Bad) as info:
        parse_record(record, "#0")
    assert (info.value.code, str(info.value)) == (code, message)


# ---------------------------------------------------------------- formats


def test_llava_json_and_jsonl_load_the_same_samples(folder):
    records = [
        {"id": "a", "image": "img/red.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "A rectangle."}],
         "objects": ["rect"]},
        {"id": 12, "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    ]  # fmt: skip
    from_json, report = load_samples(write_json(folder / "d.json", records))
    from_jsonl, _ = load_samples(write_jsonl(folder / "d.jsonl", records))
    assert from_json == from_jsonl
    assert (report.total, report.ok, report.problems) == (2, 2, [])
    assert from_json == [
        Sample(
            id="a",
            messages=[
                {"role": "user", "content": "<image>What color is it?"},
                {"role": "assistant", "content": "Red."},
                {"role": "user", "content": "And the shape?"},
                {"role": "assistant", "content": "A rectangle."},
            ],
            images=["img/red.png"],
            image_sizes=[(8, 6)],
            meta={"objects": ["rect"]},
        ),
        Sample(
            id="12",
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
        ),
    ]
    assert from_json[0].instructions() == ["<image>What color is it?", "And the shape?"]


def test_llava_moves_a_single_image_to_the_start_of_its_turn(folder):
    record = llava("m", "What is this?\n<image>", image="img/red.png")
    assert parse_record(record, "#0").messages[0]["content"] == "<image>What is this?"
    record = llava("m", "Look at <image> closely.", image="img/red.png")
    assert parse_record(record, "#0").messages[0]["content"] == "<image>Look at  closely."


def test_llava_keeps_the_placement_of_several_images():
    record = llava("two", "Compare <image> with <image>.", image=["img/red.png", "img/blue.png"])
    sample = parse_record(record, "#0")
    assert sample.messages[0]["content"] == "Compare <image> with <image>."
    assert sample.images == ["img/red.png", "img/blue.png"]


def test_messages_with_string_content_keep_placement(folder):
    record = messages(
        ("system", "You are terse."),
        ("user", "Who is <image>\nthis?"),
        ("assistant", "A red box."),
        images=["img/red.png"],
        id="s1",
        answer="red",
    )
    [sample], _ = load_samples(write_jsonl(folder / "d.jsonl", [record]))
    assert sample == Sample(
        id="s1",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Who is <image>this?"},
            {"role": "assistant", "content": "A red box."},
        ],
        images=["img/red.png"],
        image_sizes=[(8, 6)],
        meta={"answer": "red"},
    )


def test_messages_with_typed_parts(folder):
    typed = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Left "}, {"type": "image"}, {"type": "text", "text": " right "}, {"type": "image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Red, blue."}]},
        ],
        "images": ["img/red.png", "img/blue.png"],
    }
    referenced = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": "img/blue.png"}, {"type": "text", "text": "Color?"}]},
            {"role": "assistant", "content": "Blue."},
        ]
    }
    samples, report = load_samples(write_json(folder / "d.json", [typed, referenced]))
    assert report.problems == []
    assert [(s.id, s.messages[0]["content"], s.images, s.image_sizes) for s in samples] == [
        ("#0", "Left <image> right <image>", ["img/red.png", "img/blue.png"], [(8, 6), (4, 4)]),
        ("#1", "<image>Color?", ["img/blue.png"], [(4, 4)]),
    ]
    assert samples[0].messages[1] == {"role": "assistant", "content": "Red, blue."}


def test_text_only_samples_need_no_image_folder(tmp_path):
    path = write_json(tmp_path / "d.json", [GOOD])
    samples, report = load_samples(path, images=tmp_path / "no-such-folder")
    assert [s.images for s in samples] == [[]] and report.ok == 1


def test_utf8_bom_and_crlf_are_accepted(tmp_path):
    json_path = tmp_path / "bom.json"
    json_path.write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD]).encode())
    jsonl_path = tmp_path / "bom.jsonl"
    jsonl_path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\r\n" + json.dumps(GOOD) + "\r\n").encode())
    assert load_samples(json_path)[1].ok == 1
    assert load_samples(jsonl_path)[1].ok == 2


def test_jsonl_strings_with_unicode_line_separators(tmp_path):
    # json.dumps(ensure_ascii=False) writes U+2028, U+0085 and U+001C raw: still one line each.
    text = "First\u2028second\x85third\x1cfourth 这是什么？🙂"
    path = write_jsonl(tmp_path / "d.jsonl", [llava("u", text, gpt="Ça va.")] * 2)
    samples, report = load_samples(path)
    assert (report.total, report.ok) == (2, 2)
    assert samples[0].messages[0]["content"] == text


@pytest.mark.parametrize("name", ["data.txt", "data.json"])
def test_jsonl_is_detected_whatever_the_suffix(tmp_path, name):
    path = tmp_path / name
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(llava("b", "Hey")) + "\n")
    assert [s.id for s in load_samples(path)[0]] == ["good", "b"]


def test_concatenated_pretty_objects_in_a_json_file_are_invalid_json(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(GOOD, indent=1) + "\n" + json.dumps(GOOD, indent=1) + "\n")
    with pytest.raises(DataError, match=r"\[invalid_json\] Extra data at line 14, column 1"):
        load_samples(path)


def test_null_image_fields_mean_no_image(tmp_path):
    records = [
        {"id": "a", "image": None, "conversations": GOOD["conversations"]},
        {"id": "b", "images": None, "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
    ]
    samples, report = load_samples(write_jsonl(tmp_path / "d.jsonl", records))
    assert [(s.id, s.images) for s in samples] == [("a", []), ("b", [])] and report.problems == []


# ---------------------------------------------------------------- skip and count, strict

MIXED = [
    GOOD,
    llava("miss-1", "<image>\nA?", image="img/none1.png"),
    llava("miss-2", "<image>\nB?", image="img/none2.png"),
    messages(("user", "Hi"), id="short"),
    llava("ok-2", "<image>\nColor?", gpt="Red.", image="img/red.png"),
]


def test_default_mode_skips_bad_samples_and_counts_them(folder):
    path = write_json(folder / "mixed.json", MIXED)
    samples, report = load_samples(path)
    assert [s.id for s in samples] == ["good", "ok-2"]
    assert report.counts() == {"image_missing": 2, "no_final_response": 1}
    assert report.summary() == (
        f"{path}: 2 of 5 samples usable, 3 skipped\n"
        "  image_missing (2): an image file is missing\n"
        f"    sample miss-1 (#1): image file 'img/none1.png' not found under {folder}\n"
        f"    sample miss-2 (#2): image file 'img/none2.png' not found under {folder}\n"
        "  no_final_response (1): the conversation must end with an assistant turn\n"
        "    sample short (#3): the last turn is 'user'; the conversation must end with an assistant answer"
    )
    assert report.to_dict()["counts"] == {"image_missing": 2, "no_final_response": 1}


def test_strict_raises_with_the_full_report(folder):
    path = write_json(folder / "mixed.json", MIXED * 2)
    with pytest.raises(DataError) as info:
        load_samples(path, strict=True)
    report = info.value.report
    assert (report.total, report.ok, len(report.problems)) == (10, 4, 6)
    message = str(info.value)
    assert message.startswith(f"{path}: 6 bad sample(s) (strict mode)\n{path}: 4 of 10 samples usable, 6 skipped\n")
    assert all(f"sample {p.sample}: {p.message}" in message for p in report.problems)  # every one, not the first 3


def test_no_usable_sample_is_an_error_with_the_report(folder):
    path = write_json(folder / "bad.json", MIXED[1:4])
    with pytest.raises(DataError, match="no usable samples") as info:
        load_samples(path)
    assert info.value.report.counts() == {"image_missing": 2, "no_final_response": 1}


# ---------------------------------------------------------------- image roots


def test_images_from_another_folder(folder, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("data")
    path = write_json(elsewhere / "d.json", [llava("a", "<image>\nWhat?", image="img/red.png")])
    with pytest.raises(DataError):  # relative to the data file's folder by default
        load_samples(path)
    [sample], _ = load_samples(path, images=folder)
    assert sample.image_sizes == [(8, 6)]


def test_missing_image_root_with_image_samples_stops(tmp_path):
    path = write_json(tmp_path / "d.json", [llava("a", "<image>\nWhat?", image="red.png")])
    with pytest.raises(DataError, match=r"\[image_root_missing\] image folder or archive '.*nowhere' does not exist"):
        load_samples(path, images=tmp_path / "nowhere")


def test_images_from_a_zip_read_in_place(folder):
    archive = folder / "images.zip"
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("img/red.png", png())
        out.writestr("img/wide.png", png((20, 5)))
    path = write_json(folder / "d.json", [llava("a", "<image>\nWhat?", image="img/wide.png"), llava("b", "<image>\nWhat?", image="img/gone.png")])
    before = sorted(folder.rglob("*"))
    samples, report = load_samples(path, images=archive)
    assert [(s.id, s.image_sizes) for s in samples] == [("a", [(20, 5)])]
    [problem] = report.problems
    assert (problem.sample, problem.code, problem.message) == ("b (#1)", "image_missing", "image 'img/gone.png' is not in archive images.zip")
    assert sorted(folder.rglob("*")) == before


def test_unsafe_zip_stops_the_load(folder):
    archive = folder / "evil.zip"
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("../evil.png", png())
    path = write_json(folder / "d.json", [llava("a", "<image>\nWhat?", image="evil.png")])
    with pytest.raises(DataError, match=r"\[archive_unsafe_member\]"):
        load_samples(path, images=archive)


def test_check_images_false_skips_opening_them(tmp_path):
    path = write_json(tmp_path / "d.json", [llava("a", "<image>\nWhat?", image="img/none.png")])
    [sample], report = load_samples(path, check_images=False)
    assert (sample.images, sample.image_sizes, report.problems) == (["img/none.png"], [], [])


# ---------------------------------------------------------------- command line


def test_cli_check(folder, capsys):
    path = write_json(folder / "mixed.json", MIXED)
    assert data.main(["check", path]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: 2 of 5 samples usable, 3 skipped\n  image_missing (2): an image file is missing\n")
    assert data.main(["check", path, "--strict", "--json", str(folder / "report.json")]) == 1
    capsys.readouterr()
    saved = json.loads((folder / "report.json").read_text())
    assert (saved["file"], saved["total"], saved["ok"], saved["counts"]) == (path, 5, 2, {"image_missing": 2, "no_final_response": 1})
    assert saved["problems"][0] == {"file": path, "sample": "miss-1 (#1)", "code": "image_missing", "message": f"image file 'img/none1.png' not found under {folder}"}


def test_cli_check_unusable_file(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{nope")
    assert data.main(["check", str(tmp_path / "bad.json")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'bad.json'}: [invalid_json] Expecting property name enclosed in double quotes at line 1, column 2\n"


def test_cli_check_subprocess(folder):
    path = write_json(folder / "mixed.json", MIXED)
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "l2t.data", "check", path, "--strict"], capture_output=True, text=True, timeout=60, cwd=repo)
    assert done.returncode == 1
    assert done.stdout.startswith(f"{path}: 2 of 5 samples usable, 3 skipped\n")


def preview_data(folder):
    records = [
        llava(f"s{i}", f"<image>\nIs shape {i} red? Answer with one word.", gpt="Yes." if i % 2 else "No.", image="img/red.png")
        for i in range(12)
    ]
    return write_json(folder / "preview.json", records)


def test_cli_preview(folder, capsys):
    path = preview_data(folder)
    assert data.main(["preview", path, "--preset", "tiny", "--index", "1", "--mode", "l2t"]) == 0
    assert capsys.readouterr().out == (
        "sample s1: 41 tokens, 9 in the loss (mode l2t, preset tiny, 1 task templates)\n"
        "      system        '<s>USER: '\n"
        "      image         '<image> x16'\n"
        "      system        '\\n'\n"
        "LOSS  instruction   'Is shape 1 red?'\n"
        "      task_template ' Answer with one word.'\n"
        "      system        '\\nASSISTANT:'\n"
        "LOSS  response      ' Yes.'\n"
        "LOSS  response_end  '</s>'\n"
    )


def test_cli_preview_errors(folder, capsys):
    path = preview_data(folder)
    assert data.main(["preview", path, "--index", "12"]) == 1
    assert capsys.readouterr().err == "error: --index 12 is out of range: the file has 12 usable samples\n"
    assert data.main(["preview", path, "--mode", "everything"]) == 1
    assert "unknown loss mode 'everything'" in capsys.readouterr().err
