"""`bench/gpu.py --cpu-smoke`: the GPU measurement script runs end to end on CPU with shrunken configs.

The numbers it prints on CPU mean nothing; what is checked is that the one script
a GPU machine will run builds every preset's architecture, loads it through the
4-bit loader and times every arm (ours, full logits, the plain Trainer's loss,
TRL's training step) on batches of the right layout.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_script_runs_on_cpu(tmp_path):
    from bench.gpu import PRESETS

    rows_file = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "bench/gpu.py", "--cpu-smoke", "--steps", "1", "--warmup", "1", "--json", str(rows_file)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(rows_file.read_text())["rows"]
    arms = {("ours", "l2t"), ("ours", "response"), ("full-logits", "l2t"), ("full-logits", "response"), ("trainer", "response"), ("trl", "response"), ("trl", "full")}
    assert {(r["preset"], r["impl"], r["mode"]) for r in rows} == {(p, *arm) for p in PRESETS for arm in arms}
    for row in rows:
        assert row["seq_len"] == 1024 and row["samples_per_s"] > 0 and row["loss"] == row["loss"], row
        # response: the 30 answer tokens; l2t: 60 instruction tokens too; full: every token
        assert row["loss_tokens"] == {"response": 30, "l2t": 90, "full": 1024}[row["mode"]], row
    for name in PRESETS:
        assert f"{name}: ours(l2t)/trainer samples/s" in result.stdout
