"""Checked samples as memory-mapped Arrow rows, cached while the data is unchanged.

Training a 665k-sample file must not hold 665k `Sample` objects. The samples
that pass `l2t.data`'s checks are written, as they are read, to an Arrow file in
a cache folder named by a hash of what the check depends on: the data files'
paths, sizes and modification times, the image root and the `data` settings.
The report goes beside them. The folder is written under a temporary name and
renamed into place when complete; a second run memory-maps it and skips the
check. `SampleRows` reads the rows back as `Sample`s, one at a time, and streams
the instruction column for template mining, whose result is kept beside the rows
for each training split and `templates` setting.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np

from l2t.config import Config
from l2t.data import DataReport, Problem, Sample, finish_report, read_data
from l2t.sources import data_files, dataset_images, image_files, is_dataset, is_hub_spec
from l2t.templates import TaskTemplate, load_templates, mine_with_settings, save_templates

FORMAT_VERSION = 2
ROWS = "rows.arrow"
REPORT = "report.json"
READ_BATCH = 10_000
"""Rows per Arrow record batch of the checked rows."""


@contextmanager
def paused_gc():
    """The cyclic garbage collector off while a data step makes millions of short-lived objects.

    They are freed by reference counting as they go; what the collector would add is a scan
    of every live object each few thousand allocations, a third of the time of the check.
    Processes forked meanwhile (the encoding map's) start with it off too.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def cache_root(config: Config) -> Path:
    return Path(config.data.cache or os.environ.get("L2T_CACHE") or Path.home() / ".cache" / "l2t")


def _files_of(spec: str) -> list[Path]:
    if is_hub_spec(spec):
        return []
    path = Path(spec)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return data_files(spec)


def data_key(config: Config, data_path: Path, image_root) -> str:
    """What the checked rows depend on: the data files as they are now, the image root and the data settings."""
    files = []
    for path in _files_of(str(data_path)):
        try:
            stat = path.stat()
            files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
        except OSError:
            files.append([str(path), None, None])
    inputs = {"version": FORMAT_VERSION, "spec": str(data_path), "files": files, "images": str(image_root or ""),
              "data": asdict(config.data) | {"cache": "", "strict": False}}  # fmt: skip
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def features():
    """The checked rows' columns (messages as role/content structs: no JSON to write or parse per sample)."""
    import datasets

    text = datasets.Value("string")
    return datasets.Features({"id": text, "messages": datasets.List({"role": text, "content": text}), "images": datasets.List(text),
                              "image_sizes": datasets.List(datasets.List(datasets.Value("int32"))), "meta": text})  # fmt: skip


def rows_batch(samples: list[Sample]) -> dict:
    """Samples as one batch of columns in the layout of `features`."""
    return {
        "id": [s.id for s in samples],
        "messages": [s.messages for s in samples],
        "images": [list(s.images) for s in samples],
        "image_sizes": [[list(size) for size in s.image_sizes] for s in samples],
        "meta": [json.dumps(s.meta, ensure_ascii=False) if s.meta else "{}" for s in samples],
    }


def _report(payload: dict) -> DataReport:
    problems = [Problem(**p) for p in payload["problems"]]
    return DataReport(payload["file"], payload["total"], payload["ok"], problems)


def _image_source(path: Path, images, max_pixels: int):
    return dataset_images(str(path), images, max_pixels) if is_dataset(str(path)) else image_files(images, path, max_pixels)


def checked_rows(config: Config, path: Path, images, say=print) -> tuple[SampleRows, DataReport, object, str]:
    """(the usable samples as rows, the report, their image source, the cache key); from the cache when it matches."""
    import datasets

    pixels = config.data.max_image_pixels
    key = data_key(config, path, getattr(images, "root", images))
    folder = cache_root(config) / "checked" / key
    if (folder / REPORT).is_file():
        report = _report(json.loads((folder / REPORT).read_text()))
        finish_report(report, config.data.strict)
        say(f"checked data: reusing the cache {folder}")
        return SampleRows(datasets.Dataset.from_file(str(folder / ROWS))), report, _image_source(path, images, pixels), key
    samples, report, source = read_data(path, images, pixels, stream=True)
    temporary = folder.parent / f"{key}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        _write_rows(temporary / ROWS, samples, report)
        finish_report(report, config.data.strict)
        (temporary / REPORT).write_text(json.dumps(report.to_dict(), ensure_ascii=False))
        try:
            temporary.rename(folder)  # atomic: complete or absent
        except OSError:  # another process (a second rank) put it there first
            shutil.rmtree(temporary, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return SampleRows(datasets.Dataset.from_file(str(folder / ROWS))), report, source, key


def _write_rows(path: Path, samples: Iterator[Sample], report: DataReport) -> None:
    from datasets.arrow_writer import ArrowWriter
    from tqdm.auto import tqdm

    with paused_gc(), ArrowWriter(path=str(path), features=features(), writer_batch_size=READ_BATCH) as writer:
        shown = iter(tqdm(samples, desc=f"checking {report.file}", unit=" samples", mininterval=1.0, delay=1.0))
        while batch := list(itertools.islice(shown, READ_BATCH)):
            writer.write_batch(rows_batch(batch))
        writer.finalize()


def mined_templates(config: Config, key: str, train: SampleRows, split: list) -> list[TaskTemplate]:
    """The task templates of this training split under the run's `templates` settings, mined once and kept beside the rows."""
    from tqdm.auto import tqdm

    settings = asdict(config.templates)
    digest = hashlib.sha256(json.dumps([settings, split], sort_keys=True).encode()).hexdigest()[:16]
    path = cache_root(config) / "checked" / key / f"templates-{digest}.json"
    if path.is_file():
        return load_templates(path)
    def read():  # streamed from the rows, twice: never a list, nor every distinct sentence at once
        return tqdm(train.instructions(), total=len(train), desc="mining task templates", unit=" samples", delay=1.0, mininterval=1.0)

    with paused_gc():
        templates = mine_with_settings(read, config.templates)
    if path.parent.is_dir():
        save_templates(path, templates, settings)
    return templates


class SampleRows(Sequence):
    """Checked samples in a memory-mapped Arrow table, read as `Sample`s on demand (`indices`: a subset, in order)."""

    def __init__(self, table, indices: np.ndarray | None = None):
        self.table = table
        self.indices = np.arange(len(table)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        row = self.table[int(self.indices[index])]
        sizes = [tuple(size) for size in row["image_sizes"]]
        return Sample(row["id"], row["messages"], list(row["images"]), sizes, json.loads(row["meta"]))

    def subset(self, positions) -> SampleRows:
        return SampleRows(self.table, self.indices[np.asarray(positions, dtype=np.int64)])

    def columns(self, names: list[str]):
        """These rows' columns as an Arrow-backed dataset (what the encoding map reads)."""
        return self.table.select_columns(names).select(self.indices)

    def ids(self) -> list[str]:
        return self.columns(["id"]).with_format("arrow")[:]["id"].to_pylist()

    def instructions(self) -> Iterator[list[str]]:
        """Each sample's user turns, in file order, read a batch at a time from the Arrow file.

        Read, not memory-mapped: a pass over every row would otherwise leave the whole
        file's pages in the process's resident memory.
        """
        import pyarrow as pa
        import pyarrow.compute as pc

        keep = np.zeros(len(self.table), dtype=bool)
        keep[self.indices] = True
        row = 0
        with pa.OSFile(self.table.cache_files[0]["filename"]) as file:
            for batch in pa.ipc.open_stream(file):
                messages = batch.column(batch.schema.get_field_index("messages"))
                turns = messages.flatten()
                users = pc.equal(turns.field("role"), "user")
                texts = turns.field("content").filter(users).to_pylist()
                ends = np.cumsum(np.bincount(pc.list_parent_indices(messages).filter(users).to_numpy(), minlength=len(messages)))
                for k in np.flatnonzero(keep[row : row + len(messages)]):
                    yield texts[ends[k - 1] if k else 0 : ends[k]]
                row += len(messages)
