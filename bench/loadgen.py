"""Asyncio load generator on raw sockets (uvloop): HTTP/1.1 keep-alive, non-streaming and SSE.

- ``closed_loop``: ``concurrency`` connections each sending requests back to back, a fixed count in all
  (and a time limit, so it always stops).
- ``open_loop``: requests scheduled at a fixed rate whatever the server does; latency is measured from the
  scheduled send time, so a stalled server is charged for the queue it causes (no coordinated omission).
- Streaming responses record time to first byte, time to the first SSE event, and the arrival time and
  event count of every read, so relay throughput and inter-chunk gaps can be derived.

Event counting is cheap on purpose (``bytes.count(b"data: ")`` per read), so the client is not what limits
a gateway's chunk rate.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

T = TypeVar("T")

_CLOCK = time.perf_counter
_SSE_END = b"\r\n0\r\n\r\n"
_HEADER_LIMIT = 65536


@dataclass(slots=True)
class Result:
    start: float
    status: int = 0
    first_byte: float = 0.0
    first_event: float = 0.0
    end: float = 0.0
    events: int = 0
    nbytes: int = 0
    reads: list[tuple[float, int]] = field(default_factory=list)  # (time, events in that read)
    error: str | None = None

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def ok(self) -> bool:
        return self.error is None and 200 <= self.status < 300


class _Client(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self, record_reads: bool) -> None:
        self.transport: asyncio.Transport | None = None
        self.record_reads = record_reads
        self.waiter: asyncio.Future[None] | None = None
        self.result: Result | None = None
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.head_done = False
        self.buffer = b""
        self.length = -1  # content-length, or -1 for chunked
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._finish("connection closed")

    def _finish(self, error: str | None = None) -> None:
        result, waiter = self.result, self.waiter
        if result is None or waiter is None:
            return
        result.end = _CLOCK()
        if error is not None:
            result.error = error
        self.result = self.waiter = None
        if not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        now = _CLOCK()
        result = self.result
        if result is None:
            return
        if not result.first_byte:
            result.first_byte = now
        result.nbytes += len(data)
        if not self.head_done:
            self.buffer += data
            end = self.buffer.find(b"\r\n\r\n")
            if end == -1:
                if len(self.buffer) > _HEADER_LIMIT:
                    self._finish("header too large")
                return
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            try:
                result.status = int(head[0].split(" ", 2)[1])
            except (IndexError, ValueError):
                self._finish("bad status line")
                return
            self.length = -1
            for line in head[1:]:
                name, _, value = line.partition(":")
                lname = name.strip().lower()
                if lname == "content-length":
                    self.length = int(value.strip())
                elif lname == "connection" and value.strip().lower() == "close":
                    self.closed = True  # the server closes after this response: the next request reconnects
            self.head_done = True
            data = self.buffer[end + 4:]
            self.buffer = b""
        if self.length >= 0:
            self.buffer += data
            if len(self.buffer) >= self.length:
                result.events = 1
                self._finish()
            return
        # chunked SSE: count events, detect the terminal chunk
        # an occurrence split across two reads starts in the previous read's last five bytes
        events = (self.tail[-5:] + data).count(b"data: ") if self.tail else data.count(b"data: ")
        if events:
            if not result.first_event:
                result.first_event = now
            result.events += events
        if self.record_reads:
            result.reads.append((now, events))
        self.tail = (self.tail + data)[-16:]
        if self.tail.endswith(_SSE_END) or self.tail == b"0\r\n\r\n":
            self._finish()

    async def request(self, payload: bytes, start: float | None = None) -> Result:
        assert self.transport is not None
        self._reset()
        result = Result(start=_CLOCK() if start is None else start)
        self.result = result
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        await self.waiter
        return result

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def _connect(host: str, port: int, record_reads: bool) -> _Client:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(lambda: _Client(record_reads), host, port)
    return protocol


def http_request(host: str, port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Accept: */*"]
    lines.extend(f"{k}: {v}" for k, v in (headers or {}).items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def closed_loop(host: str, port: int, payload: bytes, *, concurrency: int, count: int,
                      time_limit: float, record_reads: bool = False,
                      on_result: Callable[[Result], None] | None = None) -> tuple[list[Result], float]:
    """``count`` requests over ``concurrency`` connections; returns results and wall seconds."""
    remaining = count
    results: list[Result] = []
    deadline = _CLOCK() + time_limit

    async def worker() -> None:
        nonlocal remaining
        client: _Client | None = None
        try:
            while remaining > 0 and _CLOCK() < deadline:
                remaining -= 1
                if client is None or client.closed:
                    client = await _connect(host, port, record_reads)
                result = await client.request(payload)
                results.append(result)
                if on_result is not None:
                    on_result(result)
        except OSError as exc:
            results.append(Result(start=_CLOCK(), end=_CLOCK(), error=type(exc).__name__))
        finally:
            if client is not None:
                client.close()

    started = _CLOCK()
    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=time_limit + 30)
    except TimeoutError:
        for task in tasks:
            task.cancel()
    return results, _CLOCK() - started


async def open_loop(host: str, port: int, payload: bytes, *, rate: float, count: int,
                    max_connections: int = 256, time_limit: float = 60.0) -> tuple[list[Result], float]:
    """``count`` requests sent at ``rate`` per second; latency counts from each scheduled send time."""
    idle: list[_Client] = []
    opened = 0
    slots = asyncio.Semaphore(max_connections)
    results: list[Result] = []
    loop = asyncio.get_running_loop()

    async def one(scheduled: float) -> None:
        nonlocal opened
        async with slots:
            client = idle.pop() if idle else None
            try:
                if client is None or client.closed:
                    client = await _connect(host, port, False)
                    opened += 1
                result = await client.request(payload, start=scheduled)
            except OSError as exc:
                result = Result(start=scheduled, end=_CLOCK(), error=type(exc).__name__)
            results.append(result)
            if client is not None and not client.closed:
                idle.append(client)

    started = _CLOCK()
    deadline = started + time_limit
    tasks: list[asyncio.Task[None]] = []
    for i in range(count):
        scheduled = started + i / rate
        if scheduled > deadline:
            break
        delay = scheduled - _CLOCK()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(scheduled)))
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=max(1.0, deadline - _CLOCK()) + 30)
    except TimeoutError:
        for task in tasks:
            task.cancel()
    for client in idle:
        client.close()
    return results, _CLOCK() - started


def run(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run the coroutine ``factory()`` makes, on uvloop when present."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(factory())
    result: T = uvloop.run(factory())
    return result
