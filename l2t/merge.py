"""Merge a run's adapter into its base model, check the result, and export a plain transformers folder.

    python -m l2t.merge runs/tiny-l2t --out merged/tiny-l2t
    python -m l2t.merge runs/llava-1.5-7b-l2t --out merged/llava-1.5-7b-l2t --dtype bf16 --device cuda
    python -m l2t.merge RUN_DIR --out DIR [--dtype auto|bf16|fp16|fp32] [--device cpu|cuda]
                        [--overwrite] [--no-check] [--check-samples N] [--tolerance T]

The base model is loaded again at full precision, the run's adapter goes on top
and `merge_and_unload()` folds it in; the parity check (`l2t.parity`) compares
the merged model with base + adapter, the model card comes from
`l2t.model_card`, and everything is written to a temp folder that is renamed
into place when complete. What each option does, the parity tolerances, the
memory it needs and how the writes stay safe: docs/MERGE.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from l2t import chat, runs
from l2t.config import DTYPES, Config
from l2t.errors import L2TError, print_error
from l2t.generation import pad_token_id
from l2t.masking import Encoder
from l2t.model_card import model_card, parity_lines
from l2t.models import checkpoint_dtype, dtype_name, fetch_model, load_base_model, load_processor, torch_dtype
from l2t.parity import DEFAULT_CHECK_SAMPLES, ParityCheck, ParityError

MAX_SHARD_SIZE = "2GB"
REPORT = "merge_report.json"


class MergeError(L2TError, RuntimeError):
    """A run folder or output folder that can't be used; the message says what to change."""


def say(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------- the output folder


def check_out(out: Path, run_dir: Path, overwrite: bool) -> None:
    """Refuse an --out that would replace the run, holds files (without --overwrite), or can't be written."""
    target, run = out.resolve(), run_dir.resolve()
    if target == run or target in run.parents:
        raise MergeError(f"--out {out} is (or contains) the run folder {run_dir}; choose another folder")
    if out.exists() and not out.is_dir():
        raise MergeError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MergeError(
            f"--out {out} already holds files; pass --overwrite to replace it (the old folder stays until the new one is complete)"
        )
    parent = out.parent
    if parent.exists() and not parent.is_dir():
        raise MergeError(f"--out {out}: {parent} is a file, not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.probe-")).rmdir()
    except OSError as exc:
        raise MergeError(f"--out {out}: cannot write in {parent}: {exc.strerror or exc}") from None


def clean_stale(out: Path) -> None:
    """Remove what an interrupted merge into `out` left behind."""
    pattern = str(out.parent / f".{glob.escape(out.name)}")
    for stale in glob.glob(pattern + ".merging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in glob.glob(pattern + ".replaced-*"):
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:  # interrupted between moving the old folder aside and the new one in: put the old one back
            os.replace(old, out)


def resolve_dtype(name: str, config: Config) -> str:
    """The dtype name to merge at: `name`, or for auto the one the base checkpoint is stored in (else bf16)."""
    if name != "auto":
        return name
    return dtype_name(checkpoint_dtype(config.model)) or "bf16"


def finish_files(folder: Path, mode: int) -> None:
    """Ordinary permissions (some writers create private files), and on disk before the rename."""
    for path in folder.rglob("*"):
        if path.is_file():
            os.chmod(path, mode)
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def write_export(model, processor, out: Path, report: dict, card: str) -> None:
    """Save everything into a temp folder beside `out`, then rename it into place."""
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.merging-"))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary folder
        # transformers 5 writes safetensors only; tests check that no pickle file appears.
        model.save_pretrained(tmp, max_shard_size=MAX_SHARD_SIZE)
        processor.save_pretrained(tmp)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        (tmp / REPORT).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        finish_files(tmp, 0o666 & ~umask)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.replaced-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------- the merge


def merge_run(
    run_dir: str | Path,
    out: str | Path,
    dtype: str = "auto",
    device: str | None = None,
    overwrite: bool = False,
    check: bool = True,
    check_samples: int = DEFAULT_CHECK_SAMPLES,
    tolerance: float | None = None,
) -> dict:
    """Merge, check and export one run; returns the merge report (also written to OUT/merge_report.json)."""
    started = time.time()
    run_dir, out = Path(run_dir), Path(out)
    config = runs.open_trained_run(run_dir).config
    check_out(out, run_dir, overwrite)
    clean_stale(out)
    if check_samples < 1:
        raise MergeError(f"--check-samples {check_samples}: must be at least 1 (or pass --no-check)")
    if tolerance is not None and not tolerance > 0:
        raise MergeError(f"--tolerance {tolerance}: must be positive")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise MergeError("--device cuda: no GPU is available here; use --device cpu")
    status = runs.read_status(run_dir)
    if status.get("state") not in (None, "finished"):
        say(f"note: the run is '{status['state']}' at step {status.get('step')} of {status.get('total')}; merging the adapter it saved")
    fetch_model(config)
    dtype = resolve_dtype(dtype, config)
    processor = load_processor(config.model)
    encoder = Encoder.from_config(config, processor)
    report = {"run": str(run_dir.resolve()), "base_model": config.model.hub_id, "model_class": config.model.model_class,
              "dtype": dtype, "device": device, "parity": None}  # fmt: skip

    parity = ParityCheck(config, run_dir, encoder, dtype, device, check_samples, tolerance) if check else None
    model = merged_model(config, run_dir / runs.ADAPTER, dtype, device, parity)
    if parity is not None:
        report["parity"] = parity.compare(model)
        for line in parity_lines(report):
            say(line)
        if not report["parity"]["passed"]:
            raise ParityError(
                "the merged model does not match base+adapter (numbers below); nothing was written. "
                "A merge with --dtype fp32 tells 16-bit rounding from a real mismatch.",
                report,
            )

    processor.chat_template = chat.to_jinja(chat.FORMATS[config.model.prompt_format])
    encoder.tokenizer.chat_template = processor.chat_template
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = pad_token_id(encoder.tokenizer)
    report["seconds"] = round(time.time() - started, 1)
    say(f"writing {out}")
    write_export(model, processor, out, report, model_card(config, run_dir, out, report))
    return report


def merged_model(config: Config, adapter_dir: Path, dtype: str, device: str, parity: ParityCheck | None):
    """The base model at full precision with the adapter folded in; `parity` records base+adapter first."""
    from peft import PeftModel  # peft is slow to import; the errors above need none of it

    say(f"loading {config.model.hub_id} at {dtype} on {device} with the adapter in {adapter_dir}")
    base = load_base_model(config.model, quant="none", device=device, dtype=torch_dtype(dtype))
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    except (OSError, ValueError, RuntimeError) as exc:
        raise MergeError(f"cannot load the adapter in {adapter_dir}: {exc}") from None
    model.eval()
    if parity is not None:
        parity.record(model)
    return model.merge_and_unload()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m l2t.merge",
        description="Merge a run's LoRA adapter into a full-precision copy of its base model, check parity, and export it.",
    )
    parser.add_argument("run_dir", help="the run folder (holds config.yaml and adapter/)")
    parser.add_argument("--out", required=True, help="folder to write the merged model to")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=list(DTYPES),
        help="weights of the merged model (auto: the dtype the base checkpoint is stored in)",
    )
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"], help="where to merge (default: cuda if available)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing non-empty --out (only once the new model is complete)"
    )
    parser.add_argument("--no-check", action="store_true", help="skip the parity check")
    parser.add_argument(
        "--check-samples",
        type=int,
        default=DEFAULT_CHECK_SAMPLES,
        help=f"held-out prompts in the parity check (default {DEFAULT_CHECK_SAMPLES})",
    )
    parser.add_argument(
        "--tolerance", type=float, default=None, help="max logit difference allowed, merged vs base+adapter (default: scaled per dtype)"
    )
    args = parser.parse_args(argv)
    try:
        report = merge_run(
            args.run_dir, args.out, args.dtype, args.device, args.overwrite, not args.no_check, args.check_samples, args.tolerance
        )
    except ParityError as exc:
        numbers = {k: v for k, v in exc.report["parity"].items() if k != "answers"}
        return print_error(f"{exc}\n{json.dumps(numbers, indent=2)}")
    except L2TError as exc:
        return print_error(exc)
    except OSError as exc:
        return print_error(f"writing the merged model failed ({exc.strerror or exc}{': ' + exc.filename if exc.filename else ''}); "
                           f"nothing was written to {args.out}")  # fmt: skip
    verdict = "not checked" if report["parity"] is None else "passed"
    say(
        f"merged model written to {args.out} ({report['dtype']}, parity {verdict}); load it with AutoModelForImageTextToText.from_pretrained"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
