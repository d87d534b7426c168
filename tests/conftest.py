"""Shared fixtures: a tiny random GQA LLaMA (8 query heads over 2 kv heads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture()
def tiny():
    from casrap.models.tiny import tiny_llama

    return tiny_llama()


@pytest.fixture()
def tiny_eager():
    from casrap.models.tiny import tiny_llama

    return tiny_llama(attn_implementation="eager")


@pytest.fixture(autouse=True, scope="session")
def _isolated_casrap_home(tmp_path_factory):
    """Tests never read or write the user's cache, except the converted embedded model.

    Calibrations made by tests go to a session folder; the embedded model's converted
    checkpoint (30 s to rebuild) is shared through ``CASRAP_EMBEDDED_CACHE``.
    """
    from casrap.paths import casrap_home as real_home

    os.environ.setdefault("CASRAP_EMBEDDED_CACHE", str(real_home() / "models" / "smollm2-135m"))
    os.environ["CASRAP_HOME"] = str(tmp_path_factory.mktemp("casrap-home"))
    yield


@pytest.fixture()
def casrap_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CASRAP_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M, loaded once per session (converted on first use)."""
    from casrap.models import load_model

    return load_model("smollm2-135m", device="cpu")
