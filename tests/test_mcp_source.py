"""The MCP tool source against real MCP servers (tests/support/mcp_servers.py) over stdio and streamable HTTP.

Every server process a test starts is stopped by PID at teardown; HTTP traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from app.agents.mcp import McpServerDown, McpStartError, McpToolSource
from app.agents.tools import Tool
from app.settings import McpServerSettings
from tests.support.mcp_servers import CANCEL_LOG, SERVER_MODULE, HttpServer
from tests.support.server import REPO_ROOT, free_port

SECRET = "sk-helios-test-0123456789abcdef"
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


@pytest.fixture(autouse=True)
def _no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    # The HTTP client honours *_proxy variables; loopback traffic must not be sent to a proxy.
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def record(tmp_path: Path) -> Path:
    """Where the servers write their ready marks and cancellations."""
    directory = tmp_path / "record"
    directory.mkdir()
    return directory


@pytest.fixture
def http_server(record: Path) -> Iterator[HttpServer]:
    server = HttpServer(record)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def stdio_settings(record: Path, **extra: Any) -> McpServerSettings:
    return McpServerSettings(name="files", command=sys.executable,
                             args=["-m", SERVER_MODULE, "stdio", "--record", str(record)], cwd=REPO_ROOT,
                             **extra)


def http_settings(server: HttpServer, **extra: Any) -> McpServerSettings:
    return McpServerSettings(name="web", url=server.url, **extra)


@asynccontextmanager
async def opened(settings: McpServerSettings, **options: Any) -> AsyncIterator[McpToolSource]:
    source = McpToolSource(settings, options.pop("tool_timeout", 10.0),
                           options.pop("max_tool_output_bytes", 16384), **options)
    await source.start()
    try:
        yield source
    finally:
        await source.close()


def tool(source: McpToolSource, name: str) -> Tool:
    return next(t for t in source.tools() if t.name == name)


def stdio_pids(record: Path) -> set[int]:
    return {int(path.name.removeprefix("ready-")) for path in record.glob("ready-*")}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def eventually(check: Callable[[], bool], within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {within} s")
        await asyncio.sleep(0.05)


def cancellations(record: Path) -> list[str]:
    path = record / CANCEL_LOG
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


@pytest.fixture(params=["stdio", "http"])
def any_settings(request: pytest.FixtureRequest, record: Path) -> Iterator[McpServerSettings]:
    """The same server over either transport."""
    if request.param == "stdio":
        yield stdio_settings(record)
        return
    server = HttpServer(record)
    server.start()
    try:
        yield http_settings(server)
    finally:
        server.kill()


# ---- listing -------------------------------------------------------------------------------------------


async def test_stdio_tools_are_filtered_and_prefixed(record: Path) -> None:
    settings = stdio_settings(record, allow_tools=["add", "echo", "sleep"], deny_tools=["sleep"], prefix="fs_")
    async with opened(settings) as source:
        assert source.label == "mcp:files"
        assert source.not_ready_reason() is None
        assert [t.name for t in source.tools()] == ["fs_add", "fs_echo"]
        add = tool(source, "fs_add")
        assert add.description == "Add two integers."
        assert add.parameters["type"] == "object"
        assert set(add.parameters["properties"]) == {"a", "b"}
        assert add.definition()["function"]["name"] == "fs_add"
        result = await add.call({"a": 2, "b": 3})
        assert (result.text, result.is_error) == ("5", False)


async def test_http_tools_are_filtered_and_prefixed(http_server: HttpServer) -> None:
    async with opened(http_settings(http_server, deny_tools=["env", "headers"], prefix="web-")) as source:
        assert source.label == "mcp:web"
        assert source.not_ready_reason() is None
        assert sorted(t.name for t in source.tools()) == ["web-add", "web-echo", "web-fail", "web-image",
                                                          "web-sleep"]
        # Tools without arguments still get an object schema with properties, as function calling wants.
        assert tool(source, "web-fail").parameters["properties"] == {}
        result = await tool(source, "web-echo").call({"text": "héllo"})
        assert (result.text, result.is_error) == ("héllo", False)


# ---- calls ---------------------------------------------------------------------------------------------


async def test_calls_run_concurrently(any_settings: McpServerSettings) -> None:
    async with opened(any_settings) as source:
        sleep = tool(source, "sleep")
        started = time.monotonic()
        results = await asyncio.gather(*(sleep.call({"seconds": 1}) for _ in range(5)))
        elapsed = time.monotonic() - started
    assert [r.text for r in results] == ["slept 1.0"] * 5
    assert elapsed < 2.0, f"5 one-second calls took {elapsed:.2f} s"


async def test_a_failing_tool_gives_an_error_result(any_settings: McpServerSettings) -> None:
    async with opened(any_settings) as source:
        result = await tool(source, "fail").call({})
    assert result.is_error
    assert "fail" in result.text


async def test_other_content_is_summarised(any_settings: McpServerSettings) -> None:
    async with opened(any_settings) as source:
        result = await tool(source, "image").call({})
    assert (result.text, result.is_error) == ("a pixel\n[image: image/png]", False)


async def test_long_output_is_cut_within_the_limit(record: Path) -> None:
    async with opened(stdio_settings(record), max_tool_output_bytes=256) as source:
        result = await tool(source, "echo").call({"text": "é" * 1000})
    assert len(result.text.encode()) <= 256
    match = re.fullmatch(r"(é+)\n\[output cut: 2000 bytes, only the first (\d+) are shown\]", result.text)
    assert match is not None, result.text
    assert int(match[2]) == len(match[1].encode()) > 150


async def test_a_slow_call_times_out_and_the_server_sees_the_cancellation(
    any_settings: McpServerSettings, record: Path,
) -> None:
    async with opened(any_settings, tool_timeout=0.5) as source:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"'sleep' gave no answer within 0.5 s"):
            await tool(source, "sleep").call({"seconds": 30})
        assert time.monotonic() - started < 3
        await eventually(lambda: "cancelled 30.0" in cancellations(record))
        # The connection is fine after it.
        assert (await tool(source, "add").call({"a": 1, "b": 1})).text == "2"


async def test_a_cancelled_call_is_cancelled_on_the_server(any_settings: McpServerSettings, record: Path) -> None:
    async with opened(any_settings) as source:
        call = asyncio.create_task(tool(source, "sleep").call({"seconds": 31}))
        await asyncio.sleep(0.5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await eventually(lambda: "cancelled 31.0" in cancellations(record))


# ---- death and revival ---------------------------------------------------------------------------------


async def test_http_server_killed_then_restarted(http_server: HttpServer) -> None:
    async with opened(http_settings(http_server), probe_interval=0.2, max_backoff=0.5) as source:
        add = tool(source, "add")
        assert (await add.call({"a": 1, "b": 2})).text == "3"
        in_flight = asyncio.create_task(tool(source, "sleep").call({"seconds": 30}))
        await asyncio.sleep(0.5)

        http_server.kill()
        with pytest.raises(McpServerDown, match="the connection closed during the call"):
            await asyncio.wait_for(in_flight, 5)
        # Noticed by the health check, with no call made.
        await eventually(lambda: source.not_ready_reason() == "MCP server 'web' is down: ConnectError: All "
                                                             "connection attempts failed", within=5)
        started = time.monotonic()
        with pytest.raises(McpServerDown, match="MCP server 'web' is down"):
            await add.call({"a": 1, "b": 2})
        assert time.monotonic() - started < 0.5, "a call to a down server must fail at once"
        # Reconnection attempts fail while the server stays away.
        await asyncio.sleep(1.5)
        assert (source.not_ready_reason() or "").startswith("MCP server 'web' is down")

        await asyncio.to_thread(http_server.start)
        await eventually(lambda: source.not_ready_reason() is None, within=5)
        assert (await add.call({"a": 2, "b": 2})).text == "4"


async def test_stdio_server_killed_is_restarted(record: Path) -> None:
    async with opened(stdio_settings(record), max_backoff=0.5) as source:
        (first,) = stdio_pids(record)
        in_flight = asyncio.create_task(tool(source, "sleep").call({"seconds": 30}))
        await asyncio.sleep(0.5)
        os.kill(first, signal.SIGKILL)
        with pytest.raises(McpServerDown, match="the connection closed during the call"):
            await asyncio.wait_for(in_flight, 5)
        await eventually(lambda: source.not_ready_reason() == "MCP server 'files' is down: the server process "
                                                               "exited", within=5)
        with pytest.raises(McpServerDown):
            await tool(source, "add").call({"a": 1, "b": 2})

        await eventually(lambda: source.not_ready_reason() is None)
        (second,) = stdio_pids(record) - {first}
        assert alive(second)
        assert (await tool(source, "add").call({"a": 3, "b": 4})).text == "7"
    await eventually(lambda: not alive(second), within=1)


async def test_close_stops_the_stdio_process_promptly(record: Path) -> None:
    source = McpToolSource(stdio_settings(record), 10.0, 16384)
    await source.start()
    (pid,) = stdio_pids(record)
    assert alive(pid)
    started = time.monotonic()
    await source.close()
    assert time.monotonic() - started < 3
    assert not alive(pid)
    assert source.not_ready_reason() is not None


async def test_close_during_a_call(record: Path) -> None:
    async with opened(stdio_settings(record)) as source:
        call = asyncio.create_task(tool(source, "sleep").call({"seconds": 30}))
        await asyncio.sleep(0.5)
        (pid,) = stdio_pids(record)
        started = time.monotonic()
        await source.close()
        assert time.monotonic() - started < 3
        with pytest.raises(McpServerDown):
            await call
    assert not alive(pid)


# ---- the stdio environment -----------------------------------------------------------------------------


def child_environment(text: str) -> dict[str, str]:
    environment: dict[str, str] = json.loads(text)
    # Python itself sets LC_CTYPE when it starts in the C locale (PEP 538): the test server is a Python program.
    environment.pop("LC_CTYPE", None)
    return environment


async def test_stdio_server_gets_only_its_configured_environment(
    record: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HELIOS_TEST_SECRET", SECRET)
    async with opened(stdio_settings(record, env={"HELIOS_MCP_SAMPLE": "configured"})) as source:
        result = await tool(source, "env").call({})
    assert SECRET not in result.text
    assert child_environment(result.text) == {"HELIOS_MCP_SAMPLE": "configured"}


async def test_stdio_server_gets_a_path_only_when_configured(record: Path) -> None:
    async with opened(stdio_settings(record, env={"PATH": "/usr/bin:/bin", "HOME": "/nowhere"})) as source:
        result = await tool(source, "env").call({})
    assert child_environment(result.text) == {"PATH": "/usr/bin:/bin", "HOME": "/nowhere"}


async def test_a_command_not_on_the_path_is_a_start_error(record: Path) -> None:
    settings = McpServerSettings(name="ghost", command="helios-no-such-mcp-server")
    with pytest.raises(McpStartError, match=r"^MCP server 'ghost' did not start: command "
                                            r"'helios-no-such-mcp-server' is not on the PATH$"):
        await McpToolSource(settings, 10.0, 16384).start()


async def test_a_stdio_server_that_exits_at_once_is_a_start_error(record: Path) -> None:
    settings = McpServerSettings(name="quitter", command=sys.executable, args=["-c", "pass"])
    with pytest.raises(McpStartError, match=r"^MCP server 'quitter' did not start: the server process exited$"):
        await McpToolSource(settings, 10.0, 16384).start()


# ---- HTTP headers --------------------------------------------------------------------------------------


async def test_header_secrets_reach_the_http_server(
    http_server: HttpServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HELIOS_MCP_TEST_TOKEN", "Bearer from-env")
    key_file = tmp_path / "api-key"
    key_file.write_text("from-file\n", encoding="utf-8")
    settings = http_settings(http_server, headers={"X-Plain": "plain"},
                             header_env={"Authorization": "HELIOS_MCP_TEST_TOKEN"},
                             header_files={"X-Api-Key": key_file})
    async with opened(settings) as source:
        result = await tool(source, "headers").call({})
    headers = json.loads(result.text)
    assert headers["x-plain"] == "plain"
    assert headers["authorization"] == "Bearer from-env"
    assert headers["x-api-key"] == "from-file"


async def test_a_missing_header_variable_is_a_start_error(
    http_server: HttpServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HELIOS_MCP_MISSING_TOKEN", raising=False)
    settings = http_settings(http_server, header_env={"Authorization": "HELIOS_MCP_MISSING_TOKEN"})
    with pytest.raises(McpStartError) as caught:
        await McpToolSource(settings, 10.0, 16384).start()
    assert str(caught.value) == ("MCP server 'web' did not start: header 'Authorization': environment variable "
                                 "HELIOS_MCP_MISSING_TOKEN is not set")


async def test_an_unreadable_header_file_is_a_start_error(http_server: HttpServer, tmp_path: Path) -> None:
    settings = http_settings(http_server, header_files={"X-Api-Key": tmp_path / "absent"})
    with pytest.raises(McpStartError, match=r"^MCP server 'web' did not start: header 'X-Api-Key': cannot read "
                                            r".*absent.*: No such file or directory$"):
        await McpToolSource(settings, 10.0, 16384).start()


async def test_an_unreachable_http_server_is_a_start_error() -> None:
    settings = McpServerSettings(name="nowhere", url=f"http://127.0.0.1:{free_port()}/mcp")
    started = time.monotonic()
    with pytest.raises(McpStartError) as caught:
        await McpToolSource(settings, 10.0, 16384).start()
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert message.startswith("MCP server 'nowhere' did not start: ConnectError: ")
    assert "\n" not in message
