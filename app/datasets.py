"""The data a session picked, and what the Data tab shows about it.

A `DataSelection` (kept per browser session) is a data file, its image root
and the user's edits to the mined task templates. Everything shown is read
through the library: `l2t.prepare.prepare_data` loads and checks the data,
splits off the held-out part and mines the templates exactly as a training run
of the chosen preset will; `l2t.preview.mask_preview` encodes a sample and
says which tokens are in the loss.
"""

from __future__ import annotations

import functools
import html
import json
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image, ImageDraw

from app.common import notice
from app.mask_view import mask_html
from l2t import chat, relevance
from l2t.config import Config, ConfigError, load_config
from l2t.data import REASONS, DataReport, Sample
from l2t.images import ImageError
from l2t.masking import Encoder
from l2t.models import fetch_model, load_base_model, load_processor
from l2t.prepare import data_paths, prepare_data, token_lengths
from l2t.preview import mask_preview
from l2t.synthetic import bundled_dir
from l2t.templates import TaskTemplate, apply_edits, samples_with

GALLERY_SIZE = 48
THUMBNAIL_PX = 160
REPORT_EXAMPLES = 3


@dataclass(frozen=True)
class DataSelection:
    label: str
    """What the user sees: 'demo data', an uploaded file's name, a server path."""
    path: str
    """The data file (absolute)."""
    images: str = ""
    """Image folder or .zip (absolute); empty: the data file's folder."""
    demo: bool = False
    uploaded: bool = False
    remove: tuple[str, ...] = field(default_factory=tuple)
    """Mined task templates the user unticked (templates.remove)."""
    add: tuple[str, ...] = field(default_factory=tuple)
    """Sentences the user added as task templates (templates.add)."""


def demo_selection() -> DataSelection:
    root = bundled_dir()
    return DataSelection("demo data (synthetic shapes)", str(root / "train.json"), str(root), demo=True)


def data_overrides(selection: DataSelection, preset: str, for_training: bool) -> list[str]:
    """The data.* config overrides for `selection`.

    For a training run of a preset whose own default data is the demo set (the
    tiny preset: with its held-out test split), the demo needs no override.
    """
    if for_training and selection.demo and preset_defaults_to_demo(preset):
        return []
    values = [f"data.path={json.dumps(selection.path)}"]
    if selection.images:
        values.append(f"data.images={json.dumps(selection.images)}")
    return values


@functools.lru_cache(maxsize=16)
def preset_defaults_to_demo(preset: str) -> bool:
    try:
        path, _, _ = data_paths(load_config(preset))
    except ConfigError:
        return False
    return path.resolve() == (bundled_dir() / "train.json").resolve()


def template_overrides(selection: DataSelection) -> list[str]:
    values = []
    if selection.remove:
        values.append(f"templates.remove={json.dumps(list(selection.remove))}")
    if selection.add:
        values.append(f"templates.add={json.dumps(list(selection.add))}")
    return values


# ---------------------------------------------------------------- loading (cached)


@dataclass
class Inspection:
    samples: list[Sample]
    """The training split, as a run of the preset will train on it."""
    held_out: int
    report: DataReport
    mined: list[TaskTemplate]
    images: object
    """l2t.images.ImageSource or None."""


_cache: dict[tuple, Inspection] = {}
_cache_lock = threading.Lock()


def _stamp(path: str) -> tuple:
    try:
        stat = Path(path).stat()
        return (stat.st_mtime_ns, stat.st_size)
    except OSError:
        return (0, 0)


def inspect_data(selection: DataSelection, preset: str, overrides: tuple[str, ...] = ()) -> Inspection:
    """Load, check and mine the selection as a run of `preset` (with `overrides`) would (cached per file version)."""
    key = (preset, overrides, selection.path, selection.images, _stamp(selection.path), _stamp(selection.images))
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    config = load_config(preset, overrides=[*data_overrides(selection, preset, for_training=False), *overrides])
    prepared = prepare_data(config)
    inspection = Inspection(prepared.train, len(prepared.held_out), prepared.report, prepared.templates, prepared.images)
    with _cache_lock:
        if len(_cache) >= 8:
            _cache.pop(next(iter(_cache)))
        _cache[key] = inspection
    return inspection


@functools.lru_cache(maxsize=4)
def processor_for(preset: str):
    config = load_config(preset)
    fetch_model(config, weights=False)  # the mask needs the tokenizer and processor files only
    return load_processor(config.model)


@functools.lru_cache(maxsize=1)
def base_model_for(preset: str):
    """The preset's base model, for the l2t_relevance heat map (one at a time: a real preset is gigabytes)."""
    config = load_config(preset)
    fetch_model(config)
    return load_base_model(config.model)


def token_counts(selection: DataSelection, preset: str, overrides: tuple[str, ...] = ()) -> tuple[dict[str, int], Config]:
    """Each training sample's token count, image tokens included, as a run of `preset` with `overrides` encodes it
    (`l2t.prepare.token_lengths`), and that run's config."""
    config = load_config(preset, overrides=list(overrides))
    inspection = inspect_data(selection, preset, overrides)
    encoder = Encoder.from_config(config, processor_for(config.preset), effective_templates(inspection, selection))
    return token_lengths(inspection.samples, encoder), config


# ---------------------------------------------------------------- what the tab shows


def report_html(inspection: Inspection, selection: DataSelection) -> str:
    report = inspection.report
    skipped = report.total - report.ok
    kind = "ok" if not skipped else "warn"
    split = f" ({len(inspection.samples)} to train on, {inspection.held_out} held out)" if inspection.held_out else ""
    head = (
        f'<div class="l2t-notice l2t-{kind}"><b>{html.escape(selection.label)}</b>: '
        f"{report.ok} of {report.total} samples usable{split}"
        + (f", {skipped} skipped" if skipped else "")
        + f" · {len(inspection.mined)} task templates mined</div>"
    )
    notes = []
    images = inspection.images
    if images is not None and images.read_from_top_folder:
        notes.append(
            f"The images are inside the folder '{images.top_folder}/' of {Path(selection.images).name}, one level deeper than "
            f"the paths in the data: they are read from there ({images.read_from_top_folder} found)."
        )
    if hint := missing_images_hint(selection, report):
        notes.append(hint)
    head += "".join(notice(note, "info") for note in notes)
    if not report.problems:
        return head
    rows = []
    for code, count in report.counts().items():
        examples = [p for p in report.problems if p.code == code][:REPORT_EXAMPLES]
        shown = "".join(f"<li><code>{html.escape(p.sample)}</code>: {html.escape(p.message)}</li>" for p in examples)
        rows.append(
            f"<tr><td><code>{html.escape(code)}</code></td><td>{count}</td>"
            f"<td>{html.escape(REASONS.get(code, code))}<ul>{shown}</ul></td></tr>"
        )
    table = (
        f'<table class="l2t-report"><tr><th>reason</th><th>samples</th><th>what it means, with examples</th></tr>{"".join(rows)}</table>'
    )
    return head + table


def missing_images_hint(selection: DataSelection, report: DataReport | None) -> str:
    """What to do when an upload's images are missing because no .zip came with it."""
    if selection.uploaded and not selection.images and report is not None and "image_missing" in report.counts():
        return "The data names images, but none were uploaded: upload the images as a .zip beside the data file."
    return ""


def _text_only_tile() -> Image.Image:
    tile = Image.new("RGB", (THUMBNAIL_PX, THUMBNAIL_PX), (241, 245, 249))
    ImageDraw.Draw(tile).text((THUMBNAIL_PX // 2 - 26, THUMBNAIL_PX // 2 - 6), "text only", fill=(100, 116, 139))
    return tile


def _thumbnail(image: Image.Image) -> Image.Image:
    scale = THUMBNAIL_PX / max(image.size)
    if scale > 1:  # small synthetic images: scale up crisply instead of letting the browser blur them
        return image.resize((round(image.width * scale), round(image.height * scale)), Image.NEAREST)
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    return image


def sample_image(inspection: Inspection, sample: Sample) -> Image.Image:
    """The sample's images side by side, scaled for display (a placeholder for text-only samples)."""
    if not sample.images or inspection.images is None:
        return _text_only_tile()
    tiles = []
    for path in sample.images:
        try:
            tiles.append(_thumbnail(inspection.images.open(path)))
        except ImageError:
            tiles.append(_text_only_tile())
    if len(tiles) == 1:
        return tiles[0]
    gap = 6
    strip = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), max(t.height for t in tiles)), (255, 255, 255))
    left = 0
    for tile in tiles:
        strip.paste(tile, (left, 0))
        left += tile.width + gap
    return strip


def first_question(sample: Sample, limit: int = 70) -> str:
    text = next((m["content"] for m in sample.messages if m["role"] == "user"), "")
    text = " ".join(text.replace(chat.IMAGE, " ").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def gallery_items(inspection: Inspection) -> list[tuple[Image.Image, str]]:
    return [(sample_image(inspection, s), first_question(s)) for s in inspection.samples[:GALLERY_SIZE]]


def conversation_html(sample: Sample) -> str:
    turns = []
    for m in sample.messages:
        text = html.escape(m["content"]).replace(html.escape(chat.IMAGE), '<span class="conv-image">image</span> ')
        turns.append(f'<div class="conv-turn conv-{m["role"]}"><span class="conv-role">{m["role"]}</span>{text}</div>')
    return f'<div class="conv"><div class="conv-id">sample {html.escape(sample.id)}</div>{"".join(turns)}</div>'


def effective_templates(inspection: Inspection, selection: DataSelection) -> list[TaskTemplate]:
    return apply_edits(inspection.mined, selection.add, selection.remove)


def preview(selection: DataSelection, preset: str, index: int, mode: str) -> str:
    """The coloured mask of sample `index` under loss `mode`, as the preset's tokenizer splits it."""
    inspection = inspect_data(selection, preset)
    sample = inspection.samples[max(0, min(int(index), len(inspection.samples) - 1))]
    config = load_config(preset)
    encoder = Encoder.from_config(config, processor_for(preset), effective_templates(inspection, selection))
    weights = None
    if mode == "l2t_relevance":
        model = base_model_for(preset)
        weights = relevance.sample_weights(model, encoder.processor, encoder, sample, inspection.images, config.loss.relevance_nats)
    preview = mask_preview(encoder, sample, mode, weights)
    caption = (
        f"sample {preview.sample_id} · {len(preview.tokens)} tokens, {preview.in_loss} in the loss · "
        f"loss mode {preview.mode} · tokenizer of preset {preset} · {preview.task_templates} task templates"
    )
    return mask_html(preview.tokens, caption, preview.weights if weights is not None else None)


# ---------------------------------------------------------------- the template table

TEMPLATE_HEADERS = ["masked", "sentence", "samples", "share", "source"]


def template_rows(inspection: Inspection, selection: DataSelection) -> list[list]:
    removed = set(selection.remove)
    rows = [[t.sentence not in removed, t.sentence, t.count, f"{t.fraction:.1%}", "mined"] for t in inspection.mined]
    mined = {t.sentence for t in inspection.mined}
    added = [sentence for sentence in selection.add if sentence not in mined]
    found = samples_with(added, (s.instructions() for s in inspection.samples))
    total = max(len(inspection.samples), 1)
    rows += [[True, sentence, found[sentence], f"{found[sentence] / total:.1%}", "added by you"] for sentence in added]
    return rows


def _ticked(value) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


def edits_from_rows(rows: list[list], inspection: Inspection, selection: DataSelection) -> DataSelection:
    """The selection with templates.remove / templates.add read off the edited table."""
    mined = {t.sentence for t in inspection.mined}
    remove, add = [], []
    for row in rows:
        if len(row) < 2 or not str(row[1]).strip():
            continue
        sentence, keep = str(row[1]), _ticked(row[0])
        if sentence in mined and not keep:
            remove.append(sentence)
        elif sentence not in mined and keep:
            add.append(sentence)
    return replace(selection, remove=tuple(remove), add=tuple(add))


def add_template(selection: DataSelection, inspection: Inspection, text: str) -> DataSelection:
    """Add one sentence as a task template; ValueError (from the library) if it isn't one sentence."""
    added = apply_edits([], [text])  # validates: exactly one sentence, no image placeholder
    sentence = added[0].sentence
    if sentence in {t.sentence for t in inspection.mined}:
        return replace(selection, remove=tuple(s for s in selection.remove if s != sentence))
    if sentence in selection.add:
        return selection
    return replace(selection, add=(*selection.add, sentence))
