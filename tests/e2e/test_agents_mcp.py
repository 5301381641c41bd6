"""Agents with tools from real MCP servers (tests/support/mcp_servers.py), over stdio and streamable HTTP."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from tests.e2e.agents_support import results, script
from tests.e2e.gateway import client, eventually
from tests.support.fake_provider import FakeProvider, remote_model
from tests.support.mcp_servers import CANCEL_LOG, SERVER_MODULE, HttpServer
from tests.support.server import REPO_ROOT, HeliosProcess, run_cli

AGENT = "mcp-agent"
SECRET = "sk-appliance-secret-must-not-leak"
TIMEOUT = 3


def _stdio(record: Path, **extra: Any) -> dict[str, Any]:
    return {"name": "files", "command": sys.executable, "cwd": str(REPO_ROOT),
            "args": ["-m", SERVER_MODULE, "stdio", "--record", str(record)], "env": {"GREETING": "hello"},
            **extra}


@pytest.fixture(scope="module")
def record(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mcp-record")


@pytest.fixture(scope="module")
def web(record: Path) -> Iterator[HttpServer]:
    server = HttpServer(record)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def gateway(fake_provider: FakeProvider, record: Path, web: HttpServer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeliosProcess]:
    scratch = tmp_path_factory.mktemp("agents-mcp")
    config = {
        "models": [{**{k: v for k, v in remote_model(fake_provider, "scripted", "tool-script").items()
                       if k != "api_key"}, "api_key_env": "SCRIPT_KEY"}],
        "agents": [{"name": AGENT, "model": "scripted", "tool_timeout": TIMEOUT, "tools": ["calculator"],
                    "mcp_servers": [_stdio(record, deny_tools=["image"]),
                                    {"name": "web", "url": web.url, "prefix": "web_",
                                     "allow_tools": ["echo", "sleep"]}]}],
    }
    # The appliance's own environment holds a provider key; no tool process may see it.
    process = HeliosProcess(config, {"SCRIPT_KEY": SECRET}, workdir=scratch)
    try:
        process.start(wait_ready=True, timeout=60)
        yield process
    finally:
        process.close()


@pytest.fixture()
def oa(gateway: HeliosProcess, provider: FakeProvider) -> openai.OpenAI:
    return client(gateway.base_url, timeout=60)


def _cancelled(record: Path) -> list[str]:
    path = record / CANCEL_LOG
    return path.read_text().splitlines() if path.exists() else []


def test_mcp_tools_are_offered_and_called_concurrently(oa: openai.OpenAI, provider: FakeProvider) -> None:
    started = time.monotonic()
    reply = oa.chat.completions.create(model=AGENT, messages=script([
        {"name": "add", "arguments": {"a": 2, "b": 40}},
        {"name": "web_echo", "arguments": {"text": "over http"}},
        {"name": "sleep", "arguments": {"seconds": 1}},
        {"name": "web_sleep", "arguments": {"seconds": 1}},
        {"name": "fail", "arguments": {}},
    ]))
    assert time.monotonic() - started < 2.5, "the two 1 s sleeps ran at once"
    quoted = results(reply.choices[0].message.content)
    assert quoted["call_s0_0"] == "42" and quoted["call_s0_1"] == "over http"
    assert quoted["call_s0_2"] == quoted["call_s0_3"] == "slept 1.0"
    assert quoted["call_s0_4"] == "Error executing tool fail"  # the SDK server reports it with isError
    offered = {t["function"]["name"] for t in provider.requests_for("tool-script")[-1].body["tools"]}
    assert {"calculator", "add", "echo", "sleep", "fail", "env", "web_echo", "web_sleep"} <= offered
    assert "image" not in offered and "web_add" not in offered, "allow_tools and deny_tools apply"


def test_a_stdio_server_gets_only_its_configured_environment(oa: openai.OpenAI) -> None:
    reply = oa.chat.completions.create(model=AGENT, messages=script([{"name": "env", "arguments": {}}]))
    text = results(reply.choices[0].message.content)["call_s0_0"]
    assert SECRET not in text and "SCRIPT_KEY" not in text and "HELIOS" not in text
    environment = json.loads(text)
    assert environment["GREETING"] == "hello"
    assert set(environment) <= {"GREETING", "LC_CTYPE"}, environment


def test_a_slow_mcp_tool_times_out_and_the_server_is_told(oa: openai.OpenAI, record: Path) -> None:
    before = len(_cancelled(record))
    reply = oa.chat.completions.create(model=AGENT, messages=script([{"name": "web_sleep",
                                                                        "arguments": {"seconds": 30}}]))
    assert results(reply.choices[0].message.content)["call_s0_0"] == f"error: the tool took longer than {TIMEOUT} s"
    eventually(lambda: len(_cancelled(record)) > before, 10, "the MCP server to see the cancellation")


def test_a_client_that_leaves_cancels_the_running_mcp_call(gateway: HeliosProcess, record: Path) -> None:
    before = len(_cancelled(record))
    body = {"model": AGENT, "stream": True,
            "messages": script([{"name": "sleep", "arguments": {"seconds": 2.5}}])}
    with httpx2.Client(base_url=gateway.base_url, timeout=30) as http, \
            http.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if "→ sleep" in line:
                break  # the call has started: leave
    eventually(lambda: len(_cancelled(record)) > before, 10, "the stdio MCP server to see the cancellation")
    assert _cancelled(record)[-1] == "cancelled 2.5"


def test_a_dead_mcp_server_makes_the_agent_not_ready_until_it_is_back(gateway: HeliosProcess, web: HttpServer,
                                                                     oa: openai.OpenAI) -> None:
    assert httpx2.get(f"{gateway.base_url}/ready").status_code == 200
    web.kill()
    try:
        def down() -> bool:
            ready = httpx2.get(f"{gateway.base_url}/ready")
            return ready.status_code == 503 and "MCP server 'web' is down" in ready.text
        eventually(down, 30, "/ready to report the MCP server down")
        with pytest.raises(openai.InternalServerError) as refused:
            oa.chat.completions.create(model=AGENT, messages=script([]))
        assert refused.value.status_code == 503 and "MCP server 'web'" in refused.value.message
    finally:
        web.start()
    eventually(lambda: httpx2.get(f"{gateway.base_url}/ready").status_code == 200, 60, "the agent to be ready again")
    reply = oa.chat.completions.create(model=AGENT, messages=script([{"name": "web_echo",
                                                                        "arguments": {"text": "back"}}]))
    assert results(reply.choices[0].message.content)["call_s0_0"] == "back"


def test_colliding_tool_names_stop_start_up(fake_provider: FakeProvider, record: Path) -> None:
    config = {"models": [remote_model(fake_provider, "scripted", "tool-script")],
              "agents": [{"name": AGENT, "model": "scripted",
                          "mcp_servers": [_stdio(record), _stdio(record, name="files2")]}]}
    failed = run_cli([], config, timeout=60)
    assert failed.returncode == 3, failed.stderr[-2000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert "is offered by both mcp:files and mcp:files2; give one a prefix" in last
