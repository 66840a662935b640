"""Our `response` labels against the labels of TRL's vision collator, token for token.

TRL's `DataCollatorForVisionLanguageModeling` (what `SFTTrainer` uses for image
data) can leave the prompt out of the loss in two ways:

- assistant-only (`assistant_only_loss=True`): needs a chat template with
  `{% generation %}` markers. TRL ships such training copies for hub templates
  it recognises; of our families, SmolVLM, LLaVA-NeXT and Qwen2-VL. It has none
  for LLaVA-1.5, llava-interleave (ChatML), TinyLLaVA or the built-in tiny
  model's template, so for those it cannot produce assistant-only labels at all
  (`test_no_assistant_only_labels_for_the_tiny_template`);
- completion-only (`completion_only_loss`, prompt/completion data): works with
  any template, but only for the last answer of a conversation.

Where TRL can produce them, the same tokens carry the loss as in our
`response` mode, except what a template writes after an answer's end marker
(the newline after `<end_of_utterance>` / `<|im_end|>`; LLaVA-NeXT's space after
`</s>` in a completion), which TRL puts in the loss and we leave out as a system
template. The sequences themselves also
differ where TRL tokenizes the template's text without special tokens: no BOS
unless the template writes one (LLaVA-NeXT's and the tiny model's don't).
The family processors are the offline ones of `tests/test_masking.py`, with
TRL's stored copies of the hub templates.
"""

from difflib import SequenceMatcher
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from l2t import chat
from l2t.masking import IGNORE, Encoder, Role, labels_and_weights

trl = pytest.importorskip("trl")
from trl.chat_template_utils import get_training_chat_template  # noqa: E402
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling  # noqa: E402

from tests.test_masking import (  # noqa: E402
    FAMILY_FORMATS,
    TWO_TURNS,
    idefics3_processor,
    llava_interleave_processor,
    llava_next_processor,
    qwen2_vl_processor,
)

HUB_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
SIZE = (32, 32)
ONE_TURN = TWO_TURNS[:2]

# family -> (processor, TRL's stored copy of its hub chat template)
WITH_TRAINING_TEMPLATE = {
    "smolvlm": (idefics3_processor, "smolvlm.jinja"),
    "llava-next": (llava_next_processor, "llava_next.jinja"),
    "qwen2-vl": (qwen2_vl_processor, "qwen2_5_vl.jinja"),
}


def family_processor(family: str, tiny_processor):
    if family in WITH_TRAINING_TEMPLATE:
        make, template = WITH_TRAINING_TEMPLATE[family]
        processor = make()
        processor.chat_template = (HUB_TEMPLATES / template).read_text(encoding="utf-8")
        return processor
    if family == "tiny-llava":
        return tiny_processor  # the built-in model's own template
    processor = llava_interleave_processor()
    processor.chat_template = chat.to_jinja(chat.FORMATS[FAMILY_FORMATS[family]])
    return processor


def compare(encoded, ours: np.ndarray, trl_ids: list[int], trl_labels: list[int], tokenizer, response_end: str) -> dict:
    """Align the two sequences; check that every token in one loss and not the other is where the docstring says.

    Returns the texts of the tokens only we have, only TRL has, and in TRL's loss but not ours.
    """
    ids = encoded.input_ids.tolist()
    found = {"only_ours": [], "only_trl": [], "trl_loss_only": []}

    def trl_only_in_loss(j: int) -> None:
        assert tokenizer.decode([trl_ids[j - 1]]) == response_end, "TRL's extra token in the loss does not follow an end marker"
        found["trl_loss_only"].append(tokenizer.decode([trl_ids[j]]))

    for op, a0, a1, b0, b1 in SequenceMatcher(None, ids, trl_ids, autojunk=False).get_opcodes():
        assert op != "replace", f"the sequences disagree on tokens: ours {ids[a0:a1]}, TRL's {trl_ids[b0:b1]}"
        if op == "delete":
            assert (ours[a0:a1] == IGNORE).all()
            found["only_ours"] += [tokenizer.decode([t]) for t in ids[a0:a1]]
        elif op == "insert":
            found["only_trl"] += [tokenizer.decode([t]) for t in trl_ids[b0:b1]]
            for j in range(b0, b1):
                if trl_labels[j] != IGNORE:
                    trl_only_in_loss(j)
        for i, j in zip(range(a0, a1), range(b0, b1)) if op == "equal" else ():
            if ours[i] == trl_labels[j]:
                continue
            assert ours[i] == IGNORE, f"token {i} ({tokenizer.decode([ids[i]])!r}) is in our loss, not in TRL's"
            assert encoded.roles[i] == Role.SYSTEM, "TRL's extra token is not a system template of ours"
            trl_only_in_loss(j)
    return found


def ours_and_trl(processor, family: str, messages: list[dict], collator) -> tuple:
    encoded = Encoder(processor, chat.FORMATS[FAMILY_FORMATS[family]], []).encode(messages, [SIZE])
    labels, _ = labels_and_weights(encoded, "response")
    typed, image = chat._typed(messages), Image.new("RGB", SIZE, (255, 0, 0))
    if collator.completion_only_loss:
        example = {"prompt": typed[:-1], "completion": typed[-1:], "images": [image]}
    else:
        example = {"messages": typed, "images": [image]}
    batch = collator([example])
    return encoded, labels, batch["input_ids"][0].tolist(), batch["labels"][0].tolist()


def labelled_text(tokenizer, labels) -> str:
    return tokenizer.decode([int(t) for t in labels if t != IGNORE])


# family -> our response labels as text, TRL's, the tokens only we have, only TRL has, and only in TRL's loss (TWO_TURNS, one image)
ASSISTANT_ONLY = {
    "smolvlm": (" A red circle.<end_of_utterance> On the left.<end_of_utterance>",
                " A red circle.<end_of_utterance>\n On the left.<end_of_utterance>\n", [], [], ["\n", "\n"]),
    "llava-next": (" A red circle.</s> On the left.</s>", " A red circle.</s> On the left.</s>", ["<s>"], [" ", " "], []),
    "qwen2-vl": ("A red circle.<|im_end|>On the left.<|im_end|>", "A red circle.<|im_end|>\nOn the left.<|im_end|>\n", [], [], ["\n", "\n"]),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(ASSISTANT_ONLY))
def test_assistant_only_labels_match_ours(family, tiny_processor):
    processor, fmt = family_processor(family, tiny_processor), chat.FORMATS[FAMILY_FORMATS[family]]
    assert chat.check_processor_template(processor, fmt) is None, "our format renders the hub template"
    collator = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True, chat_template=get_training_chat_template(processor))
    encoded, ours, trl_ids, trl_labels = ours_and_trl(processor, family, TWO_TURNS, collator)
    found = compare(encoded, ours, trl_ids, trl_labels, processor.tokenizer, fmt.response_end)
    assert (labelled_text(processor.tokenizer, ours), labelled_text(processor.tokenizer, trl_labels)) == ASSISTANT_ONLY[family][:2]
    assert (found["only_ours"], found["only_trl"], found["trl_loss_only"]) == ASSISTANT_ONLY[family][2:]


# the same for ONE_TURN as prompt + completion
COMPLETION_ONLY = {
    "tiny-llava": (" A red circle.</s>", " A red circle.</s>", ["<s>"], [], []),
    "llava-interleave": ("A red circle.<|im_end|>", "A red circle.<|im_end|>\n", [], [], ["\n"]),
    "smolvlm": (" A red circle.<end_of_utterance>", " A red circle.<end_of_utterance>\n", [], [], ["\n"]),
    "llava-next": (" A red circle.</s>", " A red circle.</s> ", ["<s>"], [" "], [" "]),
    "qwen2-vl": ("A red circle.<|im_end|>", "A red circle.<|im_end|>\n", [], [], ["\n"]),
}


@pytest.mark.parametrize("family", sorted(COMPLETION_ONLY))
def test_completion_only_labels_match_ours(family, tiny_processor):
    processor, fmt = family_processor(family, tiny_processor), chat.FORMATS[FAMILY_FORMATS[family]]
    collator = DataCollatorForVisionLanguageModeling(processor, completion_only_loss=True)
    encoded, ours, trl_ids, trl_labels = ours_and_trl(processor, family, ONE_TURN, collator)
    found = compare(encoded, ours, trl_ids, trl_labels, processor.tokenizer, fmt.response_end)
    assert (labelled_text(processor.tokenizer, ours), labelled_text(processor.tokenizer, trl_labels)) == COMPLETION_ONLY[family][:2]
    assert (found["only_ours"], found["only_trl"], found["trl_loss_only"]) == COMPLETION_ONLY[family][2:]


def test_no_assistant_only_labels_for_the_tiny_template(tiny_processor):
    """SFTTrainer(assistant_only_loss=True) asks for a training template first; for ours there is none."""
    with pytest.raises(ValueError, match="not training-compatible"):
        get_training_chat_template(tiny_processor)
