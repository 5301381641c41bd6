"""A chat stream as Responses stream events: the streaming half of :mod:`app.responses.translate`.

One :class:`ChatEvents` per response turns chat chunks into numbered ``event:``/``data:`` frames and builds
the final Response on the way, so the ids and text in the stream are those of the object ``response.completed``
carries and the store keeps. A text delta, the event sent most, is assembled from bytes prepared when its
item opens: one string encoding per token, no dictionary or full ``json.dumps``.
"""

from __future__ import annotations

import json
from typing import Any

from app.backends.base import ToolStep
from app.errors import APIError
from app.jsonbytes import encode_string
from app.responses.tools import ToolSet, custom_input
from app.responses.translate import (
    ResponseShape,
    error_object,
    incomplete_reason,
    message_item,
    new_id,
    reasoning_item,
    response_logprobs,
    response_usage,
    step_item,
    text_part,
)

_EVENT = b"event: "
_DATA = b"\ndata: "
_END = b"\n\n"
_SEQ = b',"sequence_number":'
_CLOSE = b"}\n\n"


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


class _Open:
    """The item being written: its place, its text so far, and the prefix of its delta events."""

    __slots__ = ("call_id", "id", "index", "kind", "logprobs", "name", "parts", "prefix")

    def __init__(self, kind: str, index: int, item_id: str) -> None:
        self.kind = kind
        self.index = index
        self.id = item_id
        self.parts: list[str] = []
        self.prefix = b""
        self.call_id = ""
        self.name = ""
        self.logprobs: list[dict[str, Any]] = []


class ChatEvents:
    def __init__(self, shape: ResponseShape, tools: ToolSet, steps: list[ToolStep] | None = None) -> None:
        self.shape = shape
        self.tools = tools
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self._open: _Open | None = None
        self._calls: dict[int, _Open] = {}
        self._usage: dict[str, Any] | None = None
        self._finish: str | None = None
        self._steps = steps
        self._steps_seen = 0
        #: agent steps shown as started and not yet finished: (record, item id, output index)
        self._running: list[tuple[ToolStep, str, int]] = []

    # ---- framing -----------------------------------------------------------------------------------

    def event(self, kind: str, fields: dict[str, Any]) -> bytes:
        seq = self.seq
        self.seq += 1
        data = _dumps({"type": kind, **fields, "sequence_number": seq})
        return b"".join((_EVENT, kind.encode(), _DATA, data, _END))

    def _delta(self, item: _Open, text: str) -> bytes:
        seq = self.seq
        self.seq += 1
        return b"".join((item.prefix, encode_string(text), _SEQ, str(seq).encode(), _CLOSE))

    def state(self, kind: str, status: str) -> bytes:
        """``response.created``/``in_progress``/``queued``: the response object as it stands."""
        return self.event(kind, {"response": self.shape.body(status, list(self.output))})

    # ---- chat chunks -------------------------------------------------------------------------------

    def start(self) -> list[bytes]:
        return [self.state("response.created", "in_progress"), self.state("response.in_progress", "in_progress")]

    def feed(self, payloads: list[bytes]) -> list[bytes]:
        """The events of a batch of chat chunks (and of any agent step that changed meanwhile)."""
        out: list[bytes] = []
        if self._steps is not None and (len(self._steps) > self._steps_seen or self._running):
            self._show_steps(out)
        for payload in payloads:
            chunk = json.loads(payload)
            if chunk.get("usage"):
                self._usage = chunk["usage"]
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                if reasoning:
                    self._text(out, "reasoning", reasoning)
                logprobs = choice.get("logprobs")
                if delta.get("content"):
                    self._text(out, "message", delta["content"],
                               response_logprobs(logprobs.get("content")) if logprobs else None)
                elif logprobs and logprobs.get("content") and self._open is not None and self._open.kind == "message":
                    # A token without text (the engine's EOS): its logprobs, as the whole answer would have them.
                    self._text(out, "message", "", response_logprobs(logprobs["content"]))
                for call in delta.get("tool_calls") or ():
                    self._call(out, call)
                if choice.get("finish_reason"):
                    self._finish = choice["finish_reason"]
        return out

    def _text(self, out: list[bytes], kind: str, text: str, logprobs: list[dict[str, Any]] | None = None) -> None:
        item = self._open
        if item is None or item.kind != kind:
            self._close(out)
            item = self._open_text(out, kind)
        item.parts.append(text)
        if logprobs:
            item.logprobs += logprobs
            out.append(self.event("response.output_text.delta", {
                "item_id": item.id, "output_index": item.index, "content_index": 0, "delta": text,
                "logprobs": logprobs}))
        else:
            out.append(self._delta(item, text))

    def _open_text(self, out: list[bytes], kind: str) -> _Open:
        index = len(self.output)
        if kind == "reasoning":
            item = _Open(kind, index, new_id("rs"))
            self.output.append(reasoning_item(item.id, ""))
            self.output[index]["summary"] = []
            out.append(self.event("response.output_item.added", {"output_index": index, "item": self.output[index]}))
            out.append(self.event("response.reasoning_summary_part.added", {
                "item_id": item.id, "output_index": index, "summary_index": 0,
                "part": {"type": "summary_text", "text": ""}}))
            head: dict[str, Any] = {"type": "response.reasoning_summary_text.delta", "item_id": item.id,
                                    "output_index": index, "summary_index": 0}
        else:
            item = _Open(kind, index, new_id("msg"))
            self.output.append(message_item(item.id, None, None, None, "in_progress"))
            out.append(self.event("response.output_item.added", {"output_index": index, "item": self.output[index]}))
            out.append(self.event("response.content_part.added", {
                "item_id": item.id, "output_index": index, "content_index": 0, "part": text_part("")}))
            head = {"type": "response.output_text.delta", "item_id": item.id, "output_index": index,
                    "content_index": 0, "logprobs": []}
        # The event's JSON up to its "delta" value, so a delta costs one string encoding.
        item.prefix = b"".join((_EVENT, str(head["type"]).encode(), _DATA, _dumps(head)[:-1], b',"delta":'))
        self._open = item
        return item

    def _call(self, out: list[bytes], part: dict[str, Any]) -> None:
        index = part.get("index", 0)
        item = self._calls.get(index)
        function = part.get("function") or {}
        if item is None:
            self._close(out)
            name = function.get("name") or ""
            custom = self.tools.is_custom(name)
            item = _Open("custom" if custom else "call", len(self.output), new_id("ctc" if custom else "fc"))
            item.call_id = part.get("id") or new_id("call")
            item.name = name
            self._calls[index] = item
            self.output.append(self.tools.call_item(item.id, item.call_id, name, "", "in_progress"))
            out.append(self.event("response.output_item.added", {"output_index": item.index,
                                                                 "item": self.output[item.index]}))
            self._open = item
        elif function.get("name"):
            item.name += function["name"]
        arguments = function.get("arguments")
        if arguments:
            item.parts.append(arguments)
            # A custom call's input is inside the JSON the model writes: it is sent whole when the call ends.
            if item.kind == "call":
                out.append(self.event("response.function_call_arguments.delta", {
                    "item_id": item.id, "output_index": item.index, "delta": arguments}))

    def _close(self, out: list[bytes], status: str = "completed") -> None:
        item = self._open
        if item is None:
            return
        self._open = None
        text = "".join(item.parts)
        index = item.index
        if item.kind == "reasoning":
            part = {"type": "summary_text", "text": text}
            out.append(self.event("response.reasoning_summary_text.done", {
                "item_id": item.id, "output_index": index, "summary_index": 0, "text": text}))
            out.append(self.event("response.reasoning_summary_part.done", {
                "item_id": item.id, "output_index": index, "summary_index": 0, "part": part}))
            self.output[index] = reasoning_item(item.id, text)
        elif item.kind == "message":
            out.append(self.event("response.output_text.done", {
                "item_id": item.id, "output_index": index, "content_index": 0, "text": text,
                "logprobs": item.logprobs}))
            out.append(self.event("response.content_part.done", {
                "item_id": item.id, "output_index": index, "content_index": 0,
                "part": text_part(text, item.logprobs)}))
            self.output[index] = message_item(item.id, text, None, item.logprobs, status)
        elif item.kind == "custom":
            value = custom_input(text)
            if value:
                out.append(self.event("response.custom_tool_call_input.delta", {
                    "item_id": item.id, "output_index": index, "delta": value}))
            out.append(self.event("response.custom_tool_call_input.done", {
                "item_id": item.id, "output_index": index, "input": value}))
            self.output[index] = self.tools.call_item(item.id, item.call_id, item.name, text, status)
        else:
            call = self.tools.call_item(item.id, item.call_id, item.name, text, status)
            out.append(self.event("response.function_call_arguments.done", {
                "item_id": item.id, "output_index": index, "name": call["name"], "arguments": text}))
            self.output[index] = call
        out.append(self.event("response.output_item.done", {"output_index": index, "item": self.output[index]}))

    # ---- an agent's server-side tool calls ---------------------------------------------------------

    def _show_steps(self, out: list[bytes]) -> None:
        assert self._steps is not None
        for step in self._steps[self._steps_seen:]:
            self._close(out)
            index = len(self.output)
            item_id = new_id("mcp")
            # Shown as it started, even when it has finished since.
            self.output.append(step_item(ToolStep(step.call_id, step.name, step.arguments, step.server), item_id))
            out.append(self.event("response.output_item.added", {"output_index": index, "item": self.output[index]}))
            out.append(self.event("response.mcp_call_arguments.done", {
                "item_id": item_id, "output_index": index, "arguments": step.arguments}))
            out.append(self.event("response.mcp_call.in_progress", {"item_id": item_id, "output_index": index}))
            self._running.append((step, item_id, index))
        self._steps_seen = len(self._steps)
        still: list[tuple[ToolStep, str, int]] = []
        for step, item_id, index in self._running:
            if step.output is None:
                still.append((step, item_id, index))
                continue
            self.output[index] = step_item(step, item_id)
            kind = "response.mcp_call.failed" if step.failed else "response.mcp_call.completed"
            out.append(self.event(kind, {"item_id": item_id, "output_index": index}))
            out.append(self.event("response.output_item.done", {"output_index": index, "item": self.output[index]}))
        self._running = still

    # ---- the end -----------------------------------------------------------------------------------

    def finish(self) -> tuple[list[bytes], dict[str, Any]]:
        """The closing events, the last being ``response.completed`` (or ``.incomplete``), and the Response."""
        out: list[bytes] = []
        if self._steps is not None:
            self._show_steps(out)
        incomplete = incomplete_reason(self._finish)
        # What the token limit cut is itself incomplete, as OpenAI marks it.
        self._close(out, "incomplete" if incomplete else "completed")
        body = self.shape.body("incomplete" if incomplete else "completed", self.output,
                               response_usage(self._usage), incomplete=incomplete)
        out.append(self.event("response.incomplete" if incomplete else "response.completed", {"response": body}))
        return out, body

    def fail(self, error: APIError) -> tuple[list[bytes], dict[str, Any]]:
        """A failure after the stream began: ``response.failed`` with the error, never a completed response."""
        out: list[bytes] = []
        body = self.shape.body("failed", self.output, response_usage(self._usage),
                               error=error_object(error.status, error.message))
        out.append(self.event("response.failed", {"response": body}))
        return out, body

    def cancelled(self) -> tuple[list[bytes], dict[str, Any]]:
        """A cancelled background response. The spec has no event for it, so a follower gets an ``error``
        event saying so rather than a stream that stops without a word."""
        body = self.shape.body("cancelled", self.output, response_usage(self._usage))
        return [self.event("error", {"code": "response_cancelled", "message": "The response was cancelled.",
                                     "param": None})], body
