"""Stopping the process from inside when something it cannot serve without fails after start-up began.

Backends such as the embedded engine load in the background so /health answers during a long load; if
the load fails the process must still stop with a clear message and a non-zero exit code, as a
configuration mistake would.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)
_failures: list[str] = []


def fail(message: str) -> None:
    """Record why the appliance cannot run, and ask the server to shut down."""
    if not _failures:
        _failures.append(message)
        log.critical("start-up failed: %s", message)
        os.kill(os.getpid(), signal.SIGTERM)


def failure() -> str | None:
    return _failures[0] if _failures else None
