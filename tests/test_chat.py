"""Prompt formats: the exact text each family's prompt is laid out as, which
span of it is which role, and agreement with Hugging Face chat templates."""

import copy

import jinja2
import pytest
from hub_folders import HUB_TEMPLATES

from l2t import chat
from l2t.chat import FORMATS, IMAGE_ROLE, INSTRUCTION, RESPONSE, RESPONSE_END, SYSTEM, check_processor_template, render, to_jinja

CONVERSATION = [
    {"role": "user", "content": "<image>What is in the picture?"},
    {"role": "assistant", "content": "A red circle."},
    {"role": "user", "content": "Where is it?"},
    {"role": "assistant", "content": "On the left."},
]

LLAVA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# format -> (rendered text, [(span text, role), ...]) for CONVERSATION
GOLDEN = {
    "llava-1.5": (
        LLAVA_SYSTEM + " USER: <image>\nWhat is in the picture? ASSISTANT: A red circle.</s>USER: Where is it? ASSISTANT: On the left.</s>",
        [
            (LLAVA_SYSTEM, SYSTEM),
            (" ", SYSTEM),
            ("USER: ", SYSTEM),
            ("<image>", IMAGE_ROLE),
            ("\n", SYSTEM),
            ("What is in the picture?", INSTRUCTION),
            (" ", SYSTEM),
            ("ASSISTANT:", SYSTEM),
            (" ", RESPONSE),
            ("A red circle.", RESPONSE),
            ("</s>", RESPONSE_END),
            ("USER: ", SYSTEM),
            ("Where is it?", INSTRUCTION),
            (" ", SYSTEM),
            ("ASSISTANT:", SYSTEM),
            (" ", RESPONSE),
            ("On the left.", RESPONSE),
            ("</s>", RESPONSE_END),
        ],
    ),
    "tiny-llava-v1": (
        "USER: <image>\nWhat is in the picture?\nASSISTANT: A red circle.</s>USER: Where is it?\nASSISTANT: On the left.</s>",
        [
            ("USER: ", SYSTEM),
            ("<image>", IMAGE_ROLE),
            ("\n", SYSTEM),
            ("What is in the picture?", INSTRUCTION),
            ("\n", SYSTEM),
            ("ASSISTANT:", SYSTEM),
            (" ", RESPONSE),
            ("A red circle.", RESPONSE),
            ("</s>", RESPONSE_END),
            ("USER: ", SYSTEM),
            ("Where is it?", INSTRUCTION),
            ("\n", SYSTEM),
            ("ASSISTANT:", SYSTEM),
            (" ", RESPONSE),
            ("On the left.", RESPONSE),
            ("</s>", RESPONSE_END),
        ],
    ),
    "chatml": (
        "<|im_start|>user\n<image>\nWhat is in the picture?<|im_end|>\n"
        "<|im_start|>assistant\nA red circle.<|im_end|>\n"
        "<|im_start|>user\nWhere is it?<|im_end|>\n"
        "<|im_start|>assistant\nOn the left.<|im_end|>\n",
        [
            ("<|im_start|>user\n", SYSTEM),
            ("<image>", IMAGE_ROLE),
            ("\n", SYSTEM),
            ("What is in the picture?", INSTRUCTION),
            ("<|im_end|>\n", SYSTEM),
            ("<|im_start|>assistant\n", SYSTEM),
            ("A red circle.", RESPONSE),
            ("<|im_end|>", RESPONSE_END),
            ("\n", SYSTEM),
            ("<|im_start|>user\n", SYSTEM),
            ("Where is it?", INSTRUCTION),
            ("<|im_end|>\n", SYSTEM),
            ("<|im_start|>assistant\n", SYSTEM),
            ("On the left.", RESPONSE),
            ("<|im_end|>", RESPONSE_END),
            ("\n", SYSTEM),
        ],
    ),
    "qwen2-vl": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the picture?<|im_end|>\n"
        "<|im_start|>assistant\nA red circle.<|im_end|>\n"
        "<|im_start|>user\nWhere is it?<|im_end|>\n"
        "<|im_start|>assistant\nOn the left.<|im_end|>\n",
        [
            ("<|im_start|>system\n", SYSTEM),
            ("You are a helpful assistant.", SYSTEM),
            ("<|im_end|>\n", SYSTEM),
            ("<|im_start|>user\n", SYSTEM),
            ("<|vision_start|><|image_pad|><|vision_end|>", IMAGE_ROLE),
            ("What is in the picture?", INSTRUCTION),
            ("<|im_end|>\n", SYSTEM),
            ("<|im_start|>assistant\n", SYSTEM),
            ("A red circle.", RESPONSE),
            ("<|im_end|>", RESPONSE_END),
            ("\n", SYSTEM),
            ("<|im_start|>user\n", SYSTEM),
            ("Where is it?", INSTRUCTION),
            ("<|im_end|>\n", SYSTEM),
            ("<|im_start|>assistant\n", SYSTEM),
            ("On the left.", RESPONSE),
            ("<|im_end|>", RESPONSE_END),
            ("\n", SYSTEM),
        ],
    ),
    "smolvlm": (
        "<|im_start|>User:<image>What is in the picture?<end_of_utterance>\n"
        "Assistant: A red circle.<end_of_utterance>\n"
        "User: Where is it?<end_of_utterance>\n"
        "Assistant: On the left.<end_of_utterance>\n",
        [
            ("<|im_start|>", SYSTEM),
            ("User:", SYSTEM),
            ("<image>", IMAGE_ROLE),
            ("What is in the picture?", INSTRUCTION),
            ("<end_of_utterance>\n", SYSTEM),
            ("Assistant:", SYSTEM),
            (" ", RESPONSE),
            ("A red circle.", RESPONSE),
            ("<end_of_utterance>", RESPONSE_END),
            ("\n", SYSTEM),
            ("User: ", SYSTEM),
            ("Where is it?", INSTRUCTION),
            ("<end_of_utterance>\n", SYSTEM),
            ("Assistant:", SYSTEM),
            (" ", RESPONSE),
            ("On the left.", RESPONSE),
            ("<end_of_utterance>", RESPONSE_END),
            ("\n", SYSTEM),
        ],
    ),
    "llava-next-mistral": (
        "[INST] <image>\nWhat is in the picture? [/INST] A red circle.</s>[INST] Where is it? [/INST] On the left.</s>",
        [
            ("[INST] ", SYSTEM),
            ("<image>", IMAGE_ROLE),
            ("\n", SYSTEM),
            ("What is in the picture?", INSTRUCTION),
            (" [/INST]", SYSTEM),
            (" ", RESPONSE),
            ("A red circle.", RESPONSE),
            ("</s>", RESPONSE_END),
            ("[INST] ", SYSTEM),
            ("Where is it?", INSTRUCTION),
            (" [/INST]", SYSTEM),
            (" ", RESPONSE),
            ("On the left.", RESPONSE),
            ("</s>", RESPONSE_END),
        ],
    ),
}


def span_texts(rendered: chat.Rendered) -> list[tuple[str, str]]:
    return [(rendered.text[s:e], role) for s, e, role in rendered.spans]


def test_every_format_has_a_golden_case():
    assert sorted(GOLDEN) == sorted(FORMATS)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_render_golden(name):
    text, spans = GOLDEN[name]
    rendered = render(CONVERSATION, FORMATS[name])
    assert rendered.text == text
    assert span_texts(rendered) == spans


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_spans_cover_the_text_in_order(name):
    rendered = render(CONVERSATION, FORMATS[name])
    ends = [0] + [e for _, e, _ in rendered.spans]
    assert [s for s, _, _ in rendered.spans] == ends[:-1]
    assert ends[-1] == len(rendered.text)
    assert [rendered.text[s:e] for s, e in rendered.image_spans] == [FORMATS[name].image_placeholder]


def test_system_message_replaces_the_default_system_prompt():
    messages = [{"role": "system", "content": "Answer briefly."}] + CONVERSATION[:2]
    llava = render(messages, FORMATS["llava-1.5"])
    assert llava.text == "Answer briefly. USER: <image>\nWhat is in the picture? ASSISTANT: A red circle.</s>"
    assert span_texts(llava)[:2] == [("Answer briefly.", SYSTEM), (" ", SYSTEM)]
    assert render(messages, FORMATS["qwen2-vl"]).text == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the picture?<|im_end|>\n"
        "<|im_start|>assistant\nA red circle.<|im_end|>\n"
    )
    # chatml has no default system prompt: a system message adds one
    assert render(CONVERSATION[:2], FORMATS["chatml"]).text.startswith("<|im_start|>user\n")
    assert render(messages, FORMATS["chatml"]).text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n")
    assert render(messages, FORMATS["smolvlm"]).text.startswith("<|im_start|>System: Answer briefly.<end_of_utterance>\nUser:<image>")


def test_add_generation_prompt_literal():
    prompt = render(CONVERSATION[:3], FORMATS["tiny-llava-v1"], add_generation_prompt=True)
    assert prompt.text == "USER: <image>\nWhat is in the picture?\nASSISTANT: A red circle.</s>USER: Where is it?\nASSISTANT:"
    assert span_texts(prompt)[-3:] == [("Where is it?", INSTRUCTION), ("\n", SYSTEM), ("ASSISTANT:", SYSTEM)]
    assert chat.render_prompt(CONVERSATION[:1], FORMATS["qwen2-vl"]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the picture?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_generation_prompt_is_the_training_text_up_to_the_answer(name):
    fmt = FORMATS[name]
    full, _ = GOLDEN[name]
    prompt = render(CONVERSATION[:3], fmt, add_generation_prompt=True).text
    assert prompt == full[: full.rindex(fmt.assistant_start) + len(fmt.assistant_start)]


def test_placeholder_in_the_middle_and_two_images():
    messages = [{"role": "user", "content": "Compare <image> and <image> please."}, {"role": "assistant", "content": "Same."}]
    rendered = render(messages, FORMATS["llava-1.5"])
    assert span_texts(rendered)[2:9] == [
        ("USER: ", SYSTEM),
        ("Compare ", INSTRUCTION),
        ("<image>", IMAGE_ROLE),
        ("\n", SYSTEM),
        (" and ", INSTRUCTION),
        ("<image>", IMAGE_ROLE),
        ("\n", SYSTEM),
    ]
    assert len(rendered.image_spans) == 2
    # SmolVLM's "User:" (no space) is only for turns that start with an image
    assert render(messages, FORMATS["smolvlm"]).text.startswith("<|im_start|>User: Compare <image> and <image> please.")


def test_unknown_role_is_refused():
    with pytest.raises(ValueError, match="'tool'"):
        render([{"role": "tool", "content": "x"}], FORMATS["chatml"])


# ---------------------------------------------------------------- chat templates

JINJA_CASES = {
    "two turns": CONVERSATION,
    "system": [{"role": "system", "content": "Answer briefly."}] + CONVERSATION,
    "text only": [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi."}],
    "image in the middle": [{"role": "user", "content": "Look: <image> What now?"}, {"role": "assistant", "content": "A dot."}],
    "two images": [{"role": "user", "content": "<image><image>Same?"}, {"role": "assistant", "content": "No."}],
    "unicode": [{"role": "user", "content": "<image>这是什么？ Décrivez 🙂"}, {"role": "assistant", "content": "Un cercle « rouge »."}],
}


def render_jinja(template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    return jinja2.Environment().from_string(template).render(messages=chat._typed(messages), add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("case", sorted(JINJA_CASES))
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_to_jinja_renders_what_render_renders(name, case):
    fmt = FORMATS[name]
    messages = JINJA_CASES[case]
    template = to_jinja(fmt)
    assert render_jinja(template, messages, False) == render(messages, fmt).text
    if messages[-1]["role"] == "assistant":
        prompt = messages[:-1]
        assert render_jinja(template, prompt, True) == render(prompt, fmt, add_generation_prompt=True).text


@pytest.mark.parametrize("case", sorted(JINJA_CASES))
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_to_jinja_takes_plain_string_content(name, case):
    fmt = FORMATS[name]
    messages = JINJA_CASES[case]  # string content, <image> placeholders in the text
    rendered = jinja2.Environment().from_string(to_jinja(fmt)).render(messages=messages, add_generation_prompt=False)
    assert rendered == render(messages, fmt).text


def with_template(processor, template):
    other = copy.copy(processor)
    other.chat_template = template
    return other


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_processor_apply_chat_template_with_to_jinja(tiny_processor, name):
    fmt = FORMATS[name]
    processor = with_template(tiny_processor, to_jinja(fmt))
    for messages in JINJA_CASES.values():
        theirs = processor.apply_chat_template(chat._typed(messages), tokenize=False)
        assert theirs == render(messages, fmt).text
        theirs = processor.apply_chat_template(chat._typed(messages[:-1]), add_generation_prompt=True, tokenize=False)
        assert theirs == render(messages[:-1], fmt, add_generation_prompt=True).text


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_check_processor_template_accepts_its_own_template(tiny_processor, name):
    assert check_processor_template(with_template(tiny_processor, to_jinja(FORMATS[name])), FORMATS[name]) is None


@pytest.mark.parametrize("name", sorted(HUB_TEMPLATES))
def test_check_processor_template_accepts_the_hub_models_templates(tiny_processor, name):
    assert check_processor_template(with_template(tiny_processor, HUB_TEMPLATES[name]), FORMATS[name]) is None


@pytest.mark.parametrize("template, fmt", [("llava-1.5", "chatml"), ("chatml", "qwen2-vl"), ("qwen2-vl", "chatml"), ("smolvlm", "llava-1.5")])
def test_check_processor_template_refuses_another_family(tiny_processor, template, fmt):
    problem = check_processor_template(with_template(tiny_processor, HUB_TEMPLATES[template]), FORMATS[fmt])
    assert problem is not None and f"prompt format '{fmt}'" in problem


def test_check_processor_template_names_both_renderings(tiny_processor):
    altered = to_jinja(FORMATS["tiny-llava-v1"]).replace('"USER: "', '"User: "')
    problem = check_processor_template(with_template(tiny_processor, altered), FORMATS["tiny-llava-v1"])
    assert problem == (
        "the processor's chat template does not match prompt format 'tiny-llava-v1':\n"
        "  template renders: 'User: <image>\\nWhat is in the picture?\\nASSISTANT: A red circle.</s>User: Where is it?\\nASSISTANT:'\n"
        "  format renders:   'USER: <image>\\nWhat is in the picture?\\nASSISTANT: A red circle.</s>USER: Where is it?\\nASSISTANT:'\n"
        "Training with a mismatched format would put the loss mask on the wrong tokens. "
        "Fix model.prompt_format, or set model.check_chat_template=false if you are sure."
    )


def test_check_processor_template_without_template_or_with_a_broken_one(tiny_processor):
    assert check_processor_template(with_template(tiny_processor, None), FORMATS["chatml"]) is None
    problem = check_processor_template(with_template(tiny_processor, "{{ raise_exception('no images here') }}"), FORMATS["chatml"])
    assert problem.startswith("the processor's chat template failed on a probe conversation:") and "no images here" in problem


def test_check_processor_template_ignores_a_leading_bos(tiny_processor):
    template = "{{ bos_token }}" + to_jinja(FORMATS["tiny-llava-v1"])
    assert check_processor_template(with_template(tiny_processor, template), FORMATS["tiny-llava-v1"]) is None
