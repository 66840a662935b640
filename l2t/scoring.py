"""Scores of a model's answers to test items: which metrics each item gets, and their values.

Pure functions, no model code: `l2t.evaluate` builds the test items and the
answers, and the functions here pick the metrics that apply to each item and
compute them with `l2t.metrics`. An item's kind is read off its reference
answer, so that user data needs no labels:

    yes_no        the reference's first word is yes or no -> POPE accuracy, F1, yes-ratio
    short_answer  a reference of at most 3 words          -> VQA exact match
    caption       a longer reference                      -> CIDEr-D, BLEU-4, and CHAIR
                                                             where the sample lists its `objects`
    text_only     no image in the first question          -> answered and shown, not scored

Items with an image also get the summary of their visual contribution.
"""

from __future__ import annotations

import re

from l2t import metrics
from l2t.synthetic import objects_in

SHORT_ANSWER_MAX_WORDS = 3
KINDS = ("caption", "short_answer", "yes_no", "text_only")


def sample_kind(reference: str, has_image: bool) -> str:
    """Which metrics a sample gets, read off its reference answer (see the module docstring)."""
    if not has_image:
        return "text_only"
    if metrics.parse_yes_no(reference) is not None:
        return "yes_no"
    if len(reference.split()) <= SHORT_ANSWER_MAX_WORDS:
        return "short_answer"
    return "caption"


def ground_truth_objects(objects: list) -> set:
    """`objects` of a sample as the set a caption parser returns: (color, shape) pairs for
    the synthetic shapes, else lower-cased object names."""
    if objects and all(isinstance(o, dict) and "color" in o and "shape" in o for o in objects):
        return {(o["color"], o["shape"]) for o in objects}
    return {str(o).lower() for o in objects if isinstance(o, str)}


def object_parser(items: list):
    """The parser that reads object mentions off a caption, for these items' ground truth.

    Synthetic shapes use `l2t.synthetic.objects_in`; named objects ("dog") use a
    whole-word match (plural -s allowed) over every name the test items list.
    """
    truths = [ground_truth_objects(item.objects) for item in items]
    if any(isinstance(o, tuple) for truth in truths for o in truth):
        return objects_in
    names = sorted({name for truth in truths for name in truth}, key=len, reverse=True)
    if not names:
        return lambda caption: set()
    pattern = re.compile(r"\b(" + "|".join(re.escape(n) for n in names) + r")s?\b", re.IGNORECASE)
    return lambda caption: {match.lower() for match in pattern.findall(caption)}


def score_answers(items: list, result) -> tuple[dict, list[dict]]:
    """Metrics of one model over the items they apply to, and each item's own scores.

    `items` are `l2t.evaluate.EvalItem`s, `result` the model's `l2t.evaluate.ModelAnswers`.
    """
    summary: dict = {}
    per_sample: list[dict] = [{} for _ in items]

    def subset(kind: str) -> list[int]:
        return [i for i, item in enumerate(items) if item.kind == kind]

    captions = subset("caption")
    if captions:
        scores = metrics.caption_scores([result.answers[i] for i in captions], [[items[i].reference] for i in captions])
        summary["caption"] = {"samples": len(captions), "cider_d": scores["cider_d"], "bleu4": scores["bleu4"]}
        for i, cider, bleu in zip(captions, scores["cider_d_per_sample"], scores["bleu4_per_sample"], strict=True):
            per_sample[i].update(cider_d=cider, bleu4=bleu)
    with_objects = [i for i in captions if ground_truth_objects(items[i].objects)]
    if with_objects:
        chair = metrics.hallucination_rate(
            [result.answers[i] for i in with_objects], [ground_truth_objects(items[i].objects) for i in with_objects], object_parser(items)
        )
        summary["hallucination"] = {"samples": len(with_objects), "chair_s": chair["chair_s"], "chair_i": chair["chair_i"]}
        for i, hallucinated in zip(with_objects, chair["hallucinated_per_sample"], strict=True):
            per_sample[i]["hallucinated"] = hallucinated
    short = subset("short_answer")
    if short:
        vqa = metrics.vqa_accuracy([result.answers[i] for i in short], [items[i].reference for i in short])
        summary["short_answer"] = {"samples": len(short), "accuracy": vqa["accuracy"]}
        for i, correct in zip(short, vqa["correct_per_sample"], strict=True):
            per_sample[i]["correct"] = correct
    yes_no = subset("yes_no")
    if yes_no:
        pope = metrics.pope_scores([result.answers[i] for i in yes_no], [metrics.parse_yes_no(items[i].reference) for i in yes_no])
        summary["yes_no"] = {
            "samples": len(yes_no),
            **{k: pope[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio", "no_answer")},
        }
        for i, correct in zip(yes_no, pope["correct_per_sample"], strict=True):
            per_sample[i]["correct"] = correct
    visual = [i for i, values in enumerate(result.visual_contribution) if values is not None]
    if visual:
        vc = metrics.visual_contribution_summary([result.visual_contribution[i] for i in visual])
        for i, total in zip(visual, vc.pop("sum_per_sample"), strict=True):
            values = result.visual_contribution[i]
            per_sample[i].update(vc_sum=total, vc_mean=total / len(values) if values else 0.0)
        summary["visual_contribution"] = vc
    return summary, per_sample
