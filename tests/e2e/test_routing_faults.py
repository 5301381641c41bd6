"""Routing under faults switched on at run time: cool-downs and their probes, hangs, resets, slow first chunks.

Two members on the imitation provider, told apart by their upstream model; the tests flip faults on the first
one and count what each received.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest

from tests.e2e.gateway import client, eventually
from tests.support.fake_provider import FakeProvider, Fault, remote_model
from tests.support.server import HeliosProcess

USER = [{"role": "user", "content": "route me"}]
FIRST, SECOND = "gpt-4o", "gpt-4o-mini"
COOLDOWN = 1.0


@pytest.fixture(scope="module")
def gateway(fake_provider: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeliosProcess]:
    config = {
        "models": [remote_model(fake_provider, "one", FIRST, internal=True, timeout=1),
                   remote_model(fake_provider, "two", SECOND, internal=True)],
        "pools": [{"name": "pool", "members": ["one", "two"]}],
        "routing": {"allowed_fails": 2, "failure_window": 30, "cooldown": COOLDOWN, "max_attempts": 3,
                    "backoff_base": 0.01, "backoff_max": 0.05, "first_chunk_timeout": 0.5},
    }
    process = HeliosProcess(config, workdir=tmp_path_factory.mktemp("routing-faults"))
    try:
        process.start(wait_ready=True, timeout=60)
        yield process
    finally:
        process.close()


@pytest.fixture()
def oa(gateway: HeliosProcess, provider: FakeProvider) -> Iterator[openai.OpenAI]:
    yield client(gateway.base_url, timeout=30)
    provider.clear_faults()
    time.sleep(COOLDOWN + 0.1)  # let a cooled member come back, so tests do not see each other's state
    client(gateway.base_url).chat.completions.create(model="pool", messages=USER)  # the probe, if one is due


def _served(oa: openai.OpenAI, **params: Any) -> tuple[str, int]:
    raw = oa.chat.completions.with_raw_response.create(model="pool", messages=USER, **params)
    raw.parse()
    return raw.headers["X-Helios-Served-By"], int(raw.headers["X-Helios-Attempts"])


def test_a_failing_member_cools_down_gets_one_probe_and_comes_back(oa: openai.OpenAI,
                                                                   provider: FakeProvider) -> None:
    provider.reset()
    provider.set_fault(Fault("status", status=500), model=FIRST)
    # Two failures (allowed_fails) cool it down; each of those requests was still answered by the other.
    assert [_served(oa) for _ in range(2)] == [("two", 2), ("two", 2)]
    # Cooling: it gets no traffic at all.
    assert [_served(oa) for _ in range(5)] == [("two", 1)] * 5
    assert provider.request_count(FIRST) == 2
    # After the cool-down one probe reaches it; it still fails, so it cools down again at once.
    time.sleep(COOLDOWN + 0.1)
    assert _served(oa) == ("two", 2)
    assert provider.request_count(FIRST) == 3 and _served(oa) == ("two", 1)
    # Healthy again: the next probe succeeds and it takes the traffic back (priority).
    provider.clear_faults()
    time.sleep(COOLDOWN + 0.1)
    assert [_served(oa) for _ in range(3)] == [("one", 1)] * 3


def test_a_rate_limit_without_retry_after_moves_on(oa: openai.OpenAI, provider: FakeProvider) -> None:
    provider.set_fault(Fault("status", status=429), model=FIRST)
    assert _served(oa) == ("two", 2)


def test_a_retry_after_cools_the_member_for_that_long(oa: openai.OpenAI, provider: FakeProvider) -> None:
    provider.set_fault(Fault("status", status=429, retry_after=0.6, times=1), model=FIRST)
    assert _served(oa) == ("two", 2)
    assert _served(oa) == ("two", 1)  # cooling for the Retry-After, though allowed_fails is 2
    time.sleep(0.7)
    assert _served(oa) == ("one", 1)


def test_a_hanging_member_times_out_and_the_other_answers(oa: openai.OpenAI, provider: FakeProvider) -> None:
    provider.set_fault(Fault("hang", times=1), model=FIRST)
    started = time.monotonic()
    assert _served(oa) == ("two", 2)
    assert time.monotonic() - started < 5
    eventually(lambda: provider.hanging == 0, what="the hanging request to be closed")


def test_a_connection_reset_before_any_byte_moves_on(oa: openai.OpenAI, provider: FakeProvider) -> None:
    provider.set_fault(Fault("reset", after_chunks=0, stream=False, times=1), model=FIRST)
    assert _served(oa) == ("two", 2)


def _stream(gateway: HeliosProcess) -> tuple[httpx2.Headers, list[Any]]:
    events: list[Any] = []
    with httpx2.stream("POST", f"{gateway.base_url}/v1/chat/completions", timeout=30,
                       json={"model": "pool", "messages": USER, "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
        return response.headers, events


@pytest.mark.parametrize("fault", [
    Fault("slow_first_chunk", delay=3, times=1),
    Fault("error_event_first", times=1),
    Fault("status", status=503, times=1),
    Fault("reset", after_chunks=0, times=1),
])
def test_streams_fail_over_invisibly_before_their_first_chunk(gateway: HeliosProcess, oa: openai.OpenAI,
                                                              provider: FakeProvider, fault: Fault) -> None:
    provider.set_fault(fault, model=FIRST)
    headers, events = _stream(gateway)
    assert headers["X-Helios-Served-By"] == "two" and headers["X-Helios-Attempts"] == "2"
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all("error" not in chunk for chunk in chunks) and {c["model"] for c in chunks} == {"pool"}
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "echo: route me"
    # The abandoned attempt's connection was closed, not left to run.
    eventually(lambda: all(s.outcome is not None for s in provider.streams), what="the first stream to end")


def test_a_stream_reset_after_its_first_chunk_ends_with_an_error_event(gateway: HeliosProcess, oa: openai.OpenAI,
                                                                      provider: FakeProvider) -> None:
    provider.set_fault(Fault("reset", after_chunks=2, times=1), model=FIRST)
    headers, events = _stream(gateway)
    assert headers["X-Helios-Served-By"] == "one"
    assert "error" in events[-1] and "[DONE]" not in events
    assert provider.request_count(SECOND) == 0
