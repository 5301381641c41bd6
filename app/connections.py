"""A whole deadline for request headers on Hypercorn's connections (``server.header_read_timeout``).

Hypercorn (0.17, 0.18) keeps one timer per connection: started when the connection opens and when a response
ends, stopped when a request's headers are complete, and closing the connection when ``keep_alive_timeout``
runs out. Bytes arriving do not restart it, so it is already a whole deadline, but one clock for two things:
an idle connection waiting for its next request, and a request whose headers are under way. Its only other
option, ``read_timeout``, is idle time between reads of the whole connection, which a byte-a-second client
never trips and which would cut every long stream (the client sends nothing while it reads).

Here the first bytes of a request that leave its headers incomplete swap that timer for one of
``header_read_timeout`` (as nginx's ``client_header_timeout``): an idle connection is closed after
``keep_alive_timeout``, headers trickled in are cut ``header_read_timeout`` after their first byte. Headers that
arrive whole in one read (every ordinary client) never touch the timer, so the hot path costs one comparison
per read. The request body has its own deadline in the routes (``app.routes.calls.read_body``).

Each request's ASGI receive channel is an :class:`Inbox` instead of Hypercorn's ``asyncio.Queue``: the queue's
three deques and its Event are 3 KB a connection, held for a stream's whole life by a channel that carries a
request's one body message and its disconnect; and our HTTP connection (``app.asgi_connection``) takes the events
from it as they come instead of running a task to await them. Each connection's ``can_read`` event is an
:class:`_Event`, not an ``asyncio.Event`` and its deque. And a read with no ``read_timeout`` (the default) is
awaited as it is, not through ``wait_for``, which would make a task per read.

Hypercorn's worker builds a ``TCPServer`` (and its task group) per connection by name, so :class:`_Connection`
and :class:`_TaskGroup` replace them when this module is imported: by ``app.server`` in the serving process, and,
with several workers, in each spawned worker when it unpickles its :class:`HeliosConfig`, before it opens a
connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from ssl import SSLError
from typing import Any

import hypercorn.asyncio.run as hypercorn_run
import hypercorn.asyncio.tcp_server as hypercorn_tcp_server
from hypercorn.asyncio.task_group import TaskGroup, _handle
from hypercorn.asyncio.tcp_server import MAX_RECV, TCPServer
from hypercorn.asyncio.worker_context import EventWrapper, WorkerContext
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.typing import AppWrapper, ASGIReceiveEvent, ASGISendEvent, Scope


class HeliosConfig(Config):
    """Hypercorn's configuration plus the options :class:`_Connection` reads."""

    header_read_timeout: float = 60.0


class _Connection(TCPServer):
    """Hypercorn's TCP connection, giving a request's headers a deadline of their own."""

    # The state Hypercorn last reported (idle: no request under way), and how many reports it made: a read
    # that changed neither began a request whose headers are not complete yet.
    _idle = True
    _updates = 0
    _head_timed = False

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, Updated):
            self._idle = event.idle
            self._updates += 1
            self._head_timed = False
        await super().protocol_send(event)

    async def _read_data(self) -> None:
        # Hypercorn 0.18's loop, with the check after each read.
        while not self.reader.at_eof():
            timeout = self.config.read_timeout
            try:
                read = self.reader.read(MAX_RECV)
                data = await (read if timeout is None else asyncio.wait_for(read, timeout))
            except (ConnectionError, OSError, TimeoutError, SSLError):
                break
            updates = self._updates
            await self.protocol.handle(RawData(data))
            if data and self._idle and not self._head_timed and updates == self._updates:
                self._head_timed = True
                await self.idle_task.restart(self._task_group, self._head_timeout)
        await self.protocol.handle(Closed())

    async def _head_timeout(self) -> None:
        timeout = getattr(self.config, "header_read_timeout", self.config.keep_alive_timeout)
        # As Hypercorn's idle timer: a server shutting down closes waiting connections at once.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.context.terminated.wait(), timeout)
        await asyncio.shield(self._initiate_server_close())


class Inbox:
    """A request's ASGI receive events, from Hypercorn's protocol to the app, at most ``limit`` waiting (the
    queue's bound: a client sending a body faster than the app takes it is made to wait), or handed to the
    app as they come once it asks for that (:meth:`deliver_to`)."""

    __slots__ = ("_deliver", "_events", "_limit", "_waiters")

    def __init__(self, limit: int) -> None:
        self._events: list[ASGIReceiveEvent] = []
        self._limit = limit
        # Hardly ever more than one: the app waiting for an event, or the protocol for room.
        self._waiters: list[asyncio.Future[None]] = []
        self._deliver: Callable[[ASGIReceiveEvent], None] | None = None

    async def put(self, event: ASGIReceiveEvent) -> None:
        while self._deliver is None and 0 < self._limit <= len(self._events):
            await self._wait()
        if self._deliver is not None:
            self._deliver(event)
            return
        self._events.append(event)
        self._wake()

    async def get(self) -> ASGIReceiveEvent:
        while not self._events:
            await self._wait()
        event = self._events.pop(0)
        self._wake()
        return event

    def deliver_to(self, receiver: Callable[[ASGIReceiveEvent], None]) -> None:
        """Hand every event to ``receiver`` as it is put (those waiting now first), instead of keeping it for
        :meth:`get`: an app whose handling of an event never waits needs no task of its own to receive."""
        self._deliver = receiver
        events, self._events = self._events, []
        for event in events:
            receiver(event)
        self._wake()

    async def _wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            self._waiters.remove(waiter)

    def _wake(self) -> None:
        # Every waiter looks again (put and get loop on their condition), so none is left behind.
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)


class _Event:
    """Hypercorn's asyncio event (its ``WorkerContext.event_class``) without an ``asyncio.Event`` inside: a
    connection keeps one (its protocol's ``can_read``) for its whole life, and an Event's deque of waiters is
    most of its size. Waiters, when there are any, are futures in a list made for them."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] | None = None

    async def clear(self) -> None:
        self._set = False

    async def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self) -> None:
        if self._set:
            return
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            # A cancelled wait leaves; one that was woken is in no list any more.
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)

    def is_set(self) -> bool:
        return self._set


class _TaskGroup(TaskGroup):
    """Hypercorn's connection task group, giving each request an :class:`Inbox`."""

    async def spawn_app(
        self,
        app: AppWrapper,
        config: Config,
        scope: Scope,
        send: Callable[[ASGISendEvent | None], Awaitable[None]],
    ) -> Callable[[ASGIReceiveEvent], Awaitable[None]]:
        inbox = Inbox(config.max_app_queue_size)
        self.spawn(_handle, app, config, scope, inbox.get, send, partial(self._loop.run_in_executor, None),
                   self._call_soon)
        return inbox.put

    def _call_soon(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
        # For an app's synchronous code running in the executor: the coroutine runs on the loop.
        return asyncio.run_coroutine_threadsafe(func(*args), self._loop).result()


def install() -> None:
    """Make Hypercorn's asyncio (and uvloop) workers serve connections with :class:`_Connection`,
    :class:`_TaskGroup` and :class:`_Event`."""
    if WorkerContext.event_class is EventWrapper:
        WorkerContext.event_class = _Event
    if vars(hypercorn_run).get("TCPServer") is TCPServer:
        hypercorn_run.TCPServer = _Connection  # type: ignore[attr-defined]  # imported there, not exported
    if vars(hypercorn_tcp_server).get("TaskGroup") is TaskGroup:
        hypercorn_tcp_server.TaskGroup = _TaskGroup  # type: ignore[attr-defined]  # the name its run() looks up


install()
