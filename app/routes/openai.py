"""The OpenAI-compatible /v1 API. Routes validate, pick a backend by model name, and frame the answer;
they never know which kind of backend they talk to."""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from quart import Blueprint, Response, g, request
from quart_schema import document_request, document_response

from app import metrics
from app.backends.base import Backend, ChunkStream
from app.errors import from_validation_error, model_not_found, not_ready
from app.exchange import Exchange
from app.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from app.state import app_state
from app.streaming import sse_response

blueprint = Blueprint("openai", __name__, url_prefix="/v1")

_Request = TypeVar("_Request", bound=BaseModel)
_Result = TypeVar("_Result")
_JSON = "application/json"


async def _read(model: type[_Request]) -> tuple[_Request, bytes]:
    # Not request.data: that also parses the body as a form, for nothing.
    body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
    try:
        # Validating the bytes directly skips building Python objects for the whole body first.
        return model.model_validate_json(body), body
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _backend(model: str) -> Backend:
    exchange: Exchange = g.exchange
    backend = app_state().registry.find(model)
    if backend is None:
        exchange.model = metrics.UNKNOWN_MODEL
        raise model_not_found(model)
    exchange.serving(backend.name)
    reason = backend.not_ready_reason()
    if reason is not None:
        raise not_ready(f"Model '{model}' is not ready: {reason}.")
    return backend


async def _timed(call: Awaitable[_Result]) -> _Result:
    """Await a backend call, counting the wait as backend time rather than appliance overhead."""
    exchange: Exchange = g.exchange
    started = time.perf_counter()
    try:
        return await call
    finally:
        exchange.backend_seconds += time.perf_counter() - started


def _json(body: bytes) -> Response:
    return Response(body, status=200, content_type=_JSON)


async def _stream(chunks: ChunkStream) -> Response:
    exchange: Exchange = g.exchange
    response = await sse_response(chunks, exchange)
    # From here the stream reports its own end; a failure before its first chunk was an ordinary error.
    exchange.stream = True
    return response


@blueprint.post("/chat/completions")
@document_request(ChatCompletionRequest)
@document_response(ChatCompletionResponse, 200)
@document_response(ErrorResponse, 400)
async def chat_completions() -> Response:
    """Create a chat completion; with `stream: true` an SSE stream of `chat.completion.chunk`."""
    req, body = await _read(ChatCompletionRequest)
    backend = _backend(req.model)
    stats = g.exchange.stats
    if req.stream:
        return await _stream(await _timed(backend.chat_stream(req, body, req.model, stats)))
    return _json(await _timed(backend.chat(req, body, req.model, stats)))


@blueprint.post("/completions")
@document_request(CompletionRequest)
@document_response(CompletionResponse, 200)
@document_response(ErrorResponse, 400)
async def completions() -> Response:
    """Create a text completion; with `stream: true` an SSE stream of `text_completion` chunks."""
    req, body = await _read(CompletionRequest)
    backend = _backend(req.model)
    stats = g.exchange.stats
    if req.stream:
        return await _stream(await _timed(backend.completion_stream(req, body, req.model, stats)))
    return _json(await _timed(backend.completion(req, body, req.model, stats)))


@blueprint.post("/embeddings")
@document_request(EmbeddingRequest)
@document_response(EmbeddingResponse, 200)
@document_response(ErrorResponse, 400)
async def embeddings() -> Response:
    """Create embeddings for one or more inputs."""
    req, body = await _read(EmbeddingRequest)
    backend = _backend(req.model)
    return _json(await _timed(backend.embeddings(req, body, req.model, g.exchange.stats)))


@blueprint.get("/models")
@document_response(ModelList, 200)
async def list_models() -> Response:
    """Every model name and alias this appliance serves."""
    return _json(app_state().models_body)


@blueprint.get("/models/<path:model>")
@document_response(ModelCard, 200)
@document_response(ErrorResponse, 404)
async def get_model(model: str) -> Response:
    """One model by name or alias."""
    registry = app_state().registry
    backend = registry.find(model)
    if backend is None:
        raise model_not_found(model)
    return _json(model_card(model, backend, registry.created).model_dump_json().encode())


def model_card(name: str, backend: Backend, created: int) -> ModelCard:
    return ModelCard(id=name, created=created, owned_by=backend.owned_by, parent=backend.parent)


def models_body(served: dict[str, Backend], created: int) -> bytes:
    cards = [model_card(name, backend, created) for name, backend in served.items()]
    return ModelList(data=cards).model_dump_json().encode()
