"""Codex CLI (npm ``@openai/codex``) against Helios with Codex's default settings: only the provider is named.

Codex sends the Responses API with function tools, a ``namespace`` of sub-agent tools and a hosted ``web_search``
tool. The imitation provider's ``tool-script`` model, reached over Chat Completions, answers the first turn with
a call of Codex's shell tool (``exec_command``) and, once Codex has sent the command's output back, with text
quoting it (``results: call_s0_0=...``): so Codex's exit and its printed answer prove every step. The same runs
through an agent on that model, which hands Codex's own tool calls back to it.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from tests.e2e.agents_support import script
from tests.support.fake_provider import FakeProvider, remote_model
from tests.support.npm import npm_tool
from tests.support.server import HeliosProcess

CODEX_PACKAGE = "@openai/codex@0.171.0"
MODEL, AGENT = "scripted", "scripted-agent"
MARKER = "helios-codex-ran-this"


@pytest.fixture(scope="module")
def codex() -> Path:
    return npm_tool(CODEX_PACKAGE, "codex")


@pytest.fixture(scope="module")
def gateway(fake_provider: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeliosProcess]:
    config = {"models": [remote_model(fake_provider, MODEL, "tool-script")],
              "agents": [{"name": AGENT, "model": MODEL, "tools": ["calculator"], "max_steps": 4}]}
    process = HeliosProcess(config, workdir=tmp_path_factory.mktemp("codex"))
    try:
        process.start(wait_ready=True, timeout=60)
        yield process
    finally:
        process.close()


def _codex_exec(codex: Path, gateway: HeliosProcess, model: str, home: Path,
                prompt: str) -> subprocess.CompletedProcess[str]:
    home.mkdir()
    (home / "config.toml").write_text(
        f'model = "{model}"\nmodel_provider = "helios"\n\n[model_providers.helios]\nname = "Helios Serve"\n'
        f'base_url = "{gateway.base_url}/v1"\nwire_api = "responses"\n')
    work = home.parent / f"{home.name}-work"
    work.mkdir()
    subprocess.run(["git", "init", "-q", str(work)], check=True, timeout=30)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("OPENAI_", "CODEX_"))}
    env.update(CODEX_HOME=str(home), NO_COLOR="1")
    return subprocess.run([str(codex), "exec", prompt], cwd=work, env=env, capture_output=True, text=True,
                          timeout=180, stdin=subprocess.DEVNULL, check=False)


def _shell_prompt() -> str:
    return str(script([{"name": "exec_command", "arguments": {"cmd": f"echo {MARKER}"}}])[0]["content"])


@pytest.mark.parametrize("model", [MODEL, AGENT])
def test_codex_runs_a_shell_call_and_prints_the_answer(codex: Path, gateway: HeliosProcess, provider: FakeProvider,
                                                       tmp_path: Path, model: str) -> None:
    done = _codex_exec(codex, gateway, model, tmp_path / "codex-home", _shell_prompt())
    assert done.returncode == 0, done.stderr[-4000:]
    # The answer quotes the command's output as Codex sent it back: Codex ran it.
    answer = done.stdout
    assert "results: call_s0_0=" in answer and MARKER in answer, (answer, done.stderr[-2000:])
    sent = provider.requests_for("tool-script")
    assert len(sent) >= 2, [r.path for r in sent]
    first, last = sent[0].body, sent[-1].body
    names = {tool["function"]["name"] for tool in first["tools"]}
    assert "exec_command" in names
    assert any(name.startswith("multi_agent_v1__") for name in names), "Codex's namespace reached the model flat"
    assert not any(name == "web_search" for name in names)
    [output] = [m for m in last["messages"] if m["role"] == "tool" and m["tool_call_id"] == "call_s0_0"]
    assert MARKER in output["content"]


def test_hosted_tools_are_named_in_a_header_and_a_log_line(gateway: HeliosProcess, provider: FakeProvider) -> None:
    body = {"model": MODEL, "input": "hi", "store": False,
            "tools": [{"type": "web_search", "external_web_access": False}, {"type": "image_generation"},
                      {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}]}
    answer = httpx2.post(f"{gateway.base_url}/v1/responses", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Helios-Dropped-Tools"] == "web_search, image_generation"
    [sent] = provider.requests_for("tool-script")
    assert [tool["function"]["name"] for tool in sent.body["tools"]] == ["f"]
    request_id = answer.headers["X-Request-ID"]
    lines = [line for line in gateway.logs().splitlines() if request_id in line and "web_search" in line]
    assert len(lines) == 1 and "image_generation" in lines[0], lines
    forced = httpx2.post(f"{gateway.base_url}/v1/responses", json={**body, "tool_choice": {"type": "web_search"}},
                         timeout=30)
    assert forced.status_code == 400 and forced.json()["error"]["param"] == "tool_choice"


def test_reject_refuses_hosted_tools_by_name(helios: object, fake_provider: FakeProvider) -> None:
    process = helios({"models": [remote_model(fake_provider, MODEL, "tool-script")],  # type: ignore[operator]
                      "responses": {"unsupported_tools": "reject"}}, wait_ready=True)
    answer = httpx2.post(f"{process.base_url}/v1/responses", timeout=30, json={
        "model": MODEL, "input": "hi", "tools": [{"type": "function", "name": "f"}, {"type": "web_search"}]})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["param"], error["code"]) == ("tools[1].type", "unsupported_tool_type"), error
    assert json.loads(answer.text)["error"]["type"] == "invalid_request_error"

