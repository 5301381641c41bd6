"""A real MCP server built with the SDK's high-level ``MCPServer``, for the MCP tool source's tests.

Run it as ``python -m tests.support.mcp_servers stdio --record DIR`` (over stdin/stdout) or
``python -m tests.support.mcp_servers http --port N --record DIR`` (streamable HTTP on 127.0.0.1:N, at
``/mcp``). Tools: ``add``, ``echo``, ``fail`` (raises, so the result is an error), ``sleep`` (appends
``cancelled <seconds>`` to ``DIR/cancelled.log`` when the client cancels it), ``env`` (its environment as
JSON), ``headers`` (the HTTP request headers it got, as JSON) and ``image`` (a one-pixel PNG plus a caption).

With ``--record``, ``DIR/ready-<pid>`` is written once the server is up, so a test knows when to connect.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import uvicorn
from mcp.server.mcpserver import Context, Image, MCPServer

from tests.support.server import REPO_ROOT, free_port

__all__ = ["CANCEL_LOG", "ONE_PIXEL_PNG", "SERVER_MODULE", "HttpServer", "build_server", "main"]

SERVER_MODULE = "tests.support.mcp_servers"

CANCEL_LOG = "cancelled.log"
ONE_PIXEL_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


class HttpServer:
    """The test MCP server as a streamable-HTTP process on a fixed loopback port (so it can be restarted)."""

    def __init__(self, record: Path) -> None:
        self.record = record
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.record / "http-server.log").open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", SERVER_MODULE, "http", "--port", str(self.port), "--record", str(self.record)],
                cwd=REPO_ROOT, stdout=log, stderr=log,
            )
        ready = self.record / f"ready-{self.process.pid}"
        deadline = time.monotonic() + 30
        while not ready.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the MCP test server did not start:\n{self.log()}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def log(self) -> str:
        return (self.record / "http-server.log").read_text(encoding="utf-8", errors="replace")



def build_server(record: Path | None) -> MCPServer:
    # CRITICAL: the SDK logs a full traceback for every failing tool, and `fail` fails on purpose.
    server = MCPServer("helios-test-tools", log_level="CRITICAL")

    @server.tool(description="Add two integers.")
    def add(a: int, b: int) -> int:
        return a + b

    @server.tool(description="Return the text unchanged.")
    def echo(text: str) -> str:
        return text

    @server.tool(description="Always fails.")
    def fail() -> str:
        raise RuntimeError("this tool always fails")

    @server.tool(description="Sleep for the given seconds, then say so.")
    async def sleep(seconds: float) -> str:
        try:
            await anyio.sleep(seconds)
        except anyio.get_cancelled_exc_class():
            if record is not None:
                with (record / CANCEL_LOG).open("a", encoding="utf-8") as log:
                    log.write(f"cancelled {seconds}\n")
            raise
        return f"slept {seconds}"

    @server.tool(description="The server process's environment, as JSON.")
    def env() -> str:
        return json.dumps(dict(os.environ))

    @server.tool(description="The HTTP request headers of this call, as JSON.")
    def headers(ctx: Context) -> str:
        return json.dumps(dict(ctx.headers or {}))

    @server.tool(description="A one-pixel image with a caption.", structured_output=False)
    def image() -> list[object]:
        return ["a pixel", Image(data=ONE_PIXEL_PNG, format="png")]

    return server


async def _serve_http(server: MCPServer, port: int, record: Path | None) -> None:
    # Bound before serving, so the server is reachable (connections wait in the backlog) once marked ready.
    listener = socket.create_server(("127.0.0.1", port))
    _mark_ready(record)
    config = uvicorn.Config(server.streamable_http_app(), log_level="warning")
    await uvicorn.Server(config).serve(sockets=[listener])


def _mark_ready(record: Path | None) -> None:
    if record is not None:
        (record / f"ready-{os.getpid()}").write_text("ready", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("transport", choices=["stdio", "http"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--record", type=Path, default=None)
    options = parser.parse_args()
    server = build_server(options.record)
    if options.transport == "stdio":
        _mark_ready(options.record)
        server.run("stdio")
    else:
        anyio.run(_serve_http, server, options.port, options.record)


if __name__ == "__main__":
    main()
