"""The embedded engine in tests: the tiny demo model, built once per session, and vLLM's environment."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.server import REPO_ROOT

ENGINE_SETTINGS: dict[str, Any] = {
    "backend": "vllm",
    "enforce_eager": True,
    "max_model_len": 512,
    "kv_cache_memory_bytes": 64 * 1024 * 1024,
    # As the default configuration has it: compact JSON, so the random model's structured outputs end.
    "structured_outputs": {"backend": "xgrammar", "disable_any_whitespace": True},
}


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def engine_env(scratch: Path) -> dict[str, str]:
    """Keep vLLM's caches, sockets and temp files inside the test's directory, and off the network."""
    (scratch / "tmp").mkdir(parents=True, exist_ok=True)
    return {
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CACHE_ROOT": str(scratch / "vllm-cache"),
        "TMPDIR": str(scratch / "tmp"),
        "HF_HOME": str(scratch / "hf"),
    }


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tiny random-weight model, built locally by the project's own builder."""
    if not vllm_available():
        pytest.fail("vllm is not installed: `make test` installs the engine extra (cpu or vllm)")
    output = tmp_path_factory.mktemp("models") / "helios-demo-tiny"
    subprocess.run([sys.executable, "-m", "app.demo_model", "--output", str(output)], cwd=REPO_ROOT,
                   check=True, timeout=300, capture_output=True)
    yield output
