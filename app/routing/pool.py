"""A served name answered by other backends: a pool of members, fallbacks, or both.

Per request the router walks the members in the strategy's order, skipping those cooling down and those that
would refuse the request before starting it (an embedded engine without capacity, a prompt longer than its
context: spill-over), and tries each until one answers. A failure of a fail-over class moves on at once; when
every member has been tried, a retry round follows after a back-off (full jitter, or the soonest member's
Retry-After when every member is cooling), unless there are fallbacks: those are tried in order as soon as
every member has failed (or the attempt budget is spent). The client's own mistakes (400, 401, 404, 413) are
answered at once. A stream counts as answered at its first chunk: a failure before it (or no chunk within
``first_chunk_timeout``) is invisible to the client and tried elsewhere; after it, the stream ends with its
error event as any stream does.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from app import metrics
from app.backends.base import Backend, CallStats, ChunkStream, close_stream
from app.errors import APIError, invalid_request, upstream_timeout
from app.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from app.routing import policy
from app.routing.health import COOLING, MemberHealth, now
from app.settings import RoutingSettings

_Call = Callable[[Backend, CallStats], Awaitable[Any]]
_COOLING_DOWN = "cooling_down"


@dataclass(slots=True)
class Member:
    name: str
    backend: Backend
    health: MemberHealth
    weight: float
    ok: Any  # the attempts counter of this member's successes, looked up once
    in_flight: int = 0


@dataclass(slots=True)
class _Tally:
    """One request's walk through members and fallbacks."""

    budget: int
    used: int = 0
    last: APIError | None = None
    last_class: str | None = None
    context_missed: bool = False
    queue_missed: bool = False


class RouterBackend(Backend):
    owned_by = "helios-router"

    def __init__(self, name: str, members: list[tuple[str, Backend]], fallbacks: list[tuple[str, Backend]],
                 context_fallbacks: list[tuple[str, Backend]], settings: RoutingSettings, *,
                 strategy: str = "priority", weights: list[float] | None = None) -> None:
        super().__init__(name)
        self._settings = settings
        self._strategy = strategy
        self.members = [
            Member(member, backend, MemberHealth(name, member, settings), (weights or [1.0] * len(members))[i],
                   metrics.pool_attempts.labels(name, member, "ok"))
            for i, (member, backend) in enumerate(members)
        ]
        self._fallbacks = fallbacks
        self._context_fallbacks = context_fallbacks

    async def start(self) -> None:
        """Nothing of its own: the registry starts the members and fallbacks."""

    async def close(self) -> None:
        """Nothing of its own."""

    def not_ready_reason(self) -> str | None:
        reasons = [f"{m.name}: {r}" for m in self.members if (r := m.backend.not_ready_reason()) is not None]
        if len(reasons) < len(self.members):
            return None
        if any(backend.not_ready_reason() is None for _, backend in self._fallbacks + self._context_fallbacks):
            return None
        return "no member is ready (" + "; ".join(reasons) + ")"

    # ---- the routes this backend answers -------------------------------------------------------------

    async def chat(self, request: ChatCompletionRequest, body: bytes, served_as: str, stats: CallStats) -> bytes:
        result: bytes = await self._route(request, stats, lambda b, s: b.chat(request, body, served_as, s))
        return result

    async def chat_stream(
        self, request: ChatCompletionRequest, body: bytes, served_as: str, stats: CallStats
    ) -> ChunkStream:
        stream: ChunkStream = await self._route(
            request, stats, lambda b, s: b.chat_stream(request, body, served_as, s), stream=True)
        return stream

    async def completion(self, request: CompletionRequest, body: bytes, served_as: str, stats: CallStats) -> bytes:
        result: bytes = await self._route(request, stats, lambda b, s: b.completion(request, body, served_as, s))
        return result

    async def completion_stream(
        self, request: CompletionRequest, body: bytes, served_as: str, stats: CallStats
    ) -> ChunkStream:
        stream: ChunkStream = await self._route(
            request, stats, lambda b, s: b.completion_stream(request, body, served_as, s), stream=True)
        return stream

    async def embeddings(self, request: EmbeddingRequest, body: bytes, served_as: str, stats: CallStats) -> bytes:
        result: bytes = await self._route(None, stats, lambda b, s: b.embeddings(request, body, served_as, s))
        return result

    # ---- one request -----------------------------------------------------------------------------------

    async def _route(self, request: ChatCompletionRequest | CompletionRequest | None, stats: CallStats,
                     call: _Call, *, stream: bool = False) -> Any:
        budget = self._settings.max_attempts
        if stats.max_attempts is not None:
            budget = min(budget, stats.max_attempts)
        tally = _Tally(budget)
        try:
            result = await self._members(request, stats, call, tally, stream)
            if result is None and not stats.no_fallback:
                result = await self._fall_back(stats, call, tally, stream)
        finally:
            stats.attempts = tally.used
            stats.retries = max(0, tally.used - 1)
        if result is None:
            raise self._exhausted(tally)
        return result

    def _order(self) -> list[Member]:
        members = self.members
        if self._strategy == "least_busy":
            return sorted(members, key=lambda m: m.in_flight)  # stable: ties keep priority order
        if self._strategy == "weighted" and len(members) > 1:
            left = list(members)
            order = []
            while left:
                pick = random.choices(left, weights=[m.weight for m in left])[0]
                order.append(pick)
                left.remove(pick)
            return order
        return members

    async def _members(self, request: ChatCompletionRequest | CompletionRequest | None, stats: CallStats,
                       call: _Call, tally: _Tally, stream: bool) -> Any:
        round_ = 0
        while tally.used < tally.budget:
            tried = False
            for member in self._order():
                if tally.used >= tally.budget:
                    break
                if request is not None:
                    reason = member.backend.admits(request)
                    if reason is not None:
                        metrics.spillovers.labels(self.name, member.name, reason).inc()
                        if reason == "context":
                            tally.context_missed = True
                        else:
                            tally.queue_missed = True
                        continue
                probe = member.health.acquire(now())
                if probe is None:
                    continue
                tried = True
                tally.used += 1
                result = await self._try_member(member, probe, stats, call, tally, stream)
                if result is not None:
                    return result
            if not tried or tally.used >= tally.budget or tally.last_class is None:
                return None
            if self._fallbacks and not stats.no_fallback:
                # A fallback that can answer now beats waiting for a member to recover.
                return None
            wait = self._retry_wait(round_)
            if wait is None:
                return None
            await asyncio.sleep(wait)
            round_ += 1
        return None

    async def _try_member(self, member: Member, probe: bool, stats: CallStats, call: _Call, tally: _Tally,
                          stream: bool) -> Any:
        attempt = CallStats(tool_steps=stats.tool_steps)
        member.in_flight += 1
        try:
            result = await self._attempt(member.backend, call, attempt, stream)
        except APIError as exc:
            member.in_flight -= 1
            kind = policy.classify(exc, attempt.error_kind)
            metrics.pool_attempts.labels(self.name, member.name, kind).inc()
            if kind in policy.FAILOVER:
                member.health.failed(now(), policy.retry_after(exc) if kind == policy.RATE_LIMIT else None, probe)
                tally.last, tally.last_class = exc, kind
                stats.error_kind = attempt.error_kind
                return None
            member.health.release(probe)
            if kind == policy.CONTEXT:
                tally.context_missed = True
                tally.last = tally.last or exc
                return None
            _copy(stats, attempt)
            stats.served_by = member.name
            raise
        except BaseException:
            member.in_flight -= 1
            member.health.release(probe)
            raise
        member.health.succeeded(probe)
        member.ok.inc()
        stats.served_by = member.name
        if not stream:
            member.in_flight -= 1
            _copy(stats, attempt)
            return result
        return _relay(result, stats, attempt, member)

    async def _fall_back(self, stats: CallStats, call: _Call, tally: _Tally, stream: bool) -> Any:
        cooling = tally.last_class is None and not tally.context_missed and not tally.queue_missed
        if tally.context_missed and tally.last_class is None and self._context_fallbacks:
            targets, why = self._context_fallbacks, policy.CONTEXT
        else:
            targets = self._fallbacks
            # No member failed: each was cooling down, too short for the prompt (context_length), or full.
            why = tally.last_class or (_COOLING_DOWN if cooling else policy.CONTEXT if tally.context_missed
                                       else "queue")
        for name, backend in targets:
            if tally.used >= tally.budget:
                break
            metrics.fallbacks.labels(self.name, name, why).inc()
            attempt = CallStats(tool_steps=stats.tool_steps, max_attempts=tally.budget - tally.used)
            try:
                result = await self._attempt(backend, call, attempt, stream)
            except APIError as exc:
                tally.used += attempt.attempts or 1
                kind = policy.classify(exc, attempt.error_kind)
                if kind not in policy.FAILOVER and kind != policy.CONTEXT:
                    _copy(stats, attempt)
                    stats.served_by = attempt.served_by or name
                    raise
                tally.last, tally.last_class = exc, kind
                why = kind
                continue
            tally.used += attempt.attempts or 1
            stats.served_by = attempt.served_by or name
            if not stream:
                _copy(stats, attempt)
                return result
            return _relay(result, stats, attempt, None)
        return None

    async def _attempt(self, backend: Backend, call: _Call, stats: CallStats, stream: bool) -> Any:
        """One call; for a stream, opened and read to its first chunk (still ours to retry until then)."""
        if not stream:
            return await call(backend, stats)
        chunks: ChunkStream = await call(backend, stats)
        timeout = self._settings.first_chunk_timeout
        try:
            async with asyncio.timeout(timeout):
                first = await anext(chunks, None)
        except TimeoutError:
            await close_stream(chunks)
            stats.error_kind = "timeout"
            raise upstream_timeout(f"No first chunk from '{backend.name}' within {timeout:g} s.") from None
        except BaseException:
            await close_stream(chunks)
            raise
        return first, chunks

    def _retry_wait(self, round_: int) -> float | None:
        """Seconds before the next round: the soonest cooling member's return when all are cooling (if not
        longer than max_retry_wait), else a jittered back-off."""
        clock = now()
        soonest = min(m.health.back_in(clock) for m in self.members)
        settings = self._settings
        if soonest > 0:
            return soonest if soonest <= settings.max_retry_wait else None
        return policy.backoff(round_, settings.backoff_base, settings.backoff_max)

    def _exhausted(self, tally: _Tally) -> APIError:
        if tally.last is not None:
            error = tally.last
        elif tally.context_missed:
            error = invalid_request(f"The prompt fits none of the models behind '{self.name}'.", "messages",
                                    "context_length_exceeded")
        elif tally.queue_missed:
            error = APIError(429, f"Every model behind '{self.name}' is at capacity; retry shortly.",
                             type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        else:
            clock = now()
            waits = [m.health.back_in(clock) for m in self.members if m.health.state == COOLING]
            error = APIError(429, f"Every model behind '{self.name}' is cooling down after failures; retry later.",
                             type="rate_limit_error", code="all_members_cooling_down",
                             headers={"Retry-After": str(max(1, math.ceil(min(waits, default=1.0))))})
        return error


async def _relay(opened: tuple[list[bytes] | None, ChunkStream], stats: CallStats, attempt: CallStats,
                 member: Member | None) -> AsyncIterator[list[bytes]]:
    """The answering stream, its first chunk already read; its accounting lands in the request's stats."""
    first, chunks = opened
    try:
        if first:
            yield first
        async for batch in chunks:
            yield batch
    finally:
        if member is not None:
            member.in_flight -= 1
        await close_stream(chunks)
        _copy(stats, attempt)


def _copy(stats: CallStats, attempt: CallStats) -> None:
    stats.prompt_tokens = attempt.prompt_tokens
    stats.completion_tokens = attempt.completion_tokens
    stats.finish_reasons = attempt.finish_reasons
    stats.error_kind = attempt.error_kind
    if attempt.steps is not None:
        stats.steps, stats.tool_calls = attempt.steps, attempt.tool_calls
