"""Serving ``/v1/responses``: conversations, the store, background runs and cancellation, over any backend.

A backend that speaks the Responses API itself gets the request relayed as bytes; every other one is called
on its Chat Completions methods through :mod:`app.responses.translate`. Either way this module keeps what
``store`` asks for, continues ``previous_response_id`` conversations, and runs ``background`` responses as
tasks whose events can be followed (``GET ...?stream=true``) and cancelled, here or from another replica.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from app.backends.base import Backend, CallStats, ChunkStream, ToolStep, close_stream
from app.errors import APIError, from_validation_error, invalid_request
from app.exchange import Exchange
from app.protocol import ChatCompletionRequest
from app.responses.events import ChatEvents
from app.responses.protocol import ResponsesRequest
from app.responses.store import ResponseStore, StoredResponse
from app.responses.tools import ToolSet, UnsupportedTools
from app.responses.translate import ResponseShape, chat_body, error_object, input_items, response_from_chat

log = logging.getLogger(__name__)

_FINAL = frozenset({"completed", "incomplete", "failed", "cancelled"})
_TYPE = re.compile(rb'^\s*\{\s*"type"\s*:\s*"([a-z_.]+)"')
# Provider events that carry the whole response, whose "model" is the provider's name for it.
_WITH_RESPONSE = frozenset({b"response.created", b"response.in_progress", b"response.queued",
                            b"response.completed", b"response.incomplete", b"response.failed"})
_TERMINAL = frozenset({b"response.completed", b"response.incomplete", b"response.failed"})
_SEQUENCE = re.compile(rb'"sequence_number"\s*:\s*(\d+)')
# Background runs are counted apart from the POST that queued them (which is answered at once).
_BACKGROUND_ROUTE = "/v1/responses#background"
_FOLLOW_POLL = 0.25  # seconds between store reads when following a response another replica runs
_CANCEL_WAIT = 10.0  # seconds a cancel waits for another replica to stop the response


def not_found(response_id: str) -> APIError:
    return APIError(404, f"No response found with id '{response_id}'.", param="response_id", code="not_found")


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def frame(kind: bytes, payload: bytes) -> bytes:
    return b"".join((b"event: ", kind, b"\ndata: ", payload, b"\n\n"))


@dataclass(slots=True)
class _Turn:
    """One response being made: what it answers and what the store will keep of it."""

    request: ResponsesRequest
    body: bytes
    backend: Backend
    served_as: str
    owner: str
    stats: CallStats
    #: the conversation before this request (a previous response's input and output), then this request's input
    history: list[dict[str, Any]]
    items: list[dict[str, Any]]
    previous: StoredResponse | None = None
    #: the previous response ran in the background here, so a native provider knows it under another id
    previous_background: bool = False
    #: frames so far, kept when the response is stored or followed
    log: list[bytes] | None = None
    #: the request's tools as a translated model sees them (None on a native relay, which sends them as they are)
    tools: ToolSet | None = None

    def record(self, response_id: str, response: bytes) -> StoredResponse:
        return StoredResponse(id=response_id, owner=self.owner, response=response,
                              input_items=_dumps(self.history + self.items), model=self.served_as,
                              events=self.log)


@dataclass(slots=True)
class _Live:
    """A background response's events as they come, for followers."""

    frames: list[bytes] = field(default_factory=list)
    done: bool = False
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def end(self) -> None:
        self.done = True
        self.wake()

    def wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self, after: int) -> AsyncIterator[list[bytes]]:
        position = after + 1
        while True:
            if position < len(self.frames):
                batch = self.frames[position:]
                position = len(self.frames)
                yield batch
                continue
            if self.done:
                return
            await self._changed.wait()


class ResponsesService:
    def __init__(self, store: ResponseStore, find: Any, unsupported_tools: UnsupportedTools = "drop") -> None:
        self.store = store
        self._find = find
        self._unsupported_tools: UnsupportedTools = unsupported_tools
        self._running: dict[str, tuple[asyncio.Task[None], _Live]] = {}
        store.on_cancel(self._cancel_here)

    async def start(self) -> None:
        await self.store.start()

    async def close(self) -> None:
        tasks = [task for task, _ in self._running.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.store.close()

    # ---- POST /v1/responses ------------------------------------------------------------------------

    async def create(self, request: ResponsesRequest, body: bytes, backend: Backend, owner: str,
                     stats: CallStats) -> tuple[bytes | ChunkStream, list[str]]:
        """The answer, and the types of the hosted tools left out of what the model saw."""
        if request.background and not request.stores:
            raise invalid_request("Invalid value for 'background': a background response must be stored; "
                                  "remove 'store: false'.", "background")
        turn = _Turn(request, body, backend, request.model, owner, stats, [], input_items(request))
        if not backend.relays_responses:
            turn.tools = ToolSet(request.tools, request.tool_choice, self._unsupported_tools)
            turn.tools.log_dropped(request.model)
        dropped = turn.tools.dropped if turn.tools is not None else []
        if request.previous_response_id:
            turn.previous = await self._owned(request.previous_response_id, owner, "previous_response_id")
            previous = json.loads(turn.previous.response)
            if previous["status"] in ("queued", "in_progress"):
                raise invalid_request(f"Previous response with id '{turn.previous.id}' is still in progress.",
                                      "previous_response_id")
            turn.history = json.loads(turn.previous.input_items) + previous["output"]
            turn.previous_background = bool(previous.get("background"))
        if request.background:
            return await self._background(turn), dropped
        if backend.relays_responses:
            return await self._native(turn), dropped
        return await self._translated(turn), dropped

    # ---- through Chat Completions --------------------------------------------------------------------

    def _chat_request(self, turn: _Turn, *, stream: bool) -> tuple[ChatCompletionRequest, bytes]:
        raw = _dumps(chat_body(turn.request, self._tools(turn), turn.history, turn.items, stream=stream))
        try:
            return ChatCompletionRequest.model_validate_json(raw), raw
        except ValidationError as exc:
            raise from_validation_error(exc) from None

    async def _translated(self, turn: _Turn) -> bytes | ChunkStream:
        request, stats = turn.request, turn.stats
        # An agent records its tool calls here, and they become output items.
        steps: list[ToolStep] = []
        stats.tool_steps = steps
        shape = ResponseShape(request, turn.served_as)
        if request.stream:
            chat, raw = self._chat_request(turn, stream=True)
            chunks = await turn.backend.chat_stream(chat, raw, turn.served_as, stats)
            if request.stores:
                turn.log = []
            return self._events(turn, ChatEvents(shape, self._tools(turn), steps), chunks)
        chat, raw = self._chat_request(turn, stream=False)
        answer = await turn.backend.chat(chat, raw, turn.served_as, stats)
        data = _dumps(response_from_chat(shape, self._tools(turn), answer, steps))
        if request.stores:
            await self.store.put(turn.record(shape.id, data))
        return data

    @staticmethod
    def _tools(turn: _Turn) -> ToolSet:
        assert turn.tools is not None, "a translated turn has its tools"
        return turn.tools

    async def _events(self, turn: _Turn, events: ChatEvents, chunks: ChunkStream) -> AsyncIterator[list[bytes]]:
        log = turn.log
        try:
            # The first chunk is awaited before any event: a failure before it is still an HTTP error.
            first = await anext(chunks, None)
            out = events.start()
            if first:
                out += events.feed(first)
            if log is not None:
                log += out
            yield out
            try:
                async for batch in chunks:
                    out = events.feed(batch)
                    if out:
                        if log is not None:
                            log += out
                        yield out
            except APIError as exc:
                out, body = events.fail(exc)
                yield await self._ended(turn, body, out)
                return
            out, body = events.finish()
            yield await self._ended(turn, body, out)
        finally:
            await close_stream(chunks)

    async def _ended(self, turn: _Turn, body: dict[str, Any], out: list[bytes]) -> list[bytes]:
        """The last frames of a stream, once what it made is stored (an ``error`` event if that failed)."""
        if turn.log is None or "id" not in body:
            return out
        turn.log += out
        try:
            await self.store.put(turn.record(body["id"], _dumps(body)))
        except APIError as exc:
            turn.log[-1:] = out[-1:] = [_store_error_frame(exc, body, out[-1])]
        return out

    # ---- relayed to a provider's own Responses API -------------------------------------------------

    def _native_body(self, turn: _Turn, *, stream: bool) -> bytes:
        request = turn.request
        fields: dict[str, Any] = {}
        previous = turn.previous
        if previous is not None and (turn.previous_background or self._find(previous.model) is not turn.backend):
            # Made by another model, or under our id in the background: the provider does not know it, so the
            # conversation is sent in full.
            fields["input"] = turn.history + turn.items
            fields["previous_response_id"] = None
        if request.background:
            fields["background"] = None  # run here, where it can be followed and cancelled
        if bool(request.stream) != stream:
            fields["stream"] = stream
        if not fields:
            return turn.body
        data = json.loads(turn.body)
        for key, value in fields.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        return _dumps(data)

    async def _native(self, turn: _Turn) -> bytes | ChunkStream:
        request = turn.request
        if request.stream:
            chunks = await turn.backend.responses_stream(self._native_body(turn, stream=True), turn.served_as,
                                                         turn.stats)
            if request.stores:
                turn.log = []
            return self._relayed(turn, chunks)
        data = await turn.backend.responses(self._native_body(turn, stream=False), turn.served_as, turn.stats)
        if request.stores:
            response = json.loads(data)
            _count_usage(turn.stats, response.get("usage"))
            await self.store.put(turn.record(response["id"], data))
        else:
            _count_usage(turn.stats, _loads(data).get("usage"))
        return data

    async def _relayed(self, turn: _Turn, chunks: ChunkStream, response_id: str | None = None
                       ) -> AsyncIterator[list[bytes]]:
        """The provider's events as frames, each response-carrying one with our model name (and, for a
        background response, the id it was queued under)."""
        log, served_as = turn.log, turn.served_as
        last = b""  # the latest event: a failure is numbered after it
        current: dict[str, Any] | None = None  # the response as the latest event carrying it showed it
        try:
            try:
                async for batch in chunks:
                    out: list[bytes] = []
                    final: dict[str, Any] | None = None
                    for data in batch:
                        payload = data
                        match = _TYPE.match(payload)
                        kind = match[1] if match else b"message"
                        if kind == b"error":
                            if not last:
                                raise _provider_error(payload)
                            final = _failed(current, _provider_error(payload))
                        elif kind in _WITH_RESPONSE:
                            event = json.loads(payload)
                            current = event["response"]
                            current["model"] = served_as
                            if response_id is not None:
                                current["id"] = response_id
                                current["background"] = True
                            payload = _dumps(event)
                            if kind in _TERMINAL:
                                final = current
                                _count_usage(turn.stats, final.get("usage"))
                        last = payload
                        out.append(frame(kind, payload))
                    if final is not None:
                        if log is not None:
                            log += out[:-1]
                        out[-1:] = await self._ended(turn, final, out[-1:])
                    elif log is not None:
                        log += out
                    yield out
            except APIError as exc:
                if not last:
                    raise
                numbers = _SEQUENCE.findall(last)
                error = _dumps({"type": "error", "code": exc.code, "message": exc.message, "param": exc.param,
                                "sequence_number": int(numbers[-1]) + 1 if numbers else 0})
                yield await self._ended(turn, _failed(current, exc), [frame(b"error", error)])
        finally:
            await close_stream(chunks)

    # ---- background --------------------------------------------------------------------------------

    async def _background(self, turn: _Turn) -> bytes | ChunkStream:
        request = turn.request
        if not turn.backend.relays_responses:
            # What translation refuses is refused now, as a 400, not after a 200 as a failed response.
            self._chat_request(turn, stream=True)
        shape = ResponseShape(request, turn.served_as)
        queued = _dumps(shape.body("queued", []))
        await self.store.put(turn.record(shape.id, queued))
        live = _Live()
        # Its own stats: the POST that queued it is finished, logged and counted already.
        turn.stats = CallStats()
        task = asyncio.create_task(self._run(turn, shape, live), name=f"background {shape.id}")
        self._running[shape.id] = (task, live)
        task.add_done_callback(lambda _: self._running.pop(shape.id, None))
        if request.stream:
            # A client following its own background stream may leave; the response goes on without it.
            return live.follow(-1)
        return queued

    async def _run(self, turn: _Turn, shape: ResponseShape, live: _Live) -> None:
        """Make a background response, its events kept for followers, its status kept in the store."""
        exchange = Exchange("POST", "/v1/responses", _BACKGROUND_ROUTE, stream=True, stats=turn.stats)
        exchange.serving(turn.backend.name)
        turn.log = live.frames
        status = 200
        steps: list[ToolStep] = []
        # A native relay's events are the provider's: these only end it (failed, cancelled).
        events = ChatEvents(shape, turn.tools or ToolSet(None, None, "drop"), steps)
        try:
            await self.store.put(turn.record(shape.id, _dumps(shape.body("in_progress", []))))
            async for _ in await self._background_stream(turn, shape, events, steps):
                live.wake()
        except asyncio.CancelledError:
            status = 499
            out, body = events.cancelled()
            live.frames.extend(out)
            await self._keep_quietly(turn.record(shape.id, _dumps(body)))
        except APIError as exc:
            status = exc.status
            out, body = events.fail(exc)
            live.frames.extend(out)
            await self._keep_quietly(turn.record(shape.id, _dumps(body)))
        except Exception as exc:
            log.exception("background response %s failed", shape.id)
            status = 500
            out, body = events.fail(APIError(500, f"The response failed: {type(exc).__name__}."))
            live.frames.extend(out)
            await self._keep_quietly(turn.record(shape.id, _dumps(body)))
        finally:
            live.end()
            exchange.finish(status)

    async def _background_stream(self, turn: _Turn, shape: ResponseShape, events: ChatEvents,
                                 steps: list[ToolStep]) -> ChunkStream:
        """The response as a stream whose frames land in ``turn.log`` (the live log) as they are made."""
        if turn.backend.relays_responses:
            chunks = await turn.backend.responses_stream(self._native_body(turn, stream=True), turn.served_as,
                                                         turn.stats)
            return self._relayed(turn, chunks, shape.id)
        turn.stats.tool_steps = steps
        chat, raw = self._chat_request(turn, stream=True)
        chunks = await turn.backend.chat_stream(chat, raw, turn.served_as, turn.stats)
        return self._events(turn, events, chunks)

    async def _keep_quietly(self, record: StoredResponse) -> None:
        try:
            await self.store.put(record)
        except APIError as exc:
            log.warning("could not store the end of response %s: %s", record.id, exc.message)

    def _cancel_here(self, response_id: str) -> None:
        running = self._running.get(response_id)
        if running is not None:
            running[0].cancel()

    # ---- GET, DELETE, cancel, input items ------------------------------------------------------------

    async def _owned(self, response_id: str, owner: str, param: str = "response_id") -> StoredResponse:
        record = await self.store.get(response_id)
        if record is None or record.owner != owner:
            # The same answer for someone else's response as for none, so ids tell nothing.
            error = not_found(response_id)
            error.param = param
            raise error
        return record

    async def retrieve(self, response_id: str, owner: str) -> bytes:
        return (await self._owned(response_id, owner)).response

    async def replay(self, response_id: str, owner: str, after: int) -> ChunkStream:
        record = await self._owned(response_id, owner)
        running = self._running.get(response_id)
        if running is not None:
            return running[1].follow(after)
        if json.loads(record.response)["status"] not in _FINAL:
            return self._follow_elsewhere(response_id, owner, after)
        if record.events is None:
            raise invalid_request(f"Response '{response_id}' was not streamed, so it has no events to replay; "
                                  "GET it without 'stream'.", "stream")
        return _replayed(record.events, after)

    async def _follow_elsewhere(self, response_id: str, owner: str, after: int) -> AsyncIterator[list[bytes]]:
        """Another replica makes it: its events reach the store when it ends."""
        while True:
            record = await self._owned(response_id, owner)
            if json.loads(record.response)["status"] in _FINAL:
                async for batch in _replayed(record.events or [], after):
                    yield batch
                return
            yield []
            await asyncio.sleep(_FOLLOW_POLL)

    async def delete(self, response_id: str, owner: str) -> bytes:
        await self._owned(response_id, owner)
        self._cancel_here(response_id)
        await self.store.delete(response_id)
        return _dumps({"id": response_id, "object": "response", "deleted": True})

    async def cancel(self, response_id: str, owner: str) -> bytes:
        record = await self._owned(response_id, owner)
        response = json.loads(record.response)
        if not response.get("background"):
            raise invalid_request("Only responses created with 'background: true' can be cancelled.",
                                  "response_id")
        if response["status"] in _FINAL:
            return record.response
        running = self._running.get(response_id)
        if running is not None:
            running[0].cancel()
            await asyncio.gather(running[0], return_exceptions=True)
        else:
            await self.store.announce_cancel(response_id)
        try:
            async with asyncio.timeout(_CANCEL_WAIT):
                while True:
                    record = await self._owned(response_id, owner)
                    if json.loads(record.response)["status"] in _FINAL:
                        return record.response
                    await asyncio.sleep(_FOLLOW_POLL)
        except TimeoutError:
            # No replica owns up to running it (the one that did has died, or cannot hear the cancel): it is
            # marked cancelled here, so it does not stay in progress until its TTL.
            response = json.loads(record.response)
            response["status"] = "cancelled"
            record.response = _dumps(response)
            await self.store.put(record)
            log.warning("response %s: no replica confirmed the cancel within %g s; marked cancelled",
                        response_id, _CANCEL_WAIT)
            return record.response

    async def input_items(self, response_id: str, owner: str, *, limit: int, order: str,
                          after: str | None) -> bytes:
        items: list[dict[str, Any]] = json.loads((await self._owned(response_id, owner)).input_items)
        if order == "desc":
            items.reverse()
        if after is not None:
            position = next((i for i, item in enumerate(items) if item.get("id") == after), None)
            if position is None:
                raise invalid_request(f"Invalid value for 'after': no input item '{after}' in this response.",
                                      "after")
            items = items[position + 1:]
        page = items[:limit]
        return _dumps({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                       "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})


async def _replayed(frames: list[bytes], after: int) -> AsyncIterator[list[bytes]]:
    if after + 1 < len(frames):
        yield frames[after + 1:]


def _count_usage(stats: CallStats, usage: Any) -> None:
    if isinstance(usage, dict):
        stats.prompt_tokens = usage.get("input_tokens")
        stats.completion_tokens = usage.get("output_tokens")


def _loads(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _provider_error(payload: bytes) -> APIError:
    event = _loads(payload)
    message = event.get("message") or (event.get("error") or {}).get("message") or "The provider reported an error."
    code = event.get("code")
    status = 429 if code == "rate_limit_exceeded" else 502
    return APIError(status, str(message), type="upstream_error" if status == 502 else "rate_limit_error",
                    code=str(code) if code else "bad_gateway")


def _failed(current: dict[str, Any] | None, error: APIError) -> dict[str, Any]:
    """What is stored of a relayed response that broke off: the response as last seen, failed."""
    body = dict(current or {})
    body.update(status="failed", error=error_object(error.status, error.message))
    return body


def _store_error_frame(error: APIError, body: dict[str, Any], replaced: bytes) -> bytes:
    """An ``error`` event in place of the terminal one, under its sequence number."""
    numbers = _SEQUENCE.findall(replaced)
    payload = {"type": "error", "code": error.code, "message": f"{error.message} The response ({body['id']}) "
               "was made but could not be stored.", "param": None,
               "sequence_number": int(numbers[-1]) if numbers else 0}
    return frame(b"error", _dumps(payload))
