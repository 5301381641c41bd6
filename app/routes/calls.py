"""What every inference route does around its backend call: read and validate the body, find the backend,
time the call, and frame the answer (a JSON body or a stream)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from quart import Response, g, request

from app import metrics
from app.backends.base import Backend, ChunkStream
from app.draining import answer_of
from app.errors import APIError, from_validation_error, invalid_request, model_not_found, not_ready
from app.exchange import Exchange
from app.state import app_state
from app.streaming import CHAT_FRAMING, Framing, sse_response

_Request = TypeVar("_Request", bound=BaseModel)
_Result = TypeVar("_Result")
_JSON = "application/json"
_NO_FALLBACK = "X-Helios-No-Fallback"
_MAX_ATTEMPTS = "X-Helios-Max-Attempts"


async def read_body(model: type[_Request]) -> tuple[_Request, bytes]:
    # The body itself, not request.get_data: that would parse it as a form too, for nothing, and put Quart's
    # BODY_TIMEOUT (with a browser's wording in its 408) in front of server.body_read_timeout.
    timeout = app_state().settings.server.body_read_timeout
    try:
        async with asyncio.timeout(timeout):
            body: bytes = await request.body
    except TimeoutError:
        # Hypercorn closes the connection after this answer: the rest of the body is never read.
        raise APIError(408, f"The request body did not arrive within {timeout:g} seconds.",
                       code="request_timeout") from None
    request.body.clear()  # the bytes above are a copy: do not hold the body twice for the whole call
    kind = request.mimetype
    # No type at all is taken as JSON (raw HTTP clients often send none); a declared other type is a client
    # sending something else (a form, text). Told so after its body is read: a connection left with an unread
    # body is closed, and would fail the client's next request on it.
    if kind and kind != _JSON and not kind.endswith("+json"):
        raise APIError(415, f"Unsupported Content-Type '{kind}': request bodies must be JSON "
                            "(Content-Type: application/json).", param="Content-Type", code="unsupported_media_type")
    try:
        # Validating the bytes directly skips building Python objects for the whole body first.
        return model.model_validate_json(body), body
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def find_backend(model: str) -> Backend:
    exchange: Exchange = g.exchange
    backend = app_state().registry.find(model)
    if backend is None:
        exchange.model = metrics.UNKNOWN_MODEL
        raise model_not_found(model)
    exchange.serving(backend.name)
    headers = request.headers
    if _NO_FALLBACK in headers:
        exchange.stats.no_fallback = headers[_NO_FALLBACK].strip().lower() in ("1", "true", "yes")
    if _MAX_ATTEMPTS in headers:
        value = headers[_MAX_ATTEMPTS].strip()
        if not value.isdigit() or not 1 <= int(value) <= 100:
            raise invalid_request(f"Invalid value for header '{_MAX_ATTEMPTS}': expected an integer from 1 to "
                                  "100 (the configured routing.max_attempts bounds it).", _MAX_ATTEMPTS)
        exchange.stats.max_attempts = int(value)
    reason = backend.not_ready_reason()
    if reason is not None:
        raise not_ready(f"Model '{model}' is not ready: {reason}.")
    return backend


async def timed(call: Awaitable[_Result]) -> _Result:
    """Await a backend call, counting the wait as backend time rather than appliance overhead."""
    exchange: Exchange = g.exchange
    started = time.perf_counter()
    try:
        return await answer_of(call)
    finally:
        exchange.backend_seconds += time.perf_counter() - started


def json_response(body: bytes) -> Response:
    return Response(body, status=200, content_type=_JSON)


async def stream_response(chunks: ChunkStream, framing: Framing = CHAT_FRAMING) -> Response:
    exchange: Exchange = g.exchange
    response = await answer_of(sse_response(chunks, exchange, framing))
    # From here the stream reports its own end; a failure before its first chunk was an ordinary error.
    exchange.stream = True
    return response
