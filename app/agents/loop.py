"""An agent: a ``Backend`` over one served model plus a set of tools, running the tool-calling loop.

Each round calls the model with the system prompt, the conversation so far and every tool; runs the
server-side calls of its answer (concurrently when allowed), appends the assistant message and one
``role: "tool"`` result per call id, and goes again, until the model answers without server-side calls or
``max_steps`` rounds have run (then one last call with ``tool_choice: "none"``). A call of one of the client's
own tools ends the loop: it goes back to the client as an ordinary ``tool_calls`` answer, and the client's
next request (with the result) resumes it. No lock: requests run concurrently, each with its own state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator

from app import metrics
from app.agents import steps
from app.agents.tools import Tool, ToolResult, ToolSource
from app.backends.base import Backend, CallStats, ChunkStream, ToolStep, close_stream
from app.errors import invalid_request
from app.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from app.settings import AgentSettings

log = logging.getLogger(__name__)

_OK, _ERROR, _TIMEOUT, _INVALID, _UNKNOWN = "ok", "error", "timeout", "invalid_arguments", "unknown_tool"
# Request fields the loop sets itself on every model call.
_LOOP_FIELDS = frozenset({"model", "messages", "tools", "stream", "stream_options", "n"})
_END = object()


@dataclass(slots=True)
class _Call:
    """One tool call of the model's answer, as it accumulates (streamed arguments arrive in pieces)."""

    id: str = ""
    name: str = ""
    arguments: str = ""

    def message(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(slots=True)
class _Run:
    """One request's loop state."""

    messages: list[dict[str, Any]]
    base: dict[str, Any]
    client_tools: frozenset[str]
    stats: CallStats
    step: int = 0
    tool_calls: int = 0
    #: the current model call is the last one (tool_choice none, at the step limit)
    final: bool = False
    reasoning: list[str] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})

    def count(self, usage: dict[str, Any] | None) -> None:
        for key in self.usage:
            self.usage[key] += (usage or {}).get(key) or 0


@dataclass(slots=True)
class _Step:
    """What one streamed model call said, gathered while its chunks are passed on."""

    calls: dict[int, _Call] = field(default_factory=dict)
    #: model's tool-call index -> index among the client's own calls
    client: dict[int, int] = field(default_factory=dict)
    content: list[str] = field(default_factory=list)
    finish: str = "stop"

    def server_calls(self) -> list[_Call]:
        return [call for index, call in sorted(self.calls.items()) if index not in self.client]


class _Chunks:
    """Our chunks for one streamed answer: one id, one model name, every step's deltas."""

    def __init__(self, served_as: str) -> None:
        self._head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                      "created": int(time.time()), "model": served_as}

    def delta(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return json.dumps({**self._head, "choices": [choice]}, ensure_ascii=False).encode()

    def usage(self, usage: dict[str, int]) -> bytes:
        return json.dumps({**self._head, "choices": [], "usage": usage}).encode()


class AgentBackend(Backend):
    owned_by = "helios-agent"

    def __init__(self, settings: AgentSettings, model: Backend, sources: list[ToolSource]) -> None:
        super().__init__(settings.name)
        self.settings = settings
        self._model = model
        self._model_name = settings.model
        self._sources = sources
        self._tools: dict[str, Tool] = {}
        self._validators: dict[str, Any] = {}
        self._definitions: list[dict[str, Any]] = []

    # ---- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        for source in self._sources:
            await source.start()
        self._index_tools()

    def _index_tools(self) -> None:
        owners: dict[str, str] = {}
        tools: dict[str, Tool] = {}
        for source in self._sources:
            for tool in source.tools():
                if tool.name in owners:
                    raise ValueError(f"agent '{self.name}': tool name '{tool.name}' is offered by both "
                                     f"{owners[tool.name]} and {source.label}; give one a prefix")
                owners[tool.name] = source.label
                tools[tool.name] = tool
        self._tools = tools
        self._validators = {name: Draft202012Validator(tool.parameters) for name, tool in tools.items()}
        self._definitions = [tool.definition() for tool in tools.values()]

    async def close(self) -> None:
        for source in self._sources:
            await source.close()

    def not_ready_reason(self) -> str | None:
        reason = self._model.not_ready_reason()
        if reason is not None:
            return f"model '{self._model_name}': {reason}"
        for source in self._sources:
            reason = source.not_ready_reason()
            if reason is not None:
                return reason
        return None

    # ---- the routes this backend answers -------------------------------------------------------------

    async def completion(self, request: CompletionRequest, body: bytes, served_as: str, stats: CallStats) -> bytes:
        raise self._chat_only(served_as)

    async def completion_stream(
        self, request: CompletionRequest, body: bytes, served_as: str, stats: CallStats
    ) -> ChunkStream:
        raise self._chat_only(served_as)

    async def embeddings(self, request: EmbeddingRequest, body: bytes, served_as: str, stats: CallStats) -> bytes:
        raise self._chat_only(served_as)

    @staticmethod
    def _chat_only(served_as: str) -> Exception:
        return invalid_request(f"'{served_as}' is an agent: it answers chat completions only.", "model",
                               "model_not_supported")

    async def chat(self, request: ChatCompletionRequest, body: bytes, served_as: str, stats: CallStats) -> bytes:
        run = self._begin(request, stats)
        said: list[str] = []  # the model's text of every round, as a stream would have shown it
        while True:
            data = json.loads(await self._call(run))
            if run.final:
                run.reasoning.append(steps.step_limit(self.settings.max_steps))
            run.count(data.get("usage"))
            choice = data["choices"][0]
            message, finish = choice["message"], choice["finish_reason"]
            if message.get("reasoning_content"):
                run.reasoning.append(message["reasoning_content"])
            if message.get("content"):
                said.append(message["content"])
            calls = [_Call(c["id"], c["function"]["name"], c["function"]["arguments"])
                     for c in message.get("tool_calls") or ()]
            client = [call for call in calls if call.name in run.client_tools]
            server = [call for call in calls if call.name not in run.client_tools]
            if client or not server or run.final:
                break
            await self._run_tools(run, message.get("content"), server, _keep_lines(run.reasoning))
        answer: dict[str, Any] = {"role": "assistant", "content": "".join(said) or None, "refusal": None}
        if client:
            # Server-side calls of the same answer are not run: the client's next request resumes from here.
            answer["tool_calls"] = [call.message() for call in client]
            finish = "tool_calls"
        elif finish == "tool_calls":
            finish = "stop"  # the forced last call still named tools, which were not run
        if run.reasoning:
            answer["reasoning_content"] = "".join(run.reasoning)
        usage = self._end(run)
        return json.dumps({
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": served_as, "choices": [{"index": 0, "message": answer, "logprobs": None,
                                             "finish_reason": finish}],
            "usage": usage,
        }, ensure_ascii=False).encode()

    async def chat_stream(
        self, request: ChatCompletionRequest, body: bytes, served_as: str, stats: CallStats
    ) -> ChunkStream:
        run = self._begin(request, stats)
        # The first model call is opened before the stream starts, so its refusals are HTTP statuses.
        first = await self._open_stream(run)
        return self._stream(run, first, request, served_as)

    # ---- one request -------------------------------------------------------------------------------

    def _begin(self, request: ChatCompletionRequest, stats: CallStats) -> _Run:
        if (request.n or 1) != 1:
            raise invalid_request("Invalid value for 'n': an agent gives one answer (n = 1).", "n")
        client_tools: set[str] = set()
        for i, tool in enumerate(request.tools or ()):
            name = tool.function.name
            if name in self._tools:
                raise invalid_request(f"Invalid value for 'tools[{i}].function.name': '{name}' is a tool of agent "
                                      f"'{self.name}' already; rename the client's tool.", f"tools[{i}].function.name")
            client_tools.add(name)
        base = request.model_dump(exclude_none=True, exclude=set(_LOOP_FIELDS), by_alias=True)
        agent = self.settings
        if agent.temperature is not None:
            base.setdefault("temperature", agent.temperature)
        if agent.max_tokens is not None and "max_completion_tokens" not in base:
            base.setdefault("max_tokens", agent.max_tokens)
        base.setdefault("parallel_tool_calls", agent.parallel_tool_calls)
        messages = [m.model_dump(exclude_none=True) for m in request.messages]
        if agent.system_prompt_text:
            messages.insert(0, {"role": "system", "content": agent.system_prompt_text})
        tools = self._definitions + [t.model_dump(exclude_none=True) for t in request.tools or ()]
        if tools:
            base["tools"] = tools
        stats.steps = stats.tool_calls = 0
        return _Run(messages, base, frozenset(client_tools), stats)

    def _model_request(self, run: _Run, *, stream: bool) -> tuple[ChatCompletionRequest, bytes]:
        """The next model call; after max_steps rounds of tools, the last one, made to answer."""
        # "model" first: the remote backend then rewrites it in the bytes without re-parsing the body.
        body = {"model": self._model_name, **run.base, "messages": run.messages}
        run.final = run.step >= self.settings.max_steps
        run.step += 1
        if run.final:
            body["tool_choice"] = "none"
            metrics.agent_step_limit.labels(self.name).inc()
        if not body.get("tools"):
            body.pop("tool_choice", None)
            body.pop("parallel_tool_calls", None)
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        raw = json.dumps(body, ensure_ascii=False).encode()
        return ChatCompletionRequest.model_validate_json(raw), raw

    async def _call(self, run: _Run) -> bytes:
        request, raw = self._model_request(run, stream=False)
        return await self._model.chat(request, raw, self._model_name, CallStats())

    async def _open_stream(self, run: _Run) -> ChunkStream:
        request, raw = self._model_request(run, stream=True)
        return await self._model.chat_stream(request, raw, self._model_name, CallStats())

    def _end(self, run: _Run) -> dict[str, int]:
        """Record the finished run; returns its usage, the sum over every model call."""
        stats = run.stats
        stats.steps, stats.tool_calls = run.step, run.tool_calls
        stats.prompt_tokens, stats.completion_tokens = run.usage["prompt_tokens"], run.usage["completion_tokens"]
        metrics.agent_steps.labels(self.name).observe(run.step)
        return {**run.usage, "total_tokens": run.usage["prompt_tokens"] + run.usage["completion_tokens"]}

    # ---- tools -------------------------------------------------------------------------------------

    async def _run_tools(self, run: _Run, content: str | None, calls: list[_Call], emit: Callable[[str], Any]) -> None:
        """Run one round's calls and append the assistant message and one result per call id. Each start and
        end is told to ``emit`` as a step line, or, when the caller records steps, as an empty line after the
        step record changed."""
        step = run.step
        run.messages.append({"role": "assistant", "content": content, "tool_calls": [c.message() for c in calls]})
        run.tool_calls += len(calls)
        records = run.stats.tool_steps
        shown: list[ToolStep | None] = []
        for call in calls:
            if records is None:
                shown.append(None)
                emit(steps.started(step, call.name, call.arguments))
            else:
                tool = self._tools.get(call.name)
                record = ToolStep(call.id, call.name, call.arguments, tool.server if tool else None)
                records.append(record)
                shown.append(record)
                emit("")
        jobs = [self._run_tool(step, call, record, emit) for call, record in zip(calls, shown, strict=True)]
        if self.settings.parallel_tool_calls:
            results = await asyncio.gather(*jobs)
        else:
            results = [await job for job in jobs]
        for call, text in zip(calls, results, strict=True):
            run.messages.append({"role": "tool", "tool_call_id": call.id, "content": text})

    async def _run_tool(self, step: int, call: _Call, record: ToolStep | None, emit: Callable[[str], Any]) -> str:
        started = time.perf_counter()
        outcome, result = await self._outcome(call)
        seconds = time.perf_counter() - started
        text = _cut(result.text, self.settings.max_tool_output_bytes)
        metrics.agent_tool_calls.labels(self.name, call.name if call.name in self._tools else "_unknown",
                                        outcome).inc()
        if call.name in self._tools:
            metrics.agent_tool_duration.labels(self.name, call.name).observe(seconds)
        log.info("tool call", extra={"agent": self.name, "tool": call.name, "outcome": outcome,
                                     "duration_ms": round(seconds * 1000, 3)})
        if log.isEnabledFor(logging.DEBUG):
            log.debug("tool call detail", extra={"tool": call.name, "arguments": call.arguments, "result": text})
        if record is None:
            emit(steps.finished(step, call.name, outcome, text, seconds))
        else:
            record.output, record.failed = text, outcome != _OK
            emit("")
        return text

    async def _outcome(self, call: _Call) -> tuple[str, ToolResult]:
        tool = self._tools.get(call.name)
        if tool is None:
            known = ", ".join(sorted(self._tools)) or "none"
            return _UNKNOWN, ToolResult(f"error: there is no tool named '{call.name}' (tools: {known})", True)
        try:
            arguments = json.loads(call.arguments or "{}")
        except json.JSONDecodeError as exc:
            return _INVALID, ToolResult(f"error: the arguments are not valid JSON ({exc.msg}); send a JSON object",
                                        True)
        if not isinstance(arguments, dict):
            return _INVALID, ToolResult("error: the arguments must be a JSON object", True)
        problem = next(iter(self._validators[call.name].iter_errors(arguments)), None)
        if problem is not None:
            where = "/".join(str(p) for p in problem.absolute_path) or "arguments"
            return _INVALID, ToolResult(f"error: invalid arguments at {where}: {problem.message}", True)
        try:
            async with asyncio.timeout(self.settings.tool_timeout):
                result = await tool.call(arguments)
        except TimeoutError:
            return _TIMEOUT, ToolResult(f"error: the tool took longer than {self.settings.tool_timeout:g} s", True)
        except Exception as exc:
            log.warning("tool %s raised", call.name, exc_info=exc)
            return _ERROR, ToolResult(f"error: the tool failed: {' '.join(str(exc).split())[:500]}", True)
        return (_ERROR if result.is_error else _OK), result

    # ---- streaming ---------------------------------------------------------------------------------

    async def _stream(
        self, run: _Run, chunks: ChunkStream, request: ChatCompletionRequest, served_as: str
    ) -> AsyncIterator[list[bytes]]:
        out = _Chunks(served_as)
        try:
            yield [out.delta({"role": "assistant", "content": ""})]
            while True:
                step = _Step()
                async for batch in self._relay(run, chunks, step, out):
                    yield batch
                await close_stream(chunks)
                server = step.server_calls()
                if step.client or not server or run.final:
                    finish = "tool_calls" if step.client else ("stop" if step.finish == "tool_calls" else step.finish)
                    yield [out.delta({}, finish)]
                    break
                async for batch in self._tools_streamed(run, "".join(step.content) or None, server, out):
                    yield batch
                chunks = await self._open_stream(run)
                if run.final:
                    yield [out.delta({"reasoning_content": steps.step_limit(self.settings.max_steps)})]
            usage = self._end(run)
            if request.wants_usage_chunk:
                yield [out.usage(usage)]
        finally:
            await close_stream(chunks)

    async def _relay(self, run: _Run, chunks: ChunkStream, step: _Step, out: _Chunks) -> AsyncIterator[list[bytes]]:
        """One model call's stream: answer text and reasoning passed on as they come, the client's own tool
        calls passed on, server-side calls held for the loop."""
        async for batch in chunks:
            relayed: list[bytes] = []
            for payload in batch:
                data = json.loads(payload)
                run.count(data.get("usage"))
                for choice in data.get("choices") or ():
                    delta = choice.get("delta") or {}
                    if delta.get("reasoning_content"):
                        relayed.append(out.delta({"reasoning_content": delta["reasoning_content"]}))
                    if delta.get("content"):
                        step.content.append(delta["content"])
                        relayed.append(out.delta({"content": delta["content"]}))
                    for part in delta.get("tool_calls") or ():
                        passed = _tool_delta(run, step, part)
                        if passed is not None:
                            relayed.append(out.delta({"tool_calls": [passed]}))
                    if choice.get("finish_reason"):
                        step.finish = choice["finish_reason"]
            if relayed:
                yield relayed

    async def _tools_streamed(
        self, run: _Run, content: str | None, calls: list[_Call], out: _Chunks
    ) -> AsyncIterator[list[bytes]]:
        """Run one round's tools, streaming each call's start and end as it happens."""
        lines: asyncio.Queue[object] = asyncio.Queue()
        work = asyncio.ensure_future(self._run_tools(run, content, calls, lines.put_nowait))
        work.add_done_callback(lambda _: lines.put_nowait(_END))
        try:
            while (line := await lines.get()) is not _END:
                # An empty line only says a recorded step changed: an empty batch wakes the caller.
                yield [out.delta({"reasoning_content": line})] if line else []
        finally:
            # A client that leaves cancels the running tool calls with the stream.
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
        work.result()


def _tool_delta(run: _Run, step: _Step, part: dict[str, Any]) -> dict[str, Any] | None:
    """Accumulate one streamed tool-call delta; a client tool's deltas are passed on (re-indexed among the
    client's calls), a server-side tool's are held for the loop."""
    index = part.get("index", 0)
    call = step.calls.setdefault(index, _Call())
    function = part.get("function") or {}
    if part.get("id"):
        call.id = part["id"]
    if function.get("name"):
        call.name += function["name"]
        if call.name in run.client_tools and index not in step.client:
            step.client[index] = len(step.client)
    if function.get("arguments"):
        call.arguments += function["arguments"]
    if index not in step.client:
        return None
    return {**part, "index": step.client[index]}


def _keep_lines(lines: list[str]) -> Callable[[str], None]:
    def keep(line: str) -> None:
        if line:
            lines.append(line)
    return keep


def _cut(text: str, limit: int) -> str:
    data = text.encode()
    if len(data) <= limit:
        return text
    kept = data[:limit].decode(errors="ignore")
    return f"{kept}\n[output cut: {len(data)} bytes, only the first {limit} are shown]"
