"""Token roles and L2T labels: golden masks per model family, parity with each
family's own processor, and properties of random conversations.

Every family's processor class is built offline from a small image processor
and a byte-level BPE tokenizer trained on a few sentences (`hub_folders.byte_level_tokenizer`),
with the family's special tokens registered, so the image-token expansion and the
tokenization are the real transformers code paths (Qwen2-VL's through
`l2t.processors`, as the product builds it).
"""

import numpy as np
import pytest
from hub_folders import byte_level_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from l2t import chat, masking
from l2t.masking import (
    IGNORE,
    LOSS_ROLES,
    Encoded,
    Encoder,
    Role,
    first_characters,
    labels_and_weights,
)
from l2t.preview import format_preview, preview_tokens


def qwen2_vl_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from l2t.processors import Qwen2VLProcessor

    tokenizer = byte_level_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    # 4-px patches merged 2x2: one image token per 8x8 pixels, between 1 and 64 of them.
    image_processor = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 64, "longest_edge": 64 * 64})
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def idefics3_processor(image_splitting: bool = False):
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = byte_level_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<global-img>", "<image>"],
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
    )
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=image_splitting, size={"longest_edge": 32}, max_image_size={"longest_edge": 16}
    )
    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4)


def llava_next_processor():
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tokenizer = byte_level_tokenizer(["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<image>"], bos="<s>", eos_token="</s>", pad_token="<unk>")
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]]
    )
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1
    )


def llava_interleave_processor():
    from transformers import LlavaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tokenizer = byte_level_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"], eos_token="<|im_end|>", pad_token="<|endoftext|>")
    image_processor = SiglipImageProcessorPil(size={"height": 16, "width": 16})
    # as the llava-interleave preset: SigLIP keeps every patch ("full"), no CLS
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="full", num_additional_image_tokens=0
    )


# family -> prompt format (tiny-llava and llava-1.5 share the built-in tiny processor)
FAMILY_FORMATS = {
    "tiny-llava": "tiny-llava-v1",
    "llava-1.5": "llava-1.5",
    "qwen2-vl": "qwen2-vl",
    "smolvlm": "smolvlm",
    "smolvlm-split": "smolvlm",
    "llava-next": "llava-next-mistral",
    "llava-interleave": "chatml",
}


@pytest.fixture(scope="module")
def family_processors(tiny_processor):
    return {
        "tiny-llava": tiny_processor,
        "llava-1.5": tiny_processor,
        "qwen2-vl": qwen2_vl_processor(),
        "smolvlm": idefics3_processor(),
        "smolvlm-split": idefics3_processor(image_splitting=True),
        "llava-next": llava_next_processor(),
        "llava-interleave": llava_interleave_processor(),
    }


def encoder_for(family_processors, family: str, templates=()) -> Encoder:
    return Encoder(family_processors[family], chat.FORMATS[FAMILY_FORMATS[family]], templates)


def runs(encoder: Encoder, encoded: Encoded, mode: str) -> list[tuple[tuple[str, ...], str, bool]]:
    """Consecutive tokens with the same role and loss flag: (token texts, role, in the loss)."""
    out: list[tuple[tuple[str, ...], str, bool]] = []
    for text, role, in_loss in preview_tokens(encoded, encoder.tokenizer, mode):
        if out and out[-1][1:] == (role, in_loss):
            out[-1] = (out[-1][0] + (text,), role, in_loss)
        else:
            out.append(((text,), role, in_loss))
    return out


TWO_TURNS = [
    {"role": "user", "content": "<image>What is in the picture?"},
    {"role": "assistant", "content": "A red circle."},
    {"role": "user", "content": "Where is it?"},
    {"role": "assistant", "content": "On the left."},
]
RED = (255, 0, 0)
TEMPLATE = "Answer with one word."


def decoded_runs(encoder: Encoder, encoded: Encoded, mode: str) -> list[tuple[str, str, bool]]:
    """Like `runs`, each run's tokens decoded together (so split unicode characters read whole)."""
    labels, _ = labels_and_weights(encoded, mode)
    out, start = [], 0
    keys = [(Role(int(r)).name.lower(), bool(label != IGNORE)) for r, label in zip(encoded.roles, labels, strict=True)]
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            out.append((encoder.tokenizer.decode(encoded.input_ids[start:i].tolist()), *keys[start]))
            start = i
    return out


IMAGE_16 = ("<image>",) * 16  # the tiny model's 32x32 image: 4x4 patches of 8 px

# ---------------------------------------------------------------- golden masks

TINY_CONVERSATION = [
    {"role": "user", "content": "<image>What is in the picture? Answer with one word."},
    {"role": "assistant", "content": "Circle."},
    {"role": "user", "content": "Where is it?"},
    {"role": "assistant", "content": "On the left."},
]

# (token texts, role) of TINY_CONVERSATION, tiny model, tiny-llava-v1 format, TEMPLATE as task template
TINY_TOKENS = [
    (("<s>", "USER", ":", " "), "system"),
    (IMAGE_16, "image"),
    (("\n",), "system"),
    (("What", " is", " in", " the", " picture", "?"), "instruction"),
    ((" Answer", " w", "i", "t", "h", " one", " word", "."), "task_template"),
    (("\n", "ASSISTANT", ":"), "system"),
    ((" ", "C", "ircle", "."), "response"),
    (("</s>",), "response_end"),
    (("USER", ":"), "system"),
    ((" Where", " is", " i", "t", "?"), "instruction"),
    (("\n", "ASSISTANT", ":"), "system"),
    ((" ", "O", "n", " the", " left", "."), "response"),
    (("</s>",), "response_end"),
]
# in the loss, per run of TINY_TOKENS
TINY_IN_LOSS = {
    "response": [False, False, False, False, False, False, True, True, False, False, False, True, True],
    "l2t": [False, False, False, True, False, False, True, True, False, True, False, True, True],
    "l2t_keep_task_templates": [False, False, False, True, True, False, True, True, False, True, False, True, True],
    "l2t_full": [True, False, True, True, True, True, True, True, True, True, True, True, True],
}


@pytest.mark.parametrize("mode", sorted(TINY_IN_LOSS))
def test_golden_tiny_every_loss_mode(family_processors, mode):
    encoder = encoder_for(family_processors, "tiny-llava", [TEMPLATE])
    encoded = encoder.encode(TINY_CONVERSATION, [(32, 32)])
    expected = [(tokens, role, in_loss) for (tokens, role), in_loss in zip(TINY_TOKENS, TINY_IN_LOSS[mode], strict=True)]
    assert runs(encoder, encoded, mode) == expected
    labels, weights = labels_and_weights(encoded, mode)
    in_loss = labels != IGNORE
    assert (labels[in_loss] == encoded.input_ids[in_loss]).all()
    assert (weights == in_loss).all()


# family -> (token texts, role, in the l2t loss) of TWO_TURNS with one 16x16 image
FAMILY_GOLDEN = {
    "qwen2-vl": [
        (("<|im_start|>", "s", "y", "st", "em", "\n", "Yo", "u", " a", "re", " a", " ", "he", "lp", "fu", "l", " assistant", ".", "<|im_end|>", "\n", "<|im_start|>", "u", "ser", "\n"), "system", False),
        (("<|vision_start|>",) + ("<|image_pad|>",) * 4 + ("<|vision_end|>",), "image", False),  # (16 / 8) ** 2
        (("Wh", "at", " is", " in", " the", " p", "ict", "u", "re", "?"), "instruction", True),
        (("<|im_end|>", "\n", "<|im_start|>", "a", "ssistant", "\n"), "system", False),
        (("A", " ", "re", "d", " ", "ci", "rcle", "."), "response", True),
        (("<|im_end|>",), "response_end", True),
        (("\n", "<|im_start|>", "u", "ser", "\n"), "system", False),
        (("Whe", "re", " is", " i", "t", "?"), "instruction", True),
        (("<|im_end|>", "\n", "<|im_start|>", "a", "ssistant", "\n"), "system", False),
        (("O", "n", " the", " ", "le", "ft", "."), "response", True),
        (("<|im_end|>",), "response_end", True),
        (("\n",), "system", False),
    ],
    "smolvlm": [
        (("<|im_start|>", "User", ":"), "system", False),
        (("<fake_token_around_image>", "<global-img>") + ("<image>",) * 4 + ("<fake_token_around_image>",), "image", False),
        (("Wh", "at", " is", " in", " the", " p", "ict", "u", "re", "?"), "instruction", True),
        (("<end_of_utterance>", "\n", "A", "ssistant", ":"), "system", False),
        ((" A", " ", "re", "d", " ", "ci", "rcle", "."), "response", True),
        (("<end_of_utterance>",), "response_end", True),
        (("\n", "User", ":", " "), "system", False),
        (("Whe", "re", " is", " i", "t", "?"), "instruction", True),
        (("<end_of_utterance>", "\n", "A", "ssistant", ":"), "system", False),
        ((" ", "O", "n", " the", " ", "le", "ft", "."), "response", True),
        (("<end_of_utterance>",), "response_end", True),
        (("\n",), "system", False),
    ],
    "llava-next": [
        (("<s>", "[INST]", " "), "system", False),
        (("<image>",) * 10, "image", False),  # base 2x2 patches + 2x2 crop + one newline per row - CLS
        (("\n",), "system", False),
        (("Wh", "at", " is", " in", " the", " p", "ict", "u", "re", "?"), "instruction", True),
        ((" ", "[/INST]"), "system", False),
        ((" A", " ", "re", "d", " ", "ci", "rcle", "."), "response", True),
        (("</s>",), "response_end", True),
        (("[INST]", " "), "system", False),
        (("Whe", "re", " is", " i", "t", "?"), "instruction", True),
        ((" ", "[/INST]"), "system", False),
        ((" ", "O", "n", " the", " ", "le", "ft", "."), "response", True),
        (("</s>",), "response_end", True),
    ],
    "llava-interleave": [
        (("<|im_start|>", "u", "ser", "\n"), "system", False),
        (("<image>",) * 4, "image", False),
        (("\n",), "system", False),
        (("Wh", "at", " is", " in", " the", " p", "ict", "ure", "?"), "instruction", True),
        (("<|im_end|>", "\n", "<|im_start|>", "a", "ssistant", "\n"), "system", False),
        (("A", " ", "re", "d", " ", "ci", "rcle", "."), "response", True),
        (("<|im_end|>",), "response_end", True),
        (("\n", "<|im_start|>", "u", "ser", "\n"), "system", False),
        (("Whe", "re", " is", " i", "t", "?"), "instruction", True),
        (("<|im_end|>", "\n", "<|im_start|>", "a", "ssistant", "\n"), "system", False),
        (("O", "n", " the", " ", "le", "ft", "."), "response", True),
        (("<|im_end|>",), "response_end", True),
        (("\n",), "system", False),
    ],
}

# what each loss mode puts in the loss (the table in l2t/masking.py's docstring)
MODE_ROLES = {
    "response": {"response", "response_end"},
    "l2t": {"instruction", "response", "response_end"},
    "l2t_keep_task_templates": {"instruction", "task_template", "response", "response_end"},
    "l2t_full": {"system", "instruction", "task_template", "response", "response_end"},
    "l2t_relevance": {"instruction", "response", "response_end"},  # each instruction token weighted by its relevance
}


@pytest.mark.parametrize("mode", sorted(MODE_ROLES))
@pytest.mark.parametrize("family", sorted(FAMILY_GOLDEN))
def test_golden_families(family_processors, family, mode):
    encoder = encoder_for(family_processors, family)
    encoded = encoder.encode(TWO_TURNS, [(16, 16)])
    if mode == "l2t_relevance":  # every instruction token fully relevant: the l2t mask
        encoded.relevance = np.ones(len(encoded.input_ids), dtype=np.float32)
    expected = [(tokens, role, role in MODE_ROLES[mode]) for tokens, role, _ in FAMILY_GOLDEN[family]]
    assert runs(encoder, encoded, mode) == expected
    if mode == "l2t":
        assert expected == FAMILY_GOLDEN[family]


def test_mode_table_matches_the_library():
    assert {mode: {Role(r).name.lower() for r in roles} for mode, roles in LOSS_ROLES.items()} == MODE_ROLES


def golden_l2t(family_processors, messages, image_sizes=(), family="tiny-llava", mode="l2t"):
    encoder = encoder_for(family_processors, family, [TEMPLATE])
    return decoded_runs(encoder, encoder.encode(messages, list(image_sizes)), mode)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_golden_no_image(family_processors):
    # the tiny tokenizer has " Is" as one token: the space after "USER:" goes with the instruction
    assert golden_l2t(family_processors, [user("Is it red?"), assistant("No.")]) == [
        ("<s>USER:", "system", False),
        (" Is it red?", "instruction", True),
        ("\nASSISTANT:", "system", False),
        (" No.", "response", True),
        ("</s>", "response_end", True),
    ]


def test_golden_image_in_the_middle_of_a_turn(family_processors):
    assert golden_l2t(family_processors, [user("Look at <image> and describe it."), assistant("A circle.")], [(32, 32)]) == [
        ("<s>USER:", "system", False),
        (" Look at ", "instruction", True),
        ("<image>" * 16, "image", False),
        ("\n", "system", False),
        (" and describe it.", "instruction", True),
        ("\nASSISTANT:", "system", False),
        (" A circle.", "response", True),
        ("</s>", "response_end", True),
    ]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Answer with one word. Is it red?", [(" Answer with one word.", "task_template", False), (" Is it red?", "instruction", True)]),
        (
            "Is it red? Answer with one word. Be quick.",
            [(" Is it red?", "instruction", True), (" Answer with one word.", "task_template", False), (" Be quick.", "instruction", True)],
        ),
        ("Is it red?\nAnswer with one word.", [(" Is it red?\n", "instruction", True), ("Answer with one word.", "task_template", False)]),
        # not a whole sentence: no template
        ("Answer with one word or two.", [(" Answer with one word or two.", "instruction", True)]),
    ],
)
def test_golden_template_at_start_middle_end(family_processors, text, expected):
    got = golden_l2t(family_processors, [user(text), assistant("No.")])
    assert got == [("<s>USER:", "system", False), *expected, ("\nASSISTANT:", "system", False), (" No.", "response", True), ("</s>", "response_end", True)]


def test_golden_repeated_template_every_occurrence(family_processors):
    messages = [
        user("Answer with one word. Is it red? Answer with one word."),
        assistant("No."),
        user("<image>Answer   with one word.  Blue?"),
        assistant("Yes."),
    ]
    assert golden_l2t(family_processors, messages, [(32, 32)]) == [
        ("<s>USER:", "system", False),
        (" Answer with one word.", "task_template", False),
        (" Is it red?", "instruction", True),
        (" Answer with one word.", "task_template", False),
        ("\nASSISTANT:", "system", False),
        (" No.", "response", True),
        ("</s>", "response_end", True),
        ("USER: ", "system", False),
        ("<image>" * 16, "image", False),
        ("\n", "system", False),
        ("Answer   with one word.", "task_template", False),  # whitespace is normalised when matching
        ("  Blue?", "instruction", True),
        ("\nASSISTANT:", "system", False),
        (" Yes.", "response", True),
        ("</s>", "response_end", True),
    ]


def test_golden_unicode(family_processors):
    assert golden_l2t(family_processors, [user("这是什么？ Décrivez l'image 🙂"), assistant("Un cercle « rouge ».")]) == [
        ("<s>USER: ", "system", False),
        ("这是什么？ Décrivez l'image 🙂", "instruction", True),
        ("\nASSISTANT:", "system", False),
        (" Un cercle « rouge ».", "response", True),
        ("</s>", "response_end", True),
    ]


def test_golden_system_message(family_processors):
    messages = [{"role": "system", "content": "Answer briefly."}, *TWO_TURNS]
    assert golden_l2t(family_processors, messages, [(32, 32)], family="llava-1.5") == [
        ("<s>Answer briefly. USER: ", "system", False),
        ("<image>" * 16, "image", False),
        ("\n", "system", False),
        ("What is in the picture?", "instruction", True),
        (" ASSISTANT:", "system", False),
        (" A red circle.", "response", True),
        ("</s>", "response_end", True),
        ("USER:", "system", False),
        (" Where is it?", "instruction", True),
        (" ASSISTANT:", "system", False),
        (" On the left.", "response", True),
        ("</s>", "response_end", True),
    ]


def test_golden_default_system_prompt_stays_out_of_the_loss(family_processors):
    first = golden_l2t(family_processors, TWO_TURNS, [(32, 32)], family="llava-1.5")[0]
    assert first == ("<s>" + chat.FORMATS["llava-1.5"].default_system + " USER: ", "system", False)


def test_golden_multi_turn(family_processors):
    messages = [user("<image>One?"), assistant("A."), user("Two?"), assistant("B."), user("Three?"), assistant("C.")]
    assert golden_l2t(family_processors, messages, [(32, 32)]) == [
        ("<s>USER: ", "system", False),
        ("<image>" * 16, "image", False),
        ("\n", "system", False),
        ("One?", "instruction", True),
        ("\nASSISTANT:", "system", False),
        (" A.", "response", True),
        ("</s>", "response_end", True),
        ("USER: ", "system", False),
        ("Two?", "instruction", True),
        ("\nASSISTANT:", "system", False),
        (" B.", "response", True),
        ("</s>", "response_end", True),
        ("USER: ", "system", False),
        ("Three?", "instruction", True),
        ("\nASSISTANT:", "system", False),
        (" C.", "response", True),
        ("</s>", "response_end", True),
    ]


def test_generation_prompt_has_no_response(family_processors):
    encoder = encoder_for(family_processors, "tiny-llava")
    encoded = encoder.encode([user("Is it red?")], add_generation_prompt=True)
    assert decoded_runs(encoder, encoded, "l2t") == [("<s>USER:", "system", False), (" Is it red?", "instruction", True), ("\nASSISTANT:", "system", False)]


def test_format_preview_literal(family_processors):
    encoder = encoder_for(family_processors, "tiny-llava", [TEMPLATE])
    encoded = encoder.encode(TINY_CONVERSATION[:2], [(32, 32)])
    assert format_preview(preview_tokens(encoded, encoder.tokenizer, "l2t")) == (
        "      system        '<s>USER: '\n"
        "      image         '<image> x16'\n"
        "      system        '\\n'\n"
        "LOSS  instruction   'What is in the picture?'\n"
        "      task_template ' Answer with one word.'\n"
        "      system        '\\nASSISTANT:'\n"
        "LOSS  response      ' Circle.'\n"
        "LOSS  response_end  '</s>'"
    )
    assert format_preview([]) == ""


# ---------------------------------------------------------------- the pieces


def test_a_token_is_read_at_its_first_non_space_character():
    text = " Answer  it"
    offsets = np.array([[0, 0], [0, 7], [7, 9], [9, 11]])  # a special token, " Answer", "  ", "it"
    assert first_characters(text, offsets).tolist() == [-1, 1, 7, 9]
    assert first_characters("", np.array([[0, 0]])).tolist() == [-1]


def test_labels_and_weights_literal():
    roles = [Role.SYSTEM, Role.INSTRUCTION, Role.TASK_TEMPLATE, Role.IMAGE, Role.RESPONSE, Role.RESPONSE_END, Role.PAD]
    encoded = Encoded(np.arange(10, 17), np.array(roles, dtype=np.int8))
    labels, weights = labels_and_weights(encoded, "l2t", instruction_weight=0.5, response_weight=2.0)
    assert labels.tolist() == [IGNORE, 11, IGNORE, IGNORE, 14, 15, IGNORE]
    assert weights.tolist() == [0, 0.5, 0, 0, 2, 2, 0]
    labels, weights = labels_and_weights(encoded, "l2t_full", instruction_weight=0.5)
    assert labels.tolist() == [10, 11, 12, IGNORE, 14, 15, IGNORE]
    assert weights.tolist() == [0.5, 0.5, 0.5, 0, 1, 1, 0]
    assert labels_and_weights(encoded, "response")[0].tolist() == [IGNORE] * 4 + [14, 15, IGNORE]
    with pytest.raises(ValueError, match="unknown loss mode 'all'; choose one of response, l2t, l2t_keep_task_templates, l2t_full"):
        labels_and_weights(encoded, "all")


def test_image_count_must_match(family_processors):
    encoder = encoder_for(family_processors, "tiny-llava")
    with pytest.raises(ValueError, match=r"1 image placeholder\(s\) but 0 image\(s\)"):
        encoder.encode([user("<image>Hi"), assistant("Yo")])


# ---------------------------------------------------------------- parity with each family's processor

ONE_IMAGE = [
    user("<image>What is in the picture?"),
    assistant("A red circle."),
    user("Where is it? Describe the image in one sentence."),
    assistant("On the left."),
]
TWO_IMAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    user("<image>What is in the picture?"),
    assistant("A red circle."),
    user("And here: <image> Describe the image in one sentence."),
    assistant("A blue square."),
]
PARITY_CASES = {
    "no image": ([user("Where is it?"), assistant("On the left.")], []),
    "square": (ONE_IMAGE, [(16, 16)]),
    "wide": (ONE_IMAGE, [(40, 24)]),
    "tall": (ONE_IMAGE, [(17, 63)]),
    "two images": (TWO_IMAGES, [(64, 64), (8, 30)]),
    "two images, other order": (TWO_IMAGES, [(8, 30), (64, 64)]),
}
PARITY_FAMILIES = ["tiny-llava", "qwen2-vl", "smolvlm", "smolvlm-split", "llava-next", "llava-interleave"]


@pytest.fixture(scope="module")
def shared_encoders(family_processors):
    """One encoder per family for all cases, as in training: its cache of image expansions is shared."""
    return {family: encoder_for(family_processors, family) for family in PARITY_FAMILIES}


def processor_ids(processor, fmt, messages, sizes) -> list[int]:
    text = chat.render(messages, fmt).text
    images = [Image.new("RGB", size, RED) for size in sizes] or None
    return list(processor(text=[text], images=images)["input_ids"][0])


@pytest.mark.parametrize("case", list(PARITY_CASES))
@pytest.mark.parametrize("family", PARITY_FAMILIES)
def test_encoder_matches_the_processor(family_processors, shared_encoders, family, case):
    messages, sizes = PARITY_CASES[case]
    encoder = shared_encoders[family]
    encoded = encoder.encode(messages, sizes)
    assert encoded.input_ids.tolist() == processor_ids(family_processors[family], encoder.fmt, messages, sizes)
    image_id = family_processors[family].tokenizer.convert_tokens_to_ids(family_processors[family].image_token)
    assert set(np.flatnonzero(encoded.input_ids == image_id)) <= set(np.flatnonzero(encoded.roles == Role.IMAGE))


@pytest.mark.parametrize("chunk", [512, 2])  # one tokenizer call, or several (the next chunk laid out while one is tokenized)
@pytest.mark.parametrize("family", PARITY_FAMILIES)
def test_encode_many_is_encode_one_by_one(shared_encoders, family, chunk, monkeypatch):
    monkeypatch.setattr(masking, "ENCODE_CHUNK", chunk)
    encoder = shared_encoders[family]
    items = list(PARITY_CASES.values())
    together = encoder.encode_many(items)
    alone = [encoder.encode(messages, sizes) for messages, sizes in items]
    assert [(e.input_ids.tolist(), e.roles.tolist()) for e in together] == [(e.input_ids.tolist(), e.roles.tolist()) for e in alone]
    assert encoder.encode_many([]) == []


def test_a_padded_or_truncated_tokenizer_call_before_does_not_change_the_encoding(family_processors):
    encoder = encoder_for(family_processors, "tiny-llava")
    items = list(PARITY_CASES.values())
    before = encoder.encode_many(items)
    encoder.tokenizer(["a", "a much longer text than the first"], padding=True, truncation=True, max_length=4)  # as other code may
    after = encoder.encode_many(items)
    assert [e.input_ids.tolist() for e in after] == [e.input_ids.tolist() for e in before]


# image tokens (the whole image run) per family and (width, height)
IMAGE_RUN_LENGTHS = {
    "tiny-llava": {(16, 16): 16, (40, 24): 16, (17, 63): 16},  # resized and cropped to 32x32
    "llava-interleave": {(16, 16): 4, (40, 24): 4, (17, 63): 4},  # resized to 16x16
    "smolvlm": {(16, 16): 7, (40, 24): 7, (17, 63): 7},  # 4 + <fake><global-img>...<fake>
    "smolvlm-split": {(16, 16): 82, (40, 24): 82, (17, 63): 46},  # 16-px tiles (2x2, 2x2, 2x1) + global image, row/col markers as text
    "qwen2-vl": {(16, 16): 6, (40, 24): 17, (17, 63): 18},  # (h/8)(w/8), sides rounded to 8 px, + start/end
    "llava-next": {(16, 16): 10, (40, 24): 14, (17, 63): 16},  # anyres: base + unpadded grid + a newline per row
}


@pytest.mark.parametrize("family", sorted(IMAGE_RUN_LENGTHS))
def test_image_runs_by_size(shared_encoders, family):
    encoder = shared_encoders[family]
    lengths = {}
    for size in IMAGE_RUN_LENGTHS[family]:
        encoded = encoder.encode([user("<image>Hi"), assistant("Yo")], [size])
        lengths[size] = int((encoded.roles == Role.IMAGE).sum())
    assert lengths == IMAGE_RUN_LENGTHS[family]


# ---------------------------------------------------------------- properties of random conversations

ALPHABET = "abZ \n\t.,?!:'é中🙂"
SPRINKLED = ["Answer with one word.", "Describe the image briefly."]
words = st.text(ALPHABET, max_size=10)
# A template sentence on its own line is a sentence whatever text is around it.
user_piece = st.one_of(words, st.just(chat.IMAGE), st.sampled_from(SPRINKLED).map(lambda t: f"\n{t}\n"))


TINY_SIZE = st.just((32, 32))


@st.composite
def conversations(draw, sizes=TINY_SIZE):
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(words)})
    for _ in range(draw(st.integers(1, 3))):
        messages.append(user("".join(draw(st.lists(user_piece, max_size=5)))))
        messages.append(assistant(draw(words)))
    n_images = sum(m["content"].count(chat.IMAGE) for m in messages if m["role"] == "user")
    return messages, draw(st.lists(sizes, min_size=n_images, max_size=n_images))


def visible(text: str) -> str:
    return "".join(text.replace(chat.IMAGE, "").split())


@pytest.mark.parametrize("family", ["tiny-llava", "llava-1.5"])
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sample=conversations(), instruction_weight=st.floats(0.1, 3), response_weight=st.floats(0.1, 3), padding=st.integers(0, 3))
def test_random_conversations(family_processors, family, sample, instruction_weight, response_weight, padding):
    messages, sizes = sample
    processor = family_processors[family]
    encoder = encoder_for(family_processors, family, SPRINKLED)
    encoded = encoder.encode(messages, sizes)
    ids, roles = encoded.input_ids, encoded.roles

    # the processor itself tokenizes the rendered text the same way
    assert ids.tolist() == processor_ids(processor, encoder.fmt, messages, sizes)
    # every token has one role; the image tokens are exactly the image runs
    assert len(roles) == len(ids) and set(roles.tolist()) <= {int(r) for r in Role}
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert ((ids == image_id) == (roles == Role.IMAGE)).all()
    assert int((roles == Role.IMAGE).sum()) == 16 * len(sizes)
    # no character changes side: what the user wrote is instruction or template, what the assistant wrote is response
    tokenizer = encoder.tokenizer
    said = tokenizer.decode(ids[np.isin(roles, [Role.INSTRUCTION, Role.TASK_TEMPLATE])].tolist())
    answered = tokenizer.decode(ids[roles == Role.RESPONSE].tolist())
    assert visible(said) == visible("".join(m["content"] for m in messages if m["role"] == "user"))
    assert visible(answered) == visible("".join(m["content"] for m in messages if m["role"] == "assistant"))
    # every sprinkled template sentence, and nothing else, is a task template
    sprinkled = [t for m in messages if m["role"] == "user" for piece in m["content"].split("\n") for t in SPRINKLED if piece == t]
    template_runs = [text.strip() for text, role, _ in decoded_runs(encoder, encoded, "l2t") if role == "task_template"]
    assert template_runs == sprinkled

    # as a batch pads it: padding never counts
    padded = Encoded(
        np.concatenate([ids, np.full(padding, tokenizer.pad_token_id)]),
        np.concatenate([roles, np.full(padding, Role.PAD, np.int8)]),
        relevance=np.ones(len(ids) + padding, np.float32),  # every instruction token at full weight: l2t_relevance is l2t
    )
    in_loss = {}
    for mode in LOSS_ROLES:
        labels, weights = labels_and_weights(padded, mode, instruction_weight, response_weight)
        mask = labels != IGNORE
        in_loss[mode] = set(np.flatnonzero(mask).tolist())
        assert (labels[mask] == padded.input_ids[mask]).all()
        assert not mask[np.isin(padded.roles, [Role.IMAGE, Role.PAD])].any()
        response_side = np.isin(padded.roles, [Role.RESPONSE, Role.RESPONSE_END])
        assert np.allclose(weights[mask & response_side], response_weight)
        assert np.allclose(weights[mask & ~response_side], np.float32(instruction_weight))
        assert (weights[~mask] == 0).all()
        assert mask.tolist() == np.isin(padded.roles, LOSS_ROLES[mode]).tolist()
    assert in_loss["response"] <= in_loss["l2t"] <= in_loss["l2t_keep_task_templates"] <= in_loss["l2t_full"]
    assert in_loss["l2t_relevance"] == in_loss["l2t"]
    assert in_loss["response"] == set(np.flatnonzero(np.isin(roles, [Role.RESPONSE, Role.RESPONSE_END])).tolist())


# every size, even 1 px wide: Qwen2-VL and LLaVA-NeXT expand by size, SmolVLM with splitting by tile count
any_size = st.tuples(st.integers(1, 90), st.integers(1, 90))


@pytest.mark.parametrize("family", ["qwen2-vl", "llava-next", "smolvlm-split"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sample=conversations(sizes=any_size))
def test_random_sizes_match_the_processor(family_processors, shared_encoders, family, sample):
    messages, sizes = sample
    encoder = shared_encoders[family]
    encoded = encoder.encode(messages, sizes)
    assert encoded.input_ids.tolist() == processor_ids(family_processors[family], encoder.fmt, messages, sizes)
