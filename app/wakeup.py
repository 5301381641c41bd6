"""Waiting for the other side of a hand-off without a queue or an Event: a future is made only when one side
has to wait, and at most one side waits at a time (the reader when nothing is there, the writer when there
is no room). An ``asyncio.Event`` holds a deque of waiters for its whole life; a held stream cannot afford
one in each of its stages."""

from __future__ import annotations

import asyncio


class Wakeup:
    __slots__ = ("_waiter",)

    def __init__(self) -> None:
        self._waiter: asyncio.Future[None] | None = None

    def _wait(self) -> asyncio.Future[None]:
        """What to await until the other side calls :meth:`_wake` (callers check their condition again after).
        The future itself, not a coroutine awaiting it: a waiting stream keeps no frame for it."""
        self._waiter = waiter = asyncio.get_running_loop().create_future()
        return waiter

    def _wake(self) -> None:
        # Let go at once, not when the waiter resumes: a side that wakes the other and then waits itself puts
        # its own future here before the woken one runs. A cancelled wait leaves a done future, skipped here.
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
