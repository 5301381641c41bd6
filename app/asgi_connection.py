"""Quart's handling of one HTTP request, with what a held stream pays for and never uses taken out.

A stream holds its request's objects for its whole life, so their size is the appliance's memory per open
stream. Quart's request body keeps two ``asyncio.Event`` objects (a deque each, 1.7 KB) and a copy of the body
in a ``bytearray`` after it was read; and it sends every response through ``asyncio.wait_for``, which is a task
of its own (0.8 KB) even with no time limit, which ours never have. Both are Quart's
documented extension points (``Request.body_class``, ``Quart.asgi_http_class``); the behaviour is Quart's.
Quart also runs each request in a task beside a receiving one (here it runs in Hypercorn's, and the receive
events are handed over as they come), reaches it through two coroutines of its own and one of Hypercorn's that
wait all the request's life (:class:`HypercornApp` calls the connection directly), makes a null session per
request (:class:`NoSessions` shares one), keeps the last part it sent of a stream while it waits for the next,
and encodes each response's headers anew, though Hypercorn keeps them for the response's life and most are the
same from one response to the next.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine, Generator, Iterable
from typing import Any

from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    HTTPResponseBodyEvent,
    Scope,
)
from quart import Quart
from quart import Request as QuartRequest
from quart.asgi import ASGIHTTPConnection, _handle_exception
from quart.sessions import NullSession, SecureCookieSessionInterface
from quart.typing import ResponseTypes
from quart.wrappers.request import Body
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.wrappers import Response as WerkzeugResponse

from app.connections import Inbox
from app.wakeup import Wakeup


class RequestBody(Body, Wakeup):
    """A request body as Quart's: awaited whole, or iterated in parts, by one reader at a time. Its parts are
    kept as they arrived and joined once (a body in one part, the usual case, is never copied), and a future
    is made only when the reader has to wait."""

    def __init__(self, expected_content_length: int | None, max_content_length: int | None) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._done = False
        Wakeup.__init__(self)
        self._max_content_length = max_content_length
        # Raised in the app's reading, not in the ASGI receiving that finds it (Quart's contract).
        self._must_raise: Exception | None = None
        if expected_content_length is not None and max_content_length is not None \
                and expected_content_length > max_content_length:
            self._must_raise = RequestEntityTooLarge()

    def __aiter__(self) -> RequestBody:
        return self

    async def __anext__(self) -> bytes:
        while not self._parts and not self._done and self._must_raise is None:
            await self._wait()
        if self._must_raise is not None:
            raise self._must_raise
        if not self._parts:
            raise StopAsyncIteration()
        data = self._joined()
        self.clear()
        return data

    def __await__(self) -> Generator[Any, None, bytes]:
        while not self._done and self._must_raise is None:
            yield from self._wait().__await__()
        if self._must_raise is not None:
            raise self._must_raise
        return self._joined()

    def append(self, data: bytes) -> None:
        if not data or self._must_raise is not None:
            return
        self._parts.append(data)
        self._size += len(data)
        if self._max_content_length is not None and self._size > self._max_content_length:
            self._must_raise = RequestEntityTooLarge()
            self.clear()
            self.set_complete()
        self._wake()

    def set_complete(self) -> None:
        self._done = True
        self._wake()

    def clear(self) -> None:
        self._parts = []
        self._size = 0

    def _joined(self) -> bytes:
        if len(self._parts) > 1:
            self._parts = [b"".join(self._parts)]
        return self._parts[0] if self._parts else b""


class Request(QuartRequest):
    body_class = RequestBody


class NoSessions(SecureCookieSessionInterface):
    """Quart's cookie sessions, which the API never uses (the app has no secret key, so every request gets a
    null session that refuses writes): one null session is shared instead of one made per request."""

    _null = NullSession()

    async def make_null_session(self, app: Quart) -> NullSession:
        return self._null


class HTTPConnection(ASGIHTTPConnection):
    """Quart's ASGI HTTP connection, handling the request in the task Hypercorn gave it. Quart runs it in a
    task of its own beside one awaiting the receive events; here, on our connections (``app.connections``), the
    events are handed over as they come, so a request has no task of its own, nor one receiving. The client
    leaving (the disconnect event) cancels the request, as in Quart. Responses have no time limit (Quart's
    ``RESPONSE_TIMEOUT`` and ``Response.timeout`` are not applied): a long generation is not a hung one."""

    async def __call__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        inbox = getattr(receive, "__self__", None)
        if not isinstance(inbox, Inbox):  # another server's receive channel: Quart's two tasks
            await super().__call__(receive, send)
            return
        request = self._create_request_from_scope(send)
        task = asyncio.current_task()
        assert task is not None
        body = request.body
        left = False

        def received(event: ASGIReceiveEvent) -> None:
            nonlocal left
            if event["type"] == "http.request":
                body.append(event.get("body", b""))
                if not event.get("more_body", False):
                    body.set_complete()
            elif event["type"] == "http.disconnect" and not left:
                left = True
                task.cancel()

        inbox.deliver_to(received)
        try:
            # handle_request inlined: its frame would be held for a stream's whole life.
            await self._send_response(send, await self._response(request))
        except asyncio.CancelledError:
            if not left:
                raise  # cancelled from outside (Hypercorn), not by the client leaving
            task.uncancel()
        finally:
            # A disconnect after the request was handled finds nothing to cancel.
            left = True

    async def handle_request(self, request: QuartRequest, send: ASGISendCallable) -> None:
        # Called only on Quart's own way (another server's receive channel), in Quart's request task.
        await self._send_response(send, await self._response(request))

    async def _response(self, request: QuartRequest) -> ResponseTypes:
        try:
            return await self.app.handle_request(request)
        except Exception as error:
            return await _handle_exception(self.app, error)

    async def _send_response(self, send: ASGISendCallable, response: ResponseTypes) -> None:
        headers = [_encoded_header(name, value) for name, value in response.headers.items()]
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        if isinstance(response, WerkzeugResponse):
            parts: Iterable[str | bytes] = response.response
            for data in parts:
                await send(_body_message(data))
        else:
            async with response.response as body:
                # A held stream waits here for its next part nearly all its life: no local keeps the last one.
                async for data in body:
                    await send(_body_message(data))
                    del data
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class HypercornApp:
    """A Quart app as Hypercorn's worker calls it (its ``AppWrapper``). An HTTP request goes to the app's
    ``asgi_http_class`` at once, as ``Quart.__call__`` and ``Quart.asgi_app`` would hand it on, without their
    coroutines and Hypercorn's own wrapper's waiting in every request for its whole life. Lifespan events, and
    every request of an app whose ``asgi_app`` is wrapped in middleware, take Quart's way."""

    __slots__ = ("_app", "_http")

    def __init__(self, app: Quart) -> None:
        self._app = app
        self._http = None if "asgi_app" in vars(app) else app.asgi_http_class

    def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable,
                 sync_spawn: Callable[..., Any], call_soon: Callable[..., Any]) -> Coroutine[Any, Any, None]:
        if self._http is not None and scope["type"] == "http":
            return self._http(self._app, scope)(receive, send)
        return self._app(scope, receive, send)


# Hypercorn keeps a response's start message, headers included, until the response ends.
@functools.lru_cache(maxsize=1024)
def _encoded_header(name: str, value: str) -> tuple[bytes, bytes]:
    """A response header as ASGI sends it (Quart's encoding); the same pair, as most of ours are from one
    response to the next, shares one tuple instead of a tuple and two bytes per response held."""
    return name.lower().encode(), value.encode()


def _body_message(data: str | bytes) -> HTTPResponseBodyEvent:
    return {"type": "http.response.body", "body": data.encode() if isinstance(data, str) else data, "more_body": True}

