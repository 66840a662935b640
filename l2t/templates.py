"""Task templates: high-frequency instruction sentences kept out of the L2T loss.

L2T puts the loss on the user's instruction tokens too, except on templates
that carry no information about the image. Task templates are whole sentences
that dataset builders paste into many instructions ("Answer the question using
a single word or phrase."). As in the paper, they are found by sentence
frequency over the training set: split every user turn into sentences, count in
how many samples each sentence occurs, keep the most frequent ones.

Sentences
    A sentence ends after a run of `.`, `?` or `!` (also the fullwidth `。？！`
    and `…`), plus any closing quotes or brackets right after it; a line break
    (anything `str.splitlines` breaks on) and the image placeholder `<image>`
    also end one and are never part of one. A period between two digits
    ("3.5") is not a boundary. Abbreviations are not special-cased ("e.g."
    ends a sentence): templates are whole prompt sentences, and a rare wrong
    split only makes a sentence rarer, so it is never mined by mistake.

Normalisation
    Whitespace inside a sentence is collapsed to one space and the ends are
    stripped; case and punctuation are kept. Templates are exact strings that a
    dataset builder pasted; folding case would merge a template with a question
    that merely starts the same way in another case, and the list the user
    reviews would no longer be the text that is actually masked.

Selection defaults, and why
    The defaults are the fields of `l2t.config.TemplatesConfig` (a run's
    `templates` section), named here as the DEFAULT_ constants. A sentence is a
    template when all of these hold:

    - ``fraction >= DEFAULT_MIN_FRACTION`` (0.5% of samples). On LLaVA-mix-665k
      the templates the paper names occur in about a third of the samples
      ("Answer the question using a single word or phrase."), a few percent
      ("Answer with the option's letter from the given choices directly.") and
      1-3% ("Provide a one-sentence caption for the provided image."), while an
      ordinary question such as "What is the man doing?" stays well under
      0.1%. 0.5% is twice below the rarest template to catch and five times
      above the commonest ordinary question. Prompts with varying content
      ("Please provide a short description for this region: [0.1, ...].")
      never match, as intended. Repeated fixed questions with a share above
      0.5% (OCR-VQA's "Who wrote this book?") are mined too: that is what a
      sentence-frequency rule means, and the user reviews the list.
    - ``count >= DEFAULT_MIN_COUNT`` (10 samples). On a small dataset the
      share alone is weak evidence: 0.5% of 200 samples is a single sample.
      A sentence must be seen in at least 10 samples to be called frequent
      rather than a coincidence. From 2,000 samples up the share decides.
    - ``words >= DEFAULT_MIN_WORDS`` (3). Lone "Yes.", "Why not?" or "?" are
      frequent in chat data but are content, not task instructions, and a
      2-word fragment is too short to be a pasted prompt. A word is a
      space-separated token holding a letter or digit (so "?" has none), and
      each kana or CJK ideograph counts as one, since those scripts put no
      spaces between words.
    - at most ``DEFAULT_TOP_K`` (50) of them, most frequent first: a list a
      person can still read in the UI; 0 mines none (only added sentences).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from l2t.config import TemplatesConfig
from l2t.files import atomic_write_json, read_json

IMAGE_PLACEHOLDER = "<image>"

DEFAULT_MIN_FRACTION = TemplatesConfig.min_fraction
DEFAULT_MIN_COUNT = TemplatesConfig.min_count
DEFAULT_MIN_WORDS = TemplatesConfig.min_words
DEFAULT_TOP_K = TemplatesConfig.top_k


@dataclass(frozen=True)
class TaskTemplate:
    sentence: str
    """Normalised sentence text."""
    count: int
    """Number of samples whose instructions contain it (once per sample)."""
    fraction: float
    """count / number of samples."""


# Line breaks are the characters str.splitlines() breaks on.
_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
_ENDS = ".?!…。？！"
_CLOSERS = "\"'”’»)\\]」』"
# The placeholder is replaced by as many line breaks before splitting, which
# keeps character offsets. A sentence starts at a character that is neither
# whitespace nor an end, runs to the next end or line break (a `.` between two
# digits does not end it), and takes the run of ends and closers after it.
# The runs are single character classes with possessive quantifiers: the
# regex engine spends its time in tight loops, not in backtracking. A
# sentence cut by a line break may end in spaces; callers strip them.
_PLACEHOLDER_BREAKS = "\n" * len(IMAGE_PLACEHOLDER)
_BODY = rf"[^{_ENDS}{_BREAKS}]*+"
_END = rf"[{_ENDS}]++[{_CLOSERS}]*+"
_SENTENCE = re.compile(rf"[^\s{_ENDS}]{_BODY}(?:(?<=\d)\.(?=\d){_BODY})*+(?:{_END})?+|{_END}")
# Words, for min_words: each kana or CJK ideograph (scripts written without
# spaces), or a run of other non-space characters holding a letter or digit.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD_UNIT = re.compile(rf"[{_CJK}]|[^\s{_CJK}]*[^\W_{_CJK}][^\s{_CJK}]*")


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans (start, end) of the sentences of one instruction text, in order."""
    spans = []
    for match in _SENTENCE.finditer(text.replace(IMAGE_PLACEHOLDER, _PLACEHOLDER_BREAKS)):
        start, end = match.span()
        if match[0][-1].isspace():
            end = start + len(match[0].rstrip())
        spans.append((start, end))
    return spans


def normalize_sentence(text: str) -> str:
    """Collapse whitespace to single spaces and strip; case and punctuation are kept."""
    return " ".join(text.split())


def _count_sentences(instructions: Iterable[list[str]]) -> tuple[Counter[str], int]:
    """In how many samples each normalised sentence occurs, and the number of samples.

    The same sentences as `split_sentences` + `normalize_sentence`, found with
    one regex pass over each sample's joined turns. Most sentences are already
    normalised, so a raw sentence is normalised in Python only the first time
    it is met, and a sample's set is rebuilt only when it holds one that
    needed it (which keeps "once per sample" exact).
    """
    counts: Counter[str] = Counter()
    seen: set[str] = set()
    irregular: dict[str, str] = {}  # raw sentence -> normalised, where they differ
    n_samples = 0
    for turns in instructions:
        found = set(_SENTENCE.findall("\n".join(turns).replace(IMAGE_PLACEHOLDER, "\n")))
        new = found - seen
        if new:
            seen |= new
            for raw in new:
                if (sentence := normalize_sentence(raw)) != raw:
                    irregular[raw] = sentence
        if irregular and not irregular.keys().isdisjoint(found):
            found = {irregular.get(raw, raw) for raw in found}
        counts.update(found)
        n_samples += 1
    return counts, n_samples


def mine_templates(
    instructions: Iterable[list[str]],
    min_fraction: float = DEFAULT_MIN_FRACTION,
    min_count: int = DEFAULT_MIN_COUNT,
    top_k: int = DEFAULT_TOP_K,
    min_words: int = DEFAULT_MIN_WORDS,
) -> list[TaskTemplate]:
    """instructions: per sample, the list of its user-turn texts. Sorted by count desc, then sentence."""
    _check_settings(min_fraction, min_count, top_k, min_words)
    counts, n_samples = _count_sentences(instructions)
    return _select(counts, n_samples, min_fraction, min_count, top_k, min_words)


def _select(counts: Counter[str], n_samples: int, min_fraction: float, min_count: int, top_k: int, min_words: int) -> list[TaskTemplate]:
    if n_samples == 0:
        return []
    kept = [
        TaskTemplate(sentence, count, count / n_samples)
        for sentence, count in counts.items()
        if count >= min_count and count / n_samples >= min_fraction and _word_count(sentence) >= min_words
    ]
    kept.sort(key=_rank)
    return kept[:top_k]


HASH_BUCKETS = 1 << 22
"""Counters of the first pass of `mine_templates_twice` (32 MB, whatever the data)."""


def _sample_sentences(instructions: Iterable[list[str]]) -> Iterable[set[str]]:
    """Each sample's set of normalised sentences, remembering nothing between samples."""
    for turns in instructions:
        yield {normalize_sentence(raw) for raw in _SENTENCE.findall("\n".join(turns).replace(IMAGE_PLACEHOLDER, "\n"))}


def mine_templates_twice(
    read: Callable[[], Iterable[list[str]]],
    min_fraction: float = DEFAULT_MIN_FRACTION,
    min_count: int = DEFAULT_MIN_COUNT,
    top_k: int = DEFAULT_TOP_K,
    min_words: int = DEFAULT_MIN_WORDS,
) -> list[TaskTemplate]:
    """`mine_templates` over data read twice (`read()` gives the instructions anew) in memory that does not grow with it.

    Counting every distinct sentence exactly holds them all (1.2M on LLaVA-mix-665k).
    The first pass counts samples per hash bucket of each sentence; a bucket's count is
    at least that of every sentence in it, so the second pass counts exactly only the
    sentences whose bucket reached the thresholds, and misses no template. Same result.
    """
    _check_settings(min_fraction, min_count, top_k, min_words)
    buckets = [0] * HASH_BUCKETS
    mask, n_samples = HASH_BUCKETS - 1, 0
    for sentences in _sample_sentences(read()):
        for sentence in sentences:
            buckets[hash(sentence) & mask] += 1
        n_samples += 1
    threshold = max(min_count, int(min_fraction * n_samples) - 1)  # one below, against float rounding
    counts: Counter[str] = Counter()
    for sentences in _sample_sentences(read()):
        counts.update(s for s in sentences if buckets[hash(s) & mask] >= threshold)
    return _select(counts, n_samples, min_fraction, min_count, top_k, min_words)


def apply_edits(
    mined: list[TaskTemplate], add: Iterable[str] = (), remove: Iterable[str] = ()
) -> list[TaskTemplate]:
    """Apply the user's edits to a mined list.

    Removed sentences are dropped (removal wins over adding the same sentence;
    removing one that is not there is a no-op). An added sentence keeps its
    count and fraction from `mined` when it is there, else gets 0: it is masked
    whatever the data says. Each added text must be exactly one sentence, since
    templates are matched sentence by sentence.
    """
    by_sentence = {template.sentence: template for template in mined}
    for text in add:
        spans = split_sentences(text)
        if len(spans) != 1 or IMAGE_PLACEHOLDER in text:
            raise ValueError(
                f"templates.add: {text!r} must be exactly one sentence "
                f"(it splits into {[text[s:e] for s, e in spans]})"
            )
        sentence = normalize_sentence(text)
        by_sentence.setdefault(sentence, TaskTemplate(sentence, 0, 0.0))
    for text in remove:
        by_sentence.pop(normalize_sentence(text), None)
    return sorted(by_sentence.values(), key=_rank)


def samples_with(sentences: Iterable[str], instructions: Iterable[list[str]]) -> dict[str, int]:
    """In how many samples each of `sentences` occurs (as a whole sentence, as mining counts them)."""
    wanted = {normalize_sentence(s) for s in sentences}
    if not wanted:
        return {}
    counts, _ = _count_sentences(instructions)
    return {sentence: counts.get(sentence, 0) for sentence in wanted}


def mine_with_settings(instructions: Iterable[list[str]] | Callable[[], Iterable[list[str]]], settings) -> list[TaskTemplate]:
    """Mine with a run's `templates` settings: the thresholds, then the user's add/remove edits.

    `instructions` may also be a function that reads them anew: mined in two passes then (`mine_templates_twice`).
    """
    mine = mine_templates_twice if callable(instructions) else mine_templates
    mined = mine(instructions, settings.min_fraction, settings.min_count, settings.top_k, settings.min_words)
    return apply_edits(mined, settings.add, settings.remove)


def template_matcher(sentences: set[str] | frozenset[str]) -> Callable[[str], tuple[tuple[int, int], ...]]:
    """`template_spans` for a fixed set of sentences, quick on texts that hold none of them or were seen before.

    A text can hold a template only where the template's words appear separated by
    whitespace: one regex search rules most texts out before they are split into
    sentences. Instructions repeat (fixed prompts, the same question over many
    images), so the spans of recent texts are remembered.
    """
    if not sentences:
        return lambda text: ()
    words = sorted((r"\s+".join(map(re.escape, s.split())) for s in sentences), key=len, reverse=True)
    candidate = re.compile("|".join(words)).search

    @lru_cache(maxsize=1 << 16)
    def spans(text: str) -> tuple[tuple[int, int], ...]:
        return tuple(template_spans(text, sentences)) if candidate(text) else ()

    return spans


def template_spans(text: str, sentences: set[str] | frozenset[str]) -> list[tuple[int, int]]:
    """Character spans in `text` of every sentence whose normalised form is in `sentences`.

    All occurrences count, at any position in the text; `sentences` holds
    normalised sentences (TaskTemplate.sentence).
    """
    if not sentences:
        return []
    return [(s, e) for s, e in split_sentences(text) if normalize_sentence(text[s:e]) in sentences]


def save_templates(path: str | Path, templates: list[TaskTemplate], settings: dict) -> None:
    """Write templates.json: the settings that mined the list, then the list itself.

    Written to a temp file in the same folder and renamed into place, so a
    crash leaves either the old file or the new one.
    """
    payload = {"settings": dict(settings), "templates": [asdict(t) for t in templates]}
    atomic_write_json(Path(path), payload)


def load_templates(path: str | Path) -> list[TaskTemplate]:
    """The template list of a templates.json written by `save_templates`."""
    data = read_json(Path(path))
    rows = data.get("templates") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        # ValueError like a bad row below: callers catch one kind of error for a bad file.
        raise ValueError(f"{path}: 'templates' must be a list of templates, got {rows!r:.80}")  # noqa: TRY004
    templates = []
    for i, row in enumerate(rows):
        try:
            templates.append(TaskTemplate(str(row["sentence"]), int(row["count"]), float(row["fraction"])))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: templates[{i}] = {row!r} is not a template ({err})") from err
    return templates


def _word_count(sentence: str) -> int:
    return len(_WORD_UNIT.findall(sentence))


def _rank(template: TaskTemplate) -> tuple[int, str]:
    return (-template.count, template.sentence)


def _check_settings(min_fraction: float, min_count: int, top_k: int, min_words: int) -> None:
    _check_range("min_fraction", min_fraction, 0.0, 1.0)
    _check_range("min_count", min_count, 1)
    _check_range("top_k", top_k, 0)
    _check_range("min_words", min_words, 0)


def _check_range(key: str, value, low, high=None) -> None:
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{key} = {value!r}: must be {bound}")
