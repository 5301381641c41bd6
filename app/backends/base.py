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


class Backend(ABC):
    """One served model. ``served_as`` is the name the client asked for, echoed in ``model``."""

    #: who the model list says owns the model
    owned_by: str = "helios-serve"
    #: the model this one is derived from (a LoRA adapter's base model), listed as the model's parent
    parent: str | None = None

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
