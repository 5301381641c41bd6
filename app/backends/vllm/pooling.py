"""Embeddings from a pooling model (``runner = "pooling"``), answered as OpenAI's embedding list."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from app.backends.base import CallStats
from app.backends.vllm.generation import Generation
from app.backends.vllm.names import VLLMNames
from app.backends.vllm.outputs import Outputs
from app.backends.vllm.prompts import Prompts
from app.errors import invalid_request
from app.protocol import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage


class Embedder:
    def __init__(self, engine: Any, vllm: VLLMNames, prompts: Prompts, outputs: Outputs) -> None:
        from vllm.entrypoints.pooling.utils import encode_pooling_output_base64, encode_pooling_output_float

        self._engine = engine
        self._vllm = vllm
        self._prompts = prompts
        self._outputs = outputs
        self._config = engine.model_config
        self._as_float = encode_pooling_output_float
        self._as_base64 = encode_pooling_output_base64

    async def warm_up(self) -> None:
        params = self._vllm.PoolingParams(task="embed")
        prompt = self._vllm.TokensPrompt(prompt_token_ids=self._prompts.encode("warm up"))
        async for _ in self._engine.encode(prompt, params, f"warmup-{uuid.uuid4().hex}"):
            pass

    async def embed(self, request: EmbeddingRequest, served_as: str, stats: CallStats, lora: Any) -> bytes:
        prompts = self._inputs(request)
        if request.dimensions is not None and not self._config.is_matryoshka:
            raise invalid_request(f"Invalid value for 'dimensions': model '{served_as}' does not support "
                                  "choosing the embedding's dimensions.", "dimensions")
        params = self._vllm.PoolingParams(task="embed", dimensions=request.dimensions)
        request_id = f"embd-{uuid.uuid4().hex}"
        outputs = await asyncio.gather(*(self._one(ids, params, f"{request_id}-{i}", lora)
                                         for i, ids in enumerate(prompts)))
        base64 = request.encoding_format == "base64"
        data = [Embedding(index=i, embedding=self._as_base64(output, "float32", "little") if base64
                          else self._as_float(output))
                for i, output in enumerate(outputs)]
        prompt_tokens = sum(len(ids) for ids in prompts)
        stats.prompt_tokens = prompt_tokens
        response = EmbeddingResponse(data=data, model=served_as,
                                     usage=EmbeddingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens))
        return response.model_dump_json().encode()

    def _inputs(self, request: EmbeddingRequest) -> list[list[int]]:
        given = request.input
        if isinstance(given, str):
            prompts = [self._prompts.encode(given)]
        elif isinstance(given[0], str):
            prompts = [self._prompts.encode(text) for text in given]
        elif isinstance(given[0], int):
            prompts = [list(given)]
        else:
            prompts = [list(ids) for ids in given]
        limit = self._prompts.max_model_len
        for i, ids in enumerate(prompts):
            if not ids:
                raise invalid_request(f"Invalid value for 'input[{i}]': it must not be empty.", f"input[{i}]")
            if len(ids) > limit:
                raise invalid_request(
                    f"This model's maximum context length is {limit} tokens, but input {i} has {len(ids)} "
                    "tokens. Shorten the input.", "input", "context_length_exceeded")
        return prompts

    async def _one(self, ids: list[int], params: Any, request_id: str, lora: Any) -> Any:
        generator = self._engine.encode(self._vllm.TokensPrompt(prompt_token_ids=ids), params, request_id,
                                        lora_request=lora)
        return await (await Generation.open(self._engine, generator, request_id, self._vllm)).final()
