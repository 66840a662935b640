"""Shared fixtures, once per session and offline: the built-in tiny model's processor, a short training run, hub-shaped preset folders."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

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


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A short tiny-preset training run (L2T mode), shared by evaluate/merge/UI tests."""
    from l2t.config import load_config
    from l2t.train import train

    run_dir = tmp_path_factory.mktemp("runs") / "tiny-l2t"
    config = load_config("tiny", overrides=[f"output={run_dir}", "train.max_steps=60", "train.logging_steps=10", "train.preview_samples=2"])
    train(config)
    return run_dir


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
