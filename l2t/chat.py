"""Prompt rendering: a conversation -> one text, with the role of every character span.

Each model family expects its own prompt layout. A `PromptFormat` is data: the
strings around the system prompt, each user turn, each assistant turn and each
image. `render` lays a conversation out and records which span of the text is
what, so the mask can later be read off the tokens:

- "system": system templates — the system prompt, role markers, separators,
  the image placeholder's separator (the newline after `<image>`);
- "image": the image placeholder itself (expanded into image tokens later);
- "instruction": what the user wrote (task templates are found inside it later);
- "response": what the assistant answered;
- "response_end": the marker that ends an answer (`</s>`, `<|im_end|>`, ...),
  which stays in the loss as in standard visual instruction tuning.

Messages hold text with `<image>` where an image goes (see `l2t.data`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from itertools import accumulate

IMAGE = "<image>"

SYSTEM = "system"
IMAGE_ROLE = "image"
INSTRUCTION = "instruction"
RESPONSE = "response"
RESPONSE_END = "response_end"


@dataclass(frozen=True)
class PromptFormat:
    name: str
    image_placeholder: str = IMAGE
    """Text that stands for one image in the prompt (what the processor expands)."""
    image_separator: str = ""
    """Written after each image placeholder (a system template)."""
    default_system: str = ""
    """System prompt used when a conversation has none."""
    preamble: str = ""
    system_start: str = ""
    system_end: str = ""
    user_start: str = ""
    user_start_with_image: str | None = None
    """Used instead of user_start when the turn begins with an image (SmolVLM)."""
    user_end: str = ""
    assistant_start: str = ""
    """The generation prompt: ends the prompt when asking the model for an answer."""
    response_lead: str = ""
    """Between assistant_start and the answer (a space for SentencePiece-style formats)."""
    response_end: str = ""
    turn_end: str = ""

    @cached_property
    def fixed_pieces(self) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
        """The fixed strings as (pieces, roles) for `render` to append, the empty ones left out (laid out once)."""

        def pieces(*pairs: tuple[str, str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
            kept = [(text, role) for text, role in pairs if text]
            return tuple(t for t, _ in kept), tuple(r for _, r in kept)

        with_image = self.user_start if self.user_start_with_image is None else self.user_start_with_image
        return {
            "preamble": pieces((self.preamble, SYSTEM)),
            "system_start": pieces((self.system_start, SYSTEM)),
            "system_end": pieces((self.system_end, SYSTEM)),
            "user": pieces((self.user_start, SYSTEM)),
            "user_with_image": pieces((with_image, SYSTEM)),
            "user_end": pieces((self.user_end, SYSTEM)),
            # The lead (a space) is the start of the answer the model must generate.
            "assistant": pieces((self.assistant_start, SYSTEM), (self.response_lead, RESPONSE)),
            "assistant_end": pieces((self.response_end, RESPONSE_END), (self.turn_end, SYSTEM)),
            "image": pieces((self.image_placeholder, IMAGE_ROLE), (self.image_separator, SYSTEM)),
            "generation": pieces((self.assistant_start, SYSTEM)),
        }


# ChatML with LLaVA's `<image>` (llava-interleave-qwen, llava-onevision)
_CHATML = PromptFormat(
    name="chatml",
    image_separator="\n",
    system_start="<|im_start|>system\n",
    system_end="<|im_end|>\n",
    user_start="<|im_start|>user\n",
    user_end="<|im_end|>\n",
    assistant_start="<|im_start|>assistant\n",
    response_end="<|im_end|>",
    turn_end="\n",
)

FORMATS: dict[str, PromptFormat] = {
    f.name: f
    for f in [
        # LLaVA-1.5 (vicuna_v1 conversation): `<sys> USER: <image>\nq ASSISTANT: a</s>`
        PromptFormat(
            name="llava-1.5",
            image_separator="\n",
            default_system=(
                "A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions."
            ),
            system_end=" ",
            user_start="USER: ",
            user_end=" ",
            assistant_start="ASSISTANT:",
            response_lead=" ",
            response_end="</s>",
        ),
        # TinyLLaVA v1 (bczhou/tiny-llava-v1-hf model card): `USER: <image>\nq\nASSISTANT: a</s>`
        PromptFormat(
            name="tiny-llava-v1",
            image_separator="\n",
            system_end="\n",
            user_start="USER: ",
            user_end="\n",
            assistant_start="ASSISTANT:",
            response_lead=" ",
            response_end="</s>",
        ),
        _CHATML,
        # Qwen2-VL: ChatML, default system prompt, vision start/pad/end tokens
        replace(
            _CHATML,
            name="qwen2-vl",
            image_placeholder="<|vision_start|><|image_pad|><|vision_end|>",
            image_separator="",
            default_system="You are a helpful assistant.",
        ),
        # SmolVLM / Idefics3: `<|im_start|>User:<image>q<end_of_utterance>\nAssistant: a<end_of_utterance>\n`
        PromptFormat(
            name="smolvlm",
            preamble="<|im_start|>",
            system_start="System: ",
            system_end="<end_of_utterance>\n",
            user_start="User: ",
            user_start_with_image="User:",
            user_end="<end_of_utterance>\n",
            assistant_start="Assistant:",
            response_lead=" ",
            response_end="<end_of_utterance>",
            turn_end="\n",
        ),
        # LLaVA-NeXT Mistral: `[INST] <image>\nq [/INST] a</s>`
        PromptFormat(
            name="llava-next-mistral",
            image_separator="\n",
            system_end="\n",
            user_start="[INST] ",
            assistant_start=" [/INST]",
            response_lead=" ",
            response_end="</s>",
        ),
    ]
}


@dataclass
class Rendered:
    """A laid-out conversation: its text piece by piece, each piece with its role."""

    pieces: list[str] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)

    @cached_property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def spans(self) -> list[tuple[int, int, str]]:
        """(start, end, role) of each piece: they cover `text` end to end, in order."""
        ends = list(accumulate(map(len, self.pieces)))
        return [(end - len(piece), end, role) for piece, end, role in zip(self.pieces, ends, self.roles, strict=True)]

    @property
    def image_spans(self) -> list[tuple[int, int]]:
        """(start, end) of each image placeholder, in the order of the images."""
        return [(start, end) for start, end, role in self.spans if role == IMAGE_ROLE]


_IMAGE_SPLIT = re.compile(f"({re.escape(IMAGE)})")


def without_images(messages: list[dict]) -> list[dict]:
    """The conversation with every image placeholder taken out (the text of each turn kept)."""
    return [{**m, "content": m["content"].replace(IMAGE, "")} for m in messages]


def render(messages: list[dict], fmt: PromptFormat, add_generation_prompt: bool = False) -> Rendered:
    """Lay out `messages` ({"role", "content"} with `<image>` in the text) in `fmt`.

    With `add_generation_prompt`, the text ends with the assistant marker, ready
    for the model to answer; the last message must then be a user turn.
    """
    fixed = fmt.fixed_pieces
    out = Rendered()
    pieces, roles = out.pieces, out.roles

    def add(part: str) -> None:
        pieces.extend(fixed[part][0])
        roles.extend(fixed[part][1])

    def write(content: str, role: str) -> None:
        if IMAGE not in content:
            if content:
                pieces.append(content)
                roles.append(role)
            return
        for piece in _IMAGE_SPLIT.split(content):
            if piece == IMAGE:
                add("image")
            elif piece:
                pieces.append(piece)
                roles.append(role)

    add("preamble")
    system = fmt.default_system
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    if system:
        add("system_start")
        pieces.append(system)
        roles.append(SYSTEM)
        add("system_end")
    for message in messages:
        content = message["content"]
        if message["role"] == "user":
            add("user_with_image" if content.startswith(IMAGE) else "user")
            write(content, INSTRUCTION)
            add("user_end")
        elif message["role"] == "assistant":
            add("assistant")
            write(content, RESPONSE)
            add("assistant_end")
        else:
            raise ValueError(f"message role must be user or assistant after an optional system message, got {message['role']!r}")
    if add_generation_prompt:
        add("generation")
    return out


def render_prompt(messages: list[dict], fmt: PromptFormat) -> str:
    """The text a model is given to generate the next answer."""
    return render(messages, fmt, add_generation_prompt=True).text


PROBE_ANSWER = "A red circle."
PROBE = [
    {"role": "user", "content": f"{IMAGE}What is in the picture?"},
    {"role": "assistant", "content": PROBE_ANSWER},
    {"role": "user", "content": "Where is it?"},
]
"""Two turns with an image: the second prompt also shows how a past answer and a new turn are joined."""


def _typed(messages: list[dict]) -> list[dict]:
    """Our messages as the typed-content conversation that HF chat templates take."""
    typed = []
    for m in messages:
        parts = []
        for piece in _IMAGE_SPLIT.split(m["content"]):
            if piece == IMAGE:
                parts.append({"type": "image"})
            elif piece:
                parts.append({"type": "text", "text": piece})
        typed.append({"role": m["role"], "content": parts})
    return typed


def check_processor_template(processor, fmt: PromptFormat) -> str | None:
    """Compare the processor's own chat template with `fmt` on a probe prompt.

    The probe is the prompt for a conversation's second answer (an image, a question,
    an answer, a second question and the generation prompt): it places the image, the
    role markers and the joints between turns, which is what a wrong prompt_format gets
    wrong. Templates that Hugging Face conversions ship for inference leave out what the
    original training format had (LLaVA-1.5's has no default system prompt, and ends a
    past answer with a space instead of `</s>`; LLaVA-NeXT-Mistral's writes `<\\s> `), so
    a template without `fmt`'s default system prompt still agrees, and the end marker of
    the past answer is compared as a separator, whatever the template writes there.

    Returns None when they agree (or the processor has no template), else a message
    showing both renderings. Whitespace runs are compared as one space, and a leading
    BOS written by the template is ignored (tokenizers add it).
    """
    template = getattr(processor, "chat_template", None)
    if not template:
        return None
    try:
        theirs = processor.apply_chat_template(_typed(PROBE), add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # a template that can't render our probe is a mismatch too
        return f"the processor's chat template failed on a probe conversation: {exc}"
    ours = render_prompt(PROBE, fmt)
    bos = getattr(getattr(processor, "tokenizer", processor), "bos_token", None)
    if bos and theirs.startswith(bos) and not ours.startswith(bos):
        theirs = theirs[len(bos):]

    def norm(s: str) -> str:
        # LLaVA-NeXT-Mistral's hub template misspells the `</s>` after past answers as `<\s>`.
        for marker in {fmt.response_end, fmt.response_end.replace("/", "\\")} - {""}:
            s = s.replace(PROBE_ANSWER + marker, PROBE_ANSWER + " ")
        return " ".join(s.split())

    accepted = {norm(ours), norm(render_prompt(PROBE, replace(fmt, default_system="")))}
    if norm(theirs) in accepted:
        return None
    return (
        f"the processor's chat template does not match prompt format '{fmt.name}':\n"
        f"  template renders: {theirs!r}\n"
        f"  format renders:   {ours!r}\n"
        "Training with a mismatched format would put the loss mask on the wrong tokens. "
        "Fix model.prompt_format, or set model.check_chat_template=false if you are sure."
    )


def to_jinja(fmt: PromptFormat) -> str:
    """`fmt` as a Hugging Face chat template, for exported models and the built-in tiny model.

    It takes the typed-content conversations that `processor.apply_chat_template`
    takes, or plain string content with `<image>` placeholders, and renders what
    `render` renders.
    """
    import json

    def lit(s: str | None) -> str:
        return "none" if s is None else json.dumps(s)

    return (
        "{{- " + lit(fmt.preamble) + " -}}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set sys = messages[0]['content'] if messages[0]['content'] is string else messages[0]['content'][0]['text'] -%}"
        "{%- set rest = messages[1:] -%}"
        "{%- else -%}{%- set sys = " + lit(fmt.default_system) + " -%}{%- set rest = messages -%}{%- endif -%}"
        "{%- if sys -%}{{- " + lit(fmt.system_start) + " + sys + " + lit(fmt.system_end) + " -}}{%- endif -%}"
        "{%- for m in rest -%}"
        # string content: its <image> placeholders become image parts, as in `render`
        "{%- if m['content'] is string -%}{%- set ns = namespace(parts=[]) -%}"
        "{%- for piece in m['content'].split(" + lit(IMAGE) + ") -%}"
        "{%- if not loop.first -%}{%- set ns.parts = ns.parts + [{'type': 'image'}] -%}{%- endif -%}"
        "{%- if piece -%}{%- set ns.parts = ns.parts + [{'type': 'text', 'text': piece}] -%}{%- endif -%}"
        "{%- endfor -%}{%- set parts = ns.parts -%}"
        "{%- else -%}{%- set parts = m['content'] -%}{%- endif -%}"
        "{%- if m['role'] == 'user' -%}"
        "{%- if " + lit(fmt.user_start_with_image) + " is not none and parts and parts[0]['type'] == 'image' -%}"
        "{{- " + lit(fmt.user_start_with_image) + " -}}{%- else -%}{{- " + lit(fmt.user_start) + " -}}{%- endif -%}"
        "{%- for p in parts -%}{%- if p['type'] == 'image' -%}{{- " + lit(fmt.image_placeholder + fmt.image_separator) + " -}}"
        "{%- else -%}{{- p['text'] -}}{%- endif -%}{%- endfor -%}"
        "{{- " + lit(fmt.user_end) + " -}}"
        "{%- else -%}"
        "{{- " + lit(fmt.assistant_start + fmt.response_lead) + " -}}"
        "{%- for p in parts -%}{{- p['text'] -}}{%- endfor -%}"
        "{{- " + lit(fmt.response_end + fmt.turn_end) + " -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- " + lit(fmt.assistant_start) + " -}}{%- endif -%}"
    )
