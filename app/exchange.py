"""One request's bookkeeping from arrival to the last byte, ending in exactly one access-log line."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from app.backends.base import CallStats

access_log = logging.getLogger("helios.access")

# Probes hit these every few seconds; logging them at INFO would drown the traffic.
_QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})


@dataclass(slots=True)
class Exchange:
    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    model: str | None = None
    stream: bool = False
    stats: CallStats = field(default_factory=CallStats)
    finished: bool = False

    def finish(self, status: int, *, disconnected: bool = False) -> None:
        if self.finished:
            return
        self.finished = True
        level = logging.DEBUG if self.path in _QUIET_PATHS else logging.INFO
        if not access_log.isEnabledFor(level):
            return
        access_log.log(
            level,
            "%s %s %d",
            self.method,
            self.path,
            status,
            extra={
                "method": self.method,
                "path": self.path,
                "model": self.model,
                "status": status,
                "stream": self.stream,
                "duration_ms": round((time.perf_counter() - self.started) * 1000, 3),
                "prompt_tokens": self.stats.prompt_tokens,
                "completion_tokens": self.stats.completion_tokens,
                "retries": self.stats.retries,
                "client_disconnected": disconnected,
            },
        )
