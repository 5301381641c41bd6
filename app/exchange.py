"""One request's bookkeeping from arrival to the last byte: timings, metrics and one access-log line.

Time is split three ways so the appliance's own cost can be measured: waiting on the backend, waiting on
the client to take bytes (a slow reader), and everything else (the overhead).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from prometheus_client import Histogram

from app import metrics
from app.backends.base import CallStats

access_log = logging.getLogger("helios.access")

# Probes hit these every few seconds; logging them at INFO would drown the traffic.
_QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})


@dataclass(slots=True)
class Exchange:
    method: str
    path: str
    route: str
    started: float = field(default_factory=time.perf_counter)
    model: str = metrics.NO_MODEL
    stream: bool = False
    stats: CallStats = field(default_factory=CallStats)
    backend_seconds: float = 0.0
    client_seconds: float = 0.0
    last_chunk: float = 0.0
    in_flight: bool = False
    finished: bool = False
    # The labelled histogram child, looked up once per stream rather than once per chunk.
    _itl: Histogram | None = None

    def serving(self, model: str) -> None:
        """The request was routed to the configured model ``model``: count it in flight."""
        self.model = model
        self.in_flight = True
        metrics.requests_in_flight.labels(model).inc()

    def chunks_arrived(self, now: float) -> None:
        # Inter-token latency is the backend's delivery cadence: what the client sees may be coalesced
        # into fewer writes when it reads slower than tokens arrive.
        if self.last_chunk:
            if self._itl is None:
                self._itl = metrics.inter_token_latency.labels(self.model)
            self._itl.observe(now - self.last_chunk)
        self.last_chunk = now

    def first_chunk_relayed(self, now: float) -> None:
        metrics.time_to_first_token.labels(self.model).observe(now - self.started)

    def finish(self, status: int, *, disconnected: bool = False) -> None:
        if self.finished:
            return
        self.finished = True
        elapsed = time.perf_counter() - self.started
        self._observe(status, elapsed)
        level = logging.DEBUG if self.path in _QUIET_PATHS else logging.INFO
        if access_log.isEnabledFor(level):
            access_log.log(
                level, "%s %s %d", self.method, self.path, status,
                extra={
                    "method": self.method,
                    "path": self.path,
                    "model": self.model,
                    "status": status,
                    "stream": self.stream,
                    "duration_ms": round(elapsed * 1000, 3),
                    "prompt_tokens": self.stats.prompt_tokens,
                    "completion_tokens": self.stats.completion_tokens,
                    "retries": self.stats.retries,
                    **({"steps": self.stats.steps, "tool_calls": self.stats.tool_calls}
                       if self.stats.steps is not None else {}),
                    **({"served_by": self.stats.served_by, "attempts": self.stats.attempts}
                       if self.stats.attempts is not None else {}),
                    "client_disconnected": disconnected,
                },
            )

    def _observe(self, status: int, elapsed: float) -> None:
        model, stats = self.model, self.stats
        metrics.requests_total.labels(model, self.route, str(status)).inc()
        metrics.request_duration.labels(model, self.route).observe(elapsed)
        metrics.overhead.labels(self.route).observe(max(0.0, elapsed - self.backend_seconds - self.client_seconds))
        if not self.in_flight:
            return
        metrics.requests_in_flight.labels(model).dec()
        metrics.upstream_duration.labels(model).observe(self.backend_seconds)
        if stats.prompt_tokens:
            metrics.prompt_tokens.labels(model).inc(stats.prompt_tokens)
        if stats.completion_tokens:
            metrics.completion_tokens.labels(model).inc(stats.completion_tokens)
        for reason in stats.finish_reasons:
            metrics.finish_reasons.labels(model, reason).inc()
        if stats.retries:
            metrics.upstream_retries.labels(model).inc(stats.retries)
        if stats.error_kind:
            metrics.upstream_errors.labels(model, stats.error_kind).inc()
