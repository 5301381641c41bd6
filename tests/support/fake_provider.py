"""A real loopback HTTP server imitating an OpenAI-compatible provider.

Behaviour is picked by the request's ``model`` field:

* any ordinary name: deterministic answer ``"echo: <last user text>"``
* ``chunks-N``: the answer is N words (``w1 w2 ... wN``), one stream chunk per word
* ``error-NNN``: HTTP NNN with an OpenAI error body (429 adds ``Retry-After: 7``)
* ``garbage``: 200, ``application/json`` content type, body ``<<<not json``
* ``slow-N``: sleep N seconds (float allowed) before answering
* ``gzip-stream``: streams are sent gzip-encoded (``Content-Encoding: gzip``), as a compressing proxy does
* ``midstream-fail``: a few chunks (or half a JSON body), then the TCP connection is aborted
* ``error-event``: streams answer 200 with an OpenAI ``error`` event as their only event (as providers do
  when a stream fails after the status was sent); non-streaming requests are answered normally
* ``slow-chunks-MS``: a 1000-word stream with MS milliseconds between chunks
* ``slow-chunks-MS-N``: the same with N words (``slow-chunks-100-600``: a chunk every 100 ms for a minute)
* ``tool-script``: an agent's model. The last user message is JSON ``{"rounds": [[call, ...], ...]}`` with
  calls ``{"name": ..., "arguments": {...}}`` (or ``"raw": "<text>"`` for arguments that are not JSON), whose
  ids are ``call_s<round>_<i>``. The next round is the one after the latest round with a result since that user
  message (so a conversation resumed after a client-side call goes on from there); after the last
  round, or with ``tool_choice: "none"``, it answers ``results: <tool_call_id>=<content> | ...``, quoting every
  tool result since the user message in order, so tests see what reached the model

Served ``model`` fields are the requested name plus :data:`MODEL_SUFFIX`, so tests can
prove a gateway rewrites them.

``POST /v1/responses`` speaks OpenAI's Responses API with the same behaviours. ``input`` (a string, or
message / ``function_call`` / ``function_call_output`` items) is read as the chat answer reads ``messages``:
the answer echoes the last user text, function tools are called as in chat, and ``tool-script`` rounds
emit ``function_call`` items (``call_id`` as in chat) driven by the ``function_call_output`` items since the
user message. ``max_output_tokens`` cuts the answer to that many words, with ``status: "incomplete"``
(below :data:`MIN_OUTPUT_TOKENS` it is a 400, as at OpenAI). ``stream: true`` sends OpenAI's named events
(``event:`` and ``data:`` lines, ``sequence_number`` from 0, no ``[DONE]``); ``error-event`` sends one
``error`` event. Responses not created with ``store: false`` are kept, so ``previous_response_id`` continues
their conversation (without their ``instructions``; an unknown id is a 404) and
``GET``/``DELETE /v1/responses/{id}`` retrieve and delete them; :meth:`FakeProvider.reset` forgets them.

Runtime faults
--------------

Besides the model names, a test flips faults at runtime (thread-safe, from the test's thread) with
``rule = provider.set_fault(Fault(kind, ...), model=None)``; :meth:`FakeProvider.clear_fault` (one scope),
:meth:`FakeProvider.clear_faults` and :meth:`FakeProvider.reset` remove them. They apply to
``/v1/chat/completions``, ``/v1/completions``, ``/v1/responses`` (streaming or not) and ``/v1/embeddings``
(never streaming), to requests that pass the API key check and name a ``model``; other paths are unaffected.
Kinds (:class:`Fault` fields in brackets):

* ``status`` [``status``, ``retry_after``]: HTTP ``status`` with :func:`error_body`; a ``Retry-After``
  header only when ``retry_after`` (seconds) is given -- unlike ``error-429``, which always sends 7
* ``hang``: read the request, never answer; ends when the client disconnects (the provider then closes its
  side) or at :meth:`FakeProvider.stop` (the connection is aborted); :attr:`FakeProvider.hanging` counts them
* ``reset`` [``after_chunks``, default 2]: a stream sends its headers and ``after_chunks`` events, then the
  TCP connection is aborted (the stream's :class:`StreamRecord` outcome is ``"aborted"``). A shorter answer
  sends all its events but the last (never ``[DONE]`` nor a Responses terminal event). A non-stream answer
  with ``after_chunks=0`` is aborted before any byte is sent (no status line); with any other value the
  status, headers (full ``Content-Length``) and half the body are sent first. Reset Responses are not kept
* ``slow`` [``delay``]: wait ``delay`` seconds before answering at all (status line included), then normally
* ``slow_first_chunk`` [``delay``] (streams only): headers at once, ``delay`` seconds, then the normal stream
* ``error_event_first`` (streams only): 200, then an ``error`` event as the only event (as ``error-event``):
  ``data: {"error": {...}}`` for chat and completions, ``{"type": "error", ...}`` for responses

Waits (``hang``, ``slow``, ``slow_first_chunk``) stop early when the client disconnects or the provider
stops. Which requests a fault takes:

* scope: ``model`` is the request's ``model`` field as received (the upstream name); ``None`` is every
  request. One fault per scope: setting another replaces it. A model's fault owns that model's requests
  and the global fault sees only requests no model fault took (including requests that a model fault
  counted but, because of ``every``, let through), and those after the model fault was used up
* ``stream``: ``True`` only streaming requests, ``False`` only the others, ``None`` both (stream-only kinds
  imply ``True``); a request the filter excludes does not count as matching
* ``every=k``: only the k-th, 2k-th, ... matching request (counted from when the fault was set) fails
* ``times=n``: the fault fails n requests, then is used up (removed; requests are answered normally, or by
  the global fault). Both combine: ``every=2, times=1`` fails the 2nd matching request only

``set_fault`` returns a :class:`FaultRule` whose ``seen`` (matching requests), ``hits`` (requests it
failed) and ``active`` read its counters; :attr:`FakeProvider.fault_hits` is the total of hits since the
last reset, of every fault. Faulted requests are recorded like any other (``requests``, ``request_count``).
Model-name behaviours still apply to what a fault lets through or shapes: ``reset`` on ``chunks-20`` aborts
after 2 of its chunks, ``slow`` on ``error-500`` waits and then answers 500; ``status`` and ``hang`` decide
the answer alone.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import itertools
import json
import re
import secrets
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, get_args

from aiohttp import web

__all__ = [
    "DEFAULT_DIMENSIONS",
    "FAKE_MODELS",
    "MIN_OUTPUT_TOKENS",
    "MODEL_SUFFIX",
    "RESPONSE_TERMINAL_EVENTS",
    "SLOW_CHUNKS_LENGTH",
    "Behaviour",
    "FakeProvider",
    "Fault",
    "FaultKind",
    "FaultRule",
    "RecordedRequest",
    "StreamRecord",
    "answer_words",
    "chat_chunks",
    "chat_completion",
    "completion",
    "completion_chunks",
    "embedding_vector",
    "embeddings",
    "error_body",
    "parse_behaviour",
    "response_events",
    "response_input_items",
    "response_object",
    "served_model",
]

MODEL_SUFFIX = "-2024-08-06"
SYSTEM_FINGERPRINT = "fp_fake0001"
DEFAULT_DIMENSIONS = 8
SLOW_CHUNKS_LENGTH = 1000
MIDSTREAM_FAIL_CHUNKS = 3
RETRY_AFTER_SECONDS = 7
TOOL_ARGUMENTS = '{"city":"Paris"}'
# Split the way OpenAI streams arguments: several small fragments of the JSON text.
TOOL_ARGUMENT_FRAGMENTS = ('{"', "city", '":"', "Paris", '"}')
FAKE_MODELS = ("gpt-4o", "gpt-4o-mini", "text-embedding-3-small")

Json = dict[str, Any]
BehaviourKind = Literal["normal", "error", "garbage", "midstream_fail", "error_event", "gzip"]
StreamOutcome = Literal["completed", "disconnected", "aborted"]
FaultKind = Literal["status", "hang", "reset", "slow", "slow_first_chunk", "error_event_first"]
_STREAM_ONLY_FAULTS = ("slow_first_chunk", "error_event_first")
# How often waits (hang, slow faults) look for a gone client or a stopping provider.
_WAIT_POLL = 0.02

_ERROR_BODIES: dict[int, tuple[str, str, str | None, str | None]] = {
    400: (
        "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
        "invalid_request_error",
        "messages",
        "empty_array",
    ),
    401: (
        "Incorrect API key provided: sk-fake***. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        "invalid_request_error",
        None,
        "invalid_api_key",
    ),
    404: (
        "The model does not exist or you do not have access to it.",
        "invalid_request_error",
        None,
        "model_not_found",
    ),
    429: (
        "Rate limit reached for requests. Please try again in 7s.",
        "requests",
        None,
        "rate_limit_exceeded",
    ),
    500: (
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
        None,
    ),
    413: (
        "Request too large. The request body exceeds the maximum size this model accepts.",
        "invalid_request_error",
        None,
        "request_too_large",
    ),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None, None),
}


@dataclass(frozen=True)
class Behaviour:
    """What the provider does for one model name."""

    kind: BehaviourKind = "normal"
    status: int = 200
    delay: float = 0.0
    chunk_delay: float = 0.0
    words: int | None = None


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the provider received it (header names lower-cased)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    raw: bytes
    received_at: float

    @property
    def model(self) -> str | None:
        """The ``model`` field of a JSON object body, if any."""
        if isinstance(self.body, dict):
            model = self.body.get("model")
            return model if isinstance(model, str) else None
        return None


@dataclass
class StreamRecord:
    """Lifecycle of one streamed response."""

    path: str
    model: str
    chunks_sent: int = 0
    outcome: StreamOutcome | None = None  # None while still streaming
    error: str | None = None
    #: bytes of the body handed to the connection so far; aiohttp makes a write wait while the connection's
    #: buffer is full, so this stops growing when the client (a gateway, say) stops reading: backpressure
    bytes_sent: int = 0


@dataclass(frozen=True)
class Fault:
    """A fault to inject at runtime (see "Runtime faults" in the module docstring).

    Parameters used by one kind only are ignored by the others (``retry_after`` is refused on them).
    """

    kind: FaultKind
    #: ``status``: the HTTP status answered
    status: int = 500
    #: ``status``: seconds sent as ``Retry-After`` (formatted ``%g``); None sends no header
    retry_after: float | None = None
    #: ``reset``: stream events sent before the abort (non-streams: 0 = before any byte, else half the body)
    after_chunks: int = 2
    #: ``slow`` / ``slow_first_chunk``: seconds to wait
    delay: float = 1.0
    #: only streaming (True) or non-streaming (False) requests; None both
    stream: bool | None = None
    #: fail only this many requests, then the fault is used up; None: no limit
    times: int | None = None
    #: fail only every k-th matching request (k, 2k, ...); None: every one
    every: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in get_args(FaultKind):
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if self.kind == "status" and not 400 <= self.status <= 599:
            raise ValueError(f"a status fault needs an error status (400-599), not {self.status}")
        if self.retry_after is not None and (self.kind != "status" or self.retry_after < 0):
            raise ValueError("retry_after is a non-negative number of seconds, for status faults only")
        if self.after_chunks < 0 or self.delay < 0:
            raise ValueError("after_chunks and delay cannot be negative")
        if self.times is not None and self.times < 1:
            raise ValueError("times must be at least 1 (or None)")
        if self.every is not None and self.every < 1:
            raise ValueError("every must be at least 1 (or None)")
        if self.kind in _STREAM_ONLY_FAULTS:
            if self.stream is False:
                raise ValueError(f"{self.kind} faults apply to streams only")
            object.__setattr__(self, "stream", True)


class FaultRule:
    """A fault set on a provider for one scope, with its counters (read them from any thread)."""

    def __init__(self, fault: Fault, model: str | None, lock: threading.Lock) -> None:
        self.fault = fault
        #: the scope: the requested model name, or None for every request
        self.model = model
        self._lock = lock
        self._seen = 0
        self._hits = 0
        self._active = True

    @property
    def seen(self) -> int:
        """Matching requests this fault owned (failed or, because of ``every``, let through)."""
        with self._lock:
            return self._seen

    @property
    def hits(self) -> int:
        """Requests this fault was applied to."""
        with self._lock:
            return self._hits

    @property
    def active(self) -> bool:
        """Still set: not used up (``times``), replaced, cleared or reset."""
        with self._lock:
            return self._active

    def __repr__(self) -> str:
        return f"FaultRule({self.fault!r}, model={self.model!r}, seen={self._seen}, hits={self._hits})"

    def _covers(self, stream: bool) -> bool:
        return self.fault.stream is None or self.fault.stream == stream

    def _take(self) -> bool:
        """Count a matching request; whether the fault applies to it. Call with the lock held."""
        self._seen += 1
        every = self.fault.every
        if every is not None and self._seen % every:
            return False
        self._hits += 1
        if self.fault.times is not None and self._hits >= self.fault.times:
            self._active = False
        return True


def parse_behaviour(model: str) -> Behaviour:
    """Map a model name to a behaviour (see the module docstring)."""
    if model == "garbage":
        return Behaviour(kind="garbage")
    if model == "midstream-fail":
        return Behaviour(kind="midstream_fail")
    if model == "error-event":
        return Behaviour(kind="error_event")
    if model == "gzip-stream":
        return Behaviour(kind="gzip")
    if match := re.fullmatch(r"error-(\d{3})", model):
        return Behaviour(kind="error", status=int(match[1]))
    if match := re.fullmatch(r"slow-chunks-(\d+(?:\.\d+)?)-(\d+)", model):
        return Behaviour(chunk_delay=float(match[1]) / 1000, words=int(match[2]))
    if match := re.fullmatch(r"slow-chunks-(\d+(?:\.\d+)?)", model):
        return Behaviour(chunk_delay=float(match[1]) / 1000, words=SLOW_CHUNKS_LENGTH)
    if match := re.fullmatch(r"slow-(\d+(?:\.\d+)?)", model):
        return Behaviour(delay=float(match[1]))
    if match := re.fullmatch(r"chunks-(\d+)", model):
        return Behaviour(words=int(match[1]))
    return Behaviour()


def served_model(model: str) -> str:
    """The model name the provider reports back (dated, like OpenAI does)."""
    return model + MODEL_SUFFIX


def error_body(status: int) -> Json:
    """OpenAI-shaped error body for an HTTP status."""
    default_type = "server_error" if status >= 500 else "invalid_request_error"
    message, type_, param, code = _ERROR_BODIES.get(status, (f"Fake provider error {status}", default_type, None, None))
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _words(text: str) -> int:
    return len(text.split())


def _text_of(content: Any) -> str:
    """Text of a message content: a string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _last_user_text(body: Json) -> str:
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return _text_of(message.get("content"))
    return ""


def _prompt_tokens(body: Json) -> int:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0
    return sum(_words(_text_of(m.get("content"))) for m in messages if isinstance(m, dict))


def _positive_int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def answer_words(base: str, behaviour: Behaviour, index: int = 0) -> list[str]:
    """Words of the answer for choice ``index`` (choices > 0 get a ``(i)`` marker to tell them apart)."""
    if behaviour.words is not None:
        words = [f"w{i}" for i in range(1, behaviour.words + 1)]
    else:
        words = base.split() or ["echo:"]
    return words if index == 0 else [*words, f"({index})"]


def _limit(words: list[str], body: Json) -> tuple[list[str], str]:
    """Apply max_tokens / max_completion_tokens (one word = one token)."""
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < len(words):
        return words[:limit], "length"
    return words, "stop"


def _pieces(words: list[str]) -> list[str]:
    """Stream fragments whose concatenation is the space-joined answer."""
    return [word if i == 0 else " " + word for i, word in enumerate(words)]


def _logprob(position: int) -> float:
    return -round(0.01 + 0.1 * (position % 7), 4)


def _token_logprob(token: str, position: int, top: int) -> Json:
    lp = _logprob(position)
    alternatives = [{"token": token, "logprob": lp, "bytes": list(token.encode())}]
    alternatives += [
        {"token": f"alt{j}", "logprob": round(lp - j, 4), "bytes": list(f"alt{j}".encode())} for j in range(1, top)
    ]
    return {"token": token, "logprob": lp, "bytes": list(token.encode()), "top_logprobs": alternatives[:top]}


def _chat_tool(body: Json) -> str | None:
    """Name of the function the fake model calls, or None to answer in text."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools or body.get("tool_choice") == "none":
        return None
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if isinstance(name, str):
            return name
    first = tools[0]
    function = first.get("function") if isinstance(first, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else "tool"


def _chat_usage(prompt_tokens: int, completion_tokens: int) -> Json:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _tool_call_id(index: int) -> str:
    return f"call_fake{index:04d}"


def _call_id(call_id: str, choice: int) -> str:
    # Choices of an n>1 answer call the same tools under their own ids.
    return call_id if choice == 0 else f"{call_id}_{choice}"


@dataclass
class _ChatPlan:
    """Everything a chat answer needs, computed once from the request."""

    model: str
    n: int
    #: the tool calls of the answer: (id, name, argument fragments as streamed); None answers in text
    calls: list[tuple[str, str, list[str]]] | None
    logprobs: bool
    top_logprobs: int
    answers: list[tuple[list[str], str]] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        if self.calls is not None:
            return sum(len(fragments) for _, _, fragments in self.calls) * self.n
        return sum(len(words) for words, _ in self.answers)


def _since_last_user(body: Json) -> list[Json]:
    messages = [m for m in body.get("messages") or () if isinstance(m, dict)]
    last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    return messages[last + 1:]


def _script(body: Json) -> tuple[list[tuple[str, str, list[str]]] | None, str]:
    """A ``tool-script`` answer: this round's calls, or the text quoting the tool results."""
    later = _since_last_user(body)
    answered = [int(m.group(1)) for t in later if t.get("role") == "tool"
                if (m := re.fullmatch(r"call_s(\d+)_\d+", str(t.get("tool_call_id"))))]
    done = max(answered) + 1 if answered else 0
    try:
        rounds = json.loads(_last_user_text(body)).get("rounds", [])
    except (ValueError, AttributeError):
        rounds = []
    if done < len(rounds) and body.get("tool_choice") != "none" and body.get("tools"):
        calls = []
        for i, call in enumerate(rounds[done]):
            arguments = call["raw"] if "raw" in call else json.dumps(call.get("arguments", {}))
            half = len(arguments) // 2
            calls.append((f"call_s{done}_{i}", call["name"], [arguments[:half], arguments[half:]]))
        return calls, ""
    results = [f"{m.get('tool_call_id')}={_text_of(m.get('content'))}" for m in later if m.get("role") == "tool"]
    return None, "results: " + " | ".join(results)


def _chat_plan(body: Json, behaviour: Behaviour) -> _ChatPlan:
    base = "echo: " + _last_user_text(body)
    calls: list[tuple[str, str, list[str]]] | None = None
    if str(body.get("model")) == "tool-script":
        calls, base = _script(body)
    elif (tool := _chat_tool(body)) is not None:
        calls = [(_tool_call_id(0), tool, list(TOOL_ARGUMENT_FRAGMENTS))]
    plan = _ChatPlan(
        model=served_model(str(body.get("model", ""))),
        n=_positive_int(body.get("n"), 1),
        calls=calls,
        logprobs=body.get("logprobs") is True,
        top_logprobs=_positive_int(body.get("top_logprobs"), 0),
    )
    plan.answers = [_limit(answer_words(base, behaviour, i), body) for i in range(plan.n)]
    return plan


def chat_completion(body: Json, behaviour: Behaviour, completion_id: str, created: int) -> Json:
    """A full ``chat.completion`` object for a request body."""
    plan = _chat_plan(body, behaviour)
    choices: list[Json] = []
    for index, (words, text_finish) in enumerate(plan.answers):
        message: Json
        finish = text_finish
        if plan.calls is not None:
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": _call_id(call_id, index),
                        "type": "function",
                        "function": {"name": name, "arguments": "".join(fragments)},
                    }
                    for call_id, name, fragments in plan.calls
                ],
                "refusal": None,
                "annotations": [],
            }
            finish = "tool_calls"
        else:
            message = {"role": "assistant", "content": " ".join(words), "refusal": None, "annotations": []}
        logprobs: Json | None = None
        if plan.logprobs and plan.calls is None:
            content = [_token_logprob(p, i, plan.top_logprobs) for i, p in enumerate(_pieces(words))]
            logprobs = {"content": content, "refusal": None}
        choices.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish})
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": plan.model,
        "choices": choices,
        "usage": _chat_usage(_prompt_tokens(body), plan.completion_tokens),
        "service_tier": "default",
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


def chat_chunks(body: Json, behaviour: Behaviour, completion_id: str, created: int) -> Iterator[Json]:
    """The ``chat.completion.chunk`` objects of a streamed answer, in order."""
    plan = _chat_plan(body, behaviour)
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True

    def chunk(choices: list[Json], usage: Json | None = None) -> Json:
        out: Json = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": plan.model,
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        }
        if include_usage:
            out["usage"] = usage  # OpenAI sends an explicit null on every chunk but the last
        return out

    def choice(index: int, delta: Json, logprobs: Json | None = None, finish: str | None = None) -> Json:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    for index in range(plan.n):
        delta: Json = {"role": "assistant", "content": "", "refusal": None}
        if plan.calls is not None:
            delta["content"] = None
        yield chunk([choice(index, delta)])

    if plan.calls is not None:
        # Each call: a first delta with id, type and name, then its arguments in fragments, as OpenAI streams.
        for index in range(plan.n):
            for number, (call_id, name, fragments) in enumerate(plan.calls):
                yield chunk([choice(index, {"tool_calls": [{"index": number, "id": _call_id(call_id, index),
                                                            "type": "function",
                                                            "function": {"name": name, "arguments": ""}}]})])
                for piece in fragments:
                    yield chunk([choice(index, {"tool_calls": [{"index": number,
                                                                "function": {"arguments": piece}}]})])
        streams: list[list[str]] = []
    else:
        streams = [_pieces(words) for words, _ in plan.answers]
    # OpenAI interleaves the choices of an n>1 stream, one choice per chunk.
    for position, row in enumerate(itertools.zip_longest(*streams)):
        for index, piece in enumerate(row):
            if piece is None:
                continue
            logprobs = None
            if plan.logprobs:
                logprobs = {
                    "content": [_token_logprob(piece, position, plan.top_logprobs)],
                    "refusal": None,
                }
            yield chunk([choice(index, {"content": piece}, logprobs)])

    for index, (_, finish) in enumerate(plan.answers):
        yield chunk([choice(index, {}, None, "tool_calls" if plan.calls is not None else finish)])

    if include_usage:
        yield chunk([], _chat_usage(_prompt_tokens(body), plan.completion_tokens))


def _prompts(body: Json) -> list[str]:
    """Completion prompts as texts (token arrays become ``tokens:N``)."""
    prompt = body.get("prompt", "")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return [f"tokens:{len(prompt)}"]
    if isinstance(prompt, list):
        return [p if isinstance(p, str) else f"tokens:{len(p) if isinstance(p, list) else 0}" for p in prompt]
    return [""]


def _completion_prompt_tokens(body: Json) -> int:
    prompt = body.get("prompt", "")
    if isinstance(prompt, str):
        return _words(prompt)
    if isinstance(prompt, list):
        return sum(_words(p) if isinstance(p, str) else len(p) if isinstance(p, list) else 1 for p in prompt)
    return 0


def _completion_answers(body: Json, behaviour: Behaviour) -> list[tuple[list[str], str]]:
    """One answer per (prompt, sample); choice index = prompt_index * n + sample."""
    n = _positive_int(body.get("n"), 1)
    answers = []
    for prompt in _prompts(body):
        for sample in range(n):
            answers.append(_limit(answer_words("echo: " + prompt, behaviour, sample), body))
    return answers


def _completion_logprobs(pieces: list[str], top: int, offset: int = 0) -> Json:
    text_offset, position = [], offset
    for piece in pieces:
        text_offset.append(position)
        position += len(piece)
    return {
        "tokens": pieces,
        "token_logprobs": [_logprob(offset + i) for i in range(len(pieces))],
        "top_logprobs": [
            {
                piece: _logprob(offset + i),
                **{f"alt{j}": round(_logprob(offset + i) - j, 4) for j in range(1, top)},
            }
            for i, piece in enumerate(pieces)
        ],
        "text_offset": text_offset,
    }


def _completion_usage(body: Json, answers: list[tuple[list[str], str]]) -> Json:
    prompt_tokens = _completion_prompt_tokens(body)
    completion_tokens = sum(len(words) for words, _ in answers)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _completion_top(body: Json) -> int | None:
    value = body.get("logprobs")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def completion(body: Json, behaviour: Behaviour, completion_id: str, created: int) -> Json:
    """A full ``text_completion`` object for a request body."""
    answers = _completion_answers(body, behaviour)
    top = _completion_top(body)
    choices = []
    for index, (words, finish) in enumerate(answers):
        pieces = _pieces(words)
        logprobs = _completion_logprobs(pieces, top) if top is not None else None
        choices.append({"text": "".join(pieces), "index": index, "logprobs": logprobs, "finish_reason": finish})
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": served_model(str(body.get("model", ""))),
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
        "usage": _completion_usage(body, answers),
    }


def completion_chunks(body: Json, behaviour: Behaviour, completion_id: str, created: int) -> Iterator[Json]:
    """The ``text_completion`` chunks of a streamed completion, in order."""
    answers = _completion_answers(body, behaviour)
    top = _completion_top(body)
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    model = served_model(str(body.get("model", "")))

    def chunk(choices: list[Json], usage: Json | None = None) -> Json:
        out: Json = {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        }
        if include_usage:
            out["usage"] = usage
        return out

    streams = [_pieces(words) for words, _ in answers]
    for position, row in enumerate(itertools.zip_longest(*streams)):
        for index, piece in enumerate(row):
            if piece is None:
                continue
            logprobs = _completion_logprobs([piece], top, position) if top is not None else None
            yield chunk([{"text": piece, "index": index, "logprobs": logprobs, "finish_reason": None}])
    for index, (_, finish) in enumerate(answers):
        yield chunk([{"text": "", "index": index, "logprobs": None, "finish_reason": finish}])
    if include_usage:
        yield chunk([], _completion_usage(body, answers))


def embedding_vector(text: str, dimensions: int) -> list[float]:
    """Deterministic float32-exact vector for a text."""
    raw = b""
    counter = 0
    while len(raw) < dimensions * 4:
        raw += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    values = [(b - 127.5) / 127.5 for b in raw[:dimensions]]
    # Round-trip through float32 so the float and base64 encodings carry identical numbers.
    packed = struct.pack(f"<{dimensions}f", *values)
    return list(struct.unpack(f"<{dimensions}f", packed))


def _embedding_inputs(body: Json) -> list[tuple[str, int]]:
    """(text key, token count) for each input."""
    value = body.get("input")
    if isinstance(value, str):
        return [(value, _words(value))]
    if isinstance(value, list) and value and all(isinstance(t, int) for t in value):
        return [(json.dumps(value), len(value))]
    if isinstance(value, list):
        return [
            (v, _words(v)) if isinstance(v, str) else (json.dumps(v), len(v) if isinstance(v, list) else 1)
            for v in value
        ]
    return []


def embeddings(body: Json) -> Json:
    """A ``list`` of embeddings for a request body."""
    dimensions = _positive_int(body.get("dimensions"), DEFAULT_DIMENSIONS)
    base64_format = body.get("encoding_format") == "base64"
    data = []
    tokens = 0
    for index, (text, count) in enumerate(_embedding_inputs(body)):
        tokens += count
        vector = embedding_vector(text, dimensions)
        encoded: list[float] | str = vector
        if base64_format:
            encoded = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return {
        "object": "list",
        "data": data,
        "model": served_model(str(body.get("model", ""))),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


# -- Responses API ------------------------------------------------------------------


# OpenAI rejects smaller limits with a 400 (integer_below_min_value), so the imitation does too.
MIN_OUTPUT_TOKENS = 16
RESPONSE_TERMINAL_EVENTS = ("response.completed", "response.incomplete")
_LOGPROBS_INCLUDE = "message.output_text.logprobs"
# The stream padding OpenAI adds to delta events unless stream_options.include_obfuscation is false.
_OBFUSCATION_BLOCK = 16


def _openai_id(prefix: str) -> str:
    """An id shaped like OpenAI's Responses ids (``resp_``, ``msg_``, ``fc_`` and 48 hex digits)."""
    return f"{prefix}_{secrets.token_hex(24)}"


def response_input_items(value: Any) -> list[Json]:
    """A request's ``input`` as a list of items (a string is one user message, as OpenAI reads it)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, dict)]
    return []


def _responses_problem(body: Json) -> tuple[str, str, str] | None:
    """(message, param, code) of the 400 OpenAI answers to a malformed request, or None."""
    value = body.get("input")
    if value is not None and not isinstance(value, (str, list)):
        return (
            "Invalid type for 'input': expected one of a string or array of input items, "
            f"but got {type(value).__name__} instead.",
            "input",
            "invalid_type",
        )
    limit = body.get("max_output_tokens")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit < MIN_OUTPUT_TOKENS:
        return (
            "Invalid 'max_output_tokens': integer below minimum value. "
            f"Expected a value >= {MIN_OUTPUT_TOKENS}, but got {limit} instead.",
            "max_output_tokens",
            "integer_below_min_value",
        )
    return None


def _chat_view(body: Json, items: list[Json]) -> Json:
    """The chat request equivalent to a Responses conversation.

    The chat planning (echo answer, special model names, tool calls, ``tool-script`` rounds, token limit)
    then answers both APIs alike: function_call items become assistant tool_calls and
    function_call_output items become tool messages.
    """
    messages: list[Json] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item.get("role"), "content": _text_of(item.get("content"))})
        elif kind == "function_call":
            function = {"name": item.get("name"), "arguments": item.get("arguments")}
            call = {"id": item.get("call_id"), "type": "function", "function": function}
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": _text_of(item.get("output"))})
    # Only function tools can be called by the fake model; hosted tools (web_search...) are just echoed.
    tools = [
        {"type": "function", "function": {"name": tool.get("name"), "parameters": tool.get("parameters")}}
        for tool in body.get("tools") or ()
        if isinstance(tool, dict) and tool.get("type") == "function"
    ]
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    include = body.get("include")
    return {
        "model": body.get("model"),
        "messages": messages,
        "tools": tools,
        "tool_choice": choice,
        "max_completion_tokens": body.get("max_output_tokens"),
        "logprobs": isinstance(include, list) and _LOGPROBS_INCLUDE in include,
        "top_logprobs": body.get("top_logprobs"),
    }


def _echoed_tools(body: Json) -> list[Any]:
    """The request's tools as OpenAI echoes them: function tools with their defaults filled in."""
    tools: list[Any] = []
    for tool in body.get("tools") or ():
        if isinstance(tool, dict) and tool.get("type") == "function":
            tools.append({"description": None, "strict": True, **tool, "parameters": tool.get("parameters")})
        else:
            tools.append(tool)
    return tools


def _or_default(body: Json, key: str, default: Any) -> Any:
    value = body.get(key)
    return default if value is None else value


@dataclass
class _ResponseAnswer:
    """A Responses answer: the final response object and, per output item, the fragments its stream sends."""

    response: Json
    #: per output item: the text pieces (message) or the argument fragments (function_call), one delta each
    fragments: list[list[str]]


def _response_answer(
    body: Json, behaviour: Behaviour, items: list[Json], response_id: str, created: int
) -> _ResponseAnswer:
    view = _chat_view(body, items)
    plan = _chat_plan(view, behaviour)
    output: list[Json] = []
    fragments: list[list[str]] = []
    incomplete = False
    if plan.calls is not None:
        for call_id, name, pieces in plan.calls:
            output.append({"id": _openai_id("fc"), "type": "function_call", "status": "completed",
                           "arguments": "".join(pieces), "call_id": call_id, "name": name})
            fragments.append(list(pieces))
    else:
        [(words, finish)] = plan.answers
        pieces = _pieces(words)
        incomplete = finish == "length"
        logprobs = [_token_logprob(p, i, plan.top_logprobs) for i, p in enumerate(pieces)] if plan.logprobs else []
        part = {"type": "output_text", "annotations": [], "logprobs": logprobs, "text": "".join(pieces)}
        output.append({"id": _openai_id("msg"), "type": "message",
                       "status": "incomplete" if incomplete else "completed", "content": [part], "role": "assistant"})
        fragments.append(pieces)
    input_tokens = _prompt_tokens(view)
    text = body.get("text")
    response: Json = {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": "incomplete" if incomplete else "completed",
        "background": False,
        # Only a completed response has a completion time.
        "completed_at": None if incomplete else int(time.time()),
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": body.get("max_tool_calls"),
        "model": plan.model,
        "output": output,
        "parallel_tool_calls": _or_default(body, "parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "prompt_cache_key": body.get("prompt_cache_key"),
        "reasoning": _or_default(body, "reasoning", {"effort": None, "summary": None}),
        "safety_identifier": body.get("safety_identifier"),
        "service_tier": "default",
        "store": _or_default(body, "store", True),
        "temperature": _or_default(body, "temperature", 1.0),
        "text": {"format": {"type": "text"}, "verbosity": "medium", **(text if isinstance(text, dict) else {})},
        "tool_choice": _or_default(body, "tool_choice", "auto"),
        "tools": _echoed_tools(body),
        "top_logprobs": _or_default(body, "top_logprobs", 0),
        "top_p": _or_default(body, "top_p", 1.0),
        "truncation": _or_default(body, "truncation", "disabled"),
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": plan.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + plan.completion_tokens,
        },
        "metadata": _or_default(body, "metadata", {}),
    }
    # OpenAI sends "user": null, which the spec does not allow (a plain string); echo it only when given.
    if isinstance(body.get("user"), str):
        response["user"] = body["user"]
    return _ResponseAnswer(response, fragments)


def response_object(body: Json, behaviour: Behaviour, items: list[Json], response_id: str, created: int) -> Json:
    """The full ``response`` object answering a request whose conversation is ``items``.

    ``items`` is everything the model sees: what ``previous_response_id`` reached, then the request's input.
    """
    return _response_answer(body, behaviour, items, response_id, created).response


def _obfuscation(delta: str, sequence_number: int) -> str:
    # Deterministic stand-in for OpenAI's random padding: it evens delta and padding out to a block.
    length = _OBFUSCATION_BLOCK - len(delta) % _OBFUSCATION_BLOCK
    return hashlib.sha256(f"{sequence_number}:{delta}".encode()).hexdigest()[:length]


def response_events(
    body: Json, behaviour: Behaviour, items: list[Json], response_id: str, created: int
) -> Iterator[Json]:
    """The events of a streamed response, in order, as OpenAI sends them (see :func:`response_object`)."""
    answer = _response_answer(body, behaviour, items, response_id, created)
    final = answer.response
    options = body.get("stream_options")
    obfuscate = not (isinstance(options, dict) and options.get("include_obfuscation") is False)
    sequence = itertools.count()

    def event(type_: str, **fields: Any) -> Json:
        return {"type": type_, "sequence_number": next(sequence), **fields}

    def delta(type_: str, piece: str, **fields: Any) -> Json:
        out = event(type_, **fields, delta=piece)
        if obfuscate:
            out["obfuscation"] = _obfuscation(piece, out["sequence_number"])
        return out

    # The spec's Response has no null usage (OpenAI sends one here), so the snapshot leaves it out.
    snapshot = {k: v for k, v in final.items() if k != "usage"}
    snapshot.update(status="in_progress", completed_at=None, incomplete_details=None, output=[])
    yield event("response.created", response=snapshot)
    yield event("response.in_progress", response=snapshot)
    for index, (item, pieces) in enumerate(zip(final["output"], answer.fragments, strict=True)):
        if item["type"] == "message":
            yield event("response.output_item.added", output_index=index,
                        item={**item, "status": "in_progress", "content": []})
            [part] = item["content"]
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            yield event("response.content_part.added", **where, part={**part, "text": "", "logprobs": []})
            for position, piece in enumerate(pieces):
                yield delta("response.output_text.delta", piece, **where,
                            logprobs=part["logprobs"][position:position + 1])
            yield event("response.output_text.done", **where, text=part["text"], logprobs=part["logprobs"])
            yield event("response.content_part.done", **where, part=part)
        else:
            yield event("response.output_item.added", output_index=index,
                        item={**item, "status": "in_progress", "arguments": ""})
            for piece in pieces:
                yield delta("response.function_call_arguments.delta", piece, item_id=item["id"], output_index=index)
            yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                        name=item["name"], arguments=item["arguments"])
        yield event("response.output_item.done", output_index=index, item=item)
    yield event(f"response.{final['status']}", response=final)


@dataclass(frozen=True)
class _StoredResponse:
    """A response the provider keeps (``store`` not false) for retrieval and ``previous_response_id``."""

    response: Json
    #: the conversation a follow-up continues: the reached history, this input, this output
    items: list[Json]


@dataclass(frozen=True)
class _SseFormat:
    """How an API frames its server-sent events."""

    #: an ``event: <type>`` line before each data line (Responses), or data lines only (chat, completions)
    named: bool
    #: written after the last event (b"" for none)
    done: bytes
    #: the only event of an ``error-event`` stream
    error_event: Json

    def frame(self, payload: Json) -> bytes:
        data = f"data: {json.dumps(payload)}\n\n"
        return (f"event: {payload['type']}\n{data}" if self.named else data).encode()


_OVERLOADED: Json = {"message": "The model is overloaded.", "type": "server_error", "param": None, "code": "overloaded"}
_CHAT_SSE = _SseFormat(named=False, done=b"data: [DONE]\n\n", error_event={"error": _OVERLOADED})
# The spec documents the error's fields flat; at runtime OpenAI nests them under "error" (which is what
# makes the official SDK raise). Sending both satisfies a client reading either shape.
_RESPONSES_SSE = _SseFormat(
    named=True,
    done=b"",
    error_event={
        "type": "error",
        "sequence_number": 0,
        "code": _OVERLOADED["code"],
        "message": _OVERLOADED["message"],
        "param": None,
        "error": _OVERLOADED,
    },
)


class FakeProvider:
    """OpenAI-compatible fake on 127.0.0.1, served from a background thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, api_key: str | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        """``api_key``, when set, is required as a Bearer token (else 401); with ``ssl_context``, HTTPS."""
        self.host = host
        self.port = port
        self.api_key = api_key
        self.ssl_context = ssl_context
        self.disconnected = threading.Event()
        self.stream_completed = threading.Event()
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._streams: list[StreamRecord] = []
        self._model_counts: Counter[str] = Counter()
        self._stored: dict[str, _StoredResponse] = {}
        self._faults: dict[str | None, FaultRule] = {}
        self._fault_hits = 0
        self._hanging = 0
        self._stopping = threading.Event()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    # -- lifecycle -----------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http(s)://127.0.0.1:PORT/v1`` (valid after start)."""
        if self._thread is None:
            raise RuntimeError("FakeProvider is not started")
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self.host}:{self.port}/v1"

    def start(self, timeout: float = 10.0) -> str:
        """Start serving; returns base_url."""
        if self._thread is not None:
            return self.base_url
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        # A gateway holding a thousand streams opens as many connections here at once.
        sock.listen(1024)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._ready.clear()
        self._stopping.clear()
        self._startup_error = None
        self._thread = threading.Thread(
            target=self._serve, args=(sock,), name=f"fake-provider-{self.port}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("FakeProvider did not start in time")
        if self._startup_error is not None:
            self._thread = None
            raise RuntimeError("FakeProvider failed to start") from self._startup_error
        return self.base_url

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and join the thread (idempotent)."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        self._stopping.set()  # ends hang faults and fault waits while the runner shuts down
        if loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = None

    def __enter__(self) -> FakeProvider:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            try:
                loop.run_until_complete(self._setup(sock))
            except BaseException as exc:  # reported to start() in the caller's thread
                self._startup_error = exc
                sock.close()
                return
            finally:
                self._ready.set()
            loop.run_forever()
            if self._runner is not None:
                loop.run_until_complete(self._runner.cleanup())
        finally:
            # Cancel leftovers (e.g. a slow-N sleep) so the loop closes cleanly.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._loop = None

    async def _setup(self, sock: socket.socket) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._handle_chat)
        app.router.add_post("/v1/completions", self._handle_completions)
        app.router.add_post("/v1/embeddings", self._handle_embeddings)
        app.router.add_post("/v1/responses", self._handle_responses)
        app.router.add_get("/v1/responses/{response_id}", self._handle_response_get)
        app.router.add_delete("/v1/responses/{response_id}", self._handle_response_delete)
        app.router.add_get("/v1/models", self._handle_models)
        app.router.add_get("/v1/models/{model}", self._handle_model)
        # Plain web pages, for agents' http_fetch tool.
        app.router.add_get("/pages/sleep/{seconds}", self._handle_sleep_page)
        app.router.add_get("/pages/redirect", self._handle_redirect_page)
        app.router.add_route("*", "/{tail:.*}", self._handle_unknown)
        # Short shutdown timeout: a slow-N handler must not hold up stop().
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=self.ssl_context).start()

    # -- recorded state (thread-safe copies) ----------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def last_request(self) -> RecordedRequest:
        """The most recent request (AssertionError if none)."""
        with self._lock:
            assert self._requests, "the fake provider received no request"
            return self._requests[-1]

    def requests_for(self, model: str) -> list[RecordedRequest]:
        """Requests whose body named ``model``."""
        return [r for r in self.requests if r.model == model]

    def request_count(self, model: str | None = None) -> int:
        """Requests received for ``model`` (all requests when None)."""
        with self._lock:
            return len(self._requests) if model is None else self._model_counts[model]

    @property
    def model_counts(self) -> dict[str, int]:
        """Requests received per model name."""
        with self._lock:
            return dict(self._model_counts)

    @property
    def streams(self) -> list[StreamRecord]:
        """Snapshot of each streamed response's lifecycle."""
        with self._lock:
            return [StreamRecord(s.path, s.model, s.chunks_sent, s.outcome, s.error, s.bytes_sent)
                    for s in self._streams]

    @property
    def disconnects(self) -> int:
        """Streams the client abandoned mid-way."""
        with self._lock:
            return sum(1 for s in self._streams if s.outcome == "disconnected")

    @property
    def completed_streams(self) -> int:
        """Streams sent through to the end (``[DONE]``, or a Responses stream's last event)."""
        with self._lock:
            return sum(1 for s in self._streams if s.outcome == "completed")

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> bool:
        """Wait until at least ``count`` requests arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.request_count() >= count:
                return True
            time.sleep(0.01)
        return self.request_count() >= count

    def wait_for_streams(self, count: int = 1, timeout: float = 5.0) -> list[StreamRecord]:
        """Wait until ``count`` streams exist and all have an outcome; returns them.

        A client can read the last event before the handler records completion, so
        check outcomes through this rather than ``streams`` right after a stream.
        """
        deadline = time.monotonic() + timeout
        while True:
            streams = self.streams
            settled = len(streams) >= count and all(s.outcome is not None for s in streams)
            if settled or time.monotonic() >= deadline:
                return streams
            time.sleep(0.01)

    @property
    def stored_responses(self) -> dict[str, Json]:
        """Copies of the Responses API responses kept (``store`` not false), by id."""
        with self._lock:
            return {response_id: copy.deepcopy(kept.response) for response_id, kept in self._stored.items()}

    def set_fault(self, fault: Fault, *, model: str | None = None) -> FaultRule:
        """Inject ``fault`` into requests for ``model`` (as received), or every request when None.

        Replaces the fault set for the same scope; returns the rule, whose counters start at 0.
        """
        rule = FaultRule(fault, model, self._lock)
        with self._lock:
            previous = self._faults.get(model)
            if previous is not None:
                previous._active = False
            self._faults[model] = rule
        return rule

    def clear_fault(self, *, model: str | None = None) -> None:
        """Remove the fault of one scope (the global one when None), if any."""
        with self._lock:
            rule = self._faults.pop(model, None)
            if rule is not None:
                rule._active = False

    def clear_faults(self) -> None:
        """Remove every fault (``fault_hits`` keeps counting; :meth:`reset` zeroes it)."""
        with self._lock:
            for rule in self._faults.values():
                rule._active = False
            self._faults.clear()

    @property
    def faults(self) -> dict[str | None, FaultRule]:
        """The faults set and not used up, by scope (model name, None for the global one)."""
        with self._lock:
            return dict(self._faults)

    @property
    def fault_hits(self) -> int:
        """Requests any fault was applied to since the last reset (per fault: :attr:`FaultRule.hits`)."""
        with self._lock:
            return self._fault_hits

    @property
    def hanging(self) -> int:
        """Requests held by a ``hang`` fault right now."""
        with self._lock:
            return self._hanging

    def reset(self) -> None:
        """Forget recorded requests, counters, stream events, stored responses and faults."""
        self.clear_faults()
        with self._lock:
            self._fault_hits = 0
            self._stored.clear()
            self._requests.clear()
            self._streams.clear()
            self._model_counts.clear()
            self.disconnected.clear()
            self.stream_completed.clear()

    # -- handlers ------------------------------------------------------------------

    async def _record(self, request: web.Request) -> RecordedRequest:
        raw = await request.read()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        recorded = RecordedRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            raw=raw,
            received_at=time.time(),
        )
        with self._lock:
            self._requests.append(recorded)
            if recorded.model is not None:
                self._model_counts[recorded.model] += 1
        return recorded

    def _next_id(self, prefix: str) -> str:
        with self._lock:
            return f"{prefix}-fake{next(self._ids):06d}"

    def _headers(self) -> dict[str, str]:
        return {"x-request-id": self._next_id("req"), "openai-processing-ms": "1"}

    def _error(
        self, status: int, message: str | None = None, param: str | None = None, code: str | None = None
    ) -> web.Response:
        body = error_body(status)
        if message is not None:
            body["error"].update(message=message, param=param, code=code)
        headers = self._headers()
        if status == 429:
            headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return web.json_response(body, status=status, headers=headers)

    def _authorized(self, request: web.Request) -> bool:
        return self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}"

    async def _prepare(
        self, request: web.Request
    ) -> tuple[RecordedRequest, Json, Behaviour, Fault | None] | web.StreamResponse:
        """Record the request; return its body, behaviour and fault, or an early response."""
        recorded = await self._record(request)
        if not self._authorized(request):
            return self._error(401)
        body = recorded.body
        if not isinstance(body, dict):
            return self._error(400, "We could not parse the JSON body of your request.")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return self._error(400, "you must provide a model parameter", "model")
        fault = self._take_fault(model, body.get("stream") is True)
        if fault is not None and (early := await self._early_fault(request, fault, body)) is not None:
            return early
        behaviour = parse_behaviour(model)
        if behaviour.delay:
            await asyncio.sleep(behaviour.delay)
        if behaviour.kind == "error":
            return self._error(behaviour.status)
        if behaviour.kind == "garbage":
            return web.Response(
                status=200, body=b"<<<not json", content_type="application/json", headers=self._headers()
            )
        return recorded, body, behaviour, fault

    def _take_fault(self, model: str, stream: bool) -> Fault | None:
        """The fault to apply to a request, counting it (see the module docstring for the rules)."""
        with self._lock:
            for scope in (model, None):
                rule = self._faults.get(scope)
                if rule is None or not rule._covers(stream):
                    continue
                applies = rule._take()
                if not rule._active:
                    del self._faults[scope]
                if not applies:
                    return None
                self._fault_hits += 1
                return rule.fault
        return None

    async def _early_fault(self, request: web.Request, fault: Fault, body: Json) -> web.StreamResponse | None:
        """Apply the faults acting before any answer; None to go on with the request."""
        if fault.kind == "status":
            headers = self._headers()
            if fault.retry_after is not None:
                headers["Retry-After"] = f"{fault.retry_after:g}"
            return web.json_response(error_body(fault.status), status=fault.status, headers=headers)
        if fault.kind == "hang":
            with self._lock:
                self._hanging += 1
            try:
                await self._wait(request, None)
            finally:
                with self._lock:
                    self._hanging -= 1
            return _aborted(request)
        if fault.kind == "slow" and not await self._wait(request, fault.delay):
            return _aborted(request)
        if fault.kind == "reset" and fault.after_chunks == 0 and body.get("stream") is not True:
            return _aborted(request)
        return None

    async def _wait(self, request: web.Request, seconds: float | None) -> bool:
        """Sleep ``seconds`` (None: forever); False, early, once the client left or the provider stops."""
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + seconds
        while True:
            transport = request.transport
            if self._stopping.is_set() or transport is None or transport.is_closing():
                return False
            remaining = _WAIT_POLL if deadline is None else deadline - loop.time()
            if remaining <= 0:
                return True
            await asyncio.sleep(min(_WAIT_POLL, remaining))

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        prepared = await self._prepare(request)
        if isinstance(prepared, web.StreamResponse):
            return prepared
        _, body, behaviour, fault = prepared
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return self._error(400)
        completion_id, created = self._next_id("chatcmpl"), int(time.time())
        if body.get("stream") is True:
            chunks = chat_chunks(body, behaviour, completion_id, created)
            return await self._stream(request, body, behaviour, chunks, fault=fault)
        result = chat_completion(body, behaviour, completion_id, created)
        return await self._json(request, result, behaviour, fault)

    async def _handle_completions(self, request: web.Request) -> web.StreamResponse:
        prepared = await self._prepare(request)
        if isinstance(prepared, web.StreamResponse):
            return prepared
        _, body, behaviour, fault = prepared
        completion_id, created = self._next_id("cmpl"), int(time.time())
        if body.get("stream") is True:
            chunks = completion_chunks(body, behaviour, completion_id, created)
            return await self._stream(request, body, behaviour, chunks, fault=fault)
        return await self._json(request, completion(body, behaviour, completion_id, created), behaviour, fault)

    async def _handle_embeddings(self, request: web.Request) -> web.StreamResponse:
        prepared = await self._prepare(request)
        if isinstance(prepared, web.StreamResponse):
            return prepared
        _, body, behaviour, fault = prepared
        if "input" not in body:
            return self._error(400, "you must provide an input parameter", "input")
        return await self._json(request, embeddings(body), behaviour, fault)

    async def _handle_responses(self, request: web.Request) -> web.StreamResponse:
        prepared = await self._prepare(request)
        if isinstance(prepared, web.StreamResponse):
            return prepared
        _, body, behaviour, fault = prepared
        if (problem := _responses_problem(body)) is not None:
            return self._error(400, *problem)
        history: list[Json] = []
        previous = body.get("previous_response_id")
        if previous is not None:
            with self._lock:
                kept = self._stored.get(previous) if isinstance(previous, str) else None
            if kept is None:
                return self._error(404, f"Previous response with id '{previous}' not found.",
                                   "previous_response_id", "previous_response_not_found")
            history = kept.items
        items = [*history, *response_input_items(body.get("input"))]
        response_id, created = _openai_id("resp"), int(time.time())
        reset = fault is not None and fault.kind == "reset"  # a reset answer is never kept
        if body.get("stream") is True:
            events = response_events(body, behaviour, items, response_id, created)
            if not reset:
                events = self._keeping(body, items, events)
            return await self._stream(request, body, behaviour, events, _RESPONSES_SSE, fault)
        result = response_object(body, behaviour, items, response_id, created)
        if not reset:
            self._keep(body, items, result)
        return await self._json(request, result, behaviour, fault)

    def _keep(self, body: Json, items: list[Json], response: Json) -> None:
        if body.get("store") is not False:
            with self._lock:
                self._stored[response["id"]] = _StoredResponse(response, [*items, *response["output"]])

    def _keeping(self, body: Json, items: list[Json], events: Iterator[Json]) -> Iterator[Json]:
        """Pass events through, storing the response before its last event reaches the client.

        Stored first so that a client retrieving the response right after the stream finds it.
        """
        for event in events:
            if event["type"] in RESPONSE_TERMINAL_EVENTS:
                self._keep(body, items, event["response"])
            yield event

    async def _handle_response_get(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        if not self._authorized(request):
            return self._error(401)
        response_id = request.match_info["response_id"]
        with self._lock:
            kept = self._stored.get(response_id)
        if kept is None:
            return self._error(404, f"Response with id '{response_id}' not found.")
        return web.json_response(kept.response, headers=self._headers())

    async def _handle_response_delete(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        if not self._authorized(request):
            return self._error(401)
        response_id = request.match_info["response_id"]
        with self._lock:
            kept = self._stored.pop(response_id, None)
        if kept is None:
            return self._error(404, f"Response with id '{response_id}' not found.")
        body = {"id": response_id, "object": "response", "deleted": True}
        return web.json_response(body, headers=self._headers())

    async def _handle_sleep_page(self, request: web.Request) -> web.StreamResponse:
        """``GET /pages/sleep/S``: a text page after S seconds."""
        await self._record(request)
        seconds = float(request.match_info["seconds"])
        await asyncio.sleep(seconds)
        return web.Response(text=f"slept {seconds:g} s", content_type="text/plain")

    async def _handle_redirect_page(self, request: web.Request) -> web.StreamResponse:
        """``GET /pages/redirect?to=URL``: a 302 to URL."""
        await self._record(request)
        raise web.HTTPFound(request.query["to"])

    async def _handle_models(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        data = [_model_object(name) for name in FAKE_MODELS]
        return web.json_response({"object": "list", "data": data}, headers=self._headers())

    async def _handle_model(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        name = request.match_info["model"]
        if name not in FAKE_MODELS:
            return self._error(404, f"The model '{name}' does not exist", "model")
        return web.json_response(_model_object(name), headers=self._headers())

    async def _handle_unknown(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        return self._error(404, f"Invalid URL ({request.method} {request.path})")

    async def _json(
        self, request: web.Request, result: Json, behaviour: Behaviour, fault: Fault | None = None
    ) -> web.StreamResponse:
        payload = json.dumps(result).encode()
        reset = fault is not None and fault.kind == "reset"
        if behaviour.kind != "midstream_fail" and not reset:
            return web.Response(body=payload, content_type="application/json", headers=self._headers())
        # Promise the full length, send half, then drop the connection.
        response = web.StreamResponse(headers=self._headers())
        response.content_type = "application/json"
        response.content_length = len(payload)
        await response.prepare(request)
        await response.write(payload[: len(payload) // 2])
        await asyncio.sleep(0.05)
        _abort(request)
        return response

    async def _stream(
        self,
        request: web.Request,
        body: Json,
        behaviour: Behaviour,
        chunks: Iterator[Json],
        sse: _SseFormat = _CHAT_SSE,
        fault: Fault | None = None,
    ) -> web.StreamResponse:
        record = StreamRecord(path=request.path, model=str(body.get("model")))
        with self._lock:
            self._streams.append(record)
        response = web.StreamResponse(headers={**self._headers(), "Cache-Control": "no-cache"})
        response.content_type = "text/event-stream"
        response.charset = "utf-8"
        if behaviour.kind == "gzip":
            response.enable_compression(web.ContentCoding.gzip)
        kind = fault.kind if fault is not None else None
        # Events sent before the connection is aborted, if it is to be.
        abort_after: int | None = None
        if kind == "reset" and fault is not None:
            abort_after = fault.after_chunks
        elif behaviour.kind == "midstream_fail":
            abort_after = MIDSTREAM_FAIL_CHUNKS
        try:
            await response.prepare(request)
            if kind == "slow_first_chunk" and fault is not None and not await self._wait(request, fault.delay):
                self._finish(record, "disconnected", "left during slow_first_chunk")
                _abort(request)
                return response
            if behaviour.kind == "error_event" or kind == "error_event_first":
                await response.write(sse.frame(sse.error_event))
                await response.write_eof()
                self._finish(record, "completed")
                return response
            chunk = next(chunks, None)
            while chunk is not None:
                if abort_after is not None and record.chunks_sent >= abort_after:
                    break
                following = next(chunks, None)
                if following is None and kind == "reset":
                    break  # a reset stream never sends its last event
                frame = sse.frame(chunk)
                await response.write(frame)
                chunk = following
                with self._lock:
                    record.chunks_sent += 1
                    record.bytes_sent += len(frame)
                if behaviour.chunk_delay:
                    await asyncio.sleep(behaviour.chunk_delay)
            if abort_after is not None:
                # Give the kernel the chunks already written, then drop the connection before the stream's end.
                await _flushed(request)
                self._finish(record, "aborted")
                _abort(request)
                return response
            if sse.done:
                await response.write(sse.done)
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError) as exc:
            # aiohttp raises ClientConnectionResetError (a ConnectionResetError) on writes
            # after the peer left; cancellation comes from server shutdown or handler cancel.
            self._finish(record, "disconnected", repr(exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
            return response
        self._finish(record, "completed")
        return response

    def _finish(self, record: StreamRecord, outcome: StreamOutcome, error: str | None = None) -> None:
        with self._lock:
            record.outcome = outcome
            record.error = error
        if outcome == "disconnected":
            self.disconnected.set()
        elif outcome == "completed":
            self.stream_completed.set()


def _model_object(name: str) -> Json:
    return {"id": name, "object": "model", "created": 1715367049, "owned_by": "system"}


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


def _aborted(request: web.Request) -> web.Response:
    """Drop the connection without an answer; the response returned is never sent."""
    _abort(request)
    return web.Response(status=503)


async def _flushed(request: web.Request) -> None:
    """Wait (up to 0.5 s) until what was written left the transport's buffer, so an abort keeps it."""
    transport = request.transport
    for _ in range(100):
        if transport is None or not transport.get_write_buffer_size():
            break
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.01)


def remote_model(provider: FakeProvider, name: str, upstream: str, **extra: Any) -> dict[str, Any]:
    """An appliance model entry served by ``provider`` as ``upstream``."""
    return {
        "name": name,
        "backend": "openai",
        "base_url": provider.base_url,
        "api_key": "sk-upstream-secret",
        "upstream_model": upstream,
        "max_retries": 0,
        "timeout": 10,
        **extra,
    }
