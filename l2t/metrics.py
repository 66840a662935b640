"""Evaluation metrics over lists of predictions and references.

Pure functions, no model code: `l2t.generation` produces the answers and the
per-token log-probabilities, and `l2t.scoring` hands the lists to the functions here. Every
function returns a plain, JSON-serialisable dict (Python floats, ints, lists),
ready to be written to a run's `eval/` folder.

- `caption_scores`: CIDEr-D and BLEU-4 with the COCO caption scorers.
- `vqa_accuracy`: exact match after the VQA answer normalisation.
- `pope_scores`: yes/no accuracy, precision, recall, F1 and yes-ratio.
- `hallucination_rate`: CHAIR_s and CHAIR_i over object mentions.
- `visual_contribution_summary`: statistics of log p(a|image) - log p(a|noise).
"""

import math
import re
import statistics
from collections.abc import Callable, Sequence

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider


def _check_lengths(predictions: Sequence, references: Sequence, references_name: str) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} {references_name}"
        )
    if not predictions:
        raise ValueError("no predictions to score")


# ---------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------

# The tokens that pycocoevalcap's PTBTokenizer drops after running the Stanford
# tokenizer (pycocoevalcap/tokenizer/ptbtokenizer.py). Brackets and double quotes
# are in it through their PTB spellings (-LRB-, ``, '').
_PTB_DROPPED = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";",
                "(", ")", "[", "]", "{", "}", '"'}

_CLITIC_NOT = re.compile(r"(\w)(n't)\b")
_CLITIC = re.compile(r"(\w)('(?:s|re|ve|ll|d|m))\b")
_PTB_TOKEN = re.compile(
    r"""n't | '(?:s|re|ve|ll|d|m)\b   # clitics, already split off their word
      | \d+(?:[.,]\d+)+               # 3.5, 1,000
      | \w+(?:-\w+)*                  # words; hyphenated compounds stay whole
      | \.\.\. | --                   # multi-character punctuation
      | \S                            # any other symbol on its own""",
    re.VERBOSE,
)


def ptb_tokenize(text: str) -> list[str]:
    """Tokenise a caption the way the COCO caption evaluation does, without Java.

    pycocoevalcap's PTBTokenizer runs the Stanford PTB tokenizer (a Java jar) with
    lower-casing and then drops punctuation tokens. For plain English captions this
    reproduces it: lower-case, split clitics ("dog's" -> "dog 's", "can't" ->
    "ca n't"), split punctuation off words, drop the punctuation PTBTokenizer drops.
    It does not reproduce the Stanford rules for abbreviations ("mr." keeps its
    period there) or its rewriting of symbols such as "&" and "%".
    """
    text = text.lower()
    text = _CLITIC_NOT.sub(r"\1 \2", text)
    text = _CLITIC.sub(r"\1 \2", text)
    return [token for token in _PTB_TOKEN.findall(text) if token not in _PTB_DROPPED]


def caption_scores(predictions: list[str], references: list[list[str]]) -> dict:
    """CIDEr-D and BLEU-4 of `predictions[i]` against `references[i]` (one or more).

    Uses pycocoevalcap's scorers on `ptb_tokenize`d text. Their conventions carry
    over unchanged:
    - `cider_d` is pycocoevalcap's `Cider`, which is CIDEr-D (clipped n-gram
      counts and a Gaussian length penalty with sigma 6) and is multiplied by 10:
      a caption equal to all its references scores 10.0, provided it has at least
      4 words and, for each n, an n-gram not found in every image's references
      (a 3-word caption has no 4-grams and tops out at 7.5).
      The idf weights come from the references of the whole call, so scores only
      mean something over a corpus of many images: with a single image every
      n-gram has idf 0 and CIDEr-D is 0.0 whatever the prediction.
    - `bleu4` is corpus-level BLEU-4 (n-gram counts and lengths summed over all
      samples, effective reference length = the closest one per sample), not the
      mean of the per-sample scores. pycocoevalcap smooths each precision with
      1e-15 / 1e-9, so a prediction without any 4-gram match scores ~1e-12, not 0.
    An empty prediction (or one of punctuation only) scores 0 on both and still
    counts towards the corpus reference length.
    """
    _check_lengths(predictions, references, "reference lists")
    for index, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(
                f"references[{index}] must be a non-empty list of strings, got {refs!r}"
            )
    tokenized_predictions = {i: [" ".join(ptb_tokenize(p))] for i, p in enumerate(predictions)}
    tokenized_references = {
        i: [" ".join(ptb_tokenize(r)) for r in refs] for i, refs in enumerate(references)
    }
    cider_d, cider_d_per_sample = Cider().compute_score(tokenized_references, tokenized_predictions)
    bleu, bleu_per_sample = Bleu(4).compute_score(
        tokenized_references, tokenized_predictions, verbose=0
    )
    # Without a single token the scorers already return 0 (up to the 1e-15
    # smoothing); make it exact so an empty answer reads as 0 in the report.
    empty = [not tokens[0] for tokens in tokenized_predictions.values()]
    return {
        "cider_d": float(cider_d),
        "bleu4": float(bleu[3]),
        "cider_d_per_sample": [0.0 if e else float(s) for e, s in zip(empty, cider_d_per_sample)],
        "bleu4_per_sample": [0.0 if e else float(s) for e, s in zip(empty, bleu_per_sample[3])],
    }


# ---------------------------------------------------------------------------
# VQA
# ---------------------------------------------------------------------------

# From the official VQA evaluation (vqaEval.py): its punctuation list, number
# words and articles. Its contraction table ("dont" -> "don't") is left out.
_VQA_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                    ">", "<", "@", "`", ",", "?", "!"]
_VQA_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3",
                     "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
                     "nine": "9", "ten": "10"}
_VQA_ARTICLES = {"a", "an", "the"}
_THOUSANDS_COMMA = re.compile(r"(\d),(\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")


def normalize_answer(answer: str) -> str:
    """The VQA answer normalisation: "The Two Dogs." -> "2 dogs".

    Lower-case; drop thousands separators ("1,000" -> "1000"); punctuation and
    periods other than decimal points become spaces; number words up to ten
    become digits; articles are dropped; whitespace is collapsed.
    """
    text = answer.lower()
    text = _THOUSANDS_COMMA.sub(r"\1\2", text)
    text = _PERIOD_NOT_DECIMAL.sub(" ", text)
    for mark in _VQA_PUNCTUATION:
        text = text.replace(mark, " ")
    words = [_VQA_NUMBER_WORDS.get(word, word) for word in text.split()]
    return " ".join(word for word in words if word not in _VQA_ARTICLES)


def vqa_accuracy(predictions: list[str], answers: list[str | list[str]]) -> dict:
    """Share of predictions equal to their answer after `normalize_answer`.

    `answers[i]` is the answer string, or a list of accepted answers (a match with
    any of them counts). This is exact match, not the VQA v2 "3 of 10 annotators"
    soft accuracy.
    """
    _check_lengths(predictions, answers, "answers")
    correct = []
    for prediction, accepted in zip(predictions, answers):
        accepted = [accepted] if isinstance(accepted, str) else accepted
        accepted_normalized = {normalize_answer(a) for a in accepted}
        correct.append(normalize_answer(prediction) in accepted_normalized)
    return {
        "accuracy": sum(correct) / len(correct),
        "correct_per_sample": correct,
    }


# ---------------------------------------------------------------------------
# POPE (yes/no object probing)
# ---------------------------------------------------------------------------

_NOT_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def parse_yes_no(text: str) -> str | None:
    """"yes" or "no" when that is the first word of `text` ("Yes, there is." -> "yes"),
    else None. Case and punctuation are ignored."""
    words = _NOT_ALPHANUMERIC.sub(" ", text.lower()).split()
    if words and words[0] in ("yes", "no"):
        return words[0]
    return None


def _safe_ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def pope_scores(predictions: list[str], answers: list[str]) -> dict:
    """POPE scores with "yes" (the object is in the image) as the positive class.

    A prediction whose first word is neither yes nor no is counted in `no_answer`
    and is wrong: it is never a positive, so on a "yes" question it is a false
    negative. `yes_ratio` is the share of all predictions parsed as "yes".
    Precision, recall and F1 are 0.0 where their denominator is 0.
    """
    _check_lengths(predictions, answers, "answers")
    gold = []
    for index, answer in enumerate(answers):
        label = answer.strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"answers[{index}] must be 'yes' or 'no', got {answer!r}")
        gold.append(label)
    parsed = [parse_yes_no(p) for p in predictions]

    true_positive = sum(p == "yes" and g == "yes" for p, g in zip(parsed, gold))
    false_positive = sum(p == "yes" and g == "no" for p, g in zip(parsed, gold))
    true_negative = sum(p == "no" and g == "no" for p, g in zip(parsed, gold))
    false_negative = sum(p != "yes" and g == "yes" for p, g in zip(parsed, gold))
    precision = _safe_ratio(true_positive, true_positive + false_positive)
    recall = _safe_ratio(true_positive, true_positive + false_negative)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (true_positive + true_negative) / len(gold),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (true_positive + false_positive) / len(gold),
        "no_answer": sum(p is None for p in parsed),
        "parsed_per_sample": parsed,
        "correct_per_sample": [p == g for p, g in zip(parsed, gold)],
    }


# ---------------------------------------------------------------------------
# Object hallucination (CHAIR)
# ---------------------------------------------------------------------------

def _json_objects(objects: set) -> list:
    return [list(o) if isinstance(o, tuple) else o for o in sorted(objects)]


def hallucination_rate(
    captions: list[str],
    present: list[set],
    vocabulary_parser: Callable[[str], set],
) -> dict:
    """CHAIR scores: how often captions name objects that are not in the image.

    `vocabulary_parser(caption)` returns the set of objects the caption mentions
    (synonyms already mapped to one name, as in `present`); an object may be any
    sortable hashable, e.g. a (color, shape) tuple, which the per-sample lists
    write as a JSON list. Each distinct object counts once per caption:
    - `chair_s`: share of captions mentioning at least one object not in `present[i]`;
    - `chair_i`: share of all (caption, mentioned object) pairs whose object is not
      present; 0.0 when no caption mentions any object.
    """
    _check_lengths(captions, present, "object sets")
    mentioned_per_sample = []
    hallucinated_per_sample = []
    for caption, objects in zip(captions, present):
        mentioned = set(vocabulary_parser(caption))
        mentioned_per_sample.append(_json_objects(mentioned))
        hallucinated_per_sample.append(_json_objects(mentioned - set(objects)))
    mentions = sum(len(m) for m in mentioned_per_sample)
    hallucinations = sum(len(h) for h in hallucinated_per_sample)
    return {
        "chair_s": sum(bool(h) for h in hallucinated_per_sample) / len(captions),
        "chair_i": _safe_ratio(hallucinations, mentions),
        "mentioned_per_sample": mentioned_per_sample,
        "hallucinated_per_sample": hallucinated_per_sample,
    }


# ---------------------------------------------------------------------------
# Visual contribution
# ---------------------------------------------------------------------------

def visual_contribution_summary(per_token: list[list[float]], bins: int = 20) -> dict:
    """Statistics of the visual contribution log p(a_t | image) - log p(a_t | noise image).

    `per_token[i]` holds the differences for the answer tokens of sample i.
    - `mean_per_token`, `median_per_token`, `std_per_token` (population std) are
      over all tokens of all samples pooled;
    - `mean_per_sequence` averages each sample's sum, i.e. the log-likelihood ratio
      of the whole answer. A sample without tokens sums to 0 and still counts.
    - `histogram` has `bins` equal-width bins over the pooled tokens: `bin_edges`
      (bins + 1 values) and `counts`, for plotting.
    """
    if not per_token:
        raise ValueError("no samples to summarise")
    for index, values in enumerate(per_token):
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"per_token[{index}] has a value that is not finite: {values!r}")
    pooled = [float(v) for values in per_token for v in values]
    if not pooled:
        raise ValueError("no tokens to summarise: every sample is empty")
    sequence_sums = [float(sum(values)) for values in per_token]
    counts, bin_edges = np.histogram(pooled, bins=bins)
    return {
        "mean_per_token": statistics.fmean(pooled),
        "mean_per_sequence": statistics.fmean(sequence_sums),
        "median_per_token": float(statistics.median(pooled)),
        "std_per_token": statistics.pstdev(pooled),
        "num_tokens": len(pooled),
        "num_sequences": len(per_token),
        "sum_per_sample": sequence_sums,
        "histogram": {
            "bin_edges": [float(edge) for edge in bin_edges],
            "counts": [int(count) for count in counts],
        },
    }
