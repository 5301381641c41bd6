"""The last word to requests still in flight when the graceful timeout runs out.

Past ``server.graceful_timeout`` Hypercorn cancels what is left: a stream is cut mid-way, which a client cannot
tell from a network failure, and a request still waiting for its answer gets Hypercorn's own bare 500. A
moment before that, :func:`end_in_flight` ends every stream being written with an error event
(``app.streaming.end_open_streams``) and answers every call still waiting for its backend with the same
OpenAI-shaped 503, after cancelling the backend's work as a client's leaving does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from app import streaming
from app.errors import APIError

_Result = TypeVar("_Result")

#: the request tasks waiting for a backend's answer (or a stream's first chunk)
_waiting: set[asyncio.Task[object]] = set()
#: those cancelled by end_in_flight, and the error each is to answer with
_ended: dict[asyncio.Task[object], APIError] = {}


async def answer_of(call: Awaitable[_Result]) -> _Result:
    """Await ``call`` in a request's task; at the graceful timeout it raises the shutdown error instead."""
    task = asyncio.current_task()
    assert task is not None
    _waiting.add(task)
    try:
        return await call
    except asyncio.CancelledError:
        error = _ended.pop(task, None)
        if error is None:  # the client left, or Hypercorn gave up on the task
            raise
        task.uncancel()
        raise error from None
    finally:
        _waiting.discard(task)


def end_in_flight(error: APIError) -> tuple[int, int]:
    """End what is in flight with ``error``: (streams ended with an error event, calls answered with it)."""
    streams = streaming.end_open_streams(error)
    calls = list(_waiting)
    _waiting.clear()
    for task in calls:
        _ended[task] = error
        task.cancel()
    return streams, len(calls)
