"""Local models: a vLLM ``AsyncLLM`` engine inside the appliance, answering the same OpenAI routes.

vLLM is imported only here and only when such a model is configured, so the gateway runs without it.
The engine is built in a thread (it takes seconds and would otherwise freeze the event loop), warmed up,
and only then reported ready. Prompts are rendered with the model's own chat template and passed to the
engine as token ids; engine outputs are turned into OpenAI objects defined in ``app.protocol``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Sequence
from typing import Any

from app import metrics
from app.backends.base import Backend, CallStats, ChunkStream
from app.backends.vllm_params import sampling_kwargs, structured_output
from app.errors import APIError, internal_error, invalid_request, not_ready
from app.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from app.settings import VLLMModelSettings

log = logging.getLogger(__name__)

# What vLLM may report that OpenAI clients know; "abort" and "error" are turned into errors instead.
_FINISH = {"stop": "stop", "length": "length", "repetition": "stop"}


class VLLMBackend(Backend):
    owned_by = "vllm"

    def __init__(self, settings: VLLMModelSettings) -> None:
        super().__init__(settings.name)
        self.settings = settings
        self._engine: Any = None
        self._tokenizer: Any = None
        self._vllm: Any = None  # the imported vllm names we need, see _import_vllm
        self._template = settings.chat_template_text()
        self._max_model_len = 0
        self._max_logprobs = 0
        self._capacity = 0
        self._active = 0
        self._state = "loading"

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._vllm = await asyncio.to_thread(_import_vllm)
        args = self._vllm.AsyncEngineArgs(**self._engine_args())
        started = time.perf_counter()
        self._engine = await asyncio.to_thread(self._vllm.AsyncLLM.from_engine_args, args)
        engine = self._engine
        self._tokenizer = engine.get_tokenizer()
        self._max_model_len = int(engine.model_config.max_model_len)
        self._max_logprobs = int(engine.model_config.max_logprobs)
        self._capacity = int(engine.vllm_config.scheduler_config.max_num_seqs) + self.settings.max_queue_depth
        await self._warm_up()
        metrics.engine_requests.labels(self.name).set_function(engine.get_num_unfinished_requests)
        self._state = "ready"
        log.info("engine for %s loaded in %.1f s (max_model_len %d, admits %d requests)", self.name,
                 time.perf_counter() - started, self._max_model_len, self._capacity)

    def _engine_args(self) -> dict[str, Any]:
        s = self.settings
        args: dict[str, Any] = {
            "model": s.model,
            "served_model_name": s.name,
            "dtype": s.dtype,
            "max_model_len": s.max_model_len,
            "gpu_memory_utilization": s.gpu_memory_utilization,
            "tensor_parallel_size": s.tensor_parallel_size,
            "kv_cache_memory_bytes": s.kv_cache_memory_bytes,
            "max_num_seqs": s.max_num_seqs,
            "enforce_eager": s.enforce_eager,
            "quantization": s.quantization,
            "trust_remote_code": s.trust_remote_code,
            "download_dir": s.download_dir,
            "tokenizer": s.tokenizer,
            # vLLM's Prometheus metrics exist only with stats enabled; /metrics exposes them unchanged.
            "disable_log_stats": False,
        }
        args = {k: v for k, v in args.items() if v is not None}
        args.update(s.engine_args)
        return args

    async def _warm_up(self) -> None:
        # The first request with logprobs pays a one-off ~2 s set-up; pay it before reporting ready.
        params = self._vllm.SamplingParams(max_tokens=2, logprobs=1, output_kind=self._vllm.FINAL_ONLY)
        prompt = self._vllm.TokensPrompt(prompt_token_ids=self._tokenizer.encode("warm up"))
        async for _ in self._engine.generate(prompt, params, f"warmup-{uuid.uuid4().hex}"):
            pass

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        self._state = "closed"
        if engine is not None:
            await asyncio.to_thread(engine.shutdown)
            # AsyncLLM.__del__ shuts down again at interpreter exit, when its globals are gone.
            engine.shutdown = lambda *args, **kwargs: None

    def not_ready_reason(self) -> str | None:
        if self._state != "ready":
            return "engine is loading" if self._state == "loading" else "engine is stopped"
        if self._engine.errored:
            return "engine has died"
        return None

    # ---- calls -----------------------------------------------------------------------------------

    async def chat(
        self, request: ChatCompletionRequest, body: bytes, served_as: str, stats: CallStats
    ) -> bytes:
        with self._admit():
            prompt_ids = await self._chat_prompt(request)
            params = self._params(request, final_only=True)
            request_id = f"chatcmpl-{uuid.uuid4().hex}"
            output = await self._final(prompt_ids, params, request_id)
        choices = []
        for c in output.outputs:
            choices.append(ChatChoice(
                index=c.index,
                message=AssistantMessage(content=c.text),
                logprobs=self._chat_logprobs(c, request.top_logprobs or 0) if request.logprobs else None,
                finish_reason=self._finish(c.finish_reason),
            ))
        usage = self._usage(stats, [prompt_ids], output.outputs)
        response = ChatCompletionResponse(id=request_id, created=int(time.time()), model=served_as,
                                          choices=choices, usage=usage, system_fingerprint=self._fingerprint())
        stats.finish_reasons.extend(choice.finish_reason for choice in choices)
        return response.model_dump_json().encode()

    async def chat_stream(
        self, request: ChatCompletionRequest, body: bytes, served_as: str, stats: CallStats
    ) -> ChunkStream:
        with self._admit() as slot:
            prompt_ids = await self._chat_prompt(request)
            params = self._params(request, final_only=False)
            request_id = f"chatcmpl-{uuid.uuid4().hex}"
            generation = await self._open(prompt_ids, params, request_id)
            return slot.keep(self._chat_chunks(generation, request, prompt_ids, served_as, request_id, stats, slot))

    async def completion(
        self, request: CompletionRequest, body: bytes, served_as: str, stats: CallStats
    ) -> bytes:
        with self._admit():
            prompts = self._completion_prompts(request)
            params = self._params(request, final_only=True)
            request_id = f"cmpl-{uuid.uuid4().hex}"
            outputs = await asyncio.gather(
                *(self._final(ids, params, f"{request_id}-{i}") for i, ids in enumerate(prompts))
            )
        n = params.n
        choices = []
        all_completions = []
        for p, output in enumerate(outputs):
            for c in output.outputs:
                all_completions.append(c)
                choices.append(CompletionChoice(
                    index=p * n + c.index, text=c.text,
                    logprobs=self._completion_logprobs(c, request.logprobs) if request.logprobs is not None
                    else None,
                    finish_reason=self._finish(c.finish_reason),
                ))
        choices.sort(key=lambda choice: choice.index)
        usage = self._usage(stats, prompts, all_completions)
        response = CompletionResponse(id=request_id, created=int(time.time()), model=served_as,
                                      choices=choices, usage=usage, system_fingerprint=self._fingerprint())
        stats.finish_reasons.extend(str(choice.finish_reason) for choice in choices)
        return response.model_dump_json().encode()

    async def completion_stream(
        self, request: CompletionRequest, body: bytes, served_as: str, stats: CallStats
    ) -> ChunkStream:
        with self._admit() as slot:
            prompts = self._completion_prompts(request)
            params = self._params(request, final_only=False)
            request_id = f"cmpl-{uuid.uuid4().hex}"
            generations: list[_Generation] = []
            try:
                for i, ids in enumerate(prompts):
                    generations.append(await self._open(ids, params, f"{request_id}-{i}"))
            except BaseException:
                for generation in generations:
                    await generation.close()
                raise
            return slot.keep(
                self._completion_chunks(generations, request, prompts, served_as, request_id, stats, slot)
            )

    async def embeddings(
        self, request: EmbeddingRequest, body: bytes, served_as: str, stats: CallStats
    ) -> bytes:
        raise invalid_request(f"Model '{served_as}' is a generative model and does not serve embeddings.",
                              "model", "model_not_supported")

    # ---- prompts and parameters ------------------------------------------------------------------

    def _admit(self) -> _Slot:
        """Take a place among the requests the engine runs or queues, or refuse with 429."""
        if self._engine is None:
            raise not_ready(f"Model '{self.name}' is not ready: {self.not_ready_reason()}.")
        if self._active >= self._capacity:
            raise APIError(
                429, f"Model '{self.name}' is at capacity ({self._active} requests running or queued); "
                     "retry shortly.",
                type="rate_limit_error", code="queue_full", headers={"Retry-After": str(self.settings.retry_after)},
            )
        self._active += 1
        return _Slot(self)

    def _release(self) -> None:
        self._active -= 1

    async def _chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        messages = [_template_message(i, m.model_dump(exclude_none=True)) for i, m in enumerate(request.messages)]
        tools = [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None
        if request.tool_choice == "none":
            tools = None
        # Rendered inline: a worker thread would have to win the GIL from a loop busy relaying streams, which
        # measured here as seconds of delay for a few milliseconds of work.
        ids = self._render(messages, tools)
        self._check_length(ids, "messages")
        return ids

    def _render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
        try:
            text = self._tokenizer.apply_chat_template(
                messages, tools=tools, chat_template=self._template, add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # jinja2 and transformers raise assorted types for bad conversations
            raise invalid_request(f"The conversation cannot be rendered with this model's chat template: {exc}",
                                  "messages") from None
        # The template writes the special tokens (BOS) itself.
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def _completion_prompts(self, request: CompletionRequest) -> list[list[int]]:
        prompt = request.prompt
        if isinstance(prompt, str):
            prompts = [self._tokenizer.encode(prompt)]
        elif prompt and isinstance(prompt[0], str):
            prompts = [self._tokenizer.encode(p) for p in prompt]
        elif prompt and isinstance(prompt[0], list):
            prompts = [list(p) for p in prompt]
        else:
            prompts = [list(prompt)]
        for ids in prompts:
            if not ids:
                raise invalid_request("Invalid value for 'prompt': it must not be empty.", "prompt")
            self._check_length(ids, "prompt")
        return prompts

    def _check_length(self, ids: Sequence[int], param: str) -> None:
        if len(ids) >= self._max_model_len:
            raise invalid_request(
                f"This model's maximum context length is {self._max_model_len} tokens, but the prompt has "
                f"{len(ids)} tokens. Shorten the prompt.", param, "context_length_exceeded",
            )

    def _params(self, request: ChatCompletionRequest | CompletionRequest, *, final_only: bool) -> Any:
        vllm = self._vllm
        kwargs = sampling_kwargs(request, self._max_logprobs)
        kwargs["output_kind"] = vllm.FINAL_ONLY if final_only else vllm.DELTA
        if isinstance(request, ChatCompletionRequest):
            structured = structured_output(request)
            if structured is not None:
                kwargs["structured_outputs"] = vllm.StructuredOutputsParams(**structured)
        try:
            return vllm.SamplingParams(**kwargs)
        except Exception as exc:
            raise _client_error(exc) from None

    # ---- generation ------------------------------------------------------------------------------

    async def _open(self, ids: list[int], params: Any, request_id: str) -> _Generation:
        """Start a generation and wait for its first output, so refusals become HTTP statuses."""
        generator = self._engine.generate(self._vllm.TokensPrompt(prompt_token_ids=ids), params, request_id)
        try:
            first = await generator.__anext__()
        except BaseException as exc:
            await generator.aclose()
            raise _engine_error(exc, self._vllm) from None
        return _Generation(self._engine, generator, first, request_id, self._vllm)

    async def _final(self, ids: list[int], params: Any, request_id: str) -> Any:
        generation = await self._open(ids, params, request_id)
        try:
            async for output in generation:
                if output.finished:
                    return output
        finally:
            await generation.close()
        raise internal_error()

    async def _chat_chunks(
        self, generation: _Generation, request: ChatCompletionRequest, prompt_ids: list[int], served_as: str,
        request_id: str, stats: CallStats, slot: _Slot,
    ) -> AsyncIterator[list[bytes]]:
        created = int(time.time())
        n = request.n or 1
        fingerprint = self._fingerprint()
        top = request.top_logprobs or 0

        def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> bytes:
            return ChatCompletionChunk(id=request_id, created=created, model=served_as, choices=choices,
                                       usage=usage, system_fingerprint=fingerprint).model_dump_json().encode()

        completions: dict[int, Any] = {}
        try:
            yield [chunk([ChunkChoice(index=i, delta=ChunkDelta(role="assistant", content="")) for i in range(n)])]
            async for output in generation:
                batch = []
                for c in output.outputs:
                    completions[c.index] = _Count.add(completions.get(c.index), c)
                    finish = self._finish(c.finish_reason) if c.finish_reason else None
                    if finish:
                        stats.finish_reasons.append(finish)
                    batch.append(chunk([ChunkChoice(
                        index=c.index, delta=ChunkDelta(content=c.text),
                        logprobs=self._chat_logprobs(c, top) if request.logprobs else None,
                        finish_reason=finish,
                    )]))
                if batch:
                    yield batch
            usage = self._usage(stats, [prompt_ids], list(completions.values()))
            if request.wants_usage_chunk:
                yield [chunk([], usage)]
        finally:
            slot.release()
            await generation.close()

    async def _completion_chunks(
        self, generations: list[_Generation], request: CompletionRequest, prompts: list[list[int]],
        served_as: str, request_id: str, stats: CallStats, slot: _Slot,
    ) -> AsyncIterator[list[bytes]]:
        created = int(time.time())
        n = request.n or 1
        fingerprint = self._fingerprint()
        completions: dict[tuple[int, int], Any] = {}

        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
            return CompletionResponse(id=request_id, created=created, model=served_as, choices=choices,
                                      usage=usage, system_fingerprint=fingerprint).model_dump_json().encode()

        try:
            async for p, output in _merge(generations):
                batch = []
                for c in output.outputs:
                    completions[p, c.index] = _Count.add(completions.get((p, c.index)), c)
                    finish = self._finish(c.finish_reason) if c.finish_reason else None
                    if finish:
                        stats.finish_reasons.append(finish)
                    batch.append(chunk([CompletionChoice(
                        index=p * n + c.index, text=c.text,
                        logprobs=self._completion_logprobs(c, request.logprobs) if request.logprobs is not None
                        else None,
                        finish_reason=finish,
                    )]))
                if batch:
                    yield batch
            usage = self._usage(stats, prompts, list(completions.values()))
            if request.wants_usage_chunk:
                yield [chunk([], usage)]
        finally:
            slot.release()
            for generation in generations:
                await generation.close()

    # ---- output conversion -----------------------------------------------------------------------

    def _finish(self, reason: str | None) -> str:
        if reason in _FINISH:
            return _FINISH[reason]
        if reason == "abort":
            raise APIError(503, f"The request to model '{self.name}' was aborted: the engine is stopping.",
                           type="service_unavailable_error", code="aborted")
        raise internal_error()

    @staticmethod
    def _usage(stats: CallStats, prompts: list[list[int]], completions: Sequence[Any]) -> Usage:
        prompt_tokens = sum(len(ids) for ids in prompts)
        completion_tokens = sum(len(c.token_ids) for c in completions)
        stats.prompt_tokens = prompt_tokens
        stats.completion_tokens = completion_tokens
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)

    def _fingerprint(self) -> str:
        return f"helios-vllm-{self._vllm.__version__}"

    def _token(self, token_id: int, logprob: Any) -> str:
        text = getattr(logprob, "decoded_token", None)
        return text if text is not None else str(self._tokenizer.decode([token_id]))

    def _chat_logprobs(self, completion: Any, top: int) -> ChoiceLogprobs | None:
        if completion.logprobs is None:
            return None
        content = []
        for token_id, position in zip(completion.token_ids, completion.logprobs, strict=False):
            sampled = position[token_id]
            token = self._token(token_id, sampled)
            ranked = sorted(position.items(), key=lambda item: item[1].rank or 0)[:top]
            content.append(TokenLogprob(
                token=token, logprob=max(sampled.logprob, -9999.0), bytes=list(token.encode()),
                top_logprobs=[
                    TopLogprob(token=(t := self._token(tid, lp)), logprob=max(lp.logprob, -9999.0),
                               bytes=list(t.encode()))
                    for tid, lp in ranked
                ],
            ))
        return ChoiceLogprobs(content=content)

    def _completion_logprobs(self, completion: Any, top: int | None) -> CompletionLogprobs | None:
        if completion.logprobs is None:
            return None
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        offset = 0
        for token_id, position in zip(completion.token_ids, completion.logprobs, strict=False):
            sampled = position[token_id]
            token = self._token(token_id, sampled)
            tokens.append(token)
            token_logprobs.append(max(sampled.logprob, -9999.0))
            ranked = sorted(position.items(), key=lambda item: item[1].rank or 0)[: top or 0]
            top_logprobs.append({self._token(tid, lp): max(lp.logprob, -9999.0) for tid, lp in ranked})
            offsets.append(offset)
            offset += len(token)
        return CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top_logprobs,
                                  text_offset=offsets)


class _Slot:
    """One admitted request's place in the engine's queue, released exactly once.

    For a stream the place is held until the stream ends; if the stream is never iterated (the client
    left before the body started) it is released when the stream object is collected.
    """

    def __init__(self, backend: VLLMBackend) -> None:
        self._backend: VLLMBackend | None = backend
        self._kept = False

    def __enter__(self) -> _Slot:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._kept:
            self.release()

    def keep(self, stream: ChunkStream) -> ChunkStream:
        """Hand the place over to ``stream``, which releases it when it ends (or is collected unstarted)."""
        self._kept = True
        weakref.finalize(stream, self.release)
        return stream

    def release(self) -> None:
        backend, self._backend = self._backend, None
        if backend is not None:
            backend._release()


class _Generation:
    """One engine request: its first output (already received) and the rest; closing it aborts it."""

    def __init__(self, engine: Any, generator: Any, first: Any, request_id: str, vllm: Any) -> None:
        self._engine = engine
        self._generator = generator
        self._first: Any = first
        self._request_id = request_id
        self._vllm = vllm
        self.finished = False

    def __aiter__(self) -> _Generation:
        return self

    async def __anext__(self) -> Any:
        if self.finished:
            raise StopAsyncIteration
        if self._first is not None:
            output, self._first = self._first, None
        else:
            try:
                output = await self._generator.__anext__()
            except StopAsyncIteration:
                raise
            except Exception as exc:
                raise _engine_error(exc, self._vllm) from None
        self.finished = bool(output.finished)
        return output

    async def close(self) -> None:
        await self._generator.aclose()
        if not self.finished:
            # Closing the generator aborts in vLLM already; saying it explicitly costs nothing.
            await self._engine.abort(self._request_id)


class _Count:
    """Token ids seen so far for one choice (delta outputs carry only the new ones)."""

    __slots__ = ("token_ids",)

    def __init__(self) -> None:
        self.token_ids: list[int] = []

    @classmethod
    def add(cls, count: _Count | None, completion: Any) -> _Count:
        count = count or cls()
        count.token_ids.extend(completion.token_ids)
        return count


async def _merge(generations: list[_Generation]) -> AsyncIterator[tuple[int, Any]]:
    """Outputs of several generations as they come, tagged with the generation's position."""
    if len(generations) == 1:
        async for output in generations[0]:
            yield 0, output
        return
    pending = {asyncio.ensure_future(g.__anext__()): i for i, g in enumerate(generations)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = pending.pop(task)
                try:
                    output = task.result()
                except StopAsyncIteration:
                    continue
                yield index, output
                pending[asyncio.ensure_future(generations[index].__anext__())] = index
    finally:
        for task in pending:
            task.cancel()


def _template_message(index: int, message: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI message as chat templates expect it: text parts joined into one string."""
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if part.get("type") == "text":
                texts.append(part["text"])
            elif part.get("type") == "refusal":
                texts.append(part["refusal"])
            else:
                raise invalid_request(f"Content of type '{part.get('type')}' is not supported by this model.",
                                      f"messages[{index}].content[{j}]")
        message["content"] = "\n".join(texts)
    return message


def _client_error(exc: BaseException) -> APIError:
    parameter = getattr(exc, "parameter", None)
    message = str(exc).split(" (parameter=")[0]
    return invalid_request(message, parameter if isinstance(parameter, str) else None)


def _engine_error(exc: BaseException, vllm: Any) -> BaseException:
    if isinstance(exc, APIError | asyncio.CancelledError):
        return exc
    if isinstance(exc, vllm.VLLMClientError | ValueError):
        return _client_error(exc)
    if isinstance(exc, vllm.EngineDeadError):
        return not_ready("The model's engine has died.")
    log.error("engine request failed", exc_info=exc)
    return internal_error()


class _VLLM:
    """The vLLM names this backend uses, imported once, off the event loop."""

    def __init__(self) -> None:
        # vLLM phones home unless told not to; an appliance must not.
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("DO_NOT_TRACK", "1")
        import vllm
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.engine.exceptions import EngineDeadError

        self.__version__ = vllm.__version__
        self.AsyncEngineArgs = AsyncEngineArgs
        self.AsyncLLM = AsyncLLM
        self.SamplingParams = vllm.SamplingParams
        self.TokensPrompt = vllm.TokensPrompt
        self.StructuredOutputsParams = StructuredOutputsParams
        self.DELTA = RequestOutputKind.DELTA
        self.FINAL_ONLY = RequestOutputKind.FINAL_ONLY
        self.VLLMClientError = VLLMClientError
        self.EngineDeadError = EngineDeadError


def _import_vllm() -> _VLLM:
    return _VLLM()
