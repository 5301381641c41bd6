"""The interface every backend implements; routes speak only to this.

Non-streaming calls return the finished JSON body as bytes. Streaming calls are awaited until the
backend has accepted the request (so refusals become proper HTTP statuses) and then return an async
iterator of batches of chunk payloads: the JSON of one ``data:`` event each, framed by ``app.streaming``.
Chunks that are ready at the same moment travel as one batch, so they cost one write instead of many. An error
raised while iterating is an :class:`app.errors.APIError` that the stream reports as an error event.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from app.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

#: batches of chunk payloads; the chunks of one batch were ready together and are written to the client at once
ChunkStream = AsyncIterator[list[bytes]]


@dataclass(slots=True)
class ToolStep:
    """One server-side tool call an agent ran, for a caller that shows steps as structured items."""

    call_id: str
    name: str
    arguments: str
    #: the MCP server the tool belongs to; None for a built-in tool
    server: str | None
    #: None while the call runs
    output: str | None = None
    failed: bool = False


@dataclass(slots=True)
class CallStats:
    """What a backend learns during one call, read afterwards for logs and metrics."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reasons: list[str] = field(default_factory=list)
    retries: int = 0
    #: why the backend call failed, for the upstream-errors metric (timeout, connection, status_5xx, ...)
    error_kind: str | None = None
    #: for agents: model calls made and server-side tool calls run
    steps: int | None = None
    tool_calls: int | None = None
    #: set to a list by a caller that shows an agent's tool calls itself (the Responses API, as output items):
    #: the agent appends its steps here instead of writing them into ``reasoning_content``, and a stream yields
    #: an empty batch whenever a step starts or ends, so the caller sees it at once
    tool_steps: list[ToolStep] | None = None
    #: routing: the configured model that answered, and the upstream attempts it took (None: the backend itself)
    served_by: str | None = None
    attempts: int | None = None
    #: routing controls from the request's headers (X-Helios-No-Fallback, X-Helios-Max-Attempts)
    no_fallback: bool = False
    max_attempts: int | None = None


class Backend(ABC):
    """One served model. ``served_as`` is the name the client asked for, echoed in ``model``."""

    #: who the model list says owns the model
    owned_by: str = "helios-serve"
    #: the model this one is derived from (a LoRA adapter's base model), listed as the model's parent
    parent: str | None = None
    #: speaks the Responses API itself: /v1/responses is relayed to it instead of translated onto chat
    relays_responses: bool = False

    def __init__(self, name: str) -> None:
        self.name = name

    @abstractmethod
    async def start(self) -> None:
        """Initialise (open clients, load engines). Failing here stops start-up."""

    @abstractmethod
    async def close(self) -> None:
        """Release everything; called once at shutdown."""

    @abstractmethod
    def not_ready_reason(self) -> str | None:
        """None when the backend can serve, else a short reason for /ready."""

    def failure(self) -> str | None:
        """Why this backend cannot serve again until the process restarts (its engine died), else None; /health
        reports it, so that the orchestrator restarts the process."""
        return None

    def admits(self, request: ChatCompletionRequest | CompletionRequest) -> str | None:
        """Why a router should not send it this request now, measured before it starts: ``"queue"`` (no
        capacity) or ``"context"`` (the prompt does not fit); None to send it. Backends that cannot tell
        (a remote provider decides for itself) send everything."""
        return None

    @abstractmethod
    async def chat(
        self, request: ChatCompletionRequest, body: bytes, served_as: str, stats: CallStats
    ) -> bytes: ...

    @abstractmethod
    async def chat_stream(
        self, request: ChatCompletionRequest, body: bytes, served_as: str, stats: CallStats
    ) -> ChunkStream: ...

    @abstractmethod
    async def completion(
        self, request: CompletionRequest, body: bytes, served_as: str, stats: CallStats
    ) -> bytes: ...

    @abstractmethod
    async def completion_stream(
        self, request: CompletionRequest, body: bytes, served_as: str, stats: CallStats
    ) -> ChunkStream: ...

    @abstractmethod
    async def embeddings(
        self, request: EmbeddingRequest, body: bytes, served_as: str, stats: CallStats
    ) -> bytes: ...

    # Only backends with ``relays_responses`` implement these: the Responses request as bytes, ``model`` to be
    # rewritten; a stream's payloads are the provider's event JSON, one per ``data:``.
    async def responses(self, body: bytes, served_as: str, stats: CallStats) -> bytes:
        raise NotImplementedError

    async def responses_stream(self, body: bytes, served_as: str, stats: CallStats) -> ChunkStream:
        raise NotImplementedError


async def close_stream(chunks: ChunkStream) -> None:
    """Close a backend's stream: what releases its upstream request (or aborts its engine request) early."""
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()
