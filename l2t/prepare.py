"""A run's data, prepared as training will use it: loaded, checked, split and mined.

The training recipe and the UI's Data tab call `prepare_data`, so the tab shows
exactly the samples, the held-out split and the task templates a run of the
same config trains with.

- The data file is `data.path`; the tiny preset defaults to the bundled
  synthetic set, whose test split is the held-out set.
- Otherwise `train.eval_fraction` of the samples (at most
  `train.eval_max_samples`) is held out, chosen with `train.seed`.
- Task templates are mined from the training split only, with the config's
  `templates` settings and the user's additions and removals.
- `token_lengths` counts each sample's tokens, image tokens included, as
  training encodes them (the cached encoding in `l2t.encoding` gives the same
  counts): training drops the samples over `train.max_length`, and the UI
  shows and checks the same counts before a run starts.

The samples are checked once per version of the data and kept as memory-mapped
Arrow rows (`l2t.checked`): the training split is a `SampleRows` sequence, and
mining streams its messages column.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from l2t.checked import SampleRows, checked_rows, mined_templates
from l2t.config import Config, ConfigError
from l2t.data import DataReport, Sample, load_samples
from l2t.images import ImageSource
from l2t.masking import Encoder
from l2t.sources import DatasetImages, image_files
from l2t.synthetic import bundled_dir
from l2t.templates import TaskTemplate


@dataclass
class PreparedData:
    train: SampleRows
    """The training split, read from memory-mapped rows as `Sample`s (a sequence, like a list)."""
    held_out: list[Sample]
    images: ImageSource | DatasetImages | None
    """Where the samples' images are read from (None for text-only data)."""
    report: DataReport
    templates: list[TaskTemplate]
    key: str = ""
    """The checked rows' cache key (`l2t.checked.data_key`)."""


def data_paths(config: Config) -> tuple[Path, Path | None, Path | None]:
    """(training file, image root, held-out file or None). The tiny preset defaults to the bundled set."""
    if config.data.path:
        path = Path(config.data.path)
        return path, Path(config.data.images) if config.data.images else None, None
    if config.preset == "tiny":
        root = bundled_dir()
        return root / "train.json", root, root / "test.json"
    raise ConfigError("data.path is empty: give your training data with --data FILE (LLaVA or messages JSON/JSONL, a save_to_disk folder, parquet/arrow files, hf:<repo_id>)")


def held_out_positions(total: int, fraction: float, limit: int, seed: int) -> set[int]:
    """Which of `total` samples are held out: `fraction` of them (at most `limit`), chosen with `seed`."""
    count = min(limit, int(round(total * fraction)))
    if count == 0 or total - count < 1:
        return set()
    order = list(range(total))
    random.Random(seed).shuffle(order)
    return set(order[:count])


def split_held_out(samples: list[Sample], fraction: float, limit: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    held = held_out_positions(len(samples), fraction, limit, seed)
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]


def prepare_data(config: Config, say=print) -> PreparedData:
    path, image_root, held_out_path = data_paths(config)
    pixels = config.data.max_image_pixels
    source = image_files(image_root, path, pixels)  # opened once (a zip's index is checked once), shared by every load below
    rows, report, images, key = checked_rows(config, path, source or image_root, say=say)
    images = images if _any_image(rows) else None
    t = config.train
    if held_out_path is not None:
        train, split = rows, [str(held_out_path)]
        held_out, _ = load_samples(held_out_path, source or image_root, max_pixels=pixels)
    else:
        held, split = held_out_positions(len(rows), t.eval_fraction, t.eval_max_samples, t.seed), [t.eval_fraction, t.eval_max_samples, t.seed]
        train = rows.subset(np.setdiff1d(np.arange(len(rows)), np.fromiter(held, dtype=np.int64)))
        held_out = [rows[i] for i in sorted(held)]
    return PreparedData(train, held_out, images, report, mined_templates(config, key, train, split), key)


def _any_image(rows: SampleRows) -> bool:
    return any(any(batch["images"]) for batch in rows.columns(["images"]).iter(batch_size=10_000))


def unique_names(ids: list[str]) -> list[str]:
    """Sample ids made unique (data files may repeat an id): the 2nd "x" becomes "x (2)"."""
    seen: dict[str, int] = {}
    names = []
    for sample_id in ids:
        seen[sample_id] = seen.get(sample_id, 0) + 1
        names.append(sample_id if seen[sample_id] == 1 else f"{sample_id} ({seen[sample_id]})")
    return names


def token_lengths(samples: list[Sample], encoder: Encoder) -> dict[str, int]:
    """Each sample's token count (image tokens included) by unique name, as training encodes it."""
    lengths = encoder.lengths(encoder.encode_batch([(s.messages, s.image_sizes) for s in samples]))
    return dict(zip(unique_names([s.id for s in samples]), lengths.tolist(), strict=True))


def held_out_records(samples: list[Sample]) -> list[dict]:
    """held_out.json's records: samples in the messages format, with their extra fields."""
    return [{"id": s.id, "messages": s.messages, "images": s.images, **s.meta} for s in samples]
