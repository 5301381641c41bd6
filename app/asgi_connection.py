"""Quart's handling of one HTTP request, with what a held stream pays for and never uses taken out.

A stream holds its request's objects for its whole life, so their size is the appliance's memory per open
stream. Quart's request body keeps two ``asyncio.Event`` objects (a deque each, 1.7 KB) and a copy of the body
in a ``bytearray`` after it was read; and it sends every response through ``asyncio.wait_for``, which is a task
of its own (0.8 KB) even with no time limit, which ours never have. Both are Quart's
documented extension points (``Request.body_class``, ``Quart.asgi_http_class``); the behaviour is Quart's.
Quart also runs each request in a task beside its receiving one (here it runs in Hypercorn's), keeps the last
part it sent of a stream while it waits for the next, and encodes each response's headers anew, though
Hypercorn keeps them for the response's life and most are the same from one response to the next.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Generator, Iterable
from typing import Any, cast

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPResponseBodyEvent
from quart import Request as QuartRequest
from quart.asgi import ASGIHTTPConnection, _handle_exception
from quart.typing import ResponseTypes
from quart.wrappers.request import Body
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.wrappers import Response as WerkzeugResponse

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


class HTTPConnection(ASGIHTTPConnection):
    """Quart's ASGI HTTP connection, handling the request in the task Hypercorn gave it. Quart runs it in a
    task of its own beside the one receiving, and waits for either; here only the receiving has a task, and
    the client leaving (what ends it) cancels the request, as in Quart. Responses have no time limit (Quart's
    ``RESPONSE_TIMEOUT`` and ``Response.timeout`` are not applied): a long generation is not a hung one."""

    async def __call__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        request = self._create_request_from_scope(send)
        task = asyncio.current_task()
        assert task is not None
        handling = True

        def client_left(_: object) -> None:
            # Run by the loop after the receiver ended, maybe after the request did: then it is too late.
            if handling:
                task.cancel()

        receiver = asyncio.ensure_future(self.handle_messages(request, receive))
        receiver.add_done_callback(client_left)
        try:
            await self.handle_request(request, send)
        except asyncio.CancelledError:
            if not receiver.done():
                raise  # cancelled from outside (Hypercorn), not by the client leaving
            task.uncancel()
        finally:
            handling = False
            receiver.remove_done_callback(client_left)
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
        if not receiver.cancelled() and receiver.exception() is not None:
            raise cast(BaseException, receiver.exception())

    async def handle_request(self, request: QuartRequest, send: ASGISendCallable) -> None:
        try:
            response = await self.app.handle_request(request)
        except Exception as error:
            response = await _handle_exception(self.app, error)
        await self._send_response(send, response)

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


# Hypercorn keeps a response's start message, headers included, until the response ends.
@functools.lru_cache(maxsize=1024)
def _encoded_header(name: str, value: str) -> tuple[bytes, bytes]:
    """A response header as ASGI sends it (Quart's encoding); the same pair, as most of ours are from one
    response to the next, shares one tuple instead of a tuple and two bytes per response held."""
    return name.lower().encode(), value.encode()


def _body_message(data: str | bytes) -> HTTPResponseBodyEvent:
    return {"type": "http.response.body", "body": data.encode() if isinstance(data, str) else data, "more_body": True}

