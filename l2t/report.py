"""The evaluation report, rendered: a Markdown table, charts and a static HTML page.

Pure functions of the report dict that `l2t.evaluate` builds (and writes as
report.json) and of the test items whose images the gallery shows: nothing
here runs a model or reads a run folder. The model card of a merged model
(`l2t.model_card`) reuses the Markdown table.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

THUMBNAIL_PIXELS = 128

@dataclass(frozen=True)
class Row:
    """One metric of the table: where its value sits in a model's metrics, its baseline, and its range."""

    label: str
    path: tuple
    """Keys into a model's metrics, e.g. ("caption", "cider_d")."""
    baseline: tuple | None = None
    """Keys of what a constant answer scores (the same for every model: a property of the data)."""
    limits: tuple[float, float | None] | None = (0.0, 1.0)
    """The axis of its chart: (low, high), high None for open-ended, None for a signed scale."""


ROWS = (
    Row("Exact match, all questions", ("questions", "exact_match"), ("questions", "majority_baseline")),
    Row("Right about the image, any wording", ("questions", "content_accuracy")),
    Row("VQA exact match (short answers)", ("short_answer", "accuracy")),
    Row("POPE accuracy (yes/no)", ("yes_no", "accuracy"), ("yes_no", "best_constant_accuracy")),
    Row("POPE F1", ("yes_no", "f1")),
    Row("POPE yes-ratio", ("yes_no", "yes_ratio")),
    Row("Caption accuracy (main object)", ("caption", "main_object_accuracy")),
    Row("CIDEr-D", ("caption", "cider_d"), limits=(0.0, None)),
    Row("BLEU-4", ("caption", "bleu4")),
    Row("CHAIR_s (captions with a hallucinated object)", ("hallucination", "chair_s")),
    Row("CHAIR_i (hallucinated object mentions)", ("hallucination", "chair_i")),
    Row("VC per token, image removed (nats)", ("visual_contribution", "mean_per_token"), limits=None),
    Row("VC per answer, image removed (nats)", ("visual_contribution", "mean_per_sequence"), limits=None),
    Row("VC per token, noise image (nats)", ("visual_contribution_noise", "mean_per_token"), limits=None),
    Row("Attention on the image, per answer token", ("attention", "image_share")),
)


def table_value(summary: dict, *path) -> float | None:
    """The value at `path` in a model's metrics, None where the section or key is missing."""
    for key in path:
        if not isinstance(summary, dict) or key not in summary:
            return None
        summary = summary[key]
    return summary


def rows_of(report: dict) -> list[Row]:
    """The rows with a value for some model: the fixed ones, with one per question type after the first."""
    types = sorted({t for m in report["models"] for t in table_value(m["metrics"], "questions", "by_type") or {}})
    per_type = [
        Row(f"  exact match: {t.replace('_', ' ')}", ("questions", "by_type", t, "exact_match"), ("questions", "by_type", t, "majority_baseline"))
        for t in types
    ]
    rows = [ROWS[0], *per_type, *ROWS[1:]] if len(types) > 1 else list(ROWS)  # per-type rows right below the overall one
    return [row for row in rows if any(table_value(m["metrics"], *row.path) is not None for m in report["models"])]


def _samples(report: dict, row: Row):
    section = row.path[:-1]
    for m in report["models"]:
        found = table_value(m["metrics"], *section)
        if isinstance(found, dict):
            return found.get("samples", found.get("num_sequences", ""))
    return ""


def _baseline(report: dict, row: Row) -> float | None:
    if row.baseline is None:
        return None
    return next((v for m in report["models"] if (v := table_value(m["metrics"], *row.baseline)) is not None), None)


def format_number(value) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}"


def markdown_table(report: dict) -> str:
    """One row per metric, one column per model (base first), and the constant-answer baseline where there is one."""
    names = [m["name"] for m in report["models"]]
    lines = ["| metric | samples | " + " | ".join(names) + " | baseline |", "|---|---:|" + "---:|" * (len(names) + 1)]
    for row in rows_of(report):
        values = [table_value(m["metrics"], *row.path) for m in report["models"]]
        cells = " | ".join(format_number(v) for v in values)
        lines.append(f"| {row.label} | {_samples(report, row)} | {cells} | {format_number(_baseline(report, row))} |")
    return "\n".join(lines)


def markdown_report(report: dict) -> str:
    kinds = ", ".join(f"{count} {kind.replace('_', ' ')}" for kind, count in report["kinds"].items() if count)
    s = report["settings"]
    lines = [
        "# Evaluation",
        "",
        f"Test data: `{s['data']}` — {len(report['sample_ids'])} samples ({kinds}); "
        f"greedy decoding, at most {s['max_new_tokens']} new tokens; model `{s['model']}` ({s['quant']}) on {s['device']}.",
        "",
        markdown_table(report),
        "",
        "Baseline: what one constant answer scores (the most common answer of each question type; "
        "for yes/no the better of always yes and always no). "
        "VC, image removed: log p(answer | image, question) − log p(answer | question), the paper's visual contribution; "
        "VC, noise image: the image replaced by random pixels. Both on the reference answer tokens. "
        "Attention on the image: the share of attention (last layers, mean over heads) that the answer tokens give the image tokens. "
        "CHAIR: lower is better. POPE yes-ratio: 0.5 is balanced.",
        "",
        "Charts: `metrics.png`, `visual_contribution.png`. Every sample's answers and scores: `report.html`, `report.json`.",
    ]
    if report["skipped"]:
        lines += ["", f"## Skipped samples ({len(report['skipped'])})", ""]
        lines += [f"- `{note['sample']}`: {note['reason']}" for note in report["skipped"]]
    return "\n".join(lines) + "\n"


def _png_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def axis_limits(row: Row, values: list[float | None]) -> tuple[float, float] | None:
    """The y axis of a metric's panel: the metric's own range, never the data's (a BLEU of 3e-14 is a bar of nothing)."""
    if row.limits is None:
        return None
    low, high = row.limits
    return low, high if high is not None else max([1.0, *(v for v in values if v is not None)]) * 1.15


def metrics_chart(report: dict) -> bytes:
    """One panel per metric, one bar per model, on the metric's own axis; the baseline as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows_of(report)
    names = [m["name"] for m in report["models"]]
    columns = min(4, len(rows))
    lines = -(-len(rows) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 2.8 * lines), dpi=100, squeeze=False)
    colors = plt.cm.tab10.colors
    for ax, row in zip(axes.flat, rows, strict=False):
        values = [table_value(m["metrics"], *row.path) for m in report["models"]]
        bars = ax.bar(range(len(names)), [v if v is not None else 0.0 for v in values], color=[colors[i % 10] for i in range(len(names))])
        ax.bar_label(bars, labels=[format_number(v) for v in values], fontsize=7)
        ax.set_title(row.label.strip().split(" (")[0], fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        limits = axis_limits(row, values)
        if limits is not None:
            ax.set_ylim(*limits)
        baseline = _baseline(report, row)
        if baseline is not None:
            ax.axhline(baseline, color="gray", linestyle="--", linewidth=1)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    fig.tight_layout()
    return _png_bytes(fig)


def visual_contribution_chart(report: dict) -> bytes:
    """The distribution of per-token VC for every model, on shared bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_model = {name: values for name, values in report["visual_contribution_per_token"].items() if values}
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    pooled = [v for values in per_model.values() for v in values]
    if pooled:
        bins = np.histogram_bin_edges(pooled, bins=40)
        for name, values in per_model.items():
            ax.hist(values, bins=bins, histtype="step", linewidth=1.5, label=f"{name} (mean {np.mean(values):.3f})")
        ax.axvline(0, color="black", linewidth=0.5)
        ax.legend(fontsize=8)
    ax.set_xlabel("log p(token | image, question) − log p(token | question)")
    ax.set_ylabel("answer tokens")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png_bytes(fig)


def attention_chart(report: dict) -> bytes:
    """The share of attention on the image for each answer token of the attention sample, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    study = report["attention"]
    fig, ax = plt.subplots(figsize=(6.5, 3.5), dpi=100)
    for model in study["models"]:
        shares = model["shares"]["image"]
        ax.plot(range(len(shares)), shares, marker="o", label=f"{model['name']}: {model['answer'][:40]!r}")
    ax.set_ylim(0, 1)
    ax.set_xlabel("answer token")
    ax.set_ylabel("share of attention on the image")
    ax.set_title(f"{study['sample']}: {study['question'][:70]}".replace("\n", " "), fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png_bytes(fig)


def attention_map(report: dict, picture: Image.Image, token: int = 0) -> bytes:
    """The image with the attention of answer token `token` over its patches laid on top, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from l2t.attention import patch_grid

    models = report["attention"]["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models), 3.4), dpi=100, squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        ax.imshow(picture)
        patches = np.asarray(model["patches"])
        grid = patch_grid(patches.shape[1]) if patches.size else None
        if grid is not None and len(patches) > token:
            weights = patches[token] / max(patches[token].max(), 1e-9)
            ax.imshow(weights.reshape(grid), cmap="inferno", alpha=0.55, extent=(0, picture.width, picture.height, 0), interpolation="nearest")
            ax.set_title(f"{model['name']}: {model['tokens'][token]!r}", fontsize=8)
        else:
            ax.set_title(f"{model['name']}: no square patch grid", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return _png_bytes(fig)


def thumbnail_uri(image: Image.Image) -> str:
    """The image, shrunk to at most THUMBNAIL_PIXELS a side, as a PNG data: URI."""
    small = image.copy()
    small.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _sample_scores_html(scores: dict) -> str:
    parts = []
    if "correct" in scores:
        parts.append("✓ correct" if scores["correct"] else "✗ wrong")
    if "exact" in scores and "correct" not in scores:
        parts.append("✓ exact" if scores["exact"] else "✗ not exact")
    for key, label in (("cider_d", "CIDEr-D"), ("bleu4", "BLEU-4"), ("vc_sum", "VC"), ("vc_mean", "VC/token"), ("vc_noise_mean", "VC/token (noise)")):
        if key in scores:
            parts.append(f"{label} {scores[key]:.3f}")
    if scores.get("hallucinated"):
        objects = ", ".join(" ".join(o) if isinstance(o, list) else str(o) for o in scores["hallucinated"])
        parts.append(f"hallucinated: {objects}")
    return "<br>".join(html.escape(p) for p in parts)


def gallery_rows(report: dict, items: list) -> str:
    """One table row per sample: its images, question and reference, and every model's answer and scores.

    `items` are the report's test items (`l2t.scoring.EvalItem`), in the report's order.
    """
    names = [m["name"] for m in report["models"]]
    rows = []
    for item, sample in zip(items, report["samples"], strict=True):
        pictures = "".join(f'<img src="{thumbnail_uri(p)}" alt="{html.escape(item.id)}">' for p in item.images) or "<em>no image</em>"
        cells = [
            f"<td>{pictures}</td>",
            f"<td><b>{html.escape(item.id)}</b><br><span class=kind>{item.kind.replace('_', ' ')}</span></td>",
            f"<td>{html.escape(item.question)}</td>",
            f"<td>{html.escape(item.reference)}</td>",
        ]
        for name in names:
            cells.append(
                f"<td>{html.escape(sample['answers'][name])}<div class=scores>{_sample_scores_html(sample['scores'][name])}</div></td>"
            )
        rows.append(f'<tr class="sample" id="{html.escape(item.id)}">' + "".join(cells) + "</tr>")
    return "\n".join(rows)


def html_report(report: dict, items: list, charts: dict[str, bytes]) -> str:
    """report.html: the table, the charts and the gallery of `items` (see `gallery_rows`), on one static page."""
    names = [m["name"] for m in report["models"]]
    header = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    table_rows = []
    for row in rows_of(report):
        values = [table_value(m["metrics"], *row.path) for m in report["models"]]
        cells = "".join(f"<td>{format_number(v)}</td>" for v in [*values, _baseline(report, row)])
        table_rows.append(f"<tr><td>{html.escape(row.label)}</td>{cells}</tr>")
    images = "".join(
        f'<img class=chart src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}" alt="{html.escape(name)}">'
        for name, data in charts.items()
    )
    skipped = "".join(f"<li><b>{html.escape(n['sample'])}</b>: {html.escape(n['reason'])}</li>" for n in report["skipped"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation: {html.escape(", ".join(names[1:]))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }}
.gallery td {{ max-width: 22em; overflow-wrap: anywhere; }}
.gallery td b {{ white-space: nowrap; }}
.gallery img {{ width: 96px; image-rendering: pixelated; border: 1px solid #ddd; }}
.scores, .kind {{ color: #666; font-size: 0.85em; }}
img.chart {{ display: block; max-width: 100%; margin: 1em 0; }}
</style></head><body>
<h1>Evaluation</h1>
<p>{len(items)} test samples from <code>{html.escape(report["settings"]["data"])}</code>; greedy decoding.</p>
<table><tr><th>metric</th>{header}<th>baseline</th></tr>
{"".join(table_rows)}
</table>
<div>{images}</div>
{f"<h2>Skipped samples</h2><ul>{skipped}</ul>" if skipped else ""}
<h2>Samples</h2>
<table class="gallery"><tr><th>image</th><th>sample</th><th>instruction</th><th>reference</th>{header}</tr>
{gallery_rows(report, items)}
</table>
</body></html>
"""

