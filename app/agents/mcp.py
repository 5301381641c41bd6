"""Tools of a Model Context Protocol server, over stdio or streamable HTTP, through the ``mcp`` SDK.

Each server gets one connection, held open by one background task: the SDK's context managers are anyio
task-scoped (the task that enters them must leave them), so that task enters the client, lists the tools and
then watches the connection. Request tasks call tools through the session it holds; the SDK's dispatcher
matches answers to requests, so calls run concurrently on the one connection.

When the connection ends (the stdio process exits, an HTTP call or health check fails), calls fail at once
with :class:`McpServerDown`, :meth:`McpToolSource.not_ready_reason` says why, and the task reconnects with a
doubling back-off, capped. An HTTP server is checked every ``probe_interval`` seconds and right after a call
fails, as HTTP holds no connection open between calls that could tell of the server going away.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import math
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import Any

import anyio
import httpx2
import mcp_types
from mcp import Client, StdioServerParameters, stdio_client
from mcp.client._transport import ReadStream, Transport, TransportStreams
from mcp.client.stdio import get_default_environment
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage
from mcp_types import CONNECTION_CLOSED, REQUEST_TIMEOUT

from app import __version__
from app.agents.tools import Tool, ToolResult, ToolSource
from app.settings import McpServerSettings

__all__ = ["McpServerDown", "McpStartError", "McpToolSource"]

log = logging.getLogger(__name__)

_CLIENT_INFO = mcp_types.Implementation(name="helios-serve", version=__version__)
_FIRST_RETRY = 0.5
# Generous: a stdio server shuts down in at most ~6 s (stdin closed, 2 s, SIGTERM, 2 s, SIGKILL).
_CLOSE_GRACE = 10.0
_MAX_LISTING_PAGES = 100
# The SDK's default wait between bytes of an HTTP answer; a call may be silent for its whole timeout.
_HTTP_READ_TIMEOUT = 300.0


class McpServerDown(ConnectionError):
    """The server is not connected, or its connection broke during the call."""


class McpStartError(RuntimeError):
    """The server could not be connected at start-up."""


class _SetupError(Exception):
    """The configuration cannot be put to use (a missing header variable, a command not on the PATH)."""


class McpToolSource(ToolSource):
    """The tools of one MCP server, filtered (``allow_tools``, then ``deny_tools``) and renamed (``prefix``).

    ``tool_timeout`` bounds each call (the SDK then sends the server a cancellation) and results longer than
    ``max_tool_output_bytes`` (UTF-8) are cut, with a note. ``connect_timeout`` bounds connecting, listing the
    tools and each health check; ``probe_interval`` is how often an HTTP server is checked; ``max_backoff``
    caps the wait between reconnection attempts (a connection that stays up that long restarts the back-off).

    A stdio server's environment is exactly the entry's ``env``: nothing of the appliance's own environment
    (which holds provider keys) reaches it, not even ``PATH`` or ``HOME`` unless the entry sets them. A bare
    ``command`` is looked up on the appliance's ``PATH`` before starting, so ``command = "npx"`` works without
    passing a ``PATH``; a server that itself runs other programs by name (``npx`` runs ``node``) needs ``PATH``
    in its ``env``. POSIX only: the SDK always hands the child HOME, LOGNAME, PATH, SHELL, TERM and USER, so
    the child is started through ``env -u NAME ...`` to drop those the entry does not set.
    """

    def __init__(
        self,
        settings: McpServerSettings,
        tool_timeout: float,
        max_tool_output_bytes: int,
        *,
        connect_timeout: float = 30.0,
        probe_interval: float = 15.0,
        max_backoff: float = 30.0,
    ) -> None:
        self.settings = settings
        self.label = f"mcp:{settings.name}"
        self._tool_timeout = tool_timeout
        self._max_bytes = max_tool_output_bytes
        self._connect_timeout = connect_timeout
        self._probe_interval = probe_interval if settings.url is not None else math.inf
        self._max_backoff = max_backoff
        self._tools: list[Tool] = []
        self._client: Client | None = None
        self._down: str | None = None
        self._closing = False
        # Set to make the background task look at things now: close(), the stream's end, a failed call.
        self._wake = asyncio.Event()
        self._scope: anyio.CancelScope | None = None
        self._runner: asyncio.Task[None] | None = None
        self._first: asyncio.Future[str | None] | None = None

    # ---- ToolSource --------------------------------------------------------------------------------

    async def start(self) -> None:
        self._first = asyncio.get_running_loop().create_future()
        self._runner = asyncio.create_task(self._run(), name=f"{self.label} connection")
        reason = await self._first
        if reason is not None:
            await self.close()
            raise McpStartError(f"MCP server {self.settings.name!r} did not start: {reason}")

    async def close(self) -> None:
        self._closing = True
        runner = self._runner
        if runner is None:
            return
        self._wake.set()
        if self._client is None and self._scope is not None:
            # Still connecting: there is no session to end gracefully, only the attempt to abandon.
            self._scope.cancel()
        done, _ = await asyncio.wait({runner}, timeout=_CLOSE_GRACE)
        if not done:
            log.error("%s: the connection did not close within %g s; cancelling it", self.label, _CLOSE_GRACE)
            runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)

    def tools(self) -> list[Tool]:
        return self._tools

    def not_ready_reason(self) -> str | None:
        if self._client is not None:
            return None
        return self._down or f"MCP server {self.settings.name!r} is not connected"

    # ---- calls -------------------------------------------------------------------------------------

    async def call(self, remote_name: str, arguments: dict[str, Any]) -> ToolResult:
        """Call the server's tool ``remote_name`` (its own name, without the prefix)."""
        client = self._client
        if client is None:
            raise McpServerDown(self.not_ready_reason())
        try:
            result = await client.call_tool(remote_name, arguments, read_timeout_seconds=self._tool_timeout)
        except MCPError as exc:
            if exc.code == REQUEST_TIMEOUT:
                raise TimeoutError(f"MCP tool {remote_name!r} gave no answer within {self._tool_timeout:g} s "
                                   "(the call was cancelled)") from None
            self._wake.set()
            if exc.code == CONNECTION_CLOSED:
                raise McpServerDown(f"MCP server {self.settings.name!r}: the connection closed during the "
                                    "call") from exc
            raise
        return ToolResult(_cut(_result_text(result), self._max_bytes), is_error=result.is_error)

    # ---- the background task -----------------------------------------------------------------------

    async def _run(self) -> None:
        delay = _FIRST_RETRY
        try:
            while not self._closing:
                started = time.monotonic()
                reason = await self._connection()
                if self._closing:
                    return
                if self._first is not None and not self._first.done():
                    self._first.set_result(reason)
                    return
                self._down = f"MCP server {self.settings.name!r} is down: {reason}"
                if time.monotonic() - started >= self._max_backoff:
                    delay = _FIRST_RETRY
                log.warning("%s; reconnecting in %g s", self._down, delay)
                self._wake.clear()
                with anyio.move_on_after(delay):
                    await self._wake.wait()
                delay = min(delay * 2, self._max_backoff)
        finally:
            self._client = None
            if self._first is not None and not self._first.done():
                self._first.set_result("closed while connecting")

    async def _connection(self) -> str:
        """Connect, list the tools and watch the connection until it ends; returns why it ended."""
        stream_ended = anyio.Event()

        def on_stream_end() -> None:
            stream_ended.set()
            self._wake.set()

        reason: str | None = None
        with anyio.CancelScope() as scope:
            self._scope = scope
            scope.deadline = anyio.current_time() + self._connect_timeout
            try:
                transport = _watched(self._transport(), on_stream_end)
                async with Client(transport, cache=None, client_info=_CLIENT_INFO) as client:
                    self._adopt(await _list_tools(client))
                    scope.deadline = math.inf
                    self._client, self._down = client, None
                    if self._first is not None and not self._first.done():
                        self._first.set_result(None)
                    log.info("%s connected: %d tools", self.label, len(self._tools))
                    try:
                        reason = await self._watch(client, stream_ended)
                    finally:
                        self._client = None
            except Exception as exc:
                reason = reason or (self._end_of_stream() if stream_ended.is_set() else _describe(exc))
            finally:
                self._scope = None
        if reason is None:
            # Only the connect deadline or close() cancels the scope.
            reason = f"no answer within {self._connect_timeout:g} s"
        return reason

    async def _watch(self, client: Client, stream_ended: anyio.Event) -> str:
        while True:
            with anyio.move_on_after(self._probe_interval):
                await self._wake.wait()
            self._wake.clear()
            if self._closing:
                return "closed"
            if stream_ended.is_set():
                return self._end_of_stream()
            if self.settings.url is not None:
                with anyio.move_on_after(self._connect_timeout) as probe:
                    try:
                        await client.list_tools()
                    except MCPError as exc:
                        return f"health check failed: {exc.message}"
                if probe.cancelled_caught:
                    return f"no answer to a health check within {self._connect_timeout:g} s"

    def _end_of_stream(self) -> str:
        return "the server process exited" if self.settings.command is not None else "the connection closed"

    def _transport(self) -> Transport:
        if self.settings.command is not None:
            return stdio_client(_stdio_parameters(self.settings))
        assert self.settings.url is not None
        return _http_transport(self.settings.url, _headers(self.settings),
                               httpx2.Timeout(self._connect_timeout,
                                              read=max(_HTTP_READ_TIMEOUT, 2 * self._tool_timeout)))

    def _adopt(self, listed: list[mcp_types.Tool]) -> None:
        allowed, denied = self.settings.allow_tools, set(self.settings.deny_tools)
        if allowed is not None and (unknown := sorted(set(allowed) - {tool.name for tool in listed})):
            log.warning("%s: allow_tools names tools the server does not have: %s", self.label, ", ".join(unknown))
        tools: list[Tool] = []
        for tool in listed:
            if (allowed is not None and tool.name not in allowed) or tool.name in denied:
                continue
            parameters = _object_schema(tool.input_schema)
            if parameters is None:
                log.warning("%s: tool %r is left out: its input schema is not an object schema", self.label,
                            tool.name)
                continue
            tools.append(_McpTool(self, tool.name, self.settings.prefix + tool.name, tool.description or "",
                                  parameters))
        self._tools = tools


class _McpTool(Tool):
    def __init__(self, source: McpToolSource, remote_name: str, name: str, description: str,
                 parameters: dict[str, Any]) -> None:
        self._source = source
        self.server = source.settings.name
        self.remote_name = remote_name
        self.name = name
        self.description = description
        self.parameters = parameters

    async def call(self, arguments: dict[str, Any]) -> ToolResult:
        return await self._source.call(self.remote_name, arguments)


# ---- transports --------------------------------------------------------------------------------------


def _stdio_parameters(settings: McpServerSettings) -> StdioServerParameters:
    assert settings.command is not None
    command = settings.command if os.sep in settings.command else shutil.which(settings.command)
    if command is None:
        raise _SetupError(f"command {settings.command!r} is not on the PATH")
    env_program = shutil.which("env")
    if env_program is None:
        raise _SetupError("the 'env' program (which starts the server with only its configured environment) "
                          "is not on the PATH")
    unset = [part for name in sorted(set(get_default_environment()) - set(settings.env)) for part in ("-u", name)]
    return StdioServerParameters(command=env_program, args=[*unset, "--", command, *settings.args],
                                 env=dict(settings.env), cwd=settings.cwd)


def _headers(settings: McpServerSettings) -> dict[str, str]:
    headers = dict(settings.headers)
    for header, variable in settings.header_env.items():
        value = os.environ.get(variable, "").strip()
        if not value:
            raise _SetupError(f"header {header!r}: environment variable {variable} is not set")
        headers[header] = value
    for header, path in settings.header_files.items():
        try:
            headers[header] = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise _SetupError(f"header {header!r}: cannot read {str(path)!r}: {exc.strerror}") from None
    return headers


@asynccontextmanager
async def _http_transport(url: str, headers: dict[str, str], limits: httpx2.Timeout) -> AsyncIterator[TransportStreams]:
    # The SDK's transport leaves a client it is given open; this one is ours to close.
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(httpx2.AsyncClient(headers=headers, timeout=limits))
        yield await stack.enter_async_context(streamable_http_client(url, http_client=http))


@asynccontextmanager
async def _watched(transport: Transport, on_end: Callable[[], None]) -> AsyncIterator[TransportStreams]:
    """The transport, with its read stream reporting its end: when a stdio server exits the SDK's session
    only fails the calls then pending, and the source must learn of it to reconnect."""
    async with transport as (read_stream, write_stream):
        yield _EndReportingStream(read_stream, on_end), write_stream


class _EndReportingStream:
    """A transport's read stream that calls ``on_end`` when it ends or is closed."""

    def __init__(self, inner: ReadStream[SessionMessage | Exception], on_end: Callable[[], None]) -> None:
        self._inner = inner
        self._on_end = on_end

    @property
    def last_context(self) -> contextvars.Context | None:
        # The SDK's dispatcher looks for the sender's context on the stream (the HTTP transport's has one).
        context: contextvars.Context | None = getattr(self._inner, "last_context", None)
        return context

    async def receive(self) -> SessionMessage | Exception:
        try:
            return await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self._on_end()
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()

    def __aiter__(self) -> _EndReportingStream:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> _EndReportingStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc_val: BaseException | None,
                        exc_tb: TracebackType | None) -> None:
        await self.aclose()


# ---- results ------------------------------------------------------------------------------------------


async def _list_tools(client: Client) -> list[mcp_types.Tool]:
    tools: list[mcp_types.Tool] = []
    cursor: str | None = None
    for _ in range(_MAX_LISTING_PAGES):
        page = await client.list_tools(cursor=cursor)
        tools += page.tools
        cursor = page.next_cursor
        if cursor is None:
            return tools
    raise _SetupError(f"the tool listing goes on for more than {_MAX_LISTING_PAGES} pages")


def _object_schema(schema: dict[str, Any]) -> dict[str, Any] | None:
    """The input schema as the object schema function calling needs (``properties`` may be left out in MCP),
    or None when it describes something else."""
    if schema.get("type", "object") != "object":
        return None
    return {"type": "object", "properties": {}, **schema}


def _result_text(result: mcp_types.CallToolResult) -> str:
    parts = [_content_text(block) for block in result.content]
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    return "\n".join(parts)


def _content_text(block: mcp_types.ContentBlock) -> str:
    """Text as it is; what a model given text cannot see (images, audio, binary resources) named in brackets."""
    if isinstance(block, mcp_types.TextContent):
        return block.text
    if isinstance(block, mcp_types.ImageContent):
        return f"[image: {block.mime_type}]"
    if isinstance(block, mcp_types.AudioContent):
        return f"[audio: {block.mime_type}]"
    if isinstance(block, mcp_types.ResourceLink):
        return f"[resource link: {block.uri}]"
    if isinstance(block.resource, mcp_types.TextResourceContents):
        return block.resource.text
    return f"[resource: {block.resource.uri}]"


def _cut(text: str, limit: int) -> str:
    """At most ``limit`` bytes of UTF-8, the note included (so the loop's own cut finds nothing to do)."""
    data = text.encode()
    if len(data) <= limit:
        return text
    note = "\n[output cut: {} bytes, only the first {} are shown]"
    kept = data[: limit - len(note.format(len(data), limit).encode())].decode(errors="ignore")
    return kept + note.format(len(data), len(kept.encode()))


def _describe(error: BaseException) -> str:
    """One line for the first underlying error (the SDK's task groups wrap them in exception groups)."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    text = " ".join(str(error).split())
    if isinstance(error, _SetupError | MCPError):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
