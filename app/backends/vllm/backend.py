"""The embedded engine's backend: its lifecycle (load in a thread, warm up, report ready, shut down) and
the chat, completion and embedding calls, each run through the modules beside it."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from app import metrics
from app.backends.base import Backend, CallStats, ChunkStream
from app.backends.vllm.engine_metrics import stat_logger
from app.backends.vllm.generation import Admission, Generation, Slot, TokenCount, client_error, merge
from app.backends.vllm.names import VLLMNames, import_vllm
from app.backends.vllm.outputs import Outputs
from app.backends.vllm.params import sampling_kwargs, structured_output
from app.backends.vllm.parsing import ModelParsing, Parsed, RequestParsing, check_parser_names
from app.backends.vllm.pooling import Embedder
from app.backends.vllm.prompts import Prompts
from app.errors import APIError, invalid_request, not_ready
from app.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChunkChoice,
    ChunkDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    Usage,
)
from app.settings import VLLMModelSettings

log = logging.getLogger(__name__)
#: seconds the engine's processes get to exit at shutdown on the CPU before vLLM kills them
CPU_ENGINE_EXIT_SECONDS = 1.5


class VLLMBackend(Backend):
    owned_by = "vllm"

    def __init__(self, settings: VLLMModelSettings) -> None:
        super().__init__(settings.name)
        self.settings = settings
        self.pooling = settings.runner == "pooling"
        self._engine: Any = None
        self._vllm: VLLMNames | None = None
        self._admission = Admission(settings.name, settings.retry_after)
        #: sequences the engine runs at once; admitted requests beyond it wait
        self._running_slots = 0
        #: the last request admits() measured, and its prompt ids
        self._measured: tuple[ChatCompletionRequest, list[int]] | None = None
        self._max_logprobs = 0
        self._state = "loading"
        #: the engine's processes (EngineCore and its workers), to kill what outlives a dead engine
        self._processes: list[Any] = []
        #: adapter name -> vLLM LoRARequest, for the adapters served under their own names
        self.loras: dict[str, Any] = {}
        # Set once the engine is loaded.
        self._prompts: Prompts
        self._outputs: Outputs
        self._parsing: ModelParsing
        self._embedder: Embedder

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._vllm = vllm = await asyncio.to_thread(import_vllm)
        check_parser_names(self.settings, vllm)
        args = vllm.AsyncEngineArgs(**self._engine_args(vllm))
        started = time.perf_counter()
        self._engine = engine = await asyncio.to_thread(_new_engine, vllm, args)
        self._processes = _engine_processes(engine)
        tokenizer = engine.get_tokenizer()
        config = engine.model_config
        self._prompts = Prompts(tokenizer, self.settings.chat_template_text(), int(config.max_model_len))
        self._outputs = Outputs(self.name, tokenizer, vllm.__version__)
        self._max_logprobs = int(config.max_logprobs)
        self._running_slots = int(engine.vllm_config.scheduler_config.max_num_seqs)
        self._admission.capacity = self._running_slots + self.settings.max_queue_depth
        if self.pooling:
            self._embedder = Embedder(engine, vllm, self._prompts, self._outputs)
        else:
            self._parsing = ModelParsing(self.settings, tokenizer, vllm)
        await self._load_adapters()
        await self._warm_up()
        metrics.engine_requests.labels(self.name).set_function(engine.get_num_unfinished_requests)
        self._state = "ready"
        log.info("engine for %s loaded in %.1f s (max_model_len %d, admits %d requests)", self.name,
                 time.perf_counter() - started, self._prompts.max_model_len, self._admission.capacity)

    def _engine_args(self, vllm: VLLMNames) -> dict[str, Any]:
        s = self.settings
        so = s.structured_outputs
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
            "runner": s.runner,
            "convert": s.convert,
            # The engine applies structured outputs after the reasoning parser says thinking ended.
            "structured_outputs_config": vllm.StructuredOutputsConfig(
                backend=so.backend, disable_any_whitespace=so.disable_any_whitespace,
                enable_in_reasoning=so.enable_in_reasoning, reasoning_parser=s.reasoning_parser or "",
            ),
            # vLLM's Prometheus metrics exist only with stats enabled; /metrics exposes them unchanged.
            "disable_log_stats": False,
        }
        if s.lora_adapters:
            args.update(enable_lora=True, max_loras=self._lora_slots(vllm), max_lora_rank=s.max_lora_rank)
        args = {k: v for k, v in args.items() if v is not None}
        args.update(s.engine_args)
        return args

    def _lora_slots(self, vllm: VLLMNames) -> int:
        """The engine's max_loras: the configured one, except on the CPU.

        vLLM's CPU LoRA kernels read the "no adapter" index (-1) of a base-model request as the engine's last
        LoRA slot, so a base-model request batched with an adapter's gets that adapter's weights (vLLM pull
        requests 48421 and 49656, unmerged in 0.32.0). One slot per adapter plus one that no adapter ever
        takes (vLLM fills the first free slot) keeps the last slot's weights zero."""
        s = self.settings
        if not vllm.on_cpu:
            return s.max_loras
        return max(s.max_loras, len(s.lora_adapters)) + 1

    async def _load_adapters(self) -> None:
        assert self._vllm is not None
        for number, adapter in enumerate(self.settings.lora_adapters, start=1):
            lora = self._vllm.LoRARequest(lora_name=adapter.name, lora_int_id=number, lora_path=str(adapter.path))
            try:
                await self._engine.add_lora(lora)
            except Exception as exc:
                raise RuntimeError(f"LoRA adapter '{adapter.name}' ({adapter.path}) cannot be loaded: {exc}") from exc
            self.loras[adapter.name] = lora

    async def _warm_up(self) -> None:
        if self.pooling:
            await self._embedder.warm_up()
            return
        assert self._vllm is not None
        # The first request with logprobs pays a one-off ~2 s set-up; pay it before reporting ready.
        params = self._vllm.SamplingParams(max_tokens=2, logprobs=1, output_kind=self._vllm.FINAL_ONLY)
        prompt = self._vllm.TokensPrompt(prompt_token_ids=self._prompts.encode("warm up"))
        async for _ in self._engine.generate(prompt, params, f"warmup-{uuid.uuid4().hex}"):
            pass

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        self._state = "closed"
        if engine is not None:
            # vLLM gives the engine's processes 5 s to exit and then kills them, and on the CPU they always
            # need the kill: their exit is a full garbage collection of a torch-laden interpreter, seconds on a
            # small machine, with no device memory to release. Waiting less changes nothing but the wait.
            assert self._vllm is not None
            await asyncio.to_thread(engine.shutdown, CPU_ENGINE_EXIT_SECONDS if self._vllm.on_cpu else None)
            # AsyncLLM.__del__ shuts down again at interpreter exit, when its globals are gone.
            engine.shutdown = lambda *args, **kwargs: None
        _kill(self._processes)

    def not_ready_reason(self) -> str | None:
        if self._state != "ready":
            return "engine is loading" if self._state == "loading" else "engine is stopped"
        return self.failure()

    def failure(self) -> str | None:
        # vLLM has no way back from a dead engine: only a new process brings the model back.
        if self._state != "ready" or not self._engine.errored:
            return None
        if self._processes:
            _kill(self._processes)
            self._processes = []
        ended = _engine_exit(self._engine)
        return f"engine has died ({ended})" if ended else "engine has died"

    def admits(self, request: ChatCompletionRequest | CompletionRequest) -> str | None:
        if self._state != "ready" or self.pooling:
            return None
        admission = self._admission
        if admission.active >= admission.capacity:
            return "queue"
        spill = self.settings.spill_at_waiting
        if spill is not None and admission.active - self._running_slots >= spill:
            return "queue"
        try:
            if isinstance(request, ChatCompletionRequest):
                # Measured exactly, with the template and tools the call would use, and kept for that call
                # (the router calls this backend next when it admits).
                prompt_ids, _, _, _ = self._prepare_chat(request, final_only=False)
                self._measured = (request, prompt_ids)
            else:
                # The prompts and the max_tokens budget they leave, as the call checks them.
                self._prepare_completion(request, final_only=False)
        except APIError as exc:
            return "context" if exc.code == "context_length_exceeded" else None
        return None

    # ---- the Backend interface: the base model itself ----------------------------------------------

    async def chat(self, request: ChatCompletionRequest, body: bytes, served_as: str, stats: CallStats) -> bytes:
        return await self.chat_with(request, served_as, stats, None)

    async def chat_stream(
        self, request: ChatCompletionRequest, body: bytes, served_as: str, stats: CallStats
    ) -> ChunkStream:
        return await self.chat_stream_with(request, served_as, stats, None)

    async def completion(self, request: CompletionRequest, body: bytes, served_as: str, stats: CallStats) -> bytes:
        return await self.completion_with(request, served_as, stats, None)

    async def completion_stream(
        self, request: CompletionRequest, body: bytes, served_as: str, stats: CallStats
    ) -> ChunkStream:
        return await self.completion_stream_with(request, served_as, stats, None)

    async def embeddings(self, request: EmbeddingRequest, body: bytes, served_as: str, stats: CallStats) -> bytes:
        return await self.embeddings_with(request, served_as, stats, None)

    # ---- calls, with an optional LoRA adapter ------------------------------------------------------

    async def chat_with(self, request: ChatCompletionRequest, served_as: str, stats: CallStats, lora: Any) -> bytes:
        with self._admit(served_as, generative=True):
            prompt_ids, params, plan, extra = self._prepare_chat(request, final_only=True)
            request_id = f"chatcmpl-{uuid.uuid4().hex}"
            output = await (await self._open(prompt_ids, params, request_id, lora, extra)).final()
        outputs = self._outputs
        choices = []
        for c in output.outputs:
            parsed = plan.parse(c.text, list(c.token_ids)) if plan is not None else Parsed(None, c.text, None)
            finish = outputs.finish(c.finish_reason)
            if parsed.tool_calls and finish == "stop":
                finish = "tool_calls"
            choices.append(ChatChoice(
                index=c.index,
                message=AssistantMessage(content=parsed.content, tool_calls=parsed.tool_calls,
                                         reasoning_content=parsed.reasoning, reasoning=parsed.reasoning),
                logprobs=outputs.chat_logprobs(c, request.top_logprobs or 0) if request.logprobs else None,
                finish_reason=finish,
            ))
        usage = outputs.usage(stats, [prompt_ids], output.outputs)
        response = ChatCompletionResponse(id=request_id, created=int(time.time()), model=served_as,
                                          choices=choices, usage=usage, system_fingerprint=outputs.fingerprint)
        stats.finish_reasons.extend(choice.finish_reason for choice in choices)
        return response.model_dump_json().encode()

    async def chat_stream_with(
        self, request: ChatCompletionRequest, served_as: str, stats: CallStats, lora: Any
    ) -> ChunkStream:
        with self._admit(served_as, generative=True) as slot:
            prompt_ids, params, plan, extra = self._prepare_chat(request, final_only=False)
            request_id = f"chatcmpl-{uuid.uuid4().hex}"
            generation = await self._open(prompt_ids, params, request_id, lora, extra)
            return slot.keep(self._chat_chunks(generation, request, plan, prompt_ids, served_as, request_id, stats,
                                               slot))

    async def completion_with(self, request: CompletionRequest, served_as: str, stats: CallStats, lora: Any) -> bytes:
        with self._admit(served_as, generative=True):
            prompts, params = self._prepare_completion(request, final_only=True)
            request_id = f"cmpl-{uuid.uuid4().hex}"
            outputs = await asyncio.gather(*(self._final(ids, params, f"{request_id}-{i}", lora)
                                             for i, ids in enumerate(prompts)))
        out = self._outputs
        n = params.n
        choices = []
        all_completions = []
        for p, output in enumerate(outputs):
            for c in output.outputs:
                all_completions.append(c)
                choices.append(CompletionChoice(
                    index=p * n + c.index, text=c.text,
                    logprobs=out.completion_logprobs(c, request.logprobs) if request.logprobs is not None else None,
                    finish_reason=out.finish(c.finish_reason),
                ))
        choices.sort(key=lambda choice: choice.index)
        usage = out.usage(stats, prompts, all_completions)
        response = CompletionResponse(id=request_id, created=int(time.time()), model=served_as,
                                      choices=choices, usage=usage, system_fingerprint=out.fingerprint)
        stats.finish_reasons.extend(str(choice.finish_reason) for choice in choices)
        return response.model_dump_json().encode()

    async def completion_stream_with(
        self, request: CompletionRequest, served_as: str, stats: CallStats, lora: Any
    ) -> ChunkStream:
        with self._admit(served_as, generative=True) as slot:
            prompts, params = self._prepare_completion(request, final_only=False)
            request_id = f"cmpl-{uuid.uuid4().hex}"
            generations = await self._open_all(prompts, params, request_id, lora)
            return slot.keep(
                self._completion_chunks(generations, request, prompts, served_as, request_id, stats, slot)
            )

    async def embeddings_with(self, request: EmbeddingRequest, served_as: str, stats: CallStats, lora: Any) -> bytes:
        with self._admit(served_as, generative=False):
            return await self._embedder.embed(request, served_as, stats, lora)

    # ---- preparing a request -----------------------------------------------------------------------

    def _admit(self, served_as: str, *, generative: bool) -> Slot:
        """Take a place among the requests the engine runs or queues, or refuse (429, 503, 400)."""
        if self._engine is None:
            raise not_ready(f"Model '{self.name}' is not ready: {self.not_ready_reason()}.")
        if generative and self.pooling:
            raise invalid_request(f"Model '{served_as}' is an embedding model: it only serves /v1/embeddings.",
                                  "model", "model_not_supported")
        if not generative and not self.pooling:
            raise invalid_request(f"Model '{served_as}' is a generative model and does not serve embeddings.",
                                  "model", "model_not_supported")
        return self._admission.admit()

    def _prepare_chat(
        self, request: ChatCompletionRequest, *, final_only: bool
    ) -> tuple[list[int], Any, RequestParsing | None, dict[str, Any]]:
        """Prompt ids, sampling parameters, output parsing and extra ``generate`` arguments of a chat."""
        measured, self._measured = self._measured, None
        plan = self._parsing.plan(request)
        if measured is not None and measured[0] is request:
            prompt_ids = measured[1]
        else:
            prompt_ids = self._prompts.chat(request, with_tools=plan is not None and plan.tools_in_play)
        kwargs = sampling_kwargs(request, self._max_logprobs)
        budget_param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        self._prompts.check_budget(len(prompt_ids), kwargs["max_tokens"], budget_param)
        structured = self._structured(request)
        extra: dict[str, Any] = {}
        if plan is not None:
            structured, kwargs["skip_special_tokens"] = plan.adjust(structured)
            ended = plan.reasoning_ended(prompt_ids)
            if ended is not None:
                extra["reasoning_ended"] = ended
        if structured is not None:
            kwargs["structured_outputs"] = structured
        return prompt_ids, self._sampling(kwargs, final_only), plan, extra

    def _prepare_completion(self, request: CompletionRequest, *, final_only: bool) -> tuple[list[list[int]], Any]:
        prompts = self._prompts.completion(request)
        kwargs = sampling_kwargs(request, self._max_logprobs)
        for ids in prompts:
            self._prompts.check_budget(len(ids), kwargs["max_tokens"], "max_tokens")
        structured = self._structured(request)
        if structured is not None:
            kwargs["structured_outputs"] = structured
        return prompts, self._sampling(kwargs, final_only)

    def _structured(self, request: ChatCompletionRequest | CompletionRequest) -> Any:
        assert self._vllm is not None
        constraint = structured_output(request)
        if constraint is None:
            return None
        try:
            return self._vllm.StructuredOutputsParams(**constraint)
        except (TypeError, ValueError) as exc:
            param = "structured_outputs" if "structured_outputs" in (request.model_extra or {}) else "response_format"
            raise invalid_request(f"Invalid value for '{param}': {exc}", param) from None

    def _sampling(self, kwargs: dict[str, Any], final_only: bool) -> Any:
        assert self._vllm is not None
        kwargs["output_kind"] = self._vllm.FINAL_ONLY if final_only else self._vllm.DELTA
        try:
            return self._vllm.SamplingParams(**kwargs)
        except Exception as exc:
            raise client_error(exc) from None

    # ---- generation ------------------------------------------------------------------------------

    async def _open(
        self, ids: list[int], params: Any, request_id: str, lora: Any, extra: dict[str, Any] | None = None
    ) -> Generation:
        assert self._vllm is not None
        generator = self._engine.generate(self._vllm.TokensPrompt(prompt_token_ids=ids), params, request_id,
                                          lora_request=lora, **(extra or {}))
        return await Generation.open(self._engine, generator, request_id, self._vllm)

    async def _final(self, ids: list[int], params: Any, request_id: str, lora: Any) -> Any:
        return await (await self._open(ids, params, request_id, lora)).final()

    async def _open_all(self, prompts: list[list[int]], params: Any, request_id: str, lora: Any) -> list[Generation]:
        generations: list[Generation] = []
        try:
            for i, ids in enumerate(prompts):
                generations.append(await self._open(ids, params, f"{request_id}-{i}", lora))
        except BaseException:
            for generation in generations:
                await generation.close()
            raise
        return generations

    async def _chat_chunks(
        self, generation: Generation, request: ChatCompletionRequest, plan: RequestParsing | None,
        prompt_ids: list[int], served_as: str, request_id: str, stats: CallStats, slot: Slot,
    ) -> AsyncIterator[list[bytes]]:
        created = int(time.time())
        n = request.n or 1
        out = self._outputs
        fingerprint = out.fingerprint
        top = request.top_logprobs or 0
        parsers = [plan.stream(prompt_ids) for _ in range(n)] if plan is not None else None

        def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> bytes:
            return ChatCompletionChunk(id=request_id, created=created, model=served_as, choices=choices,
                                       usage=usage, system_fingerprint=fingerprint).model_dump_json().encode()

        completions: dict[int, Any] = {}
        try:
            yield [chunk([ChunkChoice(index=i, delta=ChunkDelta(role="assistant", content="")) for i in range(n)])]
            async for output in generation:
                batch = []
                for c in output.outputs:
                    completions[c.index] = TokenCount.add(completions.get(c.index), c)
                    finish = out.finish(c.finish_reason) if c.finish_reason else None
                    logprobs = out.chat_logprobs(c, top) if request.logprobs else None
                    if parsers is None:
                        delta: ChunkDelta | None = ChunkDelta(content=c.text)
                    else:
                        parser = parsers[c.index]
                        delta = parser.delta(c.text, c.token_ids, finish is not None)
                        if finish == "stop" and parser.called:
                            finish = "tool_calls"
                        if delta is None:
                            if finish is None and logprobs is None:
                                continue  # the parser holds the text back until it knows what it is
                            delta = ChunkDelta()
                    if finish:
                        stats.finish_reasons.append(finish)
                    batch.append(chunk([ChunkChoice(index=c.index, delta=delta, logprobs=logprobs,
                                                    finish_reason=finish)]))
                if batch:
                    yield batch
            usage = out.usage(stats, [prompt_ids], list(completions.values()))
            if request.wants_usage_chunk:
                yield [chunk([], usage)]
        finally:
            slot.release()
            await generation.close()

    async def _completion_chunks(
        self, generations: list[Generation], request: CompletionRequest, prompts: list[list[int]],
        served_as: str, request_id: str, stats: CallStats, slot: Slot,
    ) -> AsyncIterator[list[bytes]]:
        created = int(time.time())
        n = request.n or 1
        out = self._outputs
        fingerprint = out.fingerprint
        completions: dict[tuple[int, int], Any] = {}

        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
            return CompletionResponse(id=request_id, created=created, model=served_as, choices=choices,
                                      usage=usage, system_fingerprint=fingerprint).model_dump_json().encode()

        try:
            async for p, output in merge(generations):
                batch = []
                for c in output.outputs:
                    completions[p, c.index] = TokenCount.add(completions.get((p, c.index)), c)
                    finish = out.finish(c.finish_reason) if c.finish_reason else None
                    if finish:
                        stats.finish_reasons.append(finish)
                    batch.append(chunk([CompletionChoice(
                        index=p * n + c.index, text=c.text,
                        logprobs=out.completion_logprobs(c, request.logprobs) if request.logprobs is not None
                        else None,
                        finish_reason=finish,
                    )]))
                if batch:
                    yield batch
            usage = out.usage(stats, prompts, list(completions.values()))
            if request.wants_usage_chunk:
                yield [chunk([], usage)]
        finally:
            slot.release()
            for generation in generations:
                await generation.close()


def _engine_exit(engine: Any) -> str:
    """How the engine's processes ended, as vLLM's process manager saw them ("" when it cannot tell)."""
    try:
        finished: dict[str, int | None] = engine.engine_core.resources.engine_manager.finished_procs()
    except Exception:  # vLLM internals: another engine client (or version) may not have them
        return ""
    ends = []
    for name, code in finished.items():
        if code is not None and code < 0:
            ends.append(f"{name} was killed by {_signal_name(-code)}")
        elif code is not None:
            ends.append(f"{name} exited with code {code}")
    return ", ".join(ends)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _engine_processes(engine: Any) -> list[Any]:
    """The engine's EngineCore processes and their children, as psutil handles (safe against PID reuse)."""
    import psutil

    try:
        cores = [psutil.Process(proc.pid) for proc in engine.engine_core.resources.engine_manager.processes]
        return [process for core in cores for process in (core, *core.children(recursive=True))]
    except Exception:  # vLLM internals (or a process gone already): nothing to watch over
        return []


def _kill(processes: list[Any]) -> None:
    """Kill those still running. A worker whose EngineCore was killed can spin on its shared-memory queue
    instead of exiting, a core busy until the process restarts."""
    import psutil

    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                log.warning("killing engine process %d (%s), left behind by its engine", process.pid,
                            process.name())
                process.kill()
        except psutil.Error:
            continue  # it ended meanwhile


def _new_engine(vllm: VLLMNames, args: Any) -> Any:
    # The stat logger is vLLM's Prometheus one, in a registry of this engine's own (engine_metrics).
    return vllm.AsyncLLM.from_engine_args(args, stat_loggers=[stat_logger()])
