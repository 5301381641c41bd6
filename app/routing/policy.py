"""What a failed attempt means for the next one: its error class, and how long to wait before a retry round.

Classes are decided here, from what the backend reported (its HTTP status, error code and the kind it put in
``CallStats.error_kind``), and nowhere else: a pool only asks which class a failure is in.
"""

from __future__ import annotations

import random

from app.errors import APIError

RATE_LIMIT = "rate_limit"
TIMEOUT = "timeout"
CONNECTION = "connection"
SERVER_ERROR = "server_error"
NOT_READY = "not_ready"
CONTEXT = "context_length"
#: the client's own mistake (400 invalid field, 401, 404, 413, ...): answered at once, never tried elsewhere
CLIENT = "client_error"

#: classes that move on to another member or a fallback
FAILOVER = frozenset({RATE_LIMIT, TIMEOUT, CONNECTION, SERVER_ERROR, NOT_READY})


def classify(error: APIError, kind: str | None) -> str:
    """The class of a failed attempt; ``kind`` is the backend's ``error_kind`` for it, if any."""
    status = error.status
    if status == 429:
        return RATE_LIMIT
    if error.code == "context_length_exceeded":
        return CONTEXT
    if status == 504 or kind == "timeout":
        return TIMEOUT
    if status == 503:
        return NOT_READY
    if kind == "connection":
        return CONNECTION
    if status >= 500:
        return SERVER_ERROR
    return CLIENT


def retry_after(error: APIError) -> float | None:
    """The provider's ``Retry-After`` in seconds, when it gave one as a number."""
    value = error.headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def backoff(round_: int, base: float, cap: float) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**round)), so retries of many clients spread out."""
    return random.uniform(0.0, min(cap, base * (2 ** round_)))
