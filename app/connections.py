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

Hypercorn's worker builds a ``TCPServer`` per connection by name, so :class:`_Connection` replaces it when
this module is imported: by ``app.server`` in the serving process, and, with several workers, in each spawned
worker when it unpickles its :class:`HeliosConfig`, before it opens a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from ssl import SSLError

import hypercorn.asyncio.run as hypercorn_run
from hypercorn.asyncio.tcp_server import MAX_RECV, TCPServer
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated


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
            try:
                data = await asyncio.wait_for(self.reader.read(MAX_RECV), self.config.read_timeout)
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


def install() -> None:
    """Make Hypercorn's asyncio (and uvloop) workers serve connections with :class:`_Connection`."""
    if vars(hypercorn_run).get("TCPServer") is TCPServer:
        hypercorn_run.TCPServer = _Connection  # type: ignore[attr-defined]  # imported there, not exported


install()
