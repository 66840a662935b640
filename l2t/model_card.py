"""The model card (README.md) of a merged model, and the parity check's lines in it.

What was trained on what (from the run folder: config, templates, data
report, status), the run's evaluation table if it has one (`l2t.report`), the
merge's parity verdict, and plain transformers code that loads the folder.
The same parity lines are printed by `python -m l2t.merge` and shown by the UI.
"""

from __future__ import annotations

from pathlib import Path

from l2t import runs
from l2t.config import LOSS_MODE_DESCRIPTIONS, Config
from l2t.files import read_json
from l2t.report import markdown_table


def model_card(config: Config, run_dir: Path, out: Path, report: dict) -> str:
    """README.md of the exported folder: what was trained on what, and how it checked out."""
    m, lora, loss = config.model, config.lora, config.loss
    hub = m.hub_id if "/" in m.hub_id and not m.hub_id.startswith(("builtin:", "/", ".")) and not Path(m.hub_id).exists() else None
    front = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text", "tags: [l2t, qlora, lora, merged]"]
    if hub:
        front.append(f"base_model: {hub}")
    front.append("---")
    quant = {"4bit": "QLoRA (4-bit NF4 base)", "8bit": "LoRA on an 8-bit base", "none": "LoRA"}[m.quant]
    lines = [
        *front,
        f"# {out.name}",
        "",
        f"`{m.hub_id}` ({m.model_class}, {m.parameters or 'size not given'}) fine-tuned with {quant} and the "
        f"L2T loss (learning to instruct), then merged into a {report['dtype']} copy of the base model with `python -m l2t.merge`.",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{m.hub_id}` (preset `{config.preset}`) |",
        f"| prompt format | `{m.prompt_format}` (saved as the processor's chat template) |",
        f"| loss mode | `{loss.mode}`: {LOSS_MODE_DESCRIPTIONS.get(loss.mode, loss.mode)}; instruction weight {loss.instruction_weight:g}, response weight {loss.response_weight:g} |",
    ]
    templates_path = run_dir / runs.TEMPLATES
    if templates_path.exists():
        count = len(read_json(templates_path).get("templates", []))
        used = "kept out of the loss" if loss.mode == "l2t" else "mined, not used by this loss mode"
        lines.append(f"| task templates | {count} ({used}; listed in the run's templates.json) |")
    data_path = run_dir / runs.DATA_REPORT
    if data_path.exists():
        data = read_json(data_path)
        skipped = ", ".join(f"{code} {n}" for code, n in data.get("counts", {}).items()) or "none"
        lines.append(
            f"| data | `{Path(data.get('file', '')).name}`: {data.get('ok')} of {data.get('total')} samples used; skipped: {skipped} |"
        )
    t = config.train
    steps = runs.read_status(run_dir).get("step")
    length = f"{steps} optimiser steps" if steps is not None else (f"{t.max_steps} steps" if t.max_steps else f"{t.epochs:g} epochs")
    lines += [
        f"| schedule | {length}, learning rate {t.learning_rate:g} ({t.scheduler}), batch {t.batch_size} x {t.grad_accum} accumulation |",
        f"| LoRA | r={lora.r}, alpha={lora.alpha}, on `{m.lora_target}`; projector trained in full: {m.train_projector} |",
        "",
        "## Evaluation",
        "",
        *evaluation_lines(run_dir),
        "",
        "## Merge check",
        "",
        *parity_lines(report),
        "",
        "## Use",
        "",
        "```python",
        usage_snippet(str(out)),
        "```",
        "",
    ]
    return "\n".join(lines)


def evaluation_lines(run_dir: Path) -> list[str]:
    """The table of the run's eval/report.json, as `python -m l2t.evaluate` renders it."""
    path = run_dir / runs.EVAL / runs.EVAL_REPORT
    if not path.exists():
        return [f"The run folder holds no evaluation report ({runs.EVAL}/{runs.EVAL_REPORT}); `python -m l2t.evaluate {run_dir.name}` writes one."]
    report = read_json(path)
    try:
        table = markdown_table(report)
    except (KeyError, TypeError, ValueError) as exc:  # a report from another version of l2t
        print(f"note: {path} could not be read into the model card ({type(exc).__name__}: {exc})", flush=True)
        return [f"The run's {runs.EVAL}/{runs.EVAL_REPORT} could not be read by this version of l2t."]
    s = report.get("settings", {})
    where = f"{len(report.get('sample_ids', []))} samples of `{Path(s.get('data', '')).name}`, greedy decoding"
    return [f"From the run's {runs.EVAL}/{runs.EVAL_REPORT} ({where}):", "", table]


def usage_snippet(model_dir: str) -> str:
    """Plain transformers code that loads the exported folder and answers about one image."""
    return f'''from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model_dir = "{model_dir}"
model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype="auto")
processor = AutoProcessor.from_pretrained(model_dir)
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Describe the image briefly."}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
image = Image.open("photo.jpg").convert("RGB")
inputs = processor(images=[image], text=prompt, return_tensors="pt").to(model.device, model.dtype)
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))'''


def parity_lines(report: dict) -> list[str]:
    parity = report.get("parity")
    if parity is None:
        return ["Not checked (merged with --no-check)."]
    a = parity["merged_vs_adapter"]
    verdict = "passed" if a["passed"] else "FAILED"
    rule = "must be identical" if a["answers_must_match"] else "reported; in 16-bit a near-tie may flip"
    lines = [
        f"Parity check {verdict} on {parity['samples']} prompts ({parity['prompt_source']}):",
        f"- merged vs base+adapter ({a['dtype']}): {a['identical_answers']}/{parity['samples']} greedy answers identical ({rule}); "
        f"max logit difference {a['max_logit_diff']:.3g} over {a['positions']} positions (tolerance {a['tolerance']:.3g})",
    ]
    t = parity["merged_vs_training_model"]
    if "skipped" in t:
        lines.append(f"- merged vs training-time model ({t['quant']}): not run: {t['skipped']}")
    else:
        why = "informational: the merge uses the unquantised base" if t["quant"] != "none" else "informational"
        lines.append(
            f"- merged vs training-time model ({t['quant']}, {t['dtype']}): {t['token_agreement']:.1%} of answer tokens agree, "
            f"{t['identical_answers']}/{parity['samples']} answers identical ({why})"
        )
    return lines
