"""l2t.merge: the merged model generates what the adapter generated, loads without l2t, and is written safely."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from l2t import chat, merge, parity, runs
from l2t.batch import process_images
from l2t.config import config_from_dict, read_yaml
from l2t.masking import Encoder
from l2t.models import load_processor, load_with_adapter, source
from l2t.synthetic import BUNDLE_ARGS

BUNDLED = BUNDLE_ARGS["n"]  # samples in the bundled demo train split

pytestmark = pytest.mark.slow
DOCS = Path(__file__).resolve().parent.parent / "docs" / "MERGE.md"
QUESTION = "Describe the image briefly."


def run_config(run_dir: Path):
    return config_from_dict(read_yaml(run_dir / runs.CONFIG))


def listing(folder: Path) -> dict:
    """Every file and folder under `folder` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in [folder, *folder.rglob("*")]}


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, re.S)


@pytest.fixture(scope="module")
def merged(trained_run, tmp_path_factory):
    """The README command, `python -m l2t.merge RUN --out DIR`, run once: (out, exit code, stdout)."""
    out = tmp_path_factory.mktemp("exports") / "tiny-l2t"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = merge.main([str(trained_run), "--out", str(out)])
    return out, code, printed.getvalue()


@pytest.fixture(scope="module")
def adapter_model(trained_run):
    """Base at fp32 + the run's adapter, unmerged: the reference the merge must reproduce."""
    return load_with_adapter(run_config(trained_run), trained_run / runs.ADAPTER, quant="none", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def encoder(trained_run):
    config = run_config(trained_run)
    return Encoder(load_processor(config.model), chat.FORMATS[config.model.prompt_format])


def prompt_inputs(encoder: Encoder, messages: list[dict], pictures: list) -> dict:
    ids = torch.from_numpy(encoder.encode(messages, [p.size for p in pictures], add_generation_prompt=True).input_ids)[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **process_images(encoder.processor, pictures)}


def greedy(model, inputs: dict, max_new_tokens: int) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)


def test_cli_prints_the_parity_result_and_writes_the_report(merged):
    out, code, printed = merged
    assert code == 0
    assert "Parity check passed on 8 prompts (held_out.json)" in printed
    assert "8/8 greedy answers identical" in printed
    assert "max logit difference" in printed and "of answer tokens agree" in printed
    report = json.loads((out / merge.REPORT).read_text())
    assert report["dtype"] == "fp32"  # --dtype auto: the tiny checkpoint is stored in fp32
    parity = report["parity"]
    assert parity["passed"] and parity["merged_vs_adapter"]["identical_answers"] == 8
    assert parity["merged_vs_adapter"]["max_logit_diff"] <= 1e-4
    assert parity["merged_vs_training_model"]["quant"] == "4bit"
    card = (out / "README.md").read_text()
    assert "`builtin:tiny`" in card and "`l2t`" in card and "Parity check passed" in card
    assert re.search(r"\| task templates \| \d+ ", card) and f"{BUNDLED} of {BUNDLED} samples used" in card


@torch.no_grad()
def test_merged_model_matches_the_adapter_in_fp32(merged, trained_run, adapter_model, encoder):
    from transformers import AutoModelForImageTextToText

    out, _, _ = merged
    merged_model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    ids, prompts, where = parity.check_prompts(run_config(trained_run), trained_run, 4)
    assert where == runs.HELD_OUT and all(pictures for _, pictures in prompts)
    for messages, pictures in prompts:
        inputs = prompt_inputs(encoder, messages, pictures)
        tokens = greedy(adapter_model, inputs, 24)
        assert torch.equal(greedy(merged_model, inputs, 24), tokens)
        full = {**inputs, "input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
        difference = (adapter_model(**full).logits - merged_model(**full).logits).abs().max()
        assert difference <= 1e-4


def test_merged_folder_holds_no_pickle_and_no_leftovers(merged):
    out, _, _ = merged
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if Path(n).suffix in {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy"}]
    assert [n for n in names if n.endswith(".safetensors")] == ["model.safetensors"]
    assert all(n.endswith((".safetensors", ".json", ".jinja", ".md")) for n in names), names
    assert {"config.json", "generation_config.json", "chat_template.jinja", "tokenizer.json", "README.md", merge.REPORT} <= set(names)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temp folder left beside it


def test_plain_transformers_loads_it_in_a_fresh_process(merged, adapter_model, encoder, shapes_dir, tmp_path):
    """The model card's snippet, without l2t and offline, generates what the adapter generates."""
    out, _, _ = merged
    (snippet,) = python_blocks((out / "README.md").read_text())
    (documented,) = [b for b in python_blocks(DOCS.read_text()) if "AutoModelForImageTextToText.from_pretrained(model_dir" in b]
    assert re.sub(r'model_dir = ".*"', "", documented) == re.sub(r'model_dir = ".*"', "", snippet)
    image = shapes_dir / "images" / "test_00003.png"
    script = (
        snippet.replace('"photo.jpg"', json.dumps(str(image)))
        + "\nimport json, sys\n"
        + "print(json.dumps({'input_ids': inputs['input_ids'][0].tolist(), 'output': output[0].tolist(),"
        + " 'l2t': any(m == 'l2t' or m.startswith('l2t.') for m in sys.modules)}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    shown = json.loads(result.stdout.strip().splitlines()[-1])
    assert shown["l2t"] is False
    from PIL import Image

    picture = Image.open(image).convert("RGB")
    inputs = prompt_inputs(encoder, [{"role": "user", "content": chat.IMAGE + QUESTION}], [picture])
    assert shown["input_ids"] == inputs["input_ids"][0].tolist()  # the saved chat template is the run's prompt format
    with torch.no_grad():
        assert shown["output"] == greedy(adapter_model, inputs, 64)[0].tolist()


def test_adapter_loads_with_peft_as_documented(trained_run, shapes_dir):
    """docs/MERGE.md's adapter snippet generates what the training-time model (4-bit base + adapter) generates."""
    config = run_config(trained_run)
    (snippet,) = [b for b in python_blocks(DOCS.read_text()) if "PeftModel.from_pretrained" in b]
    code = re.sub(r"^base_id = .*$", f"base_id = {str(source(config.model))!r}", snippet, flags=re.M)
    code = re.sub(r"^adapter_dir = .*$", f"adapter_dir = {str(trained_run / runs.ADAPTER)!r}", code, flags=re.M)
    code = re.sub(r"^dtype = .*$", "dtype = torch.float32", code, flags=re.M)
    code = code.replace('"photo.jpg"', json.dumps(str(shapes_dir / "images" / "test_00005.png")))
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, str(DOCS), "exec"), namespace)
    training_model = load_with_adapter(config, trained_run / runs.ADAPTER, device="cpu")
    assert config.model.quant == "4bit"
    with torch.no_grad():
        expected = greedy(training_model, dict(namespace["inputs"]), 64)
    assert torch.equal(namespace["output"], expected)


def save_that_fails(failure):
    from transformers import PreTrainedModel

    def failing(self, directory, **kwargs):
        (Path(directory) / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1024)  # half a model...
        raise failure

    return PreTrainedModel, "save_pretrained", failing


def test_failure_while_saving_leaves_no_output(trained_run, tmp_path, monkeypatch, capsys):
    exports = tmp_path / "exports"
    out = exports / "tiny"
    monkeypatch.setattr(*save_that_fails(OSError(errno.ENOSPC, "No space left on device")))
    assert merge.main([str(trained_run), "--out", str(out), "--no-check"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "nothing was written" in err and "Traceback" not in err
    assert list(exports.iterdir()) == []

    monkeypatch.setattr(*save_that_fails(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        merge.main([str(trained_run), "--out", str(out), "--no-check"])
    assert list(exports.iterdir()) == []


def test_failed_overwrite_keeps_the_old_folder_and_a_rerun_cleans_up(trained_run, tmp_path, monkeypatch, capsys):
    exports = tmp_path / "exports"
    out = exports / "tiny"
    out.mkdir(parents=True)
    (out / "old-model.txt").write_text("the previous export")
    before = listing(out)
    monkeypatch.setattr(*save_that_fails(OSError(errno.EIO, "Input/output error")))
    assert merge.main([str(trained_run), "--out", str(out), "--overwrite", "--no-check"]) == 1
    assert listing(out) == before
    assert sorted(p.name for p in exports.iterdir()) == ["tiny"]
    monkeypatch.undo()

    stale = exports / ".tiny.merging-killed"  # what a killed merge leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 16)
    assert merge.main([str(trained_run), "--out", str(out), "--overwrite", "--no-check"]) == 0
    assert sorted(p.name for p in exports.iterdir()) == ["tiny"]
    assert (out / "model.safetensors").exists() and not (out / "old-model.txt").exists()
    assert "parity not checked" in capsys.readouterr().out
    assert "Not checked" in (out / "README.md").read_text()


def test_existing_output_is_refused_without_overwrite(trained_run, tmp_path, capsys):
    out = tmp_path / "tiny"
    (out / "sub").mkdir(parents=True)
    (out / "weights.safetensors").write_bytes(b"precious")
    (out / "sub" / "notes.txt").write_text("keep me")
    before = listing(tmp_path)
    assert merge.main([str(trained_run), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "already holds files" in err and "--overwrite" in err and "Traceback" not in err
    assert listing(tmp_path) == before


def broken_run(trained_run: Path, tmp_path: Path, what: str) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    for name in (runs.CONFIG, runs.HELD_OUT, runs.TEMPLATES, runs.DATA_REPORT):
        (run / name).write_bytes((trained_run / name).read_bytes())
    if what != "no adapter":
        (run / runs.ADAPTER).mkdir()
        for f in (trained_run / runs.ADAPTER).iterdir():
            (run / runs.ADAPTER / f.name).write_bytes(f.read_bytes())
    if what == "bad yaml":
        (run / runs.CONFIG).write_text("model: [hub_id: oops\n")
    if what == "unknown key":
        (run / runs.CONFIG).write_text((trained_run / runs.CONFIG).read_text().replace("quant: 4bit", "quant: 4bit\n  quantisation: 4bit"))
    return run


@pytest.mark.parametrize(
    "what, message",
    [
        ("no adapter", "has no trained adapter"),
        ("bad yaml", "not valid YAML"),
        ("unknown key", "unknown key 'model.quantisation'"),
        ("out under a file", "is a file, not a folder"),
        ("out is the run", "is (or contains) the run folder"),
    ],
)
def test_clear_errors_before_any_weights_load(trained_run, tmp_path, capsys, what, message):
    run = broken_run(trained_run, tmp_path, what)
    out = tmp_path / "merged"
    if what == "out under a file":
        (tmp_path / "file.txt").write_text("not a folder")
        out = tmp_path / "file.txt" / "merged"
    if what == "out is the run":
        out = run
    assert merge.main([str(run), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write into read-only folders")
def test_unwritable_output_folder_is_refused(trained_run, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert merge.main([str(trained_run), "--out", str(locked / "merged")]) == 1
        assert "cannot write in" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_a_merge_that_loses_the_adapter_fails_the_check_and_writes_nothing(trained_run, tmp_path, monkeypatch, capsys):
    from peft import PeftModel

    monkeypatch.setattr(PeftModel, "merge_and_unload", lambda self, **kwargs: self.unload(), raising=False)
    out = tmp_path / "merged"
    assert merge.main([str(trained_run), "--out", str(out), "--check-samples", "2"]) == 1
    captured = capsys.readouterr()
    assert "Parity check FAILED" in captured.out
    assert '"max_logit_diff"' in captured.err and "nothing was written" in captured.err
    assert list(tmp_path.iterdir()) == []


def test_a_rerun_puts_back_an_old_folder_that_a_killed_merge_had_moved_aside(tmp_path):
    out = tmp_path / "tiny"
    old = tmp_path / ".tiny.replaced-4242"  # killed between moving the old export aside and the new one in
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"old")
    (tmp_path / ".tiny.merging-4242").mkdir()
    merge.clean_stale(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
    assert (out / "model.safetensors").read_bytes() == b"old"


def test_a_run_without_held_out_samples_is_checked_on_probe_prompts(trained_run, tmp_path):
    run = broken_run(trained_run, tmp_path, "held out nothing")
    (run / runs.HELD_OUT).write_text("[]")
    ids, prompts, where = parity.check_prompts(run_config(run), run, 3)
    assert where.startswith("probe prompts on noise images") and ids == ["probe-0", "probe-1", "probe-2"]
    assert [len(pictures) for _, pictures in prompts] == [1, 1, 1]
