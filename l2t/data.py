"""Loading instruction data: a file on disk -> checked `Sample`s and a report.

    python -m l2t.data check DATA [--images DIR_OR_ZIP] [--strict]
    python -m l2t.data preview DATA --preset tiny --index 0 --mode l2t
    python -m l2t.data preview DATA --preset smolvlm-256m model.hub_id=path/to/folder   # key=value overrides

Two formats, detected per sample:

- LLaVA: `{"id", "image": "rel/path.jpg" (or a list), "conversations":
  [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}`.
  As LLaVA does, a single image's `<image>` moves to the start of its turn.
- messages (LLaMA-Factory, TRL): `{"messages": [{"role": "user", "content":
  "<image>Who is this?"}, ...], "images": ["dir/1.jpg"]}`, where `content` may
  also be a list of parts (`{"type": "image"}`, `{"type": "text", "text": ...}`).
  The user's placement of images is kept.

Files are a JSON list or JSONL (one sample per line); a Hugging Face dataset
(a `save_to_disk` folder, parquet/arrow files, `hf:<repo_id>`) gives the same
records, one per row (`l2t.sources`). Every bad sample gets a
`Problem` naming the file, the sample (its id, else its line or index) and a
reason code; bad samples are skipped and counted, or, with `strict`, the whole
load stops with the full report. Nothing is truncated or dropped silently.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from l2t import sources
from l2t.chat import IMAGE
from l2t.errors import L2TError, print_error
from l2t.files import atomic_write_json
from l2t.images import DEFAULT_MAX_PIXELS, ImageError, ImageSource
from l2t.preview import preview_sample
from l2t.sources import SourceError

ROLE_NAMES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "system": "system",
}  # fmt: skip

REASONS = {
    "file_unreadable": "the data file can't be read",
    "invalid_encoding": "the file is not UTF-8 text",
    "invalid_json": "not valid JSON",
    "not_a_list": "a JSON data file must hold a list of samples",
    "not_an_object": "a sample must be a JSON object",
    "unknown_format": "neither LLaVA (`conversations`) nor messages (`messages`) format",
    "missing_field": "a required field is missing",
    "wrong_type": "a field has the wrong type",
    "unknown_role": "a turn has a role other than system/user/assistant",
    "roles_not_alternating": "turns must alternate user, assistant, user, ...",
    "no_final_response": "the conversation must end with an assistant turn",
    "empty_text": "a turn has no text",
    "image_in_response": "an assistant turn contains an image placeholder",
    "image_in_system": "the system message contains an image placeholder",
    "image_count_mismatch": "the number of <image> placeholders differs from the number of images",
    "image_path_unsafe": "an image path is absolute or leaves the image folder",
    "image_missing": "an image file is missing",
    "image_unreadable": "an image file is empty, corrupt or not an image",
    "image_too_large": "an image has more pixels than the limit",
    "too_long": "the sample is longer than max_length once its image tokens are counted",
}


@dataclass
class Sample:
    id: str
    messages: list[dict]
    """{"role": "system"|"user"|"assistant", "content": text with <image> placeholders}."""
    images: list[str] = field(default_factory=list)
    """Image paths relative to the image root, in placeholder order."""
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    """(width, height) per image, read while checking."""
    meta: dict = field(default_factory=dict)
    """Keys of the source record we don't use (e.g. ground truth for evaluation)."""

    def instructions(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "user"]


@dataclass
class Problem:
    file: str
    sample: str
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: sample {self.sample}: [{self.code}] {self.message}"


@dataclass
class DataReport:
    file: str
    total: int = 0
    ok: int = 0
    problems: list[Problem] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return dict(Counter(p.code for p in self.problems).most_common())

    def summary(self, examples: int = 3) -> str:
        lines = [f"{self.file}: {self.ok} of {self.total} samples usable, {len(self.problems)} skipped"]
        for code, count in self.counts().items():
            lines.append(f"  {code} ({count}): {REASONS.get(code, code)}")
            for p in [p for p in self.problems if p.code == code][:examples]:
                lines.append(f"    sample {p.sample}: {p.message}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"file": self.file, "total": self.total, "ok": self.ok, "counts": self.counts(),
                "problems": [asdict(p) for p in self.problems]}  # fmt: skip


class DataError(L2TError):
    """The data can't be used at all (or strict mode found problems); carries the report."""

    def __init__(self, message: str, report: DataReport | None = None):
        super().__init__(message)
        self.report = report


class _Bad(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _text(value, where: str) -> str:
    if not isinstance(value, str):
        raise _Bad("wrong_type", f"{where} must be a string, got {type(value).__name__}")
    return value


def _turn_list(record: dict, name: str) -> list:
    turns = record[name]
    if not isinstance(turns, list):
        raise _Bad("wrong_type", f"'{name}' must be a list, got {type(turns).__name__}")
    return turns


def _checked_turn(turn, where: str, keys: tuple[str, str]) -> dict:
    if not isinstance(turn, dict):
        raise _Bad("wrong_type", f"{where} must be an object, got {type(turn).__name__}")
    for key in keys:
        if key not in turn:
            raise _Bad("missing_field", f"{where} has no '{key}'")
    return turn


def _llava_turn(turn, i: int) -> dict:
    _checked_turn(turn, f"conversations[{i}]", ("from", "value"))
    role = ROLE_NAMES.get(turn["from"]) if isinstance(turn["from"], str) else None
    if role is None:
        raise _Bad("unknown_role", f"conversations[{i}] has 'from': {turn['from']!r}; expected human, gpt or system")
    return {"role": role, "content": _text(turn["value"], f"conversations[{i}].value")}


def _llava_turns(record: dict) -> tuple[list[dict], list[str]]:
    messages = []
    for i, turn in enumerate(_turn_list(record, "conversations")):
        try:  # the common case, in one step; anything unusual is checked and named by _llava_turn
            message = {"role": ROLE_NAMES[turn["from"]], "content": turn["value"]}
        except (TypeError, KeyError):
            message = _llava_turn(turn, i)
        if type(message["content"]) is not str:
            message = _llava_turn(turn, i)
        messages.append(message)
    # null is "no image", as exporters that write every column give text-only rows
    images = record.get("image")
    if images is None:
        images = []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise _Bad("wrong_type", "'image' must be a path string or a list of path strings")
    if len(images) == 1 and sum(m["content"].count(IMAGE) for m in messages) == 1:
        # LLaVA's convention: the single image goes to the start of its turn. (Only with one
        # placeholder: LLaVA would also fold "<image> ... <image>" into one, hiding a count mismatch.)
        for m in messages:
            if IMAGE in m["content"]:
                rest = m["content"].replace(IMAGE, "").strip()
                m["content"] = IMAGE + rest
    return messages, images


def _messages_turns(record: dict) -> tuple[list[dict], list[str]]:
    messages = []
    part_images = []
    for i, turn in enumerate(_turn_list(record, "messages")):
        _checked_turn(turn, f"messages[{i}]", ("role", "content"))
        role = turn["role"]
        if role not in ("system", "user", "assistant"):
            raise _Bad("unknown_role", f"messages[{i}] has role {role!r}; expected system, user or assistant")
        content = turn["content"]
        if isinstance(content, list):
            pieces = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image":
                    pieces.append(IMAGE)
                    ref = part.get("image") or part.get("path") or part.get("url")
                    if isinstance(ref, str):
                        part_images.append(ref)
                elif kind == "text":
                    pieces.append(_text(part.get("text"), f"messages[{i}].content[{j}].text"))
                else:
                    raise _Bad("wrong_type", f"messages[{i}].content[{j}] must be {{'type': 'image'}} or {{'type': 'text', 'text': ...}}")
            content = "".join(pieces)
        messages.append({"role": role, "content": _text(content, f"messages[{i}].content")})
    images = record.get("images")
    if images is None:
        images = part_images
    if isinstance(images, str) or not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise _Bad("wrong_type", f"'images' must be a list of path strings, got {images!r:.60}")
    return messages, images


def _check_structure(messages: list[dict], images: list[str]) -> None:
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise _Bad("missing_field", "the conversation has no turns")
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise _Bad("roles_not_alternating", f"turn {i + 1} is '{m['role']}' where '{expected}' was expected (a system message may only come first)")
    if body[-1]["role"] != "assistant":
        raise _Bad("no_final_response", f"the last turn is '{body[-1]['role']}'; the conversation must end with an assistant answer")
    placeholders = 0
    for i, m in enumerate(messages):
        content, role = m["content"], m["role"]
        if IMAGE in content:
            if role == "assistant":
                raise _Bad("image_in_response", f"turn {i + 1} (assistant) contains {IMAGE}")
            if role == "system":
                raise _Bad("image_in_system", f"the system message contains {IMAGE}; images go in user turns")
            placeholders += content.count(IMAGE)
        elif not content.strip():
            raise _Bad("empty_text", f"turn {i + 1} ({role}) is empty")
    if placeholders != len(images):
        raise _Bad("image_count_mismatch", f"{placeholders} {IMAGE} placeholder(s) but {len(images)} image(s)")


def _normalise(messages: list[dict]) -> list[dict]:
    # A newline right after <image> is the prompt format's business (it writes its own separator).
    return [{"role": m["role"], "content": m["content"].replace(IMAGE + "\n", IMAGE)} if IMAGE + "\n" in m["content"] else m for m in messages]


def parse_record(record, label: str) -> Sample:
    """One JSON record -> Sample (images not yet opened); raises _Bad."""
    if not isinstance(record, dict):
        raise _Bad("not_an_object", f"expected an object, got {type(record).__name__}")
    if "conversations" in record:
        messages, images = _llava_turns(record)
        used = {"id", "image", "conversations"}
    elif "messages" in record:
        messages, images = _messages_turns(record)
        used = {"id", "images", "messages"}
    else:
        raise _Bad("unknown_format", "has neither 'conversations' (LLaVA) nor 'messages'")
    _check_structure(messages, images)
    sample_id = record.get("id", label)
    sample_id = str(sample_id) if isinstance(sample_id, (str, int)) else label
    meta = {k: v for k, v in record.items() if k not in used}
    return Sample(id=sample_id, messages=_normalise(messages), images=list(images), meta=meta)


def open_images(source, data_path: Path, max_pixels: int):
    """An image source: `source` itself when it is one already (an ImageSource, a DatasetImages), else a folder or .zip."""
    if source is not None and not isinstance(source, (str, Path)):
        return source
    return ImageSource(Path(source) if source else Path(data_path).parent, max_pixels=max_pixels)


def read_data(path, images=None, max_pixels: int = DEFAULT_MAX_PIXELS, check_images: bool = True, stream: bool = False):
    """Open a data file or dataset: (checked samples as they are read, the report they add to, their image source).

    Problems with the file itself raise DataError here (or, with `stream`, when reading
    reaches them); each bad sample goes into the report as the iterator passes it. The
    image source is an `ImageSource`, a `DatasetImages` for a `datasets` source, or None.
    """
    spec = str(path)
    report = DataReport(file=spec)
    source = None
    if sources.is_dataset(spec):
        try:
            records, source = sources.read_dataset(spec, images, max_pixels)
        except SourceError as exc:
            raise DataError(str(exc)) from None
    else:
        path = Path(path)
        try:
            records = sources.read_json_records(path, stream)
        except SourceError as exc:
            raise DataError(str(exc)) from None
        if stream:
            records = _as_data_errors(records)
        try:
            source = open_images(images, path, max_pixels)
        except ImageError as exc:
            if stream:
                records = _stop_at_first_image(records, DataError(f"{path}: [{exc.code}] {exc}"))
            elif any(isinstance(r, dict) and (r.get("image") or r.get("images")) for _, r in records):
                raise DataError(f"{path}: [{exc.code}] {exc}") from None
    return _checked(records, source, report, check_images), report, source


def _as_data_errors(records):
    try:
        yield from records
    except SourceError as exc:
        raise DataError(str(exc)) from None


def _stop_at_first_image(records, error: DataError):
    for label, record in records:
        if isinstance(record, dict) and (record.get("image") or record.get("images")):
            raise error
        yield label, record


def _checked(records, source, report: DataReport, check_images: bool) -> Iterator[Sample]:
    sizes: dict[str, tuple[int, int]] = {}  # shared images are checked once
    for label, record in records:
        report.total += 1
        name = label
        if isinstance(record, dict) and isinstance(record.get("id"), (str, int)):
            name = f"{record['id']} ({label})"
        try:
            if isinstance(record, (ImageError, SourceError)):
                raise record
            sample = parse_record(record, label)
            if check_images and sample.images:
                if source is None:
                    raise _Bad("image_missing", "the image folder does not exist")
                sample.image_sizes = [_size(source, p, sizes) for p in sample.images]
        except (_Bad, ImageError, SourceError) as bad:
            report.problems.append(Problem(report.file, name, bad.code, str(bad)))
            continue
        report.ok += 1
        yield sample


def finish_report(report: DataReport, strict: bool) -> None:
    """After the last sample: strict mode stops on any problem, and no usable sample stops any load."""
    if strict and report.problems:
        raise DataError(f"{report.file}: {len(report.problems)} bad sample(s) (strict mode)\n" + report.summary(examples=len(report.problems)), report)
    if not report.ok:
        raise DataError(f"{report.file}: no usable samples\n" + report.summary(), report)


def load_data(path, images=None, strict: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS, check_images: bool = True):
    """Read and check a data file or dataset: (samples, report, where their images are read from).

    Bad samples are reported and skipped (or, strict, raise).
    """
    checked, report, source = read_data(path, images, max_pixels, check_images)
    samples = list(checked)
    finish_report(report, strict)
    return samples, report, source


def _size(source, ref: str, sizes: dict[str, tuple[int, int]]) -> tuple[int, int]:
    if ref.startswith(sources.EMBEDDED):
        return source.size(ref)
    if ref not in sizes:
        sizes[ref] = source.size(ref)
    return sizes[ref]


def load_samples(
    path: str | Path,
    images: str | Path | ImageSource | None = None,
    strict: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    check_images: bool = True,
) -> tuple[list[Sample], DataReport]:
    """Read and check a data file or dataset. Bad samples are reported and skipped (or, strict, raise)."""
    samples, report, _ = load_data(path, images, strict, max_pixels, check_images)
    return samples, report


def check_lengths(lengths: dict[str, int], max_length: int, report: DataReport) -> set[str]:
    """Record samples whose token count (image tokens included) exceeds max_length; returns their ids."""
    too_long = {sid for sid, n in lengths.items() if n > max_length}
    for sid in sorted(too_long):
        report.problems.append(
            Problem(report.file, sid, "too_long", f"{lengths[sid]} tokens (image tokens included) > max_length {max_length}; raise train.max_length or lower the image size cap")
        )
    report.ok -= len(too_long)
    return too_long


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m l2t.data", description="Check instruction data or preview a sample's loss mask.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a data file and print the report")
    check.add_argument("data")
    check.add_argument("--images", default=None, help="image folder or .zip (default: the data file's folder)")
    check.add_argument("--strict", action="store_true", help="exit non-zero if any sample is bad")
    check.add_argument("--json", default=None, help="also write the report as JSON to this path")
    preview = sub.add_parser("preview", help="show a sample's tokens by role and in/out of the loss")
    preview.add_argument("data")
    preview.add_argument("--images", default=None)
    preview.add_argument("--preset", default="tiny")
    preview.add_argument("--index", type=int, default=0)
    preview.add_argument("--mode", default=None, help="loss mode (default: the preset's)")
    preview.add_argument("overrides", nargs="*", help="key=value config overrides, as for python -m l2t.train (e.g. model.hub_id=DIR)")
    args, extra = parser.parse_known_args(argv)
    # argparse leaves key=value overrides that come after an option over: they are overrides too.
    if extra and (args.command != "preview" or any(a.startswith("-") or "=" not in a for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "check":  # the report only: samples are checked as they stream past, none is kept
            checked, report, _ = read_data(args.data, args.images, stream=True)
            for _ in checked:
                pass
            finish_report(report, strict=False)
        else:
            samples, report = load_samples(args.data, args.images, strict=False)
    except DataError as exc:
        return print_error(exc)
    if args.command == "check":
        print(report.summary())
        if args.json:
            atomic_write_json(Path(args.json), report.to_dict())
        return 1 if args.strict and report.problems else 0
    try:
        print(preview_sample(samples, index=args.index, preset=args.preset, mode=args.mode, overrides=[*args.overrides, *extra]))
    except (L2TError, ValueError, IndexError, OSError) as exc:
        return print_error(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
