"""Server-sent events: reading a provider's stream and framing ours.

A Chat or Completions stream is ``data: <json>\\n\\n`` per chunk and ``data: [DONE]\\n\\n`` last. A failure
after the first byte cannot change the status any more, so it is sent as an OpenAI-shaped ``error`` event and
the stream ends without ``[DONE]``: a client must never mistake a broken answer for a finished one. A Responses
stream's chunks are whole ``event:``/``data:`` frames already (``RESPONSES_FRAMING``): it ends with its own
last event and reports its own failures.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from quart import Response

from app.backends.base import ChunkStream, close_stream
from app.errors import APIError, internal_error
from app.wakeup import Wakeup

log = logging.getLogger(__name__)

_PREFIX = b"data: "
_FAIR_SHARE = 0.002  # seconds a stream may run without letting other tasks in
# Bytes read ahead of a client that reads slower than the backend produces, before the backend is made to wait
# (and, through the provider connection's buffers, the provider). Counted in bytes, not batches: one batch is
# whatever one read of the provider brought (up to 16 KiB), so a bound in batches let a slow reader hold a
# megabyte. This much still lets a fast stream's writer send hundreds of chunks per write.
READ_AHEAD_BYTES = 64 * 1024
_END = object()
_SUFFIX = b"\n\n"
DONE = b"[DONE]"
_DONE_EVENT = b"data: [DONE]\n\n"
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # Tell nginx-style proxies not to buffer, or tokens arrive in bursts.
    "X-Accel-Buffering": "no",
}

class StreamObserver(Protocol):
    """Told about a stream's progress; ``app.exchange.Exchange`` is the one used in practice."""

    backend_seconds: float
    client_seconds: float

    def chunks_arrived(self, now: float) -> None: ...

    def first_chunk_relayed(self, now: float) -> None: ...

    def finish(self, status: int, *, disconnected: bool = False) -> None: ...


def _event(payload: bytes) -> bytes:
    return b"".join((_PREFIX, payload, _SUFFIX))


def _events(batch: list[bytes]) -> bytes:
    if len(batch) == 1:
        return _event(batch[0])
    parts: list[bytes] = []
    for payload in batch:
        parts += (_PREFIX, payload, _SUFFIX)
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class Framing:
    """How one API's stream is written: a batch of chunks to bytes, the closing event, an error event."""

    frame: Callable[[list[bytes]], bytes]
    done: bytes
    error: Callable[[APIError], bytes]


CHAT_FRAMING = Framing(_events, _DONE_EVENT, lambda error: _event(error.to_json()))


def response_error_frame(error: APIError) -> bytes:
    """A Responses ``error`` event; only for a stream that failed outside its own reporting."""
    body = error.body()["error"]
    return b"".join((b"event: error\ndata: ", json.dumps({
        "type": "error", "code": body["code"] or body["type"], "message": body["message"], "param": body["param"],
        "sequence_number": 0}).encode(), _SUFFIX))


RESPONSES_FRAMING = Framing(b"".join, b"", response_error_frame)


class _ReadAhead(Wakeup):
    """The batches between the backend's reader and the client's writer: one of each. The writer takes all
    that is ready at once; the reader waits while what is not taken yet reaches the bound in bytes (a batch
    larger than the bound still goes in, so a stream always moves). Not an ``asyncio.Queue``: its three deques
    are most of what a held stream costs, and a writer that takes everything needs no per-item queue."""

    __slots__ = ("_bound", "_bytes", "_end", "_payloads")

    def __init__(self, bound: int) -> None:
        self._bound = bound
        self._payloads: list[bytes] = []
        self._bytes = 0
        self._end: object = None
        # Only one side ever waits: the writer when nothing is ready, the reader when the bound is reached.
        super().__init__()

    async def put(self, batch: list[bytes]) -> None:
        self._payloads += batch
        self._bytes += sum(map(len, batch))
        self._wake()
        if self._bytes >= self._bound:
            await self._wait()

    def finish(self, end: object) -> None:
        """What ends the stream after the batches put (``_END`` or an exception); the first one counts."""
        if self._end is None:
            self._end = end
        self._wake()

    async def take(self) -> tuple[list[bytes], object]:
        """Every payload ready now (waiting for one), and what ended the stream if that came too."""
        if not self._payloads and self._end is None:
            await self._wait()
        payloads, self._payloads, self._bytes = self._payloads, [], 0
        self._wake()
        return payloads, self._end


async def _pump(chunks: ChunkStream, read_ahead: _ReadAhead, observer: StreamObserver) -> None:
    """Read the backend as fast as it produces, up to the read-ahead bound (then it waits: backpressure)."""
    clock = time.perf_counter
    try:
        async for batch in chunks:
            observer.chunks_arrived(clock())
            await read_ahead.put(batch)
            del batch  # see sse_data: not held while the next is awaited
        read_ahead.finish(_END)
    except Exception as exc:  # handed to the writer, which reports it as an error event
        read_ahead.finish(exc)


class _Open:
    """A stream being written, as :func:`end_open_streams` reaches it."""

    __slots__ = ("pump", "read_ahead")

    def __init__(self, read_ahead: _ReadAhead) -> None:
        self.read_ahead = read_ahead
        self.pump: asyncio.Task[None] | None = None

    def end(self, error: APIError) -> None:
        # The writer takes the error next, whether it waits for the backend or for the client now.
        if self.pump is not None:
            self.pump.cancel()
        self.read_ahead.finish(error)


#: the streams being written: what shutdown ends at its graceful timeout
_open: set[_Open] = set()


def end_open_streams(error: APIError) -> int:
    """End every stream being written with ``error`` as its last event, after what it is sending now; how many.

    The backend's reading stops at once (its request is released as on a client's leaving); the batches read
    ahead (at most ``READ_AHEAD_BYTES``) go out before the error, so the answer is cut short but never has a
    gap. A stream whose end was read already ends as it would have."""
    streams = list(_open)
    _open.clear()
    for stream in streams:
        stream.end(error)
    return len(streams)


async def _frame(
    first: list[bytes], chunks: ChunkStream, observer: StreamObserver, framing: Framing
) -> AsyncIterator[bytes]:
    status = 200
    completed = False
    clock = time.perf_counter
    # Reading and writing run apart after the first batch: the writer takes everything that piled up while
    # the client's socket was busy and sends it as one write, instead of one write (and one wake-up of the
    # client) per chunk. The first batch goes out without waiting for the reader task to start.
    read_ahead = _ReadAhead(READ_AHEAD_BYTES)
    pump: asyncio.Task[None] | None = None
    current = _Open(read_ahead)
    _open.add(current)
    try:
        if first:
            observer.first_chunk_relayed(clock())
            yield framing.frame(first)
        current.pump = pump = asyncio.create_task(_pump(chunks, read_ahead, observer))
        last_pause = clock()
        while True:
            waited = clock()
            payloads, end = await read_ahead.take()
            now = clock()
            observer.backend_seconds += now - waited
            if payloads:
                yield framing.frame(payloads)
                # Time spent suspended in the yield is the client (or its socket buffer) taking the bytes.
                observer.client_seconds += clock() - now
            del payloads  # see sse_data
            if isinstance(end, BaseException):
                raise end
            if end is _END:
                break
            # When chunks are ready and the socket has room, no await above suspends, and a fast stream
            # would hold the event loop until it ends: every other request, /metrics and /health included,
            # would stall. Give way at least every few milliseconds.
            if clock() - last_pause > _FAIR_SHARE:
                await asyncio.sleep(0)
                last_pause = clock()
        if framing.done:
            yield framing.done
        completed = True
    except APIError as exc:
        status = exc.status
        completed = True
        yield framing.error(exc)
    except Exception:
        log.exception("stream failed")
        error = internal_error()
        status = error.status
        completed = True
        yield framing.error(error)
    finally:
        _open.discard(current)
        await _release(pump, chunks)
        observer.finish(status, disconnected=not completed)


async def _release(pump: asyncio.Task[None] | None, chunks: ChunkStream) -> None:
    """Stop the reader and close the backend's iterator: what releases the upstream request (or aborts the
    engine's) when the client leaves."""
    if pump is not None:
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
    await close_stream(chunks)


async def sse_response(
    chunks: ChunkStream, observer: StreamObserver, framing: Framing = CHAT_FRAMING
) -> Response:
    """The stream as an SSE response, once its first batch is in.

    Until then nothing is committed: a backend that fails before its first chunk (a refusal, an error
    event first thing) still answers with its own HTTP status and error body, and the first chunk leaves
    right behind the headers.
    """
    clock = time.perf_counter
    waited = clock()
    try:
        first: list[bytes] = await anext(chunks, [])
    finally:
        observer.backend_seconds += clock() - waited
    if first:
        observer.chunks_arrived(clock())
    # No response time limit applies (app.asgi_connection): a long generation is not a hung one.
    return Response(_frame(first, chunks, observer, framing), status=200, headers=SSE_HEADERS)


async def sse_data(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[bytes]]:
    """The ``data`` payloads of an SSE byte stream, in order, batched as they arrived.

    The first event comes alone, before the rest of its read is split: a fast provider's first read can
    hold a whole answer, and the first token should not wait for all of it.

    What was yielded is let go of before the next read is awaited, here and in the stream's other stages: a
    held stream is idle nearly all its life, and a stage holding its last chunk while it waits (the split
    events, the payloads, the batch) costs a copy of that chunk per stage per open stream (3 KB measured).
    """
    buffer = b""
    first = True
    async for chunk in chunks:
        buffer = buffer + chunk if buffer else chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        if b"\n\n" not in buffer:
            continue
        if first:
            data = None
            while data is None and b"\n\n" in buffer:
                event, _, buffer = buffer.partition(b"\n\n")
                data = _event_data(event)
            del event
            if data is not None:
                first = False
                yield [data]
            del data
            if b"\n\n" not in buffer:
                continue
        batch, buffer = _split(buffer)
        if batch:
            yield batch
        del batch
    if buffer.strip():
        data = _event_data(buffer.strip(b"\n"))
        if data is not None:
            yield [data]


def _split(buffer: bytes) -> tuple[list[bytes], bytes]:
    """The payloads of the whole events in ``buffer``, and what follows the last one."""
    *events, rest = buffer.split(b"\n\n")
    return [data for data in map(_event_data, events) if data is not None], rest


def _event_data(event: bytes) -> bytes | None:
    if event.startswith(_PREFIX) and b"\n" not in event:
        return event[6:]
    lines = [
        line[6:] if line.startswith(_PREFIX) else line[5:]
        for line in event.split(b"\n")
        if line.startswith(b"data:")
    ]
    return b"\n".join(lines) if lines else None
