"""The Chat and Runs tabs through their API (gradio_client), on a short training run."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError

pytestmark = pytest.mark.slow


def text(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


@pytest.fixture(scope="module")
def done_run(app, trained_run):
    shutil.copytree(trained_run, app.context.runs_dir / "done-run", ignore=shutil.ignore_patterns("checkpoints"))
    return "done-run"


def test_chat_keeps_each_model_s_conversation_over_turns(app, done_run):
    picture, _, _ = app.client.predict(done_run, api_name="/held_out_sample")
    image = app.client.predict(done_run, handle_file(picture), api_name="/chat_image")
    base, tuned, question = app.client.predict(done_run, handle_file(image), "What is in the picture?", api_name="/chat")
    assert question == ""
    assert [m["role"] for m in tuned] == ["user", "assistant"] and text(tuned[0]) == "What is in the picture?"
    assert text(base[1]).strip() and text(tuned[1]).strip()
    base, tuned, _ = app.client.predict(done_run, handle_file(image), "What colour is it?", api_name="/chat")
    assert [m["role"] for m in base] == ["user", "assistant"] * 2 and text(tuned[2]) == "What colour is it?"
    with pytest.raises(AppError, match="Type a question"):
        app.client.predict(done_run, handle_file(image), "  ", api_name="/chat")


def test_runs_lists_every_run_and_deletes_only_after_a_tick_and_never_a_running_one(app, done_run):
    busy = app.context.runs_dir / "busy-run"
    busy.mkdir()
    (busy / "config.yaml").write_text("preset: tiny\nloss:\n  mode: response\n")
    (busy / "status.json").write_text(json.dumps({"state": "running", "pid": os.getpid(), "step": 3, "total": 50, "updated": 1.0}))

    table, _ = app.client.predict([], api_name="/runs_table")
    rows = {row[0]: dict(zip(table["headers"], row)) for row in table["data"]}
    done = rows[done_run]
    assert done["status"] == "finished" and done["preset"] == "tiny" and done["loss mode"] == "l2t" and done["steps"] == "60 / 60"
    assert float(done["instruction loss"]) > 0 and float(done["response loss"]) > 0
    assert rows["busy-run"]["steps"] == "3 / 50" and rows["busy-run"]["loss mode"] == "response"

    with pytest.raises(AppError, match="Tick"):
        app.client.predict([done_run], False, api_name="/delete_runs")
    assert (app.context.runs_dir / done_run).exists()
    with pytest.raises(AppError, match="busy-run: its training .* is still running"):
        app.client.predict(["busy-run"], True, api_name="/delete_runs")
    assert busy.exists()

    shutil.copytree(app.context.runs_dir / done_run, app.context.runs_dir / "old-run")
    app.client.predict([], api_name="/runs_table")  # the list picks up a run that appeared since
    table, _, _, message = app.client.predict(["old-run"], True, api_name="/delete_runs")
    assert "Deleted old-run" in message and not (app.context.runs_dir / "old-run").exists()
    assert "old-run" not in [row[0] for row in table["data"]]
