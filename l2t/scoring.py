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

Every question (a short answer or a yes/no) is also scored by exact match
(after the VQA answer normalisation), overall and per question type (the
data's `turn_kinds` where it has them, e.g. color or count; else the kind),
each beside the majority-answer baseline: the share of questions of that type
whose reference is the type's most common answer, i.e. what always giving that
answer would score. Yes/no questions also get the "always yes" and "always no"
accuracies. Captions of synthetic scenes (objects with a color and a shape) get
the main-object accuracy: the share whose first-named object has the first
object's color and shape.

Items with an image also get the summary of their visual contribution, of both
kinds (`l2t.evaluate`).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from PIL import Image

from l2t import chat, metrics
from l2t.scenes import QUESTION_KINDS as SCENE_QUESTION_TYPES
from l2t.scenes import first_object_in, named_value, objects_in

SHORT_ANSWER_MAX_WORDS = 3
KINDS = ("caption", "short_answer", "yes_no", "text_only")
QUESTION_ITEM_KINDS = ("short_answer", "yes_no")


@dataclass
class EvalItem:
    """One test sample, ready for both models: its first question, reference and images."""

    id: str
    kind: str
    messages: list[dict]
    reference: str
    images: list[Image.Image]
    objects: list = field(default_factory=list)
    question_type: str = ""
    """What the question asks (the data's `turn_kinds`, e.g. color or count), else its kind."""

    @property
    def question(self) -> str:
        return self.messages[-1]["content"].replace(chat.IMAGE, "").strip()



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


def _main_object(objects: list) -> tuple[str, str] | None:
    """(color, shape) of a synthetic scene's first object, None for other ground truth."""
    first = objects[0] if objects else None
    return (first["color"], first["shape"]) if isinstance(first, dict) and "color" in first and "shape" in first else None


def object_parser(items: list):
    """The parser that reads object mentions off a caption, for these items' ground truth.

    Synthetic shapes use `l2t.scenes.objects_in`; named objects ("dog") use a
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

    `result` is the model's `l2t.answers.ModelAnswers`.
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
        scenes = [i for i in captions if _main_object(items[i].objects)]
        if scenes:
            right = [first_object_in(result.answers[i]) == _main_object(items[i].objects) for i in scenes]
            summary["caption"]["main_object_accuracy"] = sum(right) / len(scenes)
            for i, correct in zip(scenes, right, strict=True):
                per_sample[i]["main_object_right"] = correct
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
        references = [metrics.parse_yes_no(items[i].reference) for i in yes_no]
        pope = metrics.pope_scores([result.answers[i] for i in yes_no], references)
        summary["yes_no"] = {
            "samples": len(yes_no),
            **{k: pope[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio", "no_answer")},
            "always_yes_accuracy": references.count("yes") / len(yes_no),
            "always_no_accuracy": references.count("no") / len(yes_no),
            "best_constant_accuracy": max(references.count("yes"), references.count("no")) / len(yes_no),
        }
        for i, correct in zip(yes_no, pope["correct_per_sample"], strict=True):
            per_sample[i]["correct"] = correct
    questions = [i for i, item in enumerate(items) if item.kind in QUESTION_ITEM_KINDS]
    if questions:
        summary["questions"] = question_scores([items[i] for i in questions], [result.answers[i] for i in questions])
        for i, exact in zip(questions, summary["questions"].pop("exact_per_sample"), strict=True):
            per_sample[i]["exact"] = exact
    for section, per_item, prefix in (
        ("visual_contribution", result.visual_contribution, "vc"),
        ("visual_contribution_noise", result.visual_contribution_noise, "vc_noise"),
    ):
        visual = [i for i, values in enumerate(per_item) if values is not None]
        if visual:
            vc = metrics.visual_contribution_summary([per_item[i] for i in visual])
            for i, total in zip(visual, vc.pop("sum_per_sample"), strict=True):
                per_sample[i].update({f"{prefix}_sum": total, f"{prefix}_mean": total / len(per_item[i]) if per_item[i] else 0.0})
            summary[section] = vc
    if result.image_attention is not None:
        summary["attention"] = {"image_share": result.image_attention}
    return summary, per_sample


def content_right(question_type: str, answer: str, reference: str) -> bool | None:
    """Whether an answer names the reference's value in any wording (synthetic scene questions only, else None)."""
    if question_type not in SCENE_QUESTION_TYPES:
        return None
    return named_value(question_type, answer) == named_value(question_type, reference)


def question_scores(items: list, answers: list[str]) -> dict:
    """Exact match over questions, overall and per question type, each with its majority-answer baseline;
    for synthetic scene questions also the content accuracy (the right value, in any wording)."""
    exact = [metrics.normalize_answer(a) == metrics.normalize_answer(item.reference) for item, a in zip(items, answers, strict=True)]
    content = [content_right(item.question_type, a, item.reference) for item, a in zip(items, answers, strict=True)]
    by_type, right_by_majority = {}, 0
    for question_type in sorted({item.question_type for item in items}):
        chosen = [i for i, item in enumerate(items) if item.question_type == question_type]
        answer, count = Counter(metrics.normalize_answer(items[i].reference) for i in chosen).most_common(1)[0]
        right_by_majority += count
        by_type[question_type] = {
            "samples": len(chosen),
            "exact_match": sum(exact[i] for i in chosen) / len(chosen),
            "majority_answer": answer,
            "majority_baseline": count / len(chosen),
        }
        if content[chosen[0]] is not None:
            by_type[question_type]["content_accuracy"] = sum(content[i] for i in chosen) / len(chosen)
    scores = {
        "samples": len(items),
        "exact_match": sum(exact) / len(items),
        "majority_baseline": right_by_majority / len(items),
        "by_type": by_type,
        "exact_per_sample": exact,
    }
    judged = [c for c in content if c is not None]
    if judged:
        scores["content_accuracy"] = sum(judged) / len(judged)
    return scores
