"""Command-line tools the tests take from the npm registry (helm, Codex CLI), installed into ``.tools/``."""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from tests.support.ci import in_ci
from tests.support.server import REPO_ROOT

TOOLS = REPO_ROOT / ".tools"
_lock = threading.Lock()


def npm_tool(package: str, command: str) -> Path:
    """The ``command`` binary of the npm ``package`` (a pinned ``name@version``), installed into .tools/ when
    absent. Without npm the test skips, except in CI, where it fails."""
    binary = TOOLS / "node_modules" / ".bin" / command
    with _lock:
        name, _, version = package.rpartition("@")
        manifest = TOOLS / "node_modules" / name / "package.json"
        if binary.exists() and manifest.is_file() and f'"version": "{version}"' in manifest.read_text():
            return binary
        npm = shutil.which("npm")
        if npm is None:
            message = f"{command} is not in {TOOLS} and npm is not available to install {package}"
            if in_ci():
                pytest.fail(message)
            pytest.skip(message)
        TOOLS.mkdir(exist_ok=True)
        result = subprocess.run([npm, "install", "--prefix", str(TOOLS), "--no-audit", "--no-fund", package],
                                capture_output=True, text=True, timeout=300, check=False)
        if result.returncode != 0 or not binary.exists():
            pytest.fail(f"npm install {package} did not give {binary}: {result.stderr[-2000:]}")
    return binary
