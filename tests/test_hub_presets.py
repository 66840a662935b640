"""Every model preset loaded the way a user loads it: a folder shaped like its hub
repository (`hub_folders.py`), given to the preset as `model.hub_id=<folder>`, read by a
fresh `python` process with no test-only patch, offline and with an empty cache.

- every preset: `AutoProcessor.from_pretrained`, then `python -m l2t.data preview` (the
  processor loader and the mask preview) on a two-turn LLaVA-format sample with an image;
- every preset: its hub chat template renders the preset's prompt format (the text of
  both, written out below, for a two-turn conversation with an image);
- the presets up to 0.5B parameters, with random weights (real widths and vocabulary,
  `WEIGHT_LAYERS` layers): `python -m l2t.train` for 2 steps on the CPU in 4-bit,
  `python -m l2t.evaluate` on 4 held-out samples, `python -m l2t.merge` with its parity check;
- the first run of a hub preset that is not in the cache and can't be downloaded names the
  preset, the model and the cache folder; a cache filled by hand is used.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hub_folders import HUB_REPOS, MODEL_PRESETS, WEIGHT_PRESETS
from PIL import Image

from l2t import chat
from l2t.config import PRESETS_DIR, load_config
from l2t.models import load_processor

REPO = Path(__file__).resolve().parent.parent


def run_python(args: list, home: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python ARGS` from the repository, offline, with its own empty Hugging Face cache under `home`."""
    env = {**os.environ, "HF_HOME": str(home / "hf-home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    """A LLaVA-format data file: one two-turn sample with a 64 x 48 image."""
    folder = tmp_path_factory.mktemp("sample")
    Image.new("RGB", (64, 48), (200, 30, 30)).save(folder / "red.png")
    record = {"id": "s1", "image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the picture? Answer the question using a single word or phrase."},
        {"from": "gpt", "value": "A red circle."},
        {"from": "human", "value": "Where is it?"},
        {"from": "gpt", "value": "On the left."},
    ]}  # fmt: skip
    (folder / "llava.json").write_text(json.dumps([record]))
    return folder / "llava.json"


# ---------------------------------------------------------------- processor and mask preview, every preset


def torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError):
        return False
    return True


# What AutoProcessor.from_pretrained gives for the folder; Qwen2-VL's needs torchvision (see l2t/processors.py).
AUTO_PROCESSOR = {
    "tinyllava": "LlavaProcessor",
    "llava-1.5-7b": "LlavaProcessor",
    "llava-next-7b": "LlavaNextProcessor",
    "llava-interleave-0.5b": "LlavaProcessor",
    "qwen2-vl-2b": "Qwen2VLProcessor",
    "smolvlm-256m": "Idefics3Processor",
    "smolvlm-500m": "Idefics3Processor",
}
WITHOUT_TORCHVISION = {"qwen2-vl-2b": "failed: Qwen2VLVideoProcessor requires the Torchvision library"}

LOAD = """
import sys
from transformers import AutoProcessor

try:
    print("AutoProcessor:", type(AutoProcessor.from_pretrained(sys.argv[1])).__name__)
except ImportError as exc:
    print("AutoProcessor: failed:", " ".join(str(exc).split())[:70])
from l2t.data import main

sys.exit(main(sys.argv[2:]))
"""

LLAMA_PREVIEW = """\
LOSS  instruction   'What is in the picture? Answer the question using a single word or phrase.'
      system        '{assistant}'
LOSS  response      ' A red circle.'
LOSS  response_end  '</s>'
      system        '{user}'
LOSS  instruction   ' Where is it?'
      system        '{assistant}'
LOSS  response      ' On the left.'
LOSS  response_end  '</s>'"""
CHATML_PREVIEW = """\
LOSS  instruction   'What is in the picture? Answer the question using a single word or phrase.'
      system        '<|im_end|>\\n<|im_start|>assistant\\n'
LOSS  response      'A red circle.'
LOSS  response_end  '<|im_end|>'
      system        '\\n<|im_start|>user\\n'
LOSS  instruction   'Where is it?'
      system        '<|im_end|>\\n<|im_start|>assistant\\n'
LOSS  response      'On the left.'
LOSS  response_end  '<|im_end|>'
      system        '\\n'"""
SMOLVLM_PREVIEW = """\
sample s1: 120 tokens, 35 in the loss (mode l2t, preset {preset}, 0 task templates)
      system        '<|im_start|>User:'
      image         '<fake_token_around_image> x67'
LOSS  instruction   'What is in the picture? Answer the question using a single word or phrase.'
      system        '<end_of_utterance>\\nAssistant:'
LOSS  response      ' A red circle.'
LOSS  response_end  '<end_of_utterance>'
      system        '\\nUser: '
LOSS  instruction   'Where is it?'
      system        '<end_of_utterance>\\nAssistant:'
LOSS  response      ' On the left.'
LOSS  response_end  '<end_of_utterance>'
      system        '\\n'"""
LLAVA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# The mask preview of the sample, as `python -m l2t.data preview` prints it. The Llama-family
# tokenizers (SentencePiece-style) carry a word's leading space in the word's token; the
# image runs are (336 / 14)^2 = 576, anyres for 64 x 48 px, (384 // 14)^2 = 729, 4 merged
# Qwen2-VL patches + start and end, and SmolVLM's 64 + 3.
PREVIEWS = {
    "tinyllava": "sample s1: 641 tokens, 29 in the loss (mode l2t, preset tinyllava, 0 task templates)\n"
    "      system        '<s> USER: '\n"
    "      image         '<image> x576'\n"
    "      system        '\\n'\n" + LLAMA_PREVIEW.format(assistant="\\nASSISTANT:", user="USER:"),
    "llava-1.5-7b": "sample s1: 727 tokens, 29 in the loss (mode l2t, preset llava-1.5-7b, 0 task templates)\n"
    f'      system        "<s> {LLAVA_SYSTEM} USER: "\n'
    "      image         '<image> x576'\n"
    "      system        '\\n'\n" + LLAMA_PREVIEW.format(assistant=" ASSISTANT:", user="USER:"),
    "llava-next-7b": "sample s1: 1429 tokens, 29 in the loss (mode l2t, preset llava-next-7b, 0 task templates)\n"
    "      system        '<s> [INST] '\n"
    "      image         '<image> x1368'\n"
    "      system        '\\n'\n" + LLAMA_PREVIEW.format(assistant=" [/INST]", user="[INST]"),
    "llava-interleave-0.5b": "sample s1: 786 tokens, 34 in the loss (mode l2t, preset llava-interleave-0.5b, 0 task templates)\n"
    "      system        '<|im_start|>user\\n'\n"
    "      image         '<image> x729'\n"
    "      system        '\\n'\n" + CHATML_PREVIEW,
    "qwen2-vl-2b": "sample s1: 74 tokens, 34 in the loss (mode l2t, preset qwen2-vl-2b, 0 task templates)\n"
    "      system        '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n'\n"
    "      image         '<|vision_start|> x6'\n" + CHATML_PREVIEW,
    "smolvlm-256m": SMOLVLM_PREVIEW.format(preset="smolvlm-256m"),
    "smolvlm-500m": SMOLVLM_PREVIEW.format(preset="smolvlm-500m"),
}


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_processor_and_mask_preview_load_from_a_hub_folder(hub_folder, sample, preset, tmp_path):
    folder = hub_folder(preset)
    result = run_python(["-c", LOAD, folder, "preview", sample, "--preset", preset, f"model.hub_id={folder}"], tmp_path)
    assert result.returncode == 0, result.stderr
    auto, preview = result.stdout.split("\n", 1)
    if preset in WITHOUT_TORCHVISION and not torchvision_imports():
        assert auto.startswith(f"AutoProcessor: {WITHOUT_TORCHVISION[preset]}")
    else:
        assert auto == f"AutoProcessor: {AUTO_PROCESSOR[preset]}"
    assert preview.rstrip("\n") == PREVIEWS[preset]


# ---------------------------------------------------------------- hub chat templates vs prompt formats

QWEN2_VL_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
    "What is in the picture?<|im_end|>\n<|im_start|>assistant\nA red circle.<|im_end|>\n<|im_start|>user\nWhere is it?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
SMOLVLM_PROMPT = (
    "<|im_start|>User:<image>What is in the picture?<end_of_utterance>\nAssistant: A red circle.<end_of_utterance>\n"
    "User: Where is it?<end_of_utterance>\nAssistant:"
)
# preset -> (what the hub's chat template renders, what the preset's prompt format renders)
# for chat.PROBE: an image and a question, an answer, a second question, the generation prompt.
TWO_TURN_PROMPTS = {
    "tinyllava": (None, "USER: <image>\nWhat is in the picture?\nASSISTANT: A red circle.</s>USER: Where is it?\nASSISTANT:"),
    "llava-1.5-7b": (
        "USER: <image>\nWhat is in the picture? ASSISTANT: A red circle. USER: Where is it? ASSISTANT:",
        f"{LLAVA_SYSTEM} USER: <image>\nWhat is in the picture? ASSISTANT: A red circle.</s>USER: Where is it? ASSISTANT:",
    ),
    "llava-next-7b": (
        "[INST] <image>\nWhat is in the picture? [/INST] A red circle.<\\s> [INST] Where is it? [/INST]",
        "[INST] <image>\nWhat is in the picture? [/INST] A red circle.</s>[INST] Where is it? [/INST]",
    ),
    "llava-interleave-0.5b": (
        "<|im_start|>user\n<image>\nWhat is in the picture?<|im_end|>\n<|im_start|>assistant\n\nA red circle.<|im_end|>\n"
        "<|im_start|>user\n\nWhere is it?<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\n<image>\nWhat is in the picture?<|im_end|>\n<|im_start|>assistant\nA red circle.<|im_end|>\n"
        "<|im_start|>user\nWhere is it?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "qwen2-vl-2b": (QWEN2_VL_PROMPT, QWEN2_VL_PROMPT),
    "smolvlm-256m": (SMOLVLM_PROMPT, SMOLVLM_PROMPT),
    "smolvlm-500m": (SMOLVLM_PROMPT, SMOLVLM_PROMPT),
}
# Where they differ, and why the loader accepts it (chat.check_processor_template):
# llava-1.5: no system prompt in the hub's template, and a space instead of </s> after the answer;
# llava-next: `<\s> ` (sic) instead of </s> after the answer; llava-interleave: newlines.


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_hub_chat_template_renders_the_prompt_format(hub_folder, preset):
    config = load_config(preset, overrides=[f"model.hub_id={hub_folder(preset)}"])
    processor = load_processor(config.model)  # compares the two itself: a ModelError if they disagree
    fmt = chat.FORMATS[config.model.prompt_format]
    template, prompt_format = TWO_TURN_PROMPTS[preset]
    assert chat.render_prompt(chat.PROBE, fmt) == prompt_format
    if template is None:
        assert not processor.chat_template and HUB_REPOS[preset].template is None
    else:
        assert processor.apply_chat_template(chat._typed(chat.PROBE), add_generation_prompt=True, tokenize=False) == template
    assert chat.check_processor_template(processor, fmt) is None


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_preset_yaml_says_where_its_chat_template_came_from(preset):
    text = (PRESETS_DIR / f"{preset}.yaml").read_text(encoding="utf-8")
    assert "# Chat template" in text


# ---------------------------------------------------------------- train, evaluate, merge: the small presets

TRAIN_SETTINGS = [
    "train.max_steps=2", "train.batch_size=1", "train.grad_accum=1", "train.logging_steps=1",
    "train.eval_fraction=0.34", "train.eval_max_samples=4", "train.preview_samples=0",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("preset", WEIGHT_PRESETS)
def test_train_evaluate_and_merge_from_a_hub_folder(hub_folder, shapes_dir, preset, tmp_path):
    folder = hub_folder(preset, weights=True)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(json.loads((shapes_dir / "train.json").read_text())[:12]))
    run, merged = tmp_path / "run", tmp_path / "merged"
    hub = f"model.hub_id={folder}"

    trained = run_python(["-m", "l2t.train", "--preset", preset, hub, "--data", data, "--images", shapes_dir, "--output", run, *TRAIN_SETTINGS], tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert f"model: {folder} (4bit)" in trained.stdout
    assert [row["step"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in row] == [1, 2]
    assert (run / "adapter" / "adapter_model.safetensors").exists()

    evaluated = run_python(["-m", "l2t.evaluate", run, "--max-new-tokens", "8"], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((run / "eval" / "report.json").read_text())
    assert len(report["samples"]) == 4

    merging = run_python(["-m", "l2t.merge", run, "--out", merged, "--check-samples", "2"], tmp_path)
    assert merging.returncode == 0, merging.stderr[-3000:]
    assert "Parity check passed on 2 prompts" in merging.stdout
    assert json.loads((merged / "merge_report.json").read_text())["parity"]["passed"] is True


# ---------------------------------------------------------------- the first run of a hub preset


def test_first_run_offline_names_the_preset_the_model_and_the_cache(sample, tmp_path):
    result = run_python(["-m", "l2t.train", "--preset", "smolvlm-256m", "--data", sample, "--output", tmp_path / "run"], tmp_path)
    cache = tmp_path / "hf-home" / "hub"
    assert result.returncode == 1
    assert result.stderr.splitlines()[-2:] == [
        f"error: preset smolvlm-256m needs the model HuggingFaceTB/SmolVLM-256M-Instruct, which is not in the Hugging Face cache {cache}, "
        "and the hub can't be reached (HF_HUB_OFFLINE is set).",
        "Fill the cache by hand: where the hub can be reached, run `hf download HuggingFaceTB/SmolVLM-256M-Instruct` and copy the folder "
        f"models--HuggingFaceTB--SmolVLM-256M-Instruct it makes into {cache} (the cache is $HF_HOME/hub, or $HF_HUB_CACHE when set). "
        "Or set model.hub_id to a local folder that holds the model.",
    ]


def test_a_cache_filled_by_hand_is_used_offline(hub_folder, sample, tmp_path):
    repo = tmp_path / "hf-home" / "hub" / "models--HuggingFaceTB--SmolVLM-256M-Instruct"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(hub_folder("smolvlm-256m"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    result = run_python(["-m", "l2t.data", "preview", sample, "--preset", "smolvlm-256m"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == PREVIEWS["smolvlm-256m"]
