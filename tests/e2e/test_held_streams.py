"""A thousand streams held open at once through one worker, each getting every chunk in order.

The imitation provider sends one chunk every 100 ms for about ten seconds per stream, so all of them are open
together; the client side is raw asyncio streams (see ``raw_http``). The memory per open stream is a benchmark
figure (``make bench-streams``), not asserted here.
"""

from __future__ import annotations

import asyncio
import json
import time

from tests.e2e.raw_http import chat_body, connect, dechunk, http_request, raise_fd_limit, sse_payloads
from tests.support.fake_provider import FakeProvider
from tests.support.fixtures import HeliosFactory
from tests.support.server import basic_config

STREAMS = 1000
CHUNKS = 100  # words of each answer, one per chunk
CHUNK_MS = 100
_END = b"\r\n0\r\n\r\n"


class _Tally:
    def __init__(self) -> None:
        self.open = 0
        self.peak = 0

    def opened(self) -> None:
        self.open += 1
        self.peak = max(self.peak, self.open)

    def closed(self) -> None:
        self.open -= 1


async def _hold(port: int, request: bytes, tally: _Tally) -> str | None:
    """One stream to its end; what was wrong with it, or None."""
    reader, writer = await connect(port)
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 "):
            return f"answered {head[:40]!r}"
        if b"transfer-encoding: chunked" not in head.lower():
            return "not a chunked stream"
        tally.opened()
        raw = bytearray()
        try:
            while not raw.endswith(_END):
                data = await reader.read(65536)
                if not data:
                    return f"connection closed after {len(raw)} bytes"
                raw += data
        finally:
            tally.closed()
    finally:
        writer.close()
    payloads = sse_payloads(dechunk(bytes(raw)))
    if payloads[-1] != b"[DONE]" or payloads.count(b"[DONE]") != 1:
        return f"ends with {payloads[-1][:60]!r}"
    chunks = [json.loads(p) for p in payloads[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    if text != " ".join(f"w{i}" for i in range(1, CHUNKS + 1)):
        return f"text out of order or incomplete: {text[:40]!r}...{text[-40:]!r}"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    if finishes != ["stop"]:
        return f"finish reasons {finishes}"
    return None


async def test_a_thousand_held_streams_each_get_every_chunk(helios: HeliosFactory, provider: FakeProvider) -> None:
    raise_fd_limit(STREAMS + 256)  # this process holds the client sockets and the provider's
    config = basic_config(provider.base_url, name="held", upstream_model=f"slow-chunks-{CHUNK_MS}-{CHUNKS}",
                          timeout=120)
    config["server"]["log_level"] = "warning"
    gateway = helios(config)
    request = http_request("127.0.0.1", gateway.port, "/v1/chat/completions", chat_body("held", stream=True))
    tally = _Tally()
    started = time.monotonic()
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(_hold(gateway.port, request, tally) for _ in range(STREAMS)), return_exceptions=True),
        timeout=150)
    seconds = time.monotonic() - started
    problems = [o if isinstance(o, str) else repr(o) for o in outcomes if o is not None]
    assert problems == [], f"{len(problems)} of {STREAMS} streams went wrong, e.g. {problems[:5]}"
    # Each stream takes ~10 s and all were opened within a few: the thousand were open together.
    assert tally.peak == STREAMS, f"at most {tally.peak} streams were open at once"
    records = provider.wait_for_streams(STREAMS, timeout=10)
    assert len(records) == STREAMS
    assert {r.outcome for r in records} == {"completed"}
    assert gateway.is_running()
    errors = [line for line in gateway.logs().splitlines() if '"level": "error"' in line or "Traceback" in line]
    assert errors == [], errors[:5]
    print(f"{STREAMS} streams of {CHUNKS} chunks every {CHUNK_MS} ms held in {seconds:.1f} s")
