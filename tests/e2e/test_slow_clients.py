"""Slow and idle clients cannot starve others, and a slow reader holds bounded memory.

- Headers trickled in are cut ``server.header_read_timeout`` after their first byte (a whole deadline), an idle
  connection gets ``server.keep_alive_timeout``, a stalled body a 408 after ``server.body_read_timeout``.
- 500 connections trickling their headers a byte a second and 500 sending nothing (each reconnecting when
  closed) leave a normal client's latency near its baseline.
- A client reading a 10,000-chunk stream a byte a millisecond makes the gateway hold only its read-ahead bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import statistics
import time

from bench.procs import rss_bytes
from tests.e2e.raw_http import chat_body, connect, http_request, raise_fd_limit, read_answer, sse_payloads
from tests.support.fake_provider import FakeProvider
from tests.support.fixtures import HeliosFactory
from tests.support.server import HeliosProcess, basic_config

_LORIS = 500
_IDLE = 500
_HEAD_TIMEOUT = 3.0
_IDLE_TIMEOUT = 3.0
_SLACK = 1.5  # seconds the gateway may take beyond a deadline on this shared 2-core machine


def _gateway(helios: HeliosFactory, provider: FakeProvider, upstream: str = "gpt-4o", **server: float) -> HeliosProcess:
    config = basic_config(provider.base_url, name="m", upstream_model=upstream)
    config["server"].update(server, log_level="warning")
    return helios(config)


async def _closed_after(reader: asyncio.StreamReader, started: float, limit: float) -> float:
    """Seconds from ``started`` until the peer closed the connection (reading and dropping what it sends)."""
    async with asyncio.timeout(limit):
        while await reader.read(65536):
            pass
    return time.monotonic() - started


async def _trickle(writer: asyncio.StreamWriter, head: bytes, interval: float) -> None:
    with contextlib.suppress(ConnectionError):
        for i in range(len(head)):
            writer.write(head[i:i + 1])
            await writer.drain()
            await asyncio.sleep(interval)


async def _trickled_until_closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> float:
    """Seconds the appliance let ``head`` trickle in, a byte every 0.2 s, before it closed the connection."""
    started = time.monotonic()
    trickle = asyncio.create_task(_trickle(writer, head, 0.2))
    seconds = await _closed_after(reader, started, 10)
    trickle.cancel()
    writer.close()
    return seconds


async def test_headers_have_a_whole_deadline_and_idle_connections_the_keep_alive_one(
    helios: HeliosFactory, provider: FakeProvider
) -> None:
    gateway = _gateway(helios, provider, header_read_timeout=2.0, keep_alive_timeout=30.0)
    request = http_request("127.0.0.1", gateway.port, "/v1/chat/completions", chat_body("m", stream=False))

    # A new connection trickling its headers, a byte every 0.2 s: never idle for long, cut 2 s on.
    reader, writer = await connect(gateway.port)
    seconds = await _trickled_until_closed(reader, writer, request)
    assert 2.0 - 0.3 <= seconds <= 2.0 + _SLACK, f"closed after {seconds:.2f} s"

    # A kept-alive connection: idle for longer than the header deadline, it still serves; then headers
    # trickled in are cut 2 s after their first byte.
    reader, writer = await connect(gateway.port)
    writer.write(request)
    assert (await read_answer(reader)).status == 200
    await asyncio.sleep(2.5)
    writer.write(request)
    answer = await read_answer(reader)
    assert answer.status == 200 and json.loads(answer.body)["object"] == "chat.completion"
    await asyncio.sleep(1.0)
    seconds = await _trickled_until_closed(reader, writer, request)
    assert 2.0 - 0.3 <= seconds <= 2.0 + _SLACK, f"closed after {seconds:.2f} s"


async def test_an_idle_new_connection_is_closed_after_the_keep_alive_timeout(
    helios: HeliosFactory, provider: FakeProvider
) -> None:
    gateway = _gateway(helios, provider, header_read_timeout=30.0, keep_alive_timeout=1.5)
    reader, writer = await connect(gateway.port)
    seconds = await _closed_after(reader, time.monotonic(), 10)
    writer.close()
    assert 1.5 - 0.3 <= seconds <= 1.5 + _SLACK, f"closed after {seconds:.2f} s"


async def test_a_stalled_body_gets_a_408_within_the_body_timeout(
    helios: HeliosFactory, provider: FakeProvider
) -> None:
    gateway = _gateway(helios, provider, body_read_timeout=1.5)
    body = chat_body("m", stream=False)
    request = http_request("127.0.0.1", gateway.port, "/v1/chat/completions", body)
    reader, writer = await connect(gateway.port)
    writer.write(request[:-len(body) // 2])  # the headers and half the body, then nothing
    started = time.monotonic()
    async with asyncio.timeout(10):
        answer = await read_answer(reader)
    seconds = time.monotonic() - started
    assert 1.5 - 0.3 <= seconds <= 1.5 + _SLACK, f"answered after {seconds:.2f} s"
    assert answer.status == 408
    error = json.loads(answer.body)["error"]
    assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    # The rest of the body will never be read: the connection is closed rather than reused.
    assert await _closed_after(reader, started, 5) < 1.5 + _SLACK
    writer.close()
    assert provider.request_count() == 0
    # A body that arrives in time, slowly, is fine.
    reader, writer = await connect(gateway.port)
    writer.write(request[:-len(body) // 2])
    await asyncio.sleep(0.7)
    writer.write(request[-len(body) // 2:])
    assert (await read_answer(reader)).status == 200
    writer.close()


async def test_a_body_in_many_parts_is_read_whole(helios: HeliosFactory, provider: FakeProvider) -> None:
    """A chunked body in 300 parts: first trickled (the request waits for each part), then all at once (far more
    parts than the receive channel holds, so the connection's reading waits for the app): read whole and in order,
    for a plain answer and for a stream."""
    gateway = _gateway(helios, provider)
    words = [f"w{i:03d}" for i in range(300)]
    for stream in (False, True):
        body = chat_body("m", stream=stream, text=" ".join(words))
        parts = [body[i:i + 7] for i in range(0, len(body), 7)]
        reader, writer = await connect(gateway.port)
        writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{gateway.port}\r\n"
                     "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        for i, part in enumerate(parts):
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            if i < 20:
                await writer.drain()
                await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")
        async with asyncio.timeout(10):
            answer = await read_answer(reader)
        writer.close()
        assert answer.status == 200, answer.body[:200]
        sent = provider.last_request.body
        assert sent["messages"] == [{"role": "user", "content": " ".join(words)}]
        if stream:
            text = "".join(json.loads(p)["choices"][0]["delta"].get("content") or ""
                           for p in sse_payloads(answer.body) if p != b"[DONE]" and json.loads(p)["choices"])
        else:
            text = json.loads(answer.body)["choices"][0]["message"]["content"]
        assert text == "echo: " + " ".join(words)


class _Attack:
    """Connections that trickle headers a byte a second or send nothing, each reopened when the gateway closes
    it; records how long the gateway let each one live."""

    def __init__(self, port: int, head: bytes) -> None:
        self.port = port
        self.head = head
        self.open = 0
        self.peak = 0
        self.lifetimes: dict[str, list[float]] = {"loris": [], "idle": []}
        self.failures: list[str] = []
        self.stopping = asyncio.Event()
        self.all_open = asyncio.Event()

    async def run(self, kind: str) -> None:
        while not self.stopping.is_set():
            try:
                reader, writer = await connect(self.port)
            except OSError as exc:
                self.failures.append(repr(exc))
                await asyncio.sleep(0.5)
                continue
            self.open += 1
            self.peak = max(self.peak, self.open)
            if self.peak >= _LORIS + _IDLE:
                self.all_open.set()
            started = time.monotonic()
            trickle = asyncio.create_task(_trickle(writer, self.head, 1.0)) if kind == "loris" else None
            try:
                reading = asyncio.ensure_future(reader.read(65536))
                stop = asyncio.ensure_future(self.stopping.wait())
                await asyncio.wait([reading, stop], return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if reading.done():
                    # The gateway closing a connection that still sends bytes makes the kernel reset it.
                    error = reading.exception()
                    if isinstance(error, ConnectionResetError) or (error is None and reading.result() == b""):
                        self.lifetimes[kind].append(time.monotonic() - started)
                    else:
                        self.failures.append(f"{kind}: {error!r}" if error else f"{kind}: read {reading.result()!r}")
                else:
                    reading.cancel()
            finally:
                self.open -= 1
                if trickle is not None:
                    trickle.cancel()
                writer.close()


async def _latencies(port: int, request: bytes, count: int, pause: float = 0.02) -> list[float]:
    """``count`` chat calls on one keep-alive connection (reopened if the gateway closes it), each timed."""
    out: list[float] = []
    reader, writer = await connect(port)
    try:
        for _ in range(count):
            started = time.monotonic()
            writer.write(request)
            answer = await read_answer(reader)
            out.append(time.monotonic() - started)
            assert answer.status == 200, answer
            assert json.loads(answer.body)["choices"][0]["message"]["content"] == "echo: hello"
            await asyncio.sleep(pause)
    finally:
        writer.close()
    return out


async def test_slow_and_idle_clients_do_not_starve_a_normal_client(
    helios: HeliosFactory, provider: FakeProvider
) -> None:
    raise_fd_limit(_LORIS + _IDLE + 256)
    gateway = _gateway(helios, provider, header_read_timeout=_HEAD_TIMEOUT, keep_alive_timeout=_IDLE_TIMEOUT)
    request = http_request("127.0.0.1", gateway.port, "/v1/chat/completions", chat_body("m", stream=False))
    await _latencies(gateway.port, request, 20)  # warm-up
    baseline = await _latencies(gateway.port, request, 60)

    attack = _Attack(gateway.port, request)
    tasks = [asyncio.create_task(attack.run("loris")) for _ in range(_LORIS)]
    tasks += [asyncio.create_task(attack.run("idle")) for _ in range(_IDLE)]
    try:
        async with asyncio.timeout(20):
            await attack.all_open.wait()
        # The normal client goes on while all thousand are open and (after 3 s) cut and reopened.
        during = await _latencies(gateway.port, request, 150, pause=0.05)
        assert attack.open >= (_LORIS + _IDLE) // 2, "the attack stopped holding connections"
    finally:
        attack.stopping.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    base_p50, p50 = statistics.median(baseline), statistics.median(during)
    print(f"normal client p50: {base_p50 * 1e3:.1f} ms before, {p50 * 1e3:.1f} ms under attack "
          f"(max {max(during) * 1e3:.0f} ms); connections cut: {len(attack.lifetimes['loris'])} trickling, "
          f"{len(attack.lifetimes['idle'])} idle")
    assert p50 <= 3 * base_p50 + 0.015, f"p50 {p50 * 1e3:.1f} ms under attack, {base_p50 * 1e3:.1f} ms before"
    assert attack.failures == [], attack.failures[:5]
    # Every trickling connection was cut by the header deadline, every idle one by the keep-alive timeout.
    for kind, limit in (("loris", _HEAD_TIMEOUT), ("idle", _IDLE_TIMEOUT)):
        lifetimes = attack.lifetimes[kind]
        assert len(lifetimes) >= (_LORIS if kind == "loris" else _IDLE), f"only {len(lifetimes)} {kind} cut"
        assert max(lifetimes) <= limit + 2 * _SLACK, f"a {kind} connection lived {max(lifetimes):.1f} s"
    assert gateway.is_running()


# ---- a slow reader ----------------------------------------------------------------------------------------

_READERS = 12
_READ_SECONDS = 10.0
_STREAM_CHUNKS = 10_000
# The gateway's read-ahead per stream whose client stops reading: 64 KiB queued (app.streaming.READ_AHEAD_BYTES),
# one write of about that much in the server's socket buffer, and the HTTP client's own read buffer (aiohttp
# pauses the provider's socket at 128 KiB). About 0.3 MB; the bound leaves room for the allocator's rounding.
_HELD_PER_STREAM = 512 * 1024


async def _warm(port: int, request: bytes) -> None:
    reader, writer = await connect(port)
    writer.write(request)
    answer = await read_answer(reader)
    assert answer.status == 200 and answer.body.endswith(b"data: [DONE]\n\n")
    writer.close()


async def _read_slowly(port: int, request: bytes, seconds: float) -> bytes:
    """Read a stream a byte a millisecond for ``seconds``, through a small receive buffer; what was read."""
    sock = socket.socket()
    # A small window, so what the gateway could send is not hidden in this side's kernel buffer.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
    read = bytearray()
    try:
        writer.write(request)
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            read += await reader.read(1)
            await asyncio.sleep(0.001)
    finally:
        writer.close()
    return bytes(read)


async def test_a_slow_reader_makes_the_gateway_hold_only_its_read_ahead(
    helios: HeliosFactory, provider: FakeProvider
) -> None:
    gateway = _gateway(helios, provider, upstream=f"chunks-{_STREAM_CHUNKS}")
    request = http_request("127.0.0.1", gateway.port, "/v1/chat/completions", chat_body("m", stream=True))
    for _ in range(2):  # the first streams warm the code paths and the allocator up
        await _warm(gateway.port, request)
    await asyncio.sleep(0.5)
    provider.reset()
    before = rss_bytes(gateway.pid)
    reads = await asyncio.gather(*(_read_slowly(gateway.port, request, _READ_SECONDS) for _ in range(_READERS)))
    during = rss_bytes(gateway.pid)  # the readers' sockets close just now: the streams were all still held
    records = provider.streams
    stream_bytes = max(r.bytes_sent for r in records)
    for read in reads:
        assert read.startswith(b"HTTP/1.1 200 "), read[:60]
        assert 2_000 <= len(read) <= _READ_SECONDS * 1000  # a byte a millisecond at most, and it did read
        assert b"data: " in read
    held = (during - before) / _READERS
    sent = sum(r.bytes_sent for r in records) / _READERS
    print(f"slow readers: read {statistics.mean(map(len, reads)):,.0f} B each; the provider wrote {sent:,.0f} B of "
          f"{stream_bytes:,} into the connection per stream (kernel buffers take the rest); the gateway's RSS grew "
          f"{held / 1024:,.0f} KiB per stream")
    assert len(records) == _READERS
    assert held <= _HELD_PER_STREAM, f"the gateway holds {held / 1024:,.0f} KiB per slow stream"
    # The readers left: the gateway lets go of every upstream stream it had not finished.
    for record in provider.wait_for_streams(_READERS, timeout=10):
        assert record.outcome in ("completed", "disconnected")
    assert gateway.is_running()
