"""Routing with an embedded engine as a pool member: spill-over to a remote member when the engine is busy
or the prompt does not fit its context, priority when it is idle, and context-window fallbacks."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

import httpx2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.gateway import client, eventually, validated_chunks
from tests.support.engine import (
    LOCAL,
    LOCAL_FALLBACK,
    LOCAL_ONLY,
    LOCAL_RUNNING,
    LOCAL_SPILL_AT_WAITING,
    POOL,
    REMOTE,
    SMALL_CONTEXT,
    paced,
)
from tests.support.fake_provider import FakeProvider
from tests.support.server import HeliosProcess

#: requests the pool lets into the engine: LOCAL_RUNNING running plus LOCAL_SPILL_AT_WAITING waiting (below the
#: admission's own LOCAL_RUNNING + LOCAL_WAITING, so a direct request still finds room)
POOL_SHARE = LOCAL_RUNNING + LOCAL_SPILL_AT_WAITING
BURST = 12
# Exact lengths (a random model may emit EOS at any step); as long as the context allows, to stay busy.
BUSY_TOKENS = 400
EXACT = {"ignore_eos": True}
#: a busy stream: exact, and paced (400 steps of at least 5 ms), so the engine stays full on a fast machine too
BUSY = {**EXACT, **paced(5)}
USER = [{"role": "user", "content": "Tell me about the weather in Paris."}]
#: far beyond the engine's context, trivial for the remote provider
LONG = [{"role": "user", "content": "word " * (2 * SMALL_CONTEXT)}]


@pytest.fixture(scope="module")
def gateway(engine_gateway: HeliosProcess) -> HeliosProcess:
    return engine_gateway


@pytest.fixture()
def oa(gateway: HeliosProcess) -> openai.OpenAI:
    # The engine should be idle between tests: a test's leftovers would skew the next one's counts.
    eventually(lambda: _metric(gateway, "helios_engine_requests", model=LOCAL) == 0, 30, "the engine to be idle")
    return client(gateway.base_url, timeout=60)


def _value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def _metric(gateway: HeliosProcess, name: str, **labels: str) -> float:
    return _value(httpx2.get(gateway.url("/metrics")).text, name, **labels)


def _engine_counters(gateway: HeliosProcess) -> tuple[float, float, float]:
    """What the engine itself saw: requests finished, prompt tokens and requests in it right now."""
    text = httpx2.get(gateway.url("/metrics")).text
    return (_value(text, "vllm:request_success_total", model_name=LOCAL),
            _value(text, "vllm:prompt_tokens_total", model_name=LOCAL),
            _value(text, "helios_engine_requests", model=LOCAL))


GAUGES = (("helios_engine_requests", f'model="{LOCAL}"'), ("vllm:num_requests_running", f'model_name="{LOCAL}"'),
          ("vllm:num_requests_waiting", f'model_name="{LOCAL}"'))


def _gauge(text: str, name: str, label: str) -> float:
    """One labelled sample, found without parsing the whole exposition (cheap enough to poll)."""
    match = re.search(rf"^{re.escape(name)}\{{[^}}]*{re.escape(label)}[^}}]*\}} (\S+)$", text, re.M)
    return float(match[1]) if match else 0.0


def _routed(raw: Any) -> tuple[str, str]:
    headers = raw.http_response.headers
    return headers["x-helios-served-by"], headers["x-helios-attempts"]


def test_an_idle_engine_serves_the_pool_first(oa: openai.OpenAI) -> None:
    raw = oa.chat.completions.with_raw_response.create(model=POOL, messages=USER, max_tokens=4, extra_body=EXACT)
    assert _routed(raw) == (LOCAL, "1")
    reply = raw.parse()
    assert reply.model == POOL
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    # Not the remote's echo: the engine wrote it.
    assert not (reply.choices[0].message.content or "").startswith("echo:")
    raw = oa.completions.with_raw_response.create(model=POOL, prompt="one two three", max_tokens=3)
    assert _routed(raw) == (LOCAL, "1")


def test_a_prompt_too_long_for_the_engine_goes_to_the_remote_member(
    gateway: HeliosProcess, oa: openai.OpenAI, fake_provider: FakeProvider
) -> None:
    # Too long indeed: the engine by its own name refuses it.
    with pytest.raises(openai.BadRequestError) as refused:
        oa.chat.completions.create(model=LOCAL, messages=LONG, max_tokens=4)
    assert refused.value.code == "context_length_exceeded"
    spilled = _metric(gateway, "helios_spillovers_total", pool=POOL, member=LOCAL, reason="context")
    attempts = _metric(gateway, "helios_pool_attempts_total", pool=POOL, member=LOCAL)
    engine = _engine_counters(gateway)
    upstream = len(fake_provider.requests_for("gpt-4o"))

    raw = oa.chat.completions.with_raw_response.create(model=POOL, messages=LONG, max_tokens=4)
    # The skipped member is no attempt: the remote answered at the first.
    assert _routed(raw) == (REMOTE, "1")
    assert (raw.parse().choices[0].message.content or "").startswith("echo: word word")  # max_tokens cuts the echo
    assert len(fake_provider.requests_for("gpt-4o")) == upstream + 1
    assert _metric(gateway, "helios_spillovers_total", pool=POOL, member=LOCAL, reason="context") == spilled + 1
    assert _metric(gateway, "helios_pool_attempts_total", pool=POOL, member=LOCAL) == attempts
    assert _engine_counters(gateway) == engine, "the engine saw the request"

    # A completion prompt is measured the same way.
    raw = oa.completions.with_raw_response.create(model=POOL, prompt=LONG[0]["content"], max_tokens=4)
    assert _routed(raw) == (REMOTE, "1")
    assert _metric(gateway, "helios_spillovers_total", pool=POOL, member=LOCAL, reason="context") == spilled + 2
    # So is a short prompt whose max_tokens the rest of the context cannot hold.
    raw = oa.chat.completions.with_raw_response.create(model=POOL, messages=USER, max_tokens=SMALL_CONTEXT)
    assert _routed(raw) == (REMOTE, "1")
    raw = oa.completions.with_raw_response.create(model=POOL, prompt="one two", max_tokens=SMALL_CONTEXT)
    assert _routed(raw) == (REMOTE, "1")
    assert _metric(gateway, "helios_spillovers_total", pool=POOL, member=LOCAL, reason="context") == spilled + 4
    assert _metric(gateway, "helios_pool_attempts_total", pool=POOL, member=LOCAL) == attempts
    assert _engine_counters(gateway) == engine


@dataclass
class _Stream:
    served_by: str
    attempts: str
    payloads: list[bytes]


def _burst(gateway: HeliosProcess) -> tuple[list[_Stream | BaseException], dict[str, float], int]:
    """BURST streams to the pool at once (one event loop: threads would queue behind the GIL), with /metrics
    watched meanwhile; then the largest engine gauges seen, and the status of a direct request to the engine
    sent while the pool's share of it was taken."""

    async def one(oa: openai.AsyncOpenAI) -> _Stream:
        async with oa.chat.completions.with_streaming_response.create(
            model=POOL, messages=USER, max_tokens=BUSY_TOKENS, stream=True, extra_body=BUSY,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        ) as response:
            payloads = [line[6:].encode() async for line in response.iter_lines() if line.startswith("data: ")]
            headers = response.headers
            return _Stream(headers["x-helios-served-by"], headers["x-helios-attempts"], payloads)

    async def watch(http: httpx2.AsyncClient, done: asyncio.Event, seen: list[tuple[float, ...]]) -> int:
        direct: asyncio.Task[httpx2.Response] | None = None
        while not done.is_set():
            text = (await http.get("/metrics")).text
            seen.append(tuple(_gauge(text, name, label) for name, label in GAUGES))
            if direct is None and seen[-1][0] >= POOL_SHARE:
                # The pool spills at POOL_SHARE; the engine's own admission still has room for this one.
                body = {"model": LOCAL, "messages": USER, "max_tokens": 2}
                direct = asyncio.create_task(http.post("/v1/chat/completions", json=body))
            await asyncio.sleep(0.02)
        return 0 if direct is None else (await direct).status_code

    async def run() -> tuple[list[_Stream | BaseException], dict[str, float], int]:
        oa = openai.AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        seen: list[tuple[float, ...]] = []
        done = asyncio.Event()
        async with oa, httpx2.AsyncClient(base_url=gateway.base_url, timeout=60) as http:
            watcher = asyncio.create_task(watch(http, done, seen))
            try:
                streams = await asyncio.gather(*(one(oa) for _ in range(BURST)), return_exceptions=True)
            finally:
                done.set()
            direct = await watcher
        peaks = {name: max((s[i] for s in seen), default=0.0) for i, (name, _) in enumerate(GAUGES)}
        return streams, peaks, direct

    return asyncio.run(run())


def test_a_burst_fills_the_engine_and_spills_the_rest_to_the_remote(
    gateway: HeliosProcess, oa: openai.OpenAI
) -> None:
    spilled = _metric(gateway, "helios_spillovers_total", pool=POOL, member=LOCAL, reason="queue")
    streams, peaks, direct = _burst(gateway)
    failed = [s for s in streams if isinstance(s, BaseException)]
    assert not failed, failed
    served = [s for s in streams if isinstance(s, _Stream)]
    local = [s for s in served if s.served_by == LOCAL]
    remote = [s for s in served if s.served_by == REMOTE]
    assert len(local) + len(remote) == BURST, [s.served_by for s in served]
    assert LOCAL_RUNNING <= len(local) <= POOL_SHARE, [s.served_by for s in served]
    assert {s.attempts for s in served} == {"1"}
    for stream in local:
        chunks = validated_chunks(stream.payloads)
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == BUSY_TOKENS
    for stream in remote:
        text = "".join(c["choices"][0]["delta"].get("content") or ""
                       for c in validated_chunks(stream.payloads) if c["choices"])
        assert text == "echo: " + USER[0]["content"]
    # Each request that found the engine full skipped it once, then the remote answered.
    assert _metric(gateway, "helios_spillovers_total", pool=POOL, member=LOCAL, reason="queue") == (
        spilled + len(remote))
    # The engine ran as many as it could at once, and never more than the pool lets in (plus the direct one).
    assert peaks["helios_engine_requests"] >= LOCAL_RUNNING, peaks
    assert peaks["helios_engine_requests"] <= POOL_SHARE + 1, peaks
    # vLLM refreshes this gauge on its own schedule, so a scrape may catch it between steps.
    assert 1 <= peaks["vllm:num_requests_running"] <= LOCAL_RUNNING, peaks
    # spill_at_waiting spills before the admission is full: a request for the engine by name still gets in.
    assert direct == 200
    # After the burst the pool goes local again.
    eventually(lambda: _metric(gateway, "helios_engine_requests", model=LOCAL) == 0, 30, "the engine to be idle")
    raw = oa.chat.completions.with_raw_response.create(model=POOL, messages=USER, max_tokens=2)
    assert _routed(raw) == (LOCAL, "1")


def test_a_context_window_fallback_takes_a_prompt_the_only_member_cannot(
    gateway: HeliosProcess, oa: openai.OpenAI
) -> None:
    raw = oa.chat.completions.with_raw_response.create(model=LOCAL_ONLY, messages=USER, max_tokens=2)
    assert _routed(raw) == (LOCAL, "1")
    labels = {"from": LOCAL_ONLY, "to": REMOTE, "error_class": "context_length"}
    fallbacks = _metric(gateway, "helios_fallbacks_total", **labels)
    spilled = _metric(gateway, "helios_spillovers_total", pool=LOCAL_ONLY, member=LOCAL, reason="context")
    engine = _engine_counters(gateway)
    raw = oa.chat.completions.with_raw_response.create(model=LOCAL_ONLY, messages=LONG, max_tokens=4)
    assert _routed(raw) == (REMOTE, "1")
    assert (raw.parse().choices[0].message.content or "").startswith("echo: word word")  # max_tokens cuts the echo
    assert _metric(gateway, "helios_fallbacks_total", **labels) == fallbacks + 1
    assert _metric(gateway, "helios_spillovers_total", pool=LOCAL_ONLY, member=LOCAL, reason="context") == (
        spilled + 1)
    assert _engine_counters(gateway) == engine
    # Streamed the same way.
    with oa.chat.completions.with_streaming_response.create(
        model=LOCAL_ONLY, messages=LONG, max_tokens=4, stream=True
    ) as response:
        assert response.headers["x-helios-served-by"] == REMOTE
        assert response.headers["x-helios-attempts"] == "1"
        payloads = [line[6:].encode() for line in response.iter_lines() if line.startswith("data: ")]
    validated_chunks(payloads)
    assert _metric(gateway, "helios_fallbacks_total", **labels) == fallbacks + 2


def test_plain_fallbacks_take_a_prompt_the_only_member_cannot_as_a_context_miss(
    gateway: HeliosProcess, oa: openai.OpenAI
) -> None:
    # Without context_window_fallbacks, the pool's fallbacks take it; the metric still says why.
    labels = {"from": LOCAL_FALLBACK, "to": REMOTE}
    context = _metric(gateway, "helios_fallbacks_total", **labels, error_class="context_length")
    every = _metric(gateway, "helios_fallbacks_total", **labels)
    engine = _engine_counters(gateway)
    raw = oa.chat.completions.with_raw_response.create(model=LOCAL_FALLBACK, messages=LONG, max_tokens=4)
    assert _routed(raw) == (REMOTE, "1")
    assert _metric(gateway, "helios_fallbacks_total", **labels, error_class="context_length") == context + 1
    assert _metric(gateway, "helios_fallbacks_total", **labels) == every + 1
    assert _engine_counters(gateway) == engine
