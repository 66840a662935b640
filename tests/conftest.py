"""Shared fixtures, once per session and offline: the built-in tiny model's processor, short training runs, hub-shaped preset folders.

Also the rule on skips: a skip that tests/allowed_skips.txt does not list fails the run.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from tools.mutations import UNLISTED_SKIPS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny models are far faster on one thread than on two contended ones (subprocesses inherit this).
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "L2T_CACHE" not in os.environ:  # encoded-data caches of this session only (subprocesses inherit it)
    os.environ["L2T_CACHE"] = tempfile.mkdtemp(prefix="l2t-cache-")
    atexit.register(shutil.rmtree, os.environ["L2T_CACHE"], True)

import torch  # noqa: E402

torch.set_num_threads(1)

ALLOWED_SKIPS = Path(__file__).with_name("allowed_skips.txt")


def allowed_skips() -> list[tuple[str, str]]:
    """(node id, start of the skip reason) of each skip tests/allowed_skips.txt allows."""
    allowed = []
    for line in ALLOWED_SKIPS.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            node_id, reason, _why = (part.strip() for part in line.split(" | "))
            allowed.append((node_id, reason))
    return allowed


def skip_reason(report) -> str:
    longrepr = report.longrepr
    message = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return message.removeprefix("Skipped: ")


_unlisted_skips: list[str] = []


def _check_skip(report) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = skip_reason(report)
    node_id = report.nodeid.split("[")[0]
    if not any(node_id == allowed and reason.startswith(start) for allowed, start in allowed_skips()):
        _unlisted_skips.append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report):
    _check_skip(report)


def pytest_collectreport(report):
    _check_skip(report)  # a test file that skips itself (pytest.importorskip at module level)


def pytest_sessionfinish(session, exitstatus):
    if _unlisted_skips and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _unlisted_skips:
        terminalreporter.section(UNLISTED_SKIPS, red=True)
        for line in _unlisted_skips:
            terminalreporter.line(line, red=True)


@pytest.fixture(scope="session")
def tiny_config():
    from l2t.config import load_config

    return load_config("tiny")


@pytest.fixture(scope="session")
def tiny_processor(tiny_config):
    from l2t.models import load_processor

    return load_processor(tiny_config.model)


@pytest.fixture(scope="session")
def shapes_dir() -> Path:
    from l2t.synthetic import bundled_dir

    return bundled_dir()


def train_tiny(run_dir: Path, *overrides: str) -> Path:
    """A 60-step tiny-preset run, evaluated on the held-out split at its end (eval/report.json)."""
    from l2t.config import load_config
    from l2t.train import train

    settings = [f"output={run_dir}", "train.max_steps=60", "train.logging_steps=10", "train.preview_samples=2", *overrides]
    train(load_config("tiny", overrides=settings))
    return run_dir


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A short tiny-preset training run (L2T mode), shared by evaluate/merge/UI tests; tests that write into a run copy it."""
    return train_tiny(tmp_path_factory.mktemp("runs") / "tiny-l2t")


@pytest.fixture(scope="session")
def response_run(tmp_path_factory) -> Path:
    """The same run with loss.mode=response: a second run whose answers differ, to compare runs with."""
    return train_tiny(tmp_path_factory.mktemp("runs") / "tiny-response", "loss.mode=response")


def copy_run(source: Path, target: Path, adapter: bool = True) -> Path:
    """A copy of a run folder to write into (reports, merges), without its checkpoints and earlier evaluation."""
    from l2t import runs

    ignore = [runs.CHECKPOINTS, runs.EVAL] + ([] if adapter else [runs.ADAPTER])
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*ignore))
    return target


@pytest.fixture(scope="module")
def loaded(trained_run):
    """(model, encoder) of the session's tiny run, loaded once per test module."""
    from l2t import generation, runs

    return generation.load_run(runs.open_trained_run(trained_run))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The web UI served on a free port of 127.0.0.1 (its default host), with a gradio_client."""
    from gradio_client import Client

    from app.ui import create, serve

    root = tmp_path_factory.mktemp("ui")
    demo, context = create(root / "runs", root / "uploads")
    port = free_port()
    serve(demo, context, port=port, block=False)
    url = f"http://127.0.0.1:{port}/"
    client = Client(url, verbose=False, download_files=root / "downloads")
    yield SimpleNamespace(demo=demo, context=context, url=url, root=root, client=client)
    context.jobs.stop_all()
    demo.close()


@pytest.fixture(scope="session")
def hub_folder(tmp_path_factory):
    """hub_folder(preset, weights=False): a folder shaped like the preset's hub repository, written once per session."""
    from hub_folders import write_hub_folder

    root = tmp_path_factory.mktemp("hub")
    written: dict[tuple[str, bool], Path] = {}

    def folder(preset: str, weights: bool = False) -> Path:
        if (preset, weights) not in written:
            written[preset, weights] = write_hub_folder(preset, root / (f"{preset}-weights" if weights else preset), weights)
        return written[preset, weights]

    yield folder
    shutil.rmtree(root, ignore_errors=True)  # random weights: hundreds of MB that no later session needs
