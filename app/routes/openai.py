"""The OpenAI-compatible /v1 API. Routes validate, pick a backend by model name, and frame the answer;
they never know which kind of backend they talk to."""

from __future__ import annotations

from quart import Blueprint, Response, g
from quart_schema import document_request, document_response

from app.backends.base import Backend
from app.errors import model_not_found
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
from app.routes.calls import find_backend, json_response, read_body, stream_response, timed
from app.state import app_state

blueprint = Blueprint("openai", __name__, url_prefix="/v1")

@blueprint.post("/chat/completions")
@document_request(ChatCompletionRequest)
@document_response(ChatCompletionResponse, 200)
@document_response(ErrorResponse, 400)
@document_response(ErrorResponse, 404)
@document_response(ErrorResponse, 415)
async def chat_completions() -> Response:
    """Create a chat completion; with `stream: true` an SSE stream of `chat.completion.chunk`."""
    req, body = await read_body(ChatCompletionRequest)
    backend = find_backend(req.model)
    stats = g.exchange.stats
    if req.stream:
        return await stream_response(await timed(backend.chat_stream(req, body, req.model, stats)))
    return json_response(await timed(backend.chat(req, body, req.model, stats)))


@blueprint.post("/completions")
@document_request(CompletionRequest)
@document_response(CompletionResponse, 200)
@document_response(ErrorResponse, 400)
@document_response(ErrorResponse, 404)
@document_response(ErrorResponse, 415)
async def completions() -> Response:
    """Create a text completion; with `stream: true` an SSE stream of `text_completion` chunks."""
    req, body = await read_body(CompletionRequest)
    backend = find_backend(req.model)
    stats = g.exchange.stats
    if req.stream:
        return await stream_response(await timed(backend.completion_stream(req, body, req.model, stats)))
    return json_response(await timed(backend.completion(req, body, req.model, stats)))


@blueprint.post("/embeddings")
@document_request(EmbeddingRequest)
@document_response(EmbeddingResponse, 200)
@document_response(ErrorResponse, 400)
@document_response(ErrorResponse, 404)
@document_response(ErrorResponse, 415)
async def embeddings() -> Response:
    """Create embeddings for one or more inputs."""
    req, body = await read_body(EmbeddingRequest)
    backend = find_backend(req.model)
    return json_response(await timed(backend.embeddings(req, body, req.model, g.exchange.stats)))


@blueprint.get("/models")
@document_response(ModelList, 200)
async def list_models() -> Response:
    """Every model name and alias this appliance serves."""
    return json_response(app_state().models_body)


@blueprint.get("/models/<path:model>")
@document_response(ModelCard, 200)
@document_response(ErrorResponse, 404)
async def get_model(model: str) -> Response:
    """One model by name or alias."""
    registry = app_state().registry
    backend = registry.find(model)
    if backend is None:
        raise model_not_found(model)
    return json_response(model_card(model, backend, registry.created).model_dump_json().encode())


def model_card(name: str, backend: Backend, created: int) -> ModelCard:
    return ModelCard(id=name, created=created, owned_by=backend.owned_by, parent=backend.parent)


def models_body(served: dict[str, Backend], created: int) -> bytes:
    cards = [model_card(name, backend, created) for name, backend in served.items()]
    return ModelList(data=cards).model_dump_json().encode()
