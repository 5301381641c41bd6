"""One pool member's health: a circuit breaker that cools a failing member down and probes it back.

Healthy, a member takes traffic. After ``allowed_fails`` failures of the fail-over classes within
``failure_window`` seconds, or at once for a provider's ``Retry-After``, it cools down: it is skipped for
``cooldown`` seconds (or the Retry-After). Then it is half-open: one request probes it; success makes it
healthy, failure cools it down again.
"""

from __future__ import annotations

import time
from collections import deque

from app import metrics
from app.settings import RoutingSettings

HEALTHY, COOLING, PROBING = 0, 1, 2


class MemberHealth:
    __slots__ = ("_cooldowns", "_failures", "_gauge", "_settings", "_until", "probing", "state")

    def __init__(self, pool: str, member: str, settings: RoutingSettings) -> None:
        self._settings = settings
        self._failures: deque[float] = deque()
        self._until = 0.0
        self.state = HEALTHY
        #: a probe request is out (half-open admits one at a time)
        self.probing = False
        self._gauge = metrics.pool_member_state.labels(pool, member)
        self._cooldowns = metrics.pool_cooldowns.labels(pool, member)
        self._gauge.set(HEALTHY)

    def acquire(self, now: float) -> bool | None:
        """Whether an attempt may go to this member now: None if not, else whether it is the half-open probe.
        The verdict of an attempt counts only as what it was: with many requests in flight, late answers to
        attempts made before a cool-down must neither end it nor start another."""
        if self.state == HEALTHY:
            return False
        if self.state == COOLING:
            if now < self._until:
                return None
            self._set(PROBING)
        if self.probing:
            return None
        self.probing = True
        return True

    def release(self, probe: bool) -> None:
        """An attempt that said nothing about health (the client left, the client's own mistake) ended."""
        if probe:
            self.probing = False

    def succeeded(self, probe: bool) -> None:
        if probe:
            self.probing = False
            self._failures.clear()
            self._set(HEALTHY)

    def failed(self, now: float, retry_after: float | None, probe: bool) -> None:
        if self.state != HEALTHY and not probe:
            return  # an attempt from before the cool-down: the member is out already
        self.probing = False
        failures = self._failures
        failures.append(now)
        while failures and failures[0] < now - self._settings.failure_window:
            failures.popleft()
        if retry_after is not None or probe or len(failures) >= self._settings.allowed_fails:
            self._until = now + (retry_after if retry_after is not None else self._settings.cooldown)
            failures.clear()
            if self.state != COOLING:
                self._cooldowns.inc()
            self._set(COOLING)

    def back_in(self, now: float) -> float:
        """Seconds until it takes an attempt again (0 when it does now)."""
        if self.state == COOLING:
            return max(0.0, self._until - now)
        return 0.0

    def _set(self, state: int) -> None:
        self.state = state
        self._gauge.set(state)


def now() -> float:
    return time.monotonic()
