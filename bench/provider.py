"""A fast imitation of an OpenAI provider, for benchmarking gateways in front of it.

Raw asyncio protocol on uvloop, HTTP/1.1 with keep-alive. Serves:

- ``POST /v1/chat/completions``: non-streaming, or streaming (SSE, chunked transfer encoding) with
  ``--tokens`` content chunks (the request's ``max_tokens`` overrides it) and ``--delay`` seconds between
  chunks (zero think time by default). With ``stream_options.include_usage`` every chunk carries
  ``"usage":null`` and a last chunk with empty ``choices`` carries the usage, as OpenAI does.
- Tool calling, for agent benchmarks: a model named ``tools-N`` (N a number) given ``tools`` answers with
  one call of the built-in ``calculator`` (arguments ``{"expression": "6 * 7"}``, ``finish_reason:
  "tool_calls"``, streamed as the call's header and three argument fragments) while the conversation holds
  fewer than N assistant tool-call messages since the last user message, and in text after that (or with
  ``tool_choice: "none"``). Any other model, or no ``tools``, answers in text as below.
- ``GET /v1/models``, ``GET /health``.
- Fault injection, for resilience benchmarks (nothing changes until a fault is set):
  ``POST /control/faults`` with ``{"model": "gpt-4o", "fail_rate": 0.3, "status": 500}`` makes that share
  of chat requests for that upstream model (``"model"`` null or absent: every model) fail with that status
  and an OpenAI-shaped error body (``"retry_after": 2`` adds a ``Retry-After`` header). The failures are
  spread evenly and exactly (error diffusion: 0.3 fails 3 of every 10), not drawn at random, so runs
  repeat. ``fail_rate`` 0 (or ``{"clear": true}``, all models) removes faults. ``GET /control/stats``
  gives the chat requests and injected failures per model since start; ``POST /control/reset`` zeroes
  them. A provider that is down is a stopped process (connection refused).

With no delay a whole response is built once per (kind, model, length, usage, round) and cached, so one
request costs a header parse, a small ``json.loads`` and one ``transport.write``.

    python -m bench.provider --port 9100 [--tokens 16] [--delay 0.0] [--max-tokens 8192]
"""

from __future__ import annotations

import argparse
import asyncio
import http
import json
import signal
from typing import Any, cast

CREATED = 1_700_000_000
_ID = "chatcmpl-bench0123456789"
_FINGERPRINT = "fp_bench"
_PROMPT_TOKENS = 12
_MAX_TOKENS = 8192
_HEADER_LIMIT = 65536
_TOOLS_PREFIX = "tools-"
TOOL_NAME = "calculator"
TOOL_ARGUMENTS = '{"expression": "6 * 7"}'
_TOOL_PIECES = ('{"expression": ', '"6 * 7', '"}')  # streamed argument fragments, joined: TOOL_ARGUMENTS
_TOOL_TOKENS = 12  # completion tokens a tool-call answer reports


def _head(status: str, content_type: str, length: int | None, close: bool) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"content-type: {content_type}", "x-bench-provider: 1"]
    lines.append(f"content-length: {length}" if length is not None else "transfer-encoding: chunked")
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _json_response(status: str, body: bytes, close: bool = False) -> bytes:
    return _head(status, "application/json", len(body), close) + body


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _usage(completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": _PROMPT_TOKENS, "completion_tokens": completion_tokens,
            "total_tokens": _PROMPT_TOKENS + completion_tokens}


def _completion(model: str, message: dict[str, Any], finish: str, completion_tokens: int) -> bytes:
    return _dumps({
        "id": _ID, "object": "chat.completion", "created": CREATED, "model": model,
        "system_fingerprint": _FINGERPRINT,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": _usage(completion_tokens),
    })


def chat_body(model: str, tokens: int) -> bytes:
    content = " ".join(f"tok{i}" for i in range(tokens))
    return _completion(model, {"role": "assistant", "content": content, "refusal": None}, "stop", tokens)


def tool_call_id(round_index: int) -> str:
    """The id of the call the ``tools-N`` model makes in its round ``round_index`` (0-based)."""
    return f"call_bench{round_index}"


def tool_call_body(model: str, round_index: int) -> bytes:
    """A whole answer calling the calculator once."""
    call = {"id": tool_call_id(round_index), "type": "function",
            "function": {"name": TOOL_NAME, "arguments": TOOL_ARGUMENTS}}
    message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}
    return _completion(model, message, "tool_calls", _TOOL_TOKENS)


def _events(model: str, include_usage: bool, deltas: list[dict[str, Any]], finish: str,
            completion_tokens: int) -> list[bytes]:
    """SSE events: one chunk per delta, the finish chunk, the usage chunk when asked for, DONE."""
    base: dict[str, Any] = {"id": _ID, "object": "chat.completion.chunk", "created": CREATED, "model": model,
                            "system_fingerprint": _FINGERPRINT}
    if include_usage:
        base["usage"] = None

    def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
        doc = dict(base, choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])
        return b"data: " + _dumps(doc) + b"\n\n"

    events = [chunk(delta, None) for delta in deltas]
    events.append(chunk({}, finish))
    if include_usage:
        events.append(b"data: " + _dumps(dict(base, choices=[], usage=_usage(completion_tokens))) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def stream_events(model: str, tokens: int, include_usage: bool) -> list[bytes]:
    """The SSE events of one streamed answer: role chunk, ``tokens`` content chunks, finish, usage, DONE."""
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": "", "refusal": None}]
    deltas.extend({"content": f" tok{i}"} for i in range(tokens))
    return _events(model, include_usage, deltas, "stop", tokens)


def tool_call_events(model: str, round_index: int, include_usage: bool) -> list[bytes]:
    """A streamed calculator call, as OpenAI streams one: the call's id and name with empty arguments, then
    the arguments in fragments, then ``finish_reason: "tool_calls"``."""
    head = {"index": 0, "id": tool_call_id(round_index), "type": "function",
            "function": {"name": TOOL_NAME, "arguments": ""}}
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": None, "refusal": None, "tool_calls": [head]}]
    deltas.extend({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]} for piece in _TOOL_PIECES)
    return _events(model, include_usage, deltas, "tool_calls", _TOOL_TOKENS)


def tool_round(request: dict[str, Any], model: str) -> int | None:
    """For a ``tools-N`` model given tools: the 0-based round of the tool call to answer with, or None to
    answer in text (N calls made since the last user message, ``tool_choice: "none"``, another model)."""
    rounds_text = model[len(_TOOLS_PREFIX):]
    if not rounds_text.isdigit() or not request.get("tools") or request.get("tool_choice") == "none":
        return None
    made = 0
    for message in reversed(request.get("messages") or ()):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "user":
            break
        if role == "assistant" and message.get("tool_calls"):
            made += 1
    return made if made < int(rounds_text) else None


def _chunked(event: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(event), event)


_STREAM_HEAD = _head("200 OK", "text/event-stream; charset=utf-8", None, False)
_CHUNKED_END = b"0\r\n\r\n"
_HEALTH = _json_response("200 OK", b'{"status":"ok"}')
_NOT_FOUND = _json_response("404 Not Found", _dumps(
    {"error": {"message": "not found", "type": "invalid_request_error", "param": None, "code": None}}))
_BAD_REQUEST = _json_response("400 Bad Request", _dumps(
    {"error": {"message": "invalid JSON body", "type": "invalid_request_error", "param": None, "code": None}}),
    close=True)


class Fault:
    """A share of one model's (or every model's) chat requests answered with an error status."""

    __slots__ = ("credit", "rate", "response")

    def __init__(self, rate: float, status: int, retry_after: float | None) -> None:
        self.rate = rate
        self.credit = 0.0  # error diffusion: fail when the accumulated rate reaches a whole request
        phrase = http.HTTPStatus(status).phrase
        kind = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
        body = _dumps({"error": {"message": f"injected fault: HTTP {status}", "type": kind, "param": None,
                                 "code": None}})
        head = _head(f"{status} {phrase}", "application/json", len(body), False)
        if retry_after is not None:
            head = head[:-2] + f"retry-after: {retry_after:g}\r\n\r\n".encode()
        self.response = head + body

    def hit(self) -> bool:
        self.credit += self.rate
        if self.credit >= 1.0 - 1e-9:
            self.credit -= 1.0
            return True
        return False

    def describe(self) -> dict[str, Any]:
        return {"fail_rate": self.rate, "status": int(self.response.split(b" ", 2)[1])}


class Provider:
    """Settings and the response cache shared by all connections."""

    def __init__(self, tokens: int, delay: float, max_tokens: int = _MAX_TOKENS) -> None:
        self.tokens = tokens
        self.delay = delay
        self.max_tokens = max_tokens
        self._cache: dict[tuple[Any, ...], bytes] = {}
        self.requests = 0
        self.faults: dict[str | None, Fault] = {}  # by upstream model; None: every model
        self.chat_requests: dict[str, int] = {}
        self.failed: dict[str, int] = {}

    def fault(self, model: str) -> bytes | None:
        """The error response for this chat request when a fault says it fails, else None."""
        rule = self.faults.get(model) or self.faults.get(None)
        if rule is None or not rule.hit():
            return None
        self.failed[model] = self.failed.get(model, 0) + 1
        return rule.response

    def control(self, method: str, path: str, body: bytes) -> bytes:
        """``/control/faults``, ``/control/stats``, ``/control/reset``."""
        try:
            doc = json.loads(body) if body else {}
            if not isinstance(doc, dict):
                raise ValueError("not an object")
            if method == "POST" and path == "/control/faults":
                if doc.get("clear"):
                    self.faults.clear()
                else:
                    model = doc.get("model")
                    rate = float(doc.get("fail_rate", 0.0))
                    if not 0.0 <= rate <= 1.0:
                        raise ValueError("fail_rate is between 0 and 1")
                    if rate == 0.0:
                        self.faults.pop(model, None)
                    else:
                        retry_after = doc.get("retry_after")
                        self.faults[model] = Fault(rate, int(doc.get("status", 500)),
                                                   None if retry_after is None else float(retry_after))
            elif method == "POST" and path == "/control/reset":
                self.chat_requests.clear()
                self.failed.clear()
            elif not (method == "GET" and path == "/control/stats"):
                return _NOT_FOUND
        except (ValueError, TypeError) as exc:
            return _json_response("400 Bad Request", _dumps(
                {"error": {"message": str(exc), "type": "invalid_request_error", "param": None, "code": None}}))
        return _json_response("200 OK", _dumps({
            "chat_requests": self.chat_requests, "failed": self.failed,
            "faults": {str(k): v.describe() for k, v in self.faults.items()}}))

    def models(self) -> bytes:
        key = ("models",)
        if key not in self._cache:
            self._cache[key] = _json_response("200 OK", _dumps({"object": "list", "data": [
                {"id": "gpt-4o", "object": "model", "created": CREATED, "owned_by": "bench"}]}))
        return self._cache[key]

    def chat(self, model: str, tokens: int) -> bytes:
        key = ("chat", model, tokens)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = _json_response("200 OK", chat_body(model, tokens))
        return found

    def stream(self, model: str, tokens: int, usage: bool) -> bytes:
        key = ("stream", model, tokens, usage)
        found = self._cache.get(key)
        if found is None:
            events = stream_events(model, tokens, usage)
            found = self._cache[key] = _STREAM_HEAD + b"".join(map(_chunked, events)) + _CHUNKED_END
        return found

    def tool_chat(self, model: str, round_index: int) -> bytes:
        key = ("tool-chat", model, round_index)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = _json_response("200 OK", tool_call_body(model, round_index))
        return found

    def tool_stream(self, model: str, round_index: int, usage: bool) -> bytes:
        key = ("tool-stream", model, round_index, usage)
        found = self._cache.get(key)
        if found is None:
            events = tool_call_events(model, round_index, usage)
            found = self._cache[key] = _STREAM_HEAD + b"".join(map(_chunked, events)) + _CHUNKED_END
        return found


class Connection(asyncio.Protocol):
    def __init__(self, provider: Provider) -> None:
        self.provider = provider
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.busy: asyncio.Task[None] | None = None  # a paced stream is being written

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        if self.busy is not None:
            self.busy.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer = self.buffer + data if self.buffer else data
        if self.busy is None:
            self._process()

    def _process(self) -> None:
        while self.transport is not None and self.busy is None:
            buffer = self.buffer
            end = buffer.find(b"\r\n\r\n")
            if end == -1:
                if len(buffer) > _HEADER_LIMIT:
                    self.transport.close()
                return
            head = buffer[:end].decode("latin-1")
            lines = head.split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3:
                self.transport.close()
                return
            method, target = parts[0], parts[1]
            length = 0
            close = False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                lname = name.strip().lower()
                if lname == "content-length":
                    length = int(value.strip())
                elif lname == "connection" and value.strip().lower() == "close":
                    close = True
                elif lname == "transfer-encoding":
                    self.transport.write(_BAD_REQUEST)
                    self.transport.close()
                    return
            total = end + 4 + length
            if len(buffer) < total:
                return
            body = buffer[end + 4:total]
            self.buffer = buffer[total:]
            self._respond(method, target.split("?", 1)[0], body)
            if close and self.transport is not None:
                self.transport.close()

    def _respond(self, method: str, path: str, body: bytes) -> None:
        transport = self.transport
        assert transport is not None
        provider = self.provider
        provider.requests += 1
        if method == "POST" and path.endswith("/chat/completions"):
            try:
                request = json.loads(body)
                model = str(request.get("model") or "gpt-4o")
                tokens = request.get("max_completion_tokens") or request.get("max_tokens") or provider.tokens
                tokens = max(1, min(int(tokens), provider.max_tokens))
            except (ValueError, TypeError, AttributeError):
                transport.write(_BAD_REQUEST)
                transport.close()
                return
            provider.chat_requests[model] = provider.chat_requests.get(model, 0) + 1
            if provider.faults:
                failure = provider.fault(model)
                if failure is not None:
                    transport.write(failure)
                    return
            if model.startswith(_TOOLS_PREFIX) and self._tool_call(request, model):
                return
            if not request.get("stream"):
                transport.write(provider.chat(model, tokens))
                return
            options = request.get("stream_options") or {}
            usage = bool(isinstance(options, dict) and options.get("include_usage"))
            if provider.delay <= 0:
                transport.write(provider.stream(model, tokens, usage))
                return
            self.busy = asyncio.get_running_loop().create_task(self._paced(stream_events(model, tokens, usage)))
            return
        if method == "GET" and path.endswith("/models"):
            transport.write(provider.models())
        elif method == "GET" and path in ("/health", "/v1/health"):
            transport.write(_HEALTH)
        elif path.startswith("/control/"):
            transport.write(provider.control(method, path, body))
        else:
            transport.write(_NOT_FOUND)

    def _tool_call(self, request: dict[str, Any], model: str) -> bool:
        """A ``tools-N`` model: answer with a calculator call and return True, or return False (N calls made
        already: the caller answers in text)."""
        transport = self.transport
        assert transport is not None
        provider = self.provider
        try:
            round_index = tool_round(request, model)
        except TypeError:  # messages that are not a list
            transport.write(_BAD_REQUEST)
            transport.close()
            return True
        if round_index is None:
            return False
        if not request.get("stream"):
            transport.write(provider.tool_chat(model, round_index))
            return True
        options = request.get("stream_options") or {}
        usage = bool(isinstance(options, dict) and options.get("include_usage"))
        if provider.delay <= 0:
            transport.write(provider.tool_stream(model, round_index, usage))
        else:
            self.busy = asyncio.get_running_loop().create_task(
                self._paced(tool_call_events(model, round_index, usage)))
        return True

    async def _paced(self, events: list[bytes]) -> None:
        try:
            delay = self.provider.delay
            if self.transport is None:
                return
            self.transport.write(_STREAM_HEAD + _chunked(events[0]))
            for event in events[1:]:
                await asyncio.sleep(delay)
                if self.transport is None:
                    return
                self.transport.write(_chunked(event))
            self.transport.write(_CHUNKED_END)
        finally:
            self.busy = None
        self._process()


async def serve(host: str, port: int, tokens: int, delay: float, ready: asyncio.Event | None = None,
                max_tokens: int = _MAX_TOKENS) -> None:
    provider = Provider(tokens, delay, max_tokens)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(provider), host, port, backlog=1024, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="Fast OpenAI provider imitation for benchmarks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--tokens", type=int, default=16, help="completion tokens (chunks when streaming)")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between streamed chunks")
    parser.add_argument("--max-tokens", type=int, default=_MAX_TOKENS,
                        help="the most completion tokens a request may ask for (larger asks are cut to it)")
    args = parser.parse_args()
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency of the gateway's venv
        runner = asyncio.run
    runner(serve(args.host, args.port, args.tokens, args.delay, max_tokens=args.max_tokens))


if __name__ == "__main__":
    main()
