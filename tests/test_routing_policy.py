"""The router's decisions on their own: error classes, back-off bounds, and a member's circuit breaker."""

from __future__ import annotations

import pytest

from app.errors import APIError, invalid_request, not_ready, upstream_timeout, upstream_unavailable
from app.routing import policy
from app.routing.health import COOLING, HEALTHY, PROBING, MemberHealth
from app.settings import RoutingSettings


@pytest.mark.parametrize(("error", "kind", "expected"), [
    (APIError(429, "slow down", headers={"Retry-After": "3"}), "status_4xx", policy.RATE_LIMIT),
    (upstream_timeout("late"), "timeout", policy.TIMEOUT),
    (upstream_unavailable("refused"), "connection", policy.CONNECTION),
    (upstream_unavailable("HTTP 500"), "status_5xx", policy.SERVER_ERROR),
    (upstream_unavailable("broke"), "stream_broken", policy.SERVER_ERROR),
    (not_ready("loading"), None, policy.NOT_READY),
    (invalid_request("too long", "messages", "context_length_exceeded"), None, policy.CONTEXT),
    (invalid_request("bad field", "temperature"), "status_4xx", policy.CLIENT),
    (APIError(401, "no key", code="invalid_api_key"), None, policy.CLIENT),
    (APIError(404, "no model", code="model_not_found"), None, policy.CLIENT),
    (APIError(413, "too big"), None, policy.CLIENT),
])
def test_error_classes(error: APIError, kind: str | None, expected: str) -> None:
    assert policy.classify(error, kind) == expected
    assert (expected in policy.FAILOVER) == (expected not in (policy.CLIENT, policy.CONTEXT))


def test_retry_after_is_read_when_it_is_a_number() -> None:
    assert policy.retry_after(APIError(429, "x", headers={"Retry-After": "2.5"})) == 2.5
    assert policy.retry_after(APIError(429, "x", headers={"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"})) is None
    assert policy.retry_after(APIError(429, "x")) is None


def test_backoff_is_full_jitter_under_the_cap() -> None:
    waits = [policy.backoff(round_, 0.1, 1.0) for round_ in range(8) for _ in range(50)]
    assert all(0 <= wait < 1.0 for wait in waits)
    first = [policy.backoff(0, 0.1, 1.0) for _ in range(200)]
    assert max(first) < 0.1 and min(first) < 0.05  # spread over the whole interval, not bunched at its end


def _health(**settings: float) -> MemberHealth:
    return MemberHealth("pool-test", "member-test", RoutingSettings(**settings))


def test_a_member_cools_down_after_allowed_fails_then_one_probe_decides() -> None:
    health = _health(allowed_fails=2, failure_window=10, cooldown=5)
    health.failed(100.0, None, False)
    assert health.state == HEALTHY and health.acquire(100.1) is False
    health.failed(101.0, None, False)
    assert health.state == COOLING and health.acquire(103.0) is None
    assert health.back_in(103.0) == pytest.approx(3.0)
    # After the cool-down one probe goes through, and only one.
    assert health.acquire(106.1) is True and health.state == PROBING
    assert health.acquire(106.2) is None
    health.failed(106.3, None, True)  # the probe failed: cooling again at once
    assert health.state == COOLING and health.acquire(107.0) is None
    assert health.acquire(111.5) is True
    health.succeeded(True)
    assert health.state == HEALTHY and health.acquire(111.6) is False and health.acquire(111.7) is False


def test_late_answers_to_earlier_attempts_do_not_decide() -> None:
    # Many requests in flight: answers to attempts made before the cool-down arrive after it began.
    health = _health(allowed_fails=2, failure_window=10, cooldown=5)
    health.failed(100.0, None, False)
    health.failed(100.1, None, False)
    assert health.state == COOLING
    health.succeeded(False)  # a late success does not end the cool-down
    health.failed(100.2, None, False)  # nor does a late failure restart it
    assert health.state == COOLING and health.back_in(100.2) == pytest.approx(4.9)
    assert health.acquire(105.2) is True
    health.succeeded(False)
    health.failed(105.3, None, False)  # a late failure while probing is not the probe's verdict
    health.release(False)  # nor does a non-probe attempt free the probe's slot
    assert health.state == PROBING and health.acquire(105.4) is None
    health.succeeded(True)
    assert health.state == HEALTHY


def test_failures_outside_the_window_do_not_add_up() -> None:
    health = _health(allowed_fails=2, failure_window=10, cooldown=5)
    health.failed(100.0, None, False)
    health.failed(111.0, None, False)
    assert health.state == HEALTHY


def test_a_retry_after_cools_a_member_down_for_that_long() -> None:
    health = _health(allowed_fails=5, cooldown=30)
    health.failed(100.0, 2.0, False)
    assert health.state == COOLING and health.back_in(100.5) == pytest.approx(1.5)
    assert health.acquire(102.1) is True


def test_a_probe_that_ends_without_a_verdict_frees_the_slot() -> None:
    health = _health(allowed_fails=1, cooldown=1)
    health.failed(100.0, None, False)
    assert health.acquire(101.5) is True and health.acquire(101.6) is None
    health.release(True)  # the client left, or made its own mistake: nothing learnt about the member
    assert health.state == PROBING and health.acquire(101.7) is True
