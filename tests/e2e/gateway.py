"""Helpers for end-to-end tests: configurations pointing at the fake provider, and raw SSE reading."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import openai

from tests.support.openapi import validate
from tests.support.server import HeliosProcess


def client(base_url: str, api_key: str = "unused", **kwargs: Any) -> openai.OpenAI:
    kwargs.setdefault("timeout", 30)
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, **kwargs)


def stream_payloads(cl: openai.OpenAI, kind: str = "chat", **params: Any) -> list[bytes]:
    """The raw ``data:`` payloads of a stream, as the client received them, in order."""
    resource = cl.chat.completions if kind == "chat" else cl.completions
    payloads: list[bytes] = []
    with resource.with_streaming_response.create(stream=True, **params) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                payloads.append(line[6:].encode())
            else:
                assert line == "", f"unexpected SSE line {line!r}"
    return payloads


def validated_chunks(payloads: list[bytes], schema: str = "CreateChatCompletionStreamResponse") -> list[Any]:
    """Parse and validate every chunk; the stream must end with exactly one [DONE]."""
    assert payloads and payloads[-1] == b"[DONE]", payloads[-3:]
    chunks = [json.loads(p) for p in payloads[:-1]]
    for chunk in chunks:
        validate(schema, chunk)
    return chunks


def eventually(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def wait_for_log(process: HeliosProcess, *needles: str, timeout: float = 10.0) -> str:
    """The first log line containing every one of ``needles``, waiting for it to be written."""
    found: list[str] = []

    def seen() -> bool:
        found[:] = [line for line in process.logs().splitlines() if all(needle in line for needle in needles)]
        return bool(found)

    eventually(seen, timeout, f"log line with {' and '.join(map(repr, needles))}")
    return found[0]


def created_response(oa: openai.OpenAI, **params: Any) -> dict[str, Any]:
    """``responses.create`` as raw JSON, validated against OpenAI's ``Response`` schema."""
    data: dict[str, Any] = oa.responses.with_raw_response.create(**params).http_response.json()
    validate("Response", data)
    return data


def response_events(oa: openai.OpenAI, **params: Any) -> list[dict[str, Any]]:
    """A Responses stream's events as sent, each validated; ``event:`` lines must name the type of their data,
    and sequence numbers run 0, 1, 2, ..."""
    events: list[dict[str, Any]] = []
    kind = None
    with oa.responses.with_streaming_response.create(stream=True, **params) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                assert event["type"] == kind, (kind, event)
                validate("ResponseStreamEvent", event)
                events.append(event)
            else:
                assert line == "", f"unexpected SSE line {line!r}"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def output_text(response: dict[str, Any]) -> str:
    """The text of a Response's message items."""
    return "".join(part["text"] for item in response["output"] if item["type"] == "message"
                   for part in item["content"] if part["type"] == "output_text")

