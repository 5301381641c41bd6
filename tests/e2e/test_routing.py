"""Pools and fallbacks over imitation providers: where each error class goes, strategies, budgets, streams.

The members are imitation models whose names pick their behaviour (``error-500``, ``error-429`` with a
``Retry-After``, ``error-event`` first thing, ``midstream-fail`` ...); the provider counts the requests it saw,
so the tests check the attempts made, not only the answers.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest

from tests.e2e.gateway import client
from tests.support.fake_provider import FakeProvider, remote_model
from tests.support.server import HeliosProcess

USER = [{"role": "user", "content": "route me"}]


@pytest.fixture(scope="module")
def gateway(fake_provider: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeliosProcess]:
    scratch = tmp_path_factory.mktemp("routing")
    fp = fake_provider

    def member(name: str, upstream: str, **extra: Any) -> dict[str, Any]:
        return remote_model(fp, name, upstream, internal=True, **extra)

    config = {
        "models": [
            member("a", "gpt-4o"), member("b", "gpt-4o-mini"), member("c", "chunks-3"),
            member("e500", "error-500", max_retries=3), member("e500b", "error-503"),
            member("e400", "error-400"), member("e401", "error-401"), member("e429", "error-429"),
            member("slow", "slow-3", timeout=0.4), member("first-error", "error-event"),
            member("breaks", "midstream-fail"),
            member("streamer", "slow-chunks-40"),
            remote_model(fp, "plain", "gpt-4o"),
            remote_model(fp, "limited", "error-429", fallbacks=["plain"]),
        ],
        "pools": [
            {"name": "priority", "members": ["a", "b"]},
            {"name": "weighted", "members": ["a", "b"], "strategy": "weighted", "weights": [3, 1]},
            {"name": "least-busy", "members": ["streamer", "c"], "strategy": "least_busy"},
            {"name": "fails-over", "members": ["e500", "b"]},
            {"name": "client-error", "members": ["e400", "b"]},
            {"name": "gateway-key", "members": ["e401", "b"]},
            {"name": "times-out", "members": ["slow", "b"]},
            {"name": "all-fail", "members": ["e500", "e500b"]},
            {"name": "rate-limited", "members": ["e429"]},
            {"name": "stream-first-error", "members": ["first-error", "c"]},
            {"name": "stream-breaks", "members": ["breaks", "c"]},
            {"name": "with-fallback", "members": ["e500"], "fallbacks": ["priority"]},
        ],
        # Quick back-off and a short cool-down keep the module fast; allowed_fails high so that members
        # shared between tests do not cool down (the cool-down tests use their own pools).
        "routing": {"max_attempts": 3, "backoff_base": 0.01, "backoff_max": 0.05, "allowed_fails": 1000,
                    "max_retry_wait": 1, "first_chunk_timeout": 0.5},
    }
    process = HeliosProcess(config, workdir=scratch)
    try:
        process.start(wait_ready=True, timeout=60)
        yield process
    finally:
        process.close()


@pytest.fixture()
def oa(gateway: HeliosProcess, provider: FakeProvider) -> openai.OpenAI:
    return client(gateway.base_url, timeout=30)


def _chat(oa: openai.OpenAI, model: str, **params: Any) -> tuple[Any, httpx2.Headers]:
    raw = oa.chat.completions.with_raw_response.create(model=model, messages=USER, **params)
    return raw.parse(), raw.headers


def _served(headers: httpx2.Headers) -> tuple[str, int]:
    return headers["X-Helios-Served-By"], int(headers["X-Helios-Attempts"])


def test_a_plain_model_names_itself(oa: openai.OpenAI) -> None:
    reply, headers = _chat(oa, "plain")
    assert _served(headers) == ("plain", 1) and reply.model == "plain"


def test_priority_sticks_to_the_first_healthy_member(oa: openai.OpenAI, provider: FakeProvider) -> None:
    served = Counter(_served(_chat(oa, "priority")[1])[0] for _ in range(20))
    assert served == {"a": 20}
    assert provider.model_counts == {"gpt-4o": 20}


def test_weighted_spreads_by_weight(oa: openai.OpenAI) -> None:
    served = Counter(_served(_chat(oa, "weighted")[1])[0] for _ in range(400))
    # 3:1 -> 300 expected; 5 standard deviations (about 43) of slack.
    assert 257 <= served["a"] <= 343 and served["a"] + served["b"] == 400, served


def test_least_busy_sends_new_requests_to_the_idle_member(gateway: HeliosProcess) -> None:
    # A stream held on the slow member makes the other one the least busy for the next request.
    started = threading.Event()
    finished: list[str] = []

    def hold() -> None:
        with httpx2.stream("POST", f"{gateway.base_url}/v1/chat/completions", timeout=30, json={
                "model": "least-busy", "messages": USER, "stream": True}) as response:
            finished.append(response.headers["X-Helios-Served-By"])
            for _ in response.iter_lines():
                started.set()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert started.wait(10)
        served = [_served(_chat(client(gateway.base_url), "least-busy")[1])[0] for _ in range(5)]
    finally:
        holder.join(timeout=60)
    assert finished == ["streamer"] and served == ["c"] * 5


def test_a_server_error_moves_to_the_next_member(oa: openai.OpenAI, provider: FakeProvider) -> None:
    reply, headers = _chat(oa, "fails-over")
    assert _served(headers) == ("b", 2) and reply.model == "fails-over"
    # One attempt each: the member's own client retries (max_retries = 3) are off under a router.
    assert provider.model_counts == {"error-500": 1, "gpt-4o-mini": 1}


def test_the_clients_own_mistake_is_answered_at_once(oa: openai.OpenAI, provider: FakeProvider) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(oa, "client-error")
    assert caught.value.response.headers["X-Helios-Attempts"] == "1"
    assert caught.value.response.headers["X-Helios-Served-By"] == "e400"
    assert provider.model_counts == {"error-400": 1}


def test_a_provider_refusing_the_gateways_key_is_not_the_clients_fault(oa: openai.OpenAI) -> None:
    assert _served(_chat(oa, "gateway-key")[1]) == ("b", 2)


def test_a_timeout_moves_on(oa: openai.OpenAI) -> None:
    assert _served(_chat(oa, "times-out")[1]) == ("b", 2)


def test_attempts_never_exceed_the_budget(oa: openai.OpenAI, provider: FakeProvider) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        _chat(oa, "all-fail")
    assert caught.value.status_code in (502, 503)
    assert caught.value.response.headers["X-Helios-Attempts"] == "3"
    assert provider.request_count() == 3
    provider.reset()
    with pytest.raises(openai.APIStatusError):
        _chat(oa, "all-fail", extra_headers={"X-Helios-Max-Attempts": "1"})
    assert provider.request_count() == 1


def test_a_fallback_answers_when_every_member_failed(oa: openai.OpenAI, provider: FakeProvider) -> None:
    reply, headers = _chat(oa, "with-fallback")
    assert _served(headers) == ("a", 2) and reply.model == "with-fallback"
    reply, headers = _chat(oa, "limited")
    assert _served(headers) == ("plain", 2)
    with pytest.raises(openai.RateLimitError):
        _chat(oa, "limited", extra_headers={"X-Helios-No-Fallback": "1"})
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(oa, "limited", extra_headers={"X-Helios-Max-Attempts": "lots"})
    assert caught.value.param == "X-Helios-Max-Attempts"


def test_a_rate_limited_member_cools_down_for_its_retry_after(oa: openai.OpenAI, provider: FakeProvider) -> None:
    # The provider says Retry-After: 7, longer than max_retry_wait: its 429 goes back with that header...
    with pytest.raises(openai.RateLimitError) as caught:
        _chat(oa, "rate-limited")
    assert caught.value.response.headers["Retry-After"] == "7"
    # ...and the member is skipped until then: the pool answers 429 itself, saying when to come back.
    with pytest.raises(openai.RateLimitError) as caught:
        _chat(oa, "rate-limited")
    assert caught.value.code == "all_members_cooling_down"
    assert 1 <= int(caught.value.response.headers["Retry-After"]) <= 7
    assert provider.model_counts == {"error-429": 1}


def _stream(gateway: HeliosProcess, model: str) -> tuple[httpx2.Headers, list[Any]]:
    events: list[Any] = []
    with httpx2.stream("POST", f"{gateway.base_url}/v1/chat/completions", timeout=30, json={
            "model": model, "messages": USER, "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
        return response.headers, events


def test_a_stream_fails_over_invisibly_before_its_first_chunk(gateway: HeliosProcess) -> None:
    for model in ("stream-first-error",):
        headers, events = _stream(gateway, model)
        assert _served(headers) == ("c", 2), model
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1] if isinstance(e, dict))
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in events[:-1] if c["choices"])
        assert text == "w1 w2 w3" and all(c["model"] == model for c in events[:-1])


def test_a_stream_that_fails_after_its_first_chunk_ends_with_an_error_event(gateway: HeliosProcess,
                                                                           provider: FakeProvider) -> None:
    headers, events = _stream(gateway, "stream-breaks")
    assert _served(headers) == ("breaks", 1)
    assert "error" in events[-1] and "[DONE]" not in events
    assert provider.model_counts == {"midstream-fail": 1}


def test_routed_names_are_listed_and_members_kept_internal(oa: openai.OpenAI) -> None:
    listed = {model.id for model in oa.models.list()}
    assert {"priority", "weighted", "plain", "limited"} <= listed and "a" not in listed
    with pytest.raises(openai.NotFoundError):
        _chat(oa, "a")
