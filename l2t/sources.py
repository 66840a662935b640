"""Data on disk -> the records `l2t.data` checks: JSON lists, JSONL, and Hugging Face `datasets`.

    python -m l2t.data check data/shapes_hf                 # a folder written by Dataset.save_to_disk
    python -m l2t.data check "data/part-*.parquet"          # parquet or arrow files, one or a glob
    python -m l2t.train --preset tiny --data hf:org/name:config@train   # datasets.load_dataset

A JSON list can be read one record at a time (`stream`), so a 665k-sample file
is never a list of Python objects all at once. A dataset row is a record as in
a JSON file: `messages` (role/content, content as text or parts) or
`conversations` (LLaVA), and `images` / `image`. An image value may
be a `datasets.Image` (embedded bytes or a path), a PIL image or a path string;
paths are relative to the image root (`--images`), as in JSON. Embedded images
stay in the memory-mapped Arrow data: a row names them `embedded:<row>:<k>` and
`DatasetImages` reads their bytes when the image is opened.
"""

from __future__ import annotations

import glob
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from l2t.errors import L2TError
from l2t.images import ImageError, ImageSource, decode_image, to_rgb

HUB_PREFIX = "hf:"
EMBEDDED = "embedded:"
DATASET_SUFFIXES = (".parquet", ".arrow")
TURN_COLUMNS = ("messages", "conversations")
IMAGE_COLUMNS = ("images", "image")
ROWS_PER_READ = 1000
_SPACE = re.compile(r"[ \t\n\r]*")
STREAM_CHARS = 8 * 1024**2
"""Characters read at a time from a streamed JSON list."""


class SourceError(L2TError):
    """The dataset can't be opened or lacks what every row needs; `code` is a reason code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def is_hub_spec(spec: str) -> bool:
    return str(spec).startswith(HUB_PREFIX)


def is_dataset(spec: str | Path) -> bool:
    """Whether `spec` names a `datasets` source rather than a JSON/JSONL file."""
    text = str(spec)
    if is_hub_spec(text) or text.lower().endswith(DATASET_SUFFIXES):
        return True
    path = Path(text)
    return path.is_dir() and any((path / name).is_file() for name in ("state.json", "dataset_dict.json"))


def data_files(spec: str) -> list[Path]:
    """The files a parquet/arrow spec names: the matches of a glob (sorted), else the one path."""
    return [Path(p) for p in sorted(glob.glob(spec))] if glob.has_magic(spec) else [Path(spec)]


def parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    """`hf:<repo_id>[:<config>][@<split>]` -> (repo id, config or None, split; default train)."""
    body = spec[len(HUB_PREFIX) :]
    body, _, split = body.partition("@")
    repo, _, config = body.partition(":")
    if not repo:
        raise SourceError("file_unreadable", f"{spec}: [file_unreadable] no dataset named; write hf:<repo_id>[:<config>][@<split>]")
    return repo, config or None, split or "train"


def open_dataset(spec: str | Path):
    """The source as one `datasets.Dataset` (memory-mapped Arrow); SourceError names what failed."""
    import datasets

    text = str(spec)
    try:
        if is_hub_spec(text):
            repo, config, split = parse_hub_spec(text)
            return datasets.load_dataset(repo, config, split=split)
        path = Path(text)
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded["train"] if "train" in loaded else loaded[next(iter(loaded))]
            return loaded
        files = [str(f) for f in data_files(text)]
        if not files:
            raise SourceError("file_unreadable", f"{text}: [file_unreadable] no file matches")
        for file in files:
            _check_file(Path(file))
        if files[0].lower().endswith(".arrow"):
            return datasets.concatenate_datasets([datasets.Dataset.from_file(f) for f in files])
        return datasets.Dataset.from_parquet(files)
    except SourceError:
        raise
    except Exception as exc:  # datasets and pyarrow raise many kinds; the user needs the file and the reason
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError("file_unreadable", f"{text}: [file_unreadable] cannot read the dataset ({type(exc).__name__}: {reason})") from None


def _check_file(path: Path) -> None:
    """A clear error for a missing or corrupt parquet/arrow file, naming it, before datasets reads it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise SourceError("file_unreadable", f"{path}: [file_unreadable] no such file")
    try:
        if path.suffix.lower() == ".parquet":
            pq.ParquetFile(path).schema_arrow  # noqa: B018  (reads the footer)
        else:
            with pa.memory_map(str(path)) as stream:
                pa.ipc.open_stream(stream).schema  # noqa: B018
    except (pa.ArrowException, OSError) as exc:
        kind = path.suffix.lower().lstrip(".")
        raise SourceError("file_unreadable", f"{path}: [file_unreadable] not a readable {kind} file ({exc})") from None


def turn_and_image_columns(dataset, spec: str) -> tuple[str, str | None]:
    names = dataset.column_names
    turns = next((c for c in TURN_COLUMNS if c in names), None)
    if turns is None:
        raise SourceError("missing_field", f"{spec}: [missing_field] no 'messages' or 'conversations' column (columns: {', '.join(names)})")
    return turns, next((c for c in IMAGE_COLUMNS if c in names), None)


def raw_images(dataset, column: str | None):
    """The dataset with image columns undecoded: {"bytes", "path"} per image instead of PIL objects."""
    import datasets

    if column is None:
        return dataset
    feature = dataset.features[column]
    if isinstance(feature, datasets.Image):
        return dataset.cast_column(column, datasets.Image(decode=False))
    inner = getattr(feature, "feature", None)
    if isinstance(inner, datasets.Image):
        return dataset.cast_column(column, datasets.List(datasets.Image(decode=False)))
    return dataset


def rows(dataset) -> Iterator[tuple[int, dict]]:
    """(row number, record) for every row, read a batch at a time from the Arrow data."""
    row = 0
    for table in dataset.with_format("arrow").iter(batch_size=ROWS_PER_READ):
        for record in table.to_pylist():
            yield row, record
            row += 1


def image_refs(value, row: int) -> list[str]:
    """A row's image value as references: paths as written, embedded images as `embedded:<row>:<k>`."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    refs = []
    for k, item in enumerate(values):
        if isinstance(item, str):
            refs.append(item)
        elif isinstance(item, dict) and item.get("bytes"):
            refs.append(f"{EMBEDDED}{row}:{k}")
        elif isinstance(item, dict) and isinstance(item.get("path"), str):
            refs.append(item["path"])
        elif isinstance(item, Image.Image):
            refs.append(f"{EMBEDDED}{row}:{k}")
        else:
            shown = type(item).__name__ if not isinstance(item, (int, float, bool)) else repr(item)
            raise ImageError("wrong_type", f"image {k} is {shown}, not an image (datasets.Image, PIL image or path string)")
    return refs


def _jsonable(value) -> bool:
    """Whether an extra column's value can go into held_out.json (bytes and images can't)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def image_files(images, spec: str, max_pixels: int) -> ImageSource | None:
    """The image folder or .zip `images` names (default: the data's folder; none for an hf: spec), opened;
    `images` itself when it is open already. None when there is none to open: that is fine while no
    sample names an image file, and the check reports each one that does."""
    if images is not None and not isinstance(images, (str, Path)):
        return images
    if not images and is_hub_spec(str(spec)):
        return None
    try:
        return ImageSource(Path(images) if images else Path(spec).parent, max_pixels=max_pixels)
    except ImageError:
        return None


def _open(spec: str, images, max_pixels: int):
    dataset = open_dataset(spec)
    turns, column = turn_and_image_columns(dataset, spec)
    dataset = raw_images(dataset, column)
    return dataset, turns, column, DatasetImages(dataset, column, image_files(images, spec, max_pixels), max_pixels)


def dataset_images(spec: str, images, max_pixels: int) -> DatasetImages:
    """Where a dataset's images are read from (its embedded bytes, or the image root for paths)."""
    return _open(spec, images, max_pixels)[3]


def read_dataset(spec: str, images, max_pixels: int) -> tuple[Iterator[tuple[str, object]], DatasetImages]:
    """(label, record) per row, image values turned into references, and where the images are read.

    A row whose image value is not an image gives (label, ImageError) in place of its record.
    """
    dataset, turns, column, found = _open(spec, images, max_pixels)
    target = "images" if turns == "messages" else "image"

    def records():
        for row, record in rows(dataset):
            try:
                refs = image_refs(record.pop(column, None), row) if column else []
            except ImageError as exc:
                yield f"row {row}", exc
                continue
            record = {k: v for k, v in record.items() if k in (turns, "id") or _jsonable(v)}
            if refs:
                record[target] = refs
            yield f"row {row}", record

    return records(), found


def read_json_records(path: Path, stream: bool = False):
    """(label, record) pairs of a JSON list or JSONL file; file-level problems raise SourceError, a bad line is
    (label, SourceError) in place of its record.

    With `stream`, a JSON list is parsed one record at a time as the pairs are consumed.
    """
    if stream and path.suffix.lower() != ".jsonl" and _starts_a_list(path):
        return _stream_list(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SourceError("file_unreadable", f"{path}: [file_unreadable] cannot read data file: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SourceError("invalid_encoding", f"{path}: [invalid_encoding] not UTF-8 text (bad byte at offset {exc.start}); save the file as UTF-8") from None
    if not text.strip():
        raise SourceError("invalid_json", f"{path}: [invalid_json] the file is empty")
    stripped = text.lstrip()
    if path.suffix.lower() != ".jsonl" and stripped[0] in "[{\"0123456789-tfn":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            # A one-line object followed by more is JSON Lines, whatever the file is called.
            jsonl = exc.msg == "Extra data" and "\n" not in text[: exc.pos].strip()
            if stripped[0] != "{" or (path.suffix.lower() == ".json" and not jsonl):
                raise SourceError("invalid_json", f"{path}: [invalid_json] {_json_error(exc)} at line {exc.lineno}, column {exc.colno}") from None
        else:
            if isinstance(data, list):
                return [(f"#{i}", record) for i, record in enumerate(data)]
            if isinstance(data, dict) and path.suffix.lower() == ".json":
                raise SourceError("not_a_list", f"{path}: [not_a_list] a JSON data file must hold a list of samples, found one object")
            if not isinstance(data, dict):
                raise SourceError("not_a_list", f"{path}: [not_a_list] a JSON data file must hold a list of samples, found {type(data).__name__}")
    records = []
    # Only "\n" ends a JSON Lines record: str.splitlines() would also break inside
    # strings that hold a raw U+2028, U+0085, ... (valid JSON, written by ensure_ascii=False).
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            records.append((f"line {number}", SourceError("invalid_json", f"{_json_error(exc)} at column {exc.colno}")))
    return records


def _starts_a_list(path: Path) -> bool:
    try:
        with path.open("rb") as file:
            head = file.read(4096).decode("utf-8-sig", errors="ignore")
    except OSError:
        return False
    return head.lstrip().startswith("[")


def _stream_list(path: Path) -> Iterator[tuple[str, object]]:
    """A JSON list's records one at a time, read in chunks: neither the file's text nor its records are held at once.

    Any error falls back to parsing the whole file, which names it as `python -m l2t.data check` does.
    """
    decoder = json.JSONDecoder()
    try:
        with path.open(encoding="utf-8-sig", newline="") as file:
            buffer, eof = "", False

            def more() -> bool:
                nonlocal buffer, eof
                chunk = file.read(STREAM_CHARS)
                eof, buffer = not chunk, buffer + chunk
                return not eof

            def skip_space(position: int) -> int:
                position = _SPACE.match(buffer, position).end()
                while position >= len(buffer) and more():
                    position = _SPACE.match(buffer, position).end()
                return position

            while "[" not in buffer and more():
                pass
            position, index, after_comma = skip_space(buffer.index("[") + 1), 0, False
            while buffer[position : position + 1] != "]" or after_comma:
                try:
                    record, end = decoder.raw_decode(buffer, position)
                    if not eof and not isinstance(record, (dict, list)) and buffer[end : end + 1] in ("", *"0123456789.eE+-"):
                        raise json.JSONDecodeError("a number may go on in the next chunk", buffer, end)
                except json.JSONDecodeError:
                    if more():
                        continue
                    raise
                position = skip_space(end)
                if buffer[position : position + 1] not in (",", "]"):
                    raise json.JSONDecodeError("Expecting ',' delimiter", buffer, position)
                yield f"#{index}", record
                index += 1
                after_comma = buffer[position] == ","
                position = skip_space(position + 1) if after_comma else position
                if position > STREAM_CHARS:  # what is parsed is dropped
                    buffer, position = buffer[position:], 0
            if (buffer[position + 1 :] + file.read()).strip():
                raise json.JSONDecodeError("Extra data", buffer, position + 1)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        read_json_records(path)  # the whole-file parse names the error
        raise SourceError("invalid_json", f"{path}: [invalid_json] not a valid JSON list") from None


def _json_error(exc: json.JSONDecodeError) -> str:
    # "Unterminated string starting at" already ends with the "at" of the position that follows.
    return exc.msg.removesuffix(" at")


class DatasetImages:
    """A dataset's images: embedded ones read from its Arrow data by row, paths from an image root."""

    def __init__(self, dataset, column: str | None, files: ImageSource | None, max_pixels: int):
        self.dataset = dataset.with_format("arrow")
        self.column = column
        self.files = files
        self.max_pixels = max_pixels

    def __repr__(self) -> str:
        return f"DatasetImages({self.column!r}, files={self.files!r})"

    @property
    def top_folder(self) -> str:
        """As `ImageSource.top_folder`, for the images named by path."""
        return self.files.top_folder if self.files is not None else ""

    @property
    def read_from_top_folder(self) -> int:
        return self.files.read_from_top_folder if self.files is not None else 0

    def _embedded(self, ref: str) -> bytes:
        row, k = (int(x) for x in ref[len(EMBEDDED) :].split(":"))
        value = self.dataset[row][self.column].to_pylist()[0]
        item = value[k] if isinstance(value, list) else value
        if isinstance(item, Image.Image):
            buffer = io.BytesIO()
            item.save(buffer, "PNG")
            return buffer.getvalue()
        return item["bytes"]

    def _decode(self, ref: str, verify: bool) -> Image.Image:
        if ref.startswith(EMBEDDED):
            name = f"row {ref[len(EMBEDDED) :].replace(':', ', image ')}"
            return decode_image(self._embedded(ref), name, self.max_pixels, verify)
        if self.files is None:
            raise ImageError("image_missing", f"image '{ref}' is a path, and the image folder does not exist (give --images)")
        return self.files.decode(ref, verify)

    def size(self, ref: str) -> tuple[int, int]:
        return self._decode(ref, verify=True).size

    def open(self, ref: str) -> Image.Image:
        return to_rgb(self._decode(ref, verify=False), ref)
