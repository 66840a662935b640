"""The token mask preview: `l2t.preview.preview_tokens` drawn as coloured HTML.

Each token is a chip coloured by its role; tokens in the loss are solid with an
underline, tokens out of the loss are faded and dashed. In loss mode
l2t_relevance the instruction tokens are shaded from pale to red by their
weight: a heat map of how much the image makes each one more likely. A run of image tokens
is drawn as one chip ("image x 576"). The colours and the legend live here and
nowhere else.
"""

from __future__ import annotations

import html
from collections import Counter

ROLE_LABELS = {
    "image": "image",
    "system": "system template",
    "task_template": "task template",
    "instruction": "instruction",
    "response": "response",
    "response_end": "response end",
    "pad": "padding",
}
ROLE_HELP = {
    "image": "the image's tokens (never in the loss)",
    "system": "system prompt, role markers, separators",
    "task_template": "frequent instruction sentences (see the table below)",
    "instruction": "what the user wrote: in the loss with L2T",
    "response": "the answer: always in the loss",
    "response_end": "the end-of-answer marker",
    "pad": "padding",
}


def _chip(text: str, role: str, in_loss: bool, title: str, weight: float | None = None) -> str:
    shown = html.escape(text).replace("\n", "↵<br>")
    state = "in" if in_loss else "out"
    heat = f' style="--heat: {weight:.2f}" data-weight="{weight:.2f}"' if weight is not None else ""
    kind = " tok-heat" if weight is not None else ""
    return f'<span class="tok tok-{role} tok-{state}{kind}"{heat} title="{html.escape(title)}">{shown}</span>'


def _runs(tokens: list[tuple[str, str, bool]]):
    """Consecutive image tokens as one run; every other token on its own."""
    run: list = []
    for token in tokens:
        if token[1] == "image" and run and run[-1][1] == "image" and run[-1][2] == token[2]:
            run.append(token)
            continue
        if run:
            yield run
        run = [token]
    if run:
        yield run


def mask_html(tokens: list[tuple[str, str, bool]], caption: str, weights: list[float] | None = None) -> str:
    """The preview of one encoded sample: a caption line, then the token chips; with `weights`
    (loss mode l2t_relevance) each instruction token is shaded by its weight, a heat map."""
    chips = []
    position = 0
    for run in _runs(tokens):
        text, role, in_loss = run[0]
        label = ROLE_LABELS.get(role, role)
        where = "in the loss" if in_loss else "not in the loss"
        if role == "image":
            chips.append(_chip(f"image × {len(run)}", role, in_loss, f"{len(run)} image tokens, {where}"))
        elif role == "instruction" and weights is not None:
            weight = weights[position]
            chips.append(_chip(text, role, in_loss, f"{label}, weight {weight:.2f}: {text!r}", weight))
        else:
            chips.append(_chip(text, role, in_loss, f"{label}, {where}: {text!r}"))
        position += len(run)
    in_loss = Counter(role for _, role, flag in tokens if flag)
    out_loss = Counter(role for _, role, flag in tokens if not flag)
    counts = " · ".join(
        f"{ROLE_LABELS.get(role, role)} {in_loss[role]}/{in_loss[role] + out_loss[role]}"
        for role in ROLE_LABELS
        if in_loss[role] + out_loss[role]
    )
    return (
        f'<div class="mask-caption">{html.escape(caption)}</div>'
        f'<div class="mask-counts">tokens in the loss, by role: {html.escape(counts)}</div>'
        f'<div class="mask-preview">{"".join(chips)}</div>'
    )


def legend_html() -> str:
    roles = "".join(
        f'<span class="legend-item"><span class="tok tok-{role} tok-in">{html.escape(label)}</span>'
        f'<span class="legend-help">{html.escape(ROLE_HELP[role])}</span></span>'
        for role, label in ROLE_LABELS.items()
        if role != "pad"
    )
    states = (
        '<span class="legend-item"><span class="tok tok-instruction tok-in">solid</span><span class="legend-help">in the loss</span></span>'
        '<span class="legend-item"><span class="tok tok-instruction tok-out">faded</span><span class="legend-help">not in the loss</span></span>'
    )
    return f'<div class="mask-legend">{roles}</div><div class="mask-legend">{states}</div>'


MASK_CSS = """
.mask-preview { line-height: 2.1; font-family: var(--font-mono); font-size: 13px; padding: 10px 12px;
  border: 1px solid var(--border-color-primary); border-radius: 10px; background: var(--background-fill-secondary); }
.mask-caption { font-weight: 600; margin: 2px 0 2px; }
.mask-counts { color: var(--body-text-color-subdued); font-size: 12.5px; margin-bottom: 8px; }
.tok { white-space: pre-wrap; padding: 2px 1px; margin: 0 1px 0 0; border-radius: 4px; border-bottom: 2px solid transparent; }
.tok-out { opacity: 0.55; border-bottom: 2px dashed rgba(100,116,139,.55); }
.tok-in { border-bottom-style: solid; }
.tok-image { background: rgba(167,139,250,.30); border-bottom-color: #7c3aed; }
.tok-system { background: rgba(148,163,184,.28); border-bottom-color: #64748b; }
.tok-task_template { background: rgba(251,191,36,.35); border-bottom-color: #d97706; }
.tok-instruction { background: rgba(96,165,250,.32); border-bottom-color: #2563eb; }
.tok-response { background: rgba(52,211,153,.35); border-bottom-color: #059669; }
.tok-response_end { background: rgba(16,185,129,.50); border-bottom-color: #047857; }
.tok-pad { background: transparent; }
.tok-instruction.tok-heat { opacity: 1; background: rgba(220, 38, 38, calc(0.08 + 0.72 * var(--heat))); }
.tok-out.tok-image, .tok-out.tok-system, .tok-out.tok-task_template, .tok-out.tok-instruction { border-bottom-style: dashed; }
.mask-legend { display: flex; flex-wrap: wrap; gap: 6px 16px; margin: 4px 0 6px; font-size: 13px; }
.legend-item { display: inline-flex; align-items: center; gap: 6px; }
.legend-help { color: var(--body-text-color-subdued); font-size: 12px; }
"""
