"""A LoRA adapter served under its own model name, on its base model's engine.

The adapter is a backend of its own so that routes, metrics and logs see its name like any model's; every
call goes to the base model's engine with the adapter's ``LoRARequest``, sharing the base model's queue.
"""

from __future__ import annotations

from app.backends.base import Backend, CallStats, ChunkStream
from app.backends.vllm.backend import VLLMBackend
from app.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest


class LoRAAdapterBackend(Backend):
    owned_by = "vllm"

    def __init__(self, base: VLLMBackend, name: str) -> None:
        super().__init__(name)
        self.base = base
        self.parent = base.name

    async def start(self) -> None:
        """Nothing of its own: the base model loads the adapter with its engine."""

    async def close(self) -> None:
        """Nothing of its own: the base model's engine goes with the base model."""

    def not_ready_reason(self) -> str | None:
        reason = self.base.not_ready_reason()
        return f"base model '{self.base.name}': {reason}" if reason else None

    def admits(self, request: ChatCompletionRequest | CompletionRequest) -> str | None:
        return self.base.admits(request)

    async def chat(self, request: ChatCompletionRequest, body: bytes, served_as: str, stats: CallStats) -> bytes:
        return await self.base.chat_with(request, served_as, stats, self.base.loras[self.name])

    async def chat_stream(
        self, request: ChatCompletionRequest, body: bytes, served_as: str, stats: CallStats
    ) -> ChunkStream:
        return await self.base.chat_stream_with(request, served_as, stats, self.base.loras[self.name])

    async def completion(self, request: CompletionRequest, body: bytes, served_as: str, stats: CallStats) -> bytes:
        return await self.base.completion_with(request, served_as, stats, self.base.loras[self.name])

    async def completion_stream(
        self, request: CompletionRequest, body: bytes, served_as: str, stats: CallStats
    ) -> ChunkStream:
        return await self.base.completion_stream_with(request, served_as, stats, self.base.loras[self.name])

    async def embeddings(self, request: EmbeddingRequest, body: bytes, served_as: str, stats: CallStats) -> bytes:
        return await self.base.embeddings_with(request, served_as, stats, self.base.loras[self.name])
