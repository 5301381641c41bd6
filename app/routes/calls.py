"""What every inference route does around its backend call: read and validate the body, find the backend,
time the call, and frame the answer (a JSON body or a stream)."""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from quart import Response, g, request

from app import metrics
from app.backends.base import Backend, ChunkStream
from app.errors import from_validation_error, invalid_request, model_not_found, not_ready
from app.exchange import Exchange
from app.state import app_state
from app.streaming import CHAT_FRAMING, Framing, sse_response

_Request = TypeVar("_Request", bound=BaseModel)
_Result = TypeVar("_Result")
_JSON = "application/json"
_NO_FALLBACK = "X-Helios-No-Fallback"
_MAX_ATTEMPTS = "X-Helios-Max-Attempts"


async def read_body(model: type[_Request]) -> tuple[_Request, bytes]:
    # Not request.data: that also parses the body as a form, for nothing.
    body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
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
        return await call
    finally:
        exchange.backend_seconds += time.perf_counter() - started


def json_response(body: bytes) -> Response:
    return Response(body, status=200, content_type=_JSON)


async def stream_response(chunks: ChunkStream, framing: Framing = CHAT_FRAMING) -> Response:
    exchange: Exchange = g.exchange
    response = await sse_response(chunks, exchange, framing)
    # From here the stream reports its own end; a failure before its first chunk was an ordinary error.
    exchange.stream = True
    return response
