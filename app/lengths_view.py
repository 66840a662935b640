"""Token lengths as the Data and Train tabs show them: a histogram, the samples over
`train.max_length` (which training skips), and the fix.

The counts come from `l2t.prepare.token_lengths` with the preset's tokenizer and
image tokens (`app.datasets.token_counts`), the same counts training drops samples by.
"""

from __future__ import annotations

import html
import math
import statistics
from dataclasses import dataclass

import pandas as pd

from l2t.config import Config

MAX_SKIPPED_SHARE = 0.05
"""Start refuses a run that would skip more than this share of the training samples (unless told to go on)."""
SHOWN_NAMES = 12
FITS, OVER = "within max_length", "over max_length: skipped"


@dataclass
class LengthCheck:
    counts: dict[str, int]
    """Token count per sample (image tokens included), by unique sample name."""
    max_length: int

    @property
    def over(self) -> list[str]:
        """The samples training would skip, longest first."""
        return sorted((name for name, n in self.counts.items() if n > self.max_length), key=lambda name: -self.counts[name])

    @property
    def share_over(self) -> float:
        return len(self.over) / len(self.counts) if self.counts else 0.0

    @property
    def longest(self) -> int:
        return max(self.counts.values(), default=0)


def histogram(check: LengthCheck) -> pd.DataFrame:
    """One row per sample, for a bar plot binned by token count and coloured by whether it fits."""
    rows = [{"tokens": n, "samples": 1, "fits": OVER if n > check.max_length else FITS} for n in check.counts.values()]
    return pd.DataFrame(rows, columns=["tokens", "samples", "fits"])


def bin_width(check: LengthCheck, bins: int = 24) -> int:
    top = max(check.longest, check.max_length, 1)
    step = top / bins
    magnitude = 10 ** math.floor(math.log10(step)) if step >= 1 else 1
    return int(next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= step))


def memory_note(check: LengthCheck, config: Config) -> str:
    ratio = check.longest / check.max_length
    note = f"each batch then holds up to {ratio:.1f}× as many tokens, and activation memory grows about as much"
    if config.model.estimated_peak_gpu_gb:
        note += f" (the preset's peak estimate of ~{config.model.estimated_peak_gpu_gb:g} GB is for max_length {check.max_length})"
    return note


def summary_html(check: LengthCheck, config: Config) -> str:
    values = list(check.counts.values())
    head = (
        f"Tokens per sample with the tokenizer of preset {config.preset}, image tokens included: "
        f"shortest {min(values)}, median {statistics.median(values):g}, longest {max(values)} · train.max_length {check.max_length}."
    )
    if not check.over:
        return f'<div class="l2t-notice l2t-ok">{html.escape(head)} Every sample fits.</div>'
    names = ", ".join(f"{name} ({check.counts[name]})" for name in check.over[:SHOWN_NAMES])
    more = f" and {len(check.over) - SHOWN_NAMES} more" if len(check.over) > SHOWN_NAMES else ""
    kind = "error" if check.share_over > MAX_SKIPPED_SHARE else "warn"
    return (
        f'<div class="l2t-notice l2t-{kind}" id="length-warning">{html.escape(head)}<br>'
        f"<b>{len(check.over)} of {len(check.counts)} samples ({check.share_over:.0%}) are longer than max_length and "
        f"training would skip them</b>: {html.escape(names + more)}.<br>"
        f"Fix: raise Max length to {check.longest} (Train tab, “Length and images”); {html.escape(memory_note(check, config))}. "
        "Or lower the image size cap.</div>"
    )


def refusal(check: LengthCheck) -> str:
    """Why Start refuses: too large a share of the samples would be skipped."""
    return (
        f"{len(check.over)} of {len(check.counts)} training samples ({check.share_over:.0%}) are longer than Max length "
        f"{check.max_length} once their image tokens are counted, and training would skip them "
        f"(longest: {', '.join(check.over[:3])}). Raise Max length to {check.longest}, lower the image size cap, "
        f"or tick “Start anyway, skipping the long samples”."
    )
