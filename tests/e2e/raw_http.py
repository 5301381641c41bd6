"""HTTP/1.1 over raw asyncio streams, for tests that hold many connections or misbehave on purpose (a thousand
``openai`` clients would cost more CPU than the gateway they test)."""

from __future__ import annotations

import asyncio
import json
import resource
from dataclasses import dataclass
from typing import Any

from app.server import raise_open_files_limit
from bench.loadgen import http_request

__all__ = ["Answer", "chat_body", "connect", "dechunk", "http_request", "raise_fd_limit", "read_answer",
           "sse_payloads"]

_LOOPBACK = "127.0.0.1"


def raise_fd_limit(needed: int) -> None:
    """Lift this process' soft limit on open files as the appliance lifts its own; fail when ``needed`` won't fit."""
    soft = raise_open_files_limit()
    assert soft == resource.RLIM_INFINITY or soft >= needed, f"{needed} open files needed, the limit is {soft}"


def chat_body(model: str, *, stream: bool, text: str = "hello") -> bytes:
    doc: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}]}
    if stream:
        doc["stream"] = True
    return json.dumps(doc).encode()


async def connect(port: int, **options: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(_LOOPBACK, port, **options)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """One response: its head, then a Content-Length or chunked body (read whole)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        return Answer(status, headers, await reader.readexactly(int(headers["content-length"])))
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return Answer(status, headers, bytes(body))
        body += (await reader.readexactly(size + 2))[:-2]


def dechunk(raw: bytes) -> bytes:
    """The body of a chunked transfer encoding, whole (``raw`` starts at the first chunk's size line)."""
    body = bytearray()
    at = 0
    while True:
        end = raw.index(b"\r\n", at)
        size = int(raw[at:end], 16)
        if size == 0:
            return bytes(body)
        body += raw[end + 2:end + 2 + size]
        at = end + 2 + size + 2


def sse_payloads(body: bytes) -> list[bytes]:
    """The ``data:`` payloads of an SSE body, in order; every event must be one ``data:`` line."""
    events = body.split(b"\n\n")
    assert events[-1] == b"", f"the stream does not end with a whole event: {body[-80:]!r}"
    for event in events[:-1]:
        assert event.startswith(b"data: ") and b"\n" not in event, f"unexpected SSE event {event[:80]!r}"
    return [event[6:] for event in events[:-1]]
