"""The embedded engine in tests: the tiny demo model, built once per session, vLLM's environment, and one
appliance whose engines every module shares unless it stops, kills or reconfigures the process (an appliance
with one engine takes over a minute to start on the CPU; each further engine in it, about 25 s)."""

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
#: admission limits (CAPPED_RUNNING run, CAPPED_WAITING wait, the rest get 429 with Retry-After
#: CAPPED_RETRY_AFTER), an alias and a chat-template override (see override_template)
CAPPED, CAPPED_ALIAS = "tiny-capped", "tiny-capped-alias"
CAPPED_RUNNING, CAPPED_WAITING, CAPPED_RETRY_AFTER = 8, 8, 2
#: a base model with one LoRA adapter (the session's demo_lora_dir) on its engine
LORA_BASE, LORA = "tiny-base", "tiny-lora"
#: a small engine (LOCAL_RUNNING run, LOCAL_WAITING wait) as a member of pools, with a remote to spill to
LOCAL = "tiny-local"
LOCAL_RUNNING, LOCAL_WAITING, LOCAL_SPILL_AT_WAITING = 2, 2, 1
POOL = "pool"  # LOCAL then REMOTE, by priority
LOCAL_ONLY = "local-only"  # LOCAL alone, REMOTE as its context-window fallback
LOCAL_FALLBACK = "local-fallback"  # LOCAL alone, REMOTE as its plain fallback
#: the context of CAPPED, LORA_BASE and LOCAL, which a test's long prompt must exceed (the others have 1024)
SMALL_CONTEXT = 512
#: only a conversation opening with this gets the CAPPED model's template override
TEMPLATE_CHECK = "helios-template-check"


def override_template(model_dir: Path) -> str:
    """The model's own template, plus words that only a conversation opening with TEMPLATE_CHECK gets:
    the override is observable without changing what any other test renders."""
    own = (model_dir / "chat_template.jinja").read_text()
    return f"{{% if messages[0]['content'] == '{TEMPLATE_CHECK}' %}}chat template override in use{{% endif %}}{own}"


@pytest.fixture(scope="session")
def engine_gateway_loading(
    demo_model_dir: Path, demo_lora_dir: Path, fake_provider: FakeProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HeliosProcess]:
    """The shared appliance (see engine_gateway), started: it answers /health while its engines load. The
    session asks for it before its first test when any selected test needs engine_gateway (tests/conftest.py),
    so that the engines load while the tests before that one run."""
    scratch = tmp_path_factory.mktemp("engine-gateway")
    template = scratch / "override.jinja"
    template.write_text(override_template(demo_model_dir))
    # Tool schemas take ~300 prompt tokens; leave room for the answer.
    model = {**ENGINE_SETTINGS, "model": str(demo_model_dir), "max_model_len": 1024}
    small = {**model, "max_model_len": SMALL_CONTEXT}
    config = {
        # Quick retries, so that a test of a failing member does not wait for the default back-off.
        "routing": {"backoff_base": 0.05, "backoff_max": 0.2},
        "models": [
            {**model, "name": PLAIN},
            {**model, "name": HERMES, "tool_call_parser": "hermes", "enable_auto_tool_choice": True},
            {**model, "name": THINK, "tool_call_parser": "hermes", "enable_auto_tool_choice": True,
             "reasoning_parser": "deepseek_r1",
             # Tests shape the thinking with a regex too, so the constraint must apply inside it.
             "structured_outputs": {**ENGINE_SETTINGS["structured_outputs"], "enable_in_reasoning": True}},
            {**model, "name": EMBED, "runner": "pooling", "convert": "embed", "engine_args": {}},
            {**small, "name": CAPPED, "aliases": [CAPPED_ALIAS], "max_num_seqs": CAPPED_RUNNING,
             "max_queue_depth": CAPPED_WAITING, "retry_after": CAPPED_RETRY_AFTER, "chat_template": str(template)},
            {**small, "name": LORA_BASE, "lora_adapters": [{"name": LORA, "path": str(demo_lora_dir)}]},
            {**small, "name": LOCAL, "max_num_seqs": LOCAL_RUNNING, "max_queue_depth": LOCAL_WAITING,
             "spill_at_waiting": LOCAL_SPILL_AT_WAITING},
            remote_model(fake_provider, REMOTE, "gpt-4o"),
        ],
        "pools": [
            {"name": POOL, "members": [LOCAL, REMOTE], "strategy": "priority"},
            {"name": LOCAL_ONLY, "members": [LOCAL], "context_window_fallbacks": [REMOTE]},
            {"name": LOCAL_FALLBACK, "members": [LOCAL], "fallbacks": [REMOTE]},
        ],
        "agents": [{"name": AGENT, "model": PLAIN, "tools": ["calculator", "current_time"], "max_steps": 2,
                    "max_tokens": 120, "system_prompt": "Use the tools."}],
    }
    process = HeliosProcess(config, engine_env(scratch), workdir=scratch)
    try:
        process.start(timeout=60)
        yield process
    finally:
        process.close()


@pytest.fixture(scope="session")
def engine_gateway(engine_gateway_loading: HeliosProcess) -> HeliosProcess:
    """One appliance for the whole session, ready: the demo model plain, with vLLM's hermes tool parser, with
    the deepseek_r1 reasoning parser, as an embedding model, with admission limits, with a LoRA adapter, as a
    pool member; an agent, pools and a remote model. Tests using it measure metrics as differences, since
    other modules' requests accumulate."""
    engine_gateway_loading.wait_healthy("/ready", timeout=540)
    return engine_gateway_loading
