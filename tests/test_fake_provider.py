"""The fake provider, driven by the official openai client, must speak valid OpenAI."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.e2e.gateway import eventually
from tests.support.fake_provider import (
    MIDSTREAM_FAIL_CHUNKS,
    MIN_OUTPUT_TOKENS,
    MODEL_SUFFIX,
    RETRY_AFTER_SECONDS,
    FakeProvider,
    Fault,
    embedding_vector,
)
from tests.support.openapi import COMPLETION_STREAM_SCHEMA, validate

USER: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello big world"},
]
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture
def fake(fake_provider: FakeProvider) -> Iterator[FakeProvider]:
    fake_provider.reset()
    yield fake_provider
    fake_provider.clear_faults()  # the provider is the session's: leave no fault to other tests


@pytest.fixture
def oa(fake: FakeProvider) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fake.base_url, api_key="test", max_retries=0, timeout=10) as client:
        yield client


def raw_json(response: Any, schema: str) -> Any:
    """Body of a with_raw_response call, validated."""
    http: httpx2.Response = response.http_response
    assert http.headers["content-type"].startswith("application/json")
    body = http.json()
    validate(schema, body)
    return body


def stream(client: openai.OpenAI, schema: str, kind: str = "chat", **params: Any) -> list[Any]:
    """Raw SSE chunks of a stream, each validated; asserts the [DONE] terminator."""
    resource: Any = client.chat.completions if kind == "chat" else client.completions
    payloads: list[str] = []
    with resource.with_streaming_response.create(stream=True, **params) as response:
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        for line in response.iter_lines():
            if line:
                assert line.startswith("data: "), line
                payloads.append(line.removeprefix("data: "))
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    for chunk in chunks:
        validate(schema, chunk)
    return chunks


def chat_text(chunks: list[Any], index: int = 0) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in chunks
        if c["choices"] and c["choices"][0]["index"] == index
    )


# -- chat completions -------------------------------------------------------------------


def test_chat_completion(oa: openai.OpenAI, fake: FakeProvider) -> None:
    raw = oa.chat.completions.with_raw_response.create(model="gpt-x", messages=USER)
    body = raw_json(raw, "CreateChatCompletionResponse")
    assert body["model"] == "gpt-x" + MODEL_SUFFIX
    assert body["object"] == "chat.completion"
    assert body["system_fingerprint"]
    [choice] = body["choices"]
    assert choice["message"]["content"] == "echo: hello big world"
    assert choice["finish_reason"] == "stop"
    assert choice["logprobs"] is None
    assert body["usage"]["prompt_tokens"] == 5
    assert body["usage"]["completion_tokens"] == 4
    assert body["usage"]["total_tokens"] == 9
    assert raw.http_response.headers["x-request-id"]
    assert raw.parse().choices[0].message.content == "echo: hello big world"

    recorded = fake.last_request
    assert (recorded.method, recorded.path) == ("POST", "/v1/chat/completions")
    assert recorded.headers["authorization"] == "Bearer test"
    assert recorded.body["messages"] == USER
    assert fake.request_count("gpt-x") == 1


def test_chat_n_choices_and_content_parts(oa: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": [{"type": "text", "text": "part one"}]}]
    raw = oa.chat.completions.with_raw_response.create(model="m", messages=messages, n=3)
    body = raw_json(raw, "CreateChatCompletionResponse")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    contents = [c["message"]["content"] for c in body["choices"]]
    assert contents == ["echo: part one", "echo: part one (1)", "echo: part one (2)"]
    assert body["usage"]["completion_tokens"] == 3 + 4 + 4


def test_chat_max_tokens_truncates(oa: openai.OpenAI) -> None:
    raw = oa.chat.completions.with_raw_response.create(model="chunks-10", messages=USER, max_tokens=3)
    body = raw_json(raw, "CreateChatCompletionResponse")
    assert body["choices"][0]["message"]["content"] == "w1 w2 w3"
    assert body["choices"][0]["finish_reason"] == "length"


def test_chat_tool_call(oa: openai.OpenAI) -> None:
    raw = oa.chat.completions.with_raw_response.create(model="m", messages=USER, tools=TOOLS)
    body = raw_json(raw, "CreateChatCompletionResponse")
    [choice] = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_chat_logprobs(oa: openai.OpenAI) -> None:
    raw = oa.chat.completions.with_raw_response.create(model="m", messages=USER, logprobs=True, top_logprobs=3)
    body = raw_json(raw, "CreateChatCompletionResponse")
    content = body["choices"][0]["logprobs"]["content"]
    assert "".join(entry["token"] for entry in content) == "echo: hello big world"
    assert all(len(entry["top_logprobs"]) == 3 for entry in content)


def test_chat_stream(oa: openai.OpenAI, fake: FakeProvider) -> None:
    chunks = stream(oa, "CreateChatCompletionStreamResponse", model="m", messages=USER)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert {c["model"] for c in chunks} == {"m" + MODEL_SUFFIX}
    assert chat_text(chunks) == "echo: hello big world"
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    [record] = fake.wait_for_streams()
    assert record.outcome == "completed"
    assert record.chunks_sent == len(chunks)
    assert fake.stream_completed.is_set()


def test_chat_stream_usage(oa: openai.OpenAI) -> None:
    chunks = stream(
        oa,
        "CreateChatCompletionStreamResponse",
        model="m",
        messages=USER,
        stream_options={"include_usage": True},
    )
    *body, last = chunks
    assert all(c["usage"] is None for c in body)
    assert last["choices"] == []
    assert last["usage"]["total_tokens"] == 9


def test_chat_stream_chunk_count(oa: openai.OpenAI) -> None:
    chunks = stream(oa, "CreateChatCompletionStreamResponse", model="chunks-300", messages=USER)
    content = [c for c in chunks if c["choices"][0]["delta"].get("content")]
    assert len(content) == 300
    assert chat_text(chunks) == " ".join(f"w{i}" for i in range(1, 301))


def test_chat_stream_n_interleaves(oa: openai.OpenAI) -> None:
    chunks = stream(oa, "CreateChatCompletionStreamResponse", model="chunks-2", messages=USER, n=2)
    order = [c["choices"][0]["index"] for c in chunks]
    assert order == [0, 1, 0, 1, 0, 1, 1, 0, 1]  # roles, w1, w2, "(1)" marker, finishes
    assert chat_text(chunks, 0) == "w1 w2"
    assert chat_text(chunks, 1) == "w1 w2 (1)"


def test_chat_stream_logprobs(oa: openai.OpenAI) -> None:
    chunks = stream(oa, "CreateChatCompletionStreamResponse", model="m", messages=USER, logprobs=True, top_logprobs=2)
    content_chunks = [c for c in chunks if c["choices"][0]["delta"].get("content")]
    assert all(len(c["choices"][0]["logprobs"]["content"]) == 1 for c in content_chunks)


def test_chat_stream_tool_calls(oa: openai.OpenAI) -> None:
    chunks = stream(oa, "CreateChatCompletionStreamResponse", model="m", messages=USER, tools=TOOLS)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    first = next(d["tool_calls"][0] for d in deltas if d.get("tool_calls"))
    assert first["id"] and first["type"] == "function" and first["function"]["name"] == "get_weather"
    fragments = [d["tool_calls"][0]["function"]["arguments"] for d in deltas if d.get("tool_calls")]
    assert len(fragments) > 3
    assert json.loads("".join(fragments)) == {"city": "Paris"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"

    # The SDK's own accumulation must agree.
    with oa.chat.completions.stream(model="m", messages=USER, tools=TOOLS) as events:
        final = events.get_final_completion()
    tool_calls = final.choices[0].message.tool_calls
    assert tool_calls is not None
    assert json.loads(tool_calls[0].function.arguments) == {"city": "Paris"}


# -- legacy completions -------------------------------------------------------------------


def test_completion(oa: openai.OpenAI) -> None:
    raw = oa.completions.with_raw_response.create(model="m", prompt=["one two", "three"], n=2, logprobs=2)
    body = raw_json(raw, "CreateCompletionResponse")
    assert body["object"] == "text_completion"
    assert body["model"] == "m" + MODEL_SUFFIX
    texts = [c["text"] for c in body["choices"]]
    assert texts == ["echo: one two", "echo: one two (1)", "echo: three", "echo: three (1)"]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    logprobs = body["choices"][0]["logprobs"]
    assert "".join(logprobs["tokens"]) == "echo: one two"
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15}


def test_completion_stream(oa: openai.OpenAI) -> None:
    chunks = stream(
        oa,
        COMPLETION_STREAM_SCHEMA,
        "completions",
        model="chunks-3",
        prompt="hi",
        stream_options={"include_usage": True},
    )
    *body, last = chunks
    assert "".join(c["choices"][0]["text"] for c in body) == "w1 w2 w3"
    assert body[-1]["choices"][0]["finish_reason"] == "stop"
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 3


# -- embeddings and models ------------------------------------------------------------------


def test_embeddings_float(oa: openai.OpenAI) -> None:
    raw = oa.embeddings.with_raw_response.create(model="e", input=["a b", "c"], encoding_format="float")
    body = raw_json(raw, "CreateEmbeddingResponse")
    assert body["model"] == "e" + MODEL_SUFFIX
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert body["data"][0]["embedding"] == embedding_vector("a b", 8)
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


def test_embeddings_base64_and_dimensions(oa: openai.OpenAI, fake: FakeProvider) -> None:
    # The SDK asks for base64 by default and decodes it.
    result = oa.embeddings.create(model="e", input="hello", dimensions=4)
    assert fake.last_request.body["encoding_format"] == "base64"
    assert result.data[0].embedding == embedding_vector("hello", 4)
    raw = oa.embeddings.with_raw_response.create(model="e", input="hello", encoding_format="base64")
    encoded = raw.http_response.json()["data"][0]["embedding"]
    assert list(struct.unpack("<8f", base64.b64decode(encoded))) == embedding_vector("hello", 8)


def test_embeddings_token_arrays(oa: openai.OpenAI) -> None:
    raw = oa.embeddings.with_raw_response.create(model="e", input=[[1, 2, 3], [4]], encoding_format="float")
    body = raw_json(raw, "CreateEmbeddingResponse")
    assert len(body["data"]) == 2
    assert body["usage"]["prompt_tokens"] == 4


def test_models(oa: openai.OpenAI) -> None:
    body = raw_json(oa.models.with_raw_response.list(), "ListModelsResponse")
    assert body["data"]
    one = raw_json(oa.models.with_raw_response.retrieve(body["data"][0]["id"]), "Model")
    assert one == body["data"][0]


# -- responses ----------------------------------------------------------------------------

RESPONSE_TOOLS: list[Any] = [
    {
        "type": "function",
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
    {"type": "function", "name": "get_time", "description": "Local time", "parameters": {"type": "object"}},
]
SCRIPT = {
    "rounds": [
        [{"name": "lookup", "arguments": {"q": "a"}}],
        [{"name": "lookup", "arguments": {"q": "b"}}, {"name": "fetch", "raw": "not json"}],
    ]
}
SCRIPT_TOOLS: list[Any] = [
    {"type": "function", "name": name, "parameters": {"type": "object"}} for name in ("lookup", "fetch")
]
TEXT_EVENTS = ["response.output_text.delta"]
FUNCTION_CALL_EVENTS = [
    "response.output_item.added",
    "response.function_call_arguments.delta",
    "response.function_call_arguments.delta",
    "response.function_call_arguments.done",
    "response.output_item.done",
]


def response_stream(client: openai.OpenAI, **params: Any) -> list[Any]:
    """Raw events of a Responses stream, each validated against the spec.

    Also checks the framing OpenAI uses: an ``event:`` line naming each event's type, sequence numbers
    0, 1, 2... and no ``[DONE]`` terminator.
    """
    with client.responses.with_streaming_response.create(stream=True, **params) as response:
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        lines = list(response.iter_lines())
    events = []
    for block in "\n".join(lines).strip("\n").split("\n\n"):
        name, data = block.split("\n")
        assert name.startswith("event: "), block
        assert data.startswith("data: "), block
        event = json.loads(data.removeprefix("data: "))
        assert event["type"] == name.removeprefix("event: ")
        validate("ResponseStreamEvent", event)
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def text_events(count: int) -> list[str]:
    """Event types of a stream answering one message of ``count`` deltas."""
    return [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *TEXT_EVENTS * count,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]


def deltas(events: list[Any]) -> list[str]:
    return [e["delta"] for e in events if e["type"] == "response.output_text.delta"]


def test_response(oa: openai.OpenAI, fake: FakeProvider) -> None:
    raw = oa.responses.with_raw_response.create(model="gpt-x", input="hello big world", instructions="be brief")
    body = raw_json(raw, "Response")
    assert body["id"].startswith("resp_")
    assert body["object"] == "response"
    assert (body["status"], body["error"], body["incomplete_details"]) == ("completed", None, None)
    assert body["completed_at"] >= body["created_at"]
    assert body["model"] == "gpt-x" + MODEL_SUFFIX
    assert body["instructions"] == "be brief"
    [message] = body["output"]
    assert message["id"].startswith("msg_")
    assert (message["type"], message["role"], message["status"]) == ("message", "assistant", "completed")
    text = {"type": "output_text", "annotations": [], "logprobs": [], "text": "echo: hello big world"}
    assert message["content"] == [text]
    assert body["usage"] == {
        "input_tokens": 5,  # the instructions count, as they do at OpenAI
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 4,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 9,
    }
    assert (body["tools"], body["tool_choice"], body["metadata"], body["store"]) == ([], "auto", {}, True)
    assert raw.http_response.headers["x-request-id"]
    assert raw.parse().output_text == "echo: hello big world"

    recorded = fake.last_request
    assert (recorded.method, recorded.path) == ("POST", "/v1/responses")
    assert recorded.body == {"model": "gpt-x", "input": "hello big world", "instructions": "be brief"}
    assert fake.request_count("gpt-x") == 1


def test_response_input_items_and_echoed_parameters(oa: openai.OpenAI) -> None:
    items: Any = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "input_text", "text": "first question"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "first answer"}]},
        {"role": "system", "content": "stay brief"},
        {"role": "user", "content": "second question"},
    ]
    raw = oa.responses.with_raw_response.create(
        model="m",
        input=items,
        tools=RESPONSE_TOOLS,
        tool_choice="none",
        parallel_tool_calls=False,
        metadata={"team": "helios"},
        temperature=0.2,
        top_p=0.5,
        text={"format": {"type": "text"}, "verbosity": "low"},
    )
    body = raw_json(raw, "Response")
    assert body["output"][0]["content"][0]["text"] == "echo: second question"
    assert body["usage"]["input_tokens"] == 10
    assert body["tools"] == [
        {**RESPONSE_TOOLS[0], "description": None, "strict": True},
        {**RESPONSE_TOOLS[1], "strict": True},
    ]
    assert (body["tool_choice"], body["parallel_tool_calls"]) == ("none", False)
    assert (body["metadata"], body["temperature"], body["top_p"]) == ({"team": "helios"}, 0.2, 0.5)
    assert body["text"] == {"format": {"type": "text"}, "verbosity": "low"}


def test_response_stream(oa: openai.OpenAI, fake: FakeProvider) -> None:
    events = response_stream(oa, model="m", input="hello big world")
    assert [e["type"] for e in events] == text_events(4)
    created, in_progress, added, part_added, *_, text_done, part_done, item_done, completed = events
    response_id = created["response"]["id"]
    assert {e["response"]["id"] for e in (in_progress, completed)} == {response_id}
    for snapshot in (created["response"], in_progress["response"]):
        assert (snapshot["status"], snapshot["output"], snapshot["completed_at"]) == ("in_progress", [], None)
    final = completed["response"]
    assert final["status"] == "completed"
    [message] = final["output"]
    assert added["item"] == {**message, "status": "in_progress", "content": []}
    assert part_added["part"] == {**message["content"][0], "text": ""}
    # Every event about the text names its item and positions.
    for event in events[3:-2]:
        assert (event["item_id"], event["output_index"], event["content_index"]) == (message["id"], 0, 0)
    assert deltas(events) == ["echo:", " hello", " big", " world"]
    assert all(e["obfuscation"] for e in events if e["type"] == "response.output_text.delta")
    assert text_done["text"] == "echo: hello big world"
    assert part_done["part"] == message["content"][0]
    assert (item_done["output_index"], item_done["item"]) == (0, message)

    # Streamed responses are kept too, as OpenAI keeps them.
    assert raw_json(oa.responses.with_raw_response.retrieve(response_id), "Response") == final
    [record] = fake.wait_for_streams()
    assert (record.path, record.model, record.outcome) == ("/v1/responses", "m", "completed")
    assert record.chunks_sent == len(events)
    assert fake.stream_completed.is_set()


def test_response_stream_chunks(oa: openai.OpenAI) -> None:
    events = response_stream(oa, model="chunks-50", input="x", stream_options={"include_obfuscation": False})
    assert [e["type"] for e in events] == text_events(50)
    assert "".join(deltas(events)) == " ".join(f"w{i}" for i in range(1, 51))
    assert all("obfuscation" not in e for e in events)

    # The SDK's stream helper accumulates the same answer.
    with oa.responses.stream(model="chunks-5", input="x") as stream_events:
        texts = [e.delta for e in stream_events if e.type == "response.output_text.delta"]
        final = stream_events.get_final_response()
    assert texts == ["w1", " w2", " w3", " w4", " w5"]
    assert final.output_text == "w1 w2 w3 w4 w5"


def test_response_max_output_tokens_incomplete(oa: openai.OpenAI) -> None:
    limited = " ".join(f"w{i}" for i in range(1, MIN_OUTPUT_TOKENS + 1))
    raw = oa.responses.with_raw_response.create(model="chunks-40", input="x", max_output_tokens=MIN_OUTPUT_TOKENS)
    body = raw_json(raw, "Response")
    assert (body["status"], body["incomplete_details"]) == ("incomplete", {"reason": "max_output_tokens"})
    assert (body["completed_at"], body["max_output_tokens"]) == (None, MIN_OUTPUT_TOKENS)
    [message] = body["output"]
    assert message["status"] == "incomplete"
    assert message["content"][0]["text"] == limited
    assert body["usage"]["output_tokens"] == MIN_OUTPUT_TOKENS

    events = response_stream(oa, model="chunks-40", input="x", max_output_tokens=MIN_OUTPUT_TOKENS)
    assert [e["type"] for e in events] == [*text_events(MIN_OUTPUT_TOKENS)[:-1], "response.incomplete"]
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-2]["item"]["status"] == "incomplete"
    assert "".join(deltas(events)) == limited

    # A limit the answer fits in completes; one below OpenAI's minimum is refused, as OpenAI refuses it.
    fits = oa.responses.create(model=f"chunks-{MIN_OUTPUT_TOKENS}", input="x", max_output_tokens=MIN_OUTPUT_TOKENS)
    assert fits.status == "completed"
    with pytest.raises(openai.BadRequestError) as info:
        oa.responses.create(model="m", input="x", max_output_tokens=5)
    error = info.value.response.json()
    validate("ErrorResponse", error)
    assert (error["error"]["param"], error["error"]["code"]) == ("max_output_tokens", "integer_below_min_value")


def test_response_errors(oa: openai.OpenAI, fake: FakeProvider) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        oa.responses.create(model="error-429", input="x")
    assert info.value.response.headers["retry-after"] == str(RETRY_AFTER_SECONDS)
    validate("ErrorResponse", info.value.response.json())
    with pytest.raises(openai.RateLimitError):
        oa.responses.create(model="error-429", input="x", stream=True)
    with pytest.raises(openai.InternalServerError):
        oa.responses.create(model="error-500", input="x")
    assert fake.request_count("error-429") == 2
    assert not fake.streams  # errors are answered before any stream starts


def test_response_error_event(oa: openai.OpenAI, fake: FakeProvider) -> None:
    [event] = response_stream(oa, model="error-event", input="x")
    nested = {"message": "The model is overloaded.", "type": "server_error", "param": None, "code": "overloaded"}
    assert event == {
        "type": "error",
        "sequence_number": 0,
        "code": "overloaded",
        "message": "The model is overloaded.",
        "param": None,
        "error": nested,
    }
    # The nested error (OpenAI's runtime shape) makes the SDK raise rather than yield the event.
    with pytest.raises(openai.APIError, match="overloaded") as info:
        for _ in oa.responses.create(model="error-event", input="x", stream=True):
            pass
    assert not isinstance(info.value, openai.APIStatusError)
    assert [s.outcome for s in fake.wait_for_streams(2)] == ["completed", "completed"]
    assert oa.responses.create(model="error-event", input="hi").output_text == "echo: hi"


def test_response_previous_response_id(oa: openai.OpenAI, fake: FakeProvider) -> None:
    raw = oa.responses.with_raw_response.create(model="m", input="hello", instructions="be brief")
    first = raw_json(raw, "Response")
    assert first["usage"]["input_tokens"] == 3
    raw = oa.responses.with_raw_response.create(model="m", input="again please", previous_response_id=first["id"])
    second = raw_json(raw, "Response")
    assert second["previous_response_id"] == first["id"]
    assert second["output"][0]["content"][0]["text"] == "echo: again please"
    # The model saw "hello", "echo: hello" and "again please", but not the first response's instructions.
    assert second["usage"]["input_tokens"] == 1 + 2 + 2
    assert second["instructions"] is None

    assert raw_json(oa.responses.with_raw_response.retrieve(first["id"]), "Response") == first
    assert set(fake.stored_responses) == {first["id"], second["id"]}
    deleted = oa.responses.with_raw_response.delete(first["id"])
    assert deleted.http_response.json() == {"id": first["id"], "object": "response", "deleted": True}
    assert (fake.last_request.method, fake.last_request.path) == ("DELETE", f"/v1/responses/{first['id']}")
    oa.responses.delete(second["id"])  # the SDK returns None for the deletion body
    assert not fake.stored_responses

    for gone in (first["id"], "resp_unknown"):
        with pytest.raises(openai.NotFoundError) as info:
            oa.responses.create(model="m", input="x", previous_response_id=gone)
        error = info.value.response.json()
        validate("ErrorResponse", error)
        assert error["error"] == {
            "message": f"Previous response with id '{gone}' not found.",
            "type": "invalid_request_error",
            "param": "previous_response_id",
            "code": "previous_response_not_found",
        }
        with pytest.raises(openai.NotFoundError):
            oa.responses.retrieve(gone)
        with pytest.raises(openai.NotFoundError):
            oa.responses.delete(gone)

    # store: false answers without keeping anything to continue from.
    unstored = raw_json(oa.responses.with_raw_response.create(model="m", input="x", store=False), "Response")
    assert unstored["store"] is False
    assert not fake.stored_responses
    with pytest.raises(openai.NotFoundError):
        oa.responses.create(model="m", input="x", previous_response_id=unstored["id"])


def test_response_tool_script_round_trip(oa: openai.OpenAI) -> None:
    raw = oa.responses.with_raw_response.create(model="tool-script", input=json.dumps(SCRIPT), tools=SCRIPT_TOOLS)
    first = raw_json(raw, "Response")
    [call] = first["output"]
    assert call["id"].startswith("fc_")
    assert (call["type"], call["status"], call["call_id"], call["name"]) == (
        "function_call",
        "completed",
        "call_s0_0",
        "lookup",
    )
    assert json.loads(call["arguments"]) == {"q": "a"}

    # Round two, streamed: driven by the output of round one's call, the rest reached through the id.
    output: Any = [{"type": "function_call_output", "call_id": "call_s0_0", "output": "A"}]
    events = response_stream(
        oa, model="tool-script", tools=SCRIPT_TOOLS, previous_response_id=first["id"], input=output
    )
    types = [e["type"] for e in events]
    assert types == ["response.created", "response.in_progress", *FUNCTION_CALL_EVENTS * 2, "response.completed"]
    second = events[-1]["response"]
    calls = second["output"]
    assert [(c["call_id"], c["name"], c["arguments"]) for c in calls] == [
        ("call_s1_0", "lookup", '{"q": "b"}'),
        ("call_s1_1", "fetch", "not json"),
    ]
    for index, done_call in enumerate(calls):
        added, *argument_deltas, arguments_done, item_done = [e for e in events if e.get("output_index") == index]
        assert added["item"] == {**done_call, "status": "in_progress", "arguments": ""}
        assert {e["item_id"] for e in (*argument_deltas, arguments_done)} == {done_call["id"]}
        assert "".join(e["delta"] for e in argument_deltas) == done_call["arguments"]
        assert (arguments_done["name"], arguments_done["arguments"]) == (done_call["name"], done_call["arguments"])
        assert item_done["item"] == done_call

    # Round three: every result since the user message, in order (one given as content parts).
    outputs: Any = [
        {"type": "function_call_output", "call_id": "call_s1_0", "output": "B"},
        {"type": "function_call_output", "call_id": "call_s1_1", "output": [{"type": "input_text", "text": "C"}]},
    ]
    final = oa.responses.create(
        model="tool-script", tools=SCRIPT_TOOLS, previous_response_id=second["id"], input=outputs
    )
    assert final.output_text == "results: call_s0_0=A | call_s1_0=B | call_s1_1=C"


def test_response_tool_script_stateless(oa: openai.OpenAI) -> None:
    # Without previous_response_id the client sends the calls and their outputs itself.
    items: Any = [
        {"role": "user", "content": json.dumps(SCRIPT)},
        {"type": "function_call", "call_id": "call_s0_0", "name": "lookup", "arguments": '{"q": "a"}'},
        {"type": "function_call_output", "call_id": "call_s0_0", "output": "A"},
    ]
    resumed = oa.responses.create(model="tool-script", tools=SCRIPT_TOOLS, input=items, store=False)
    assert [(c.type, getattr(c, "call_id", None)) for c in resumed.output] == [
        ("function_call", "call_s1_0"),
        ("function_call", "call_s1_1"),
    ]
    answered = oa.responses.create(model="tool-script", tools=SCRIPT_TOOLS, input=items, tool_choice="none")
    assert answered.output_text == "results: call_s0_0=A"


def test_response_function_call(oa: openai.OpenAI) -> None:
    body = raw_json(oa.responses.with_raw_response.create(model="m", input="x", tools=RESPONSE_TOOLS), "Response")
    [call] = body["output"]
    assert (call["type"], call["name"]) == ("function_call", "get_weather")
    assert json.loads(call["arguments"]) == {"city": "Paris"}
    assert body["usage"]["output_tokens"] > 0

    # A forced function is the one called; the SDK's stream helper accumulates its arguments.
    with oa.responses.stream(
        model="m", input="x", tools=RESPONSE_TOOLS, tool_choice={"type": "function", "name": "get_time"}
    ) as events:
        fragments = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
        final = events.get_final_response()
    [streamed] = final.output
    assert streamed.type == "function_call"
    assert streamed.name == "get_time"
    assert len(fragments) > 3
    assert json.loads(streamed.arguments) == {"city": "Paris"}


def test_response_logprobs(oa: openai.OpenAI) -> None:
    params: Any = {"model": "m", "input": "hello big world", "include": ["message.output_text.logprobs"]}
    body = raw_json(oa.responses.with_raw_response.create(**params, top_logprobs=2), "Response")
    logprobs = body["output"][0]["content"][0]["logprobs"]
    assert "".join(entry["token"] for entry in logprobs) == "echo: hello big world"
    assert all(len(entry["top_logprobs"]) == 2 for entry in logprobs)
    assert body["top_logprobs"] == 2
    events = response_stream(oa, **params)
    assert all(len(e["logprobs"]) == 1 for e in events if e["type"] == "response.output_text.delta")


def test_response_midstream_fail(oa: openai.OpenAI, fake: FakeProvider) -> None:
    received = []
    with pytest.raises(openai.APIConnectionError):
        for event in oa.responses.create(model="midstream-fail", input="x", stream=True):
            received.append(event.type)
    assert received == ["response.created", "response.in_progress", "response.output_item.added"]
    assert len(received) == MIDSTREAM_FAIL_CHUNKS
    [record] = fake.wait_for_streams()
    assert record.outcome == "aborted"
    with pytest.raises(openai.APIConnectionError):
        oa.responses.create(model="midstream-fail", input="x")


def test_response_client_disconnect_is_recorded(oa: openai.OpenAI, fake: FakeProvider) -> None:
    events = oa.responses.create(model="slow-chunks-10", input="x", stream=True)
    for index, _ in enumerate(events):
        if index == 3:
            break
    events.close()
    assert fake.disconnected.wait(5)
    [record] = fake.wait_for_streams()
    assert record.outcome == "disconnected"
    assert 4 <= record.chunks_sent < 100
    assert not fake.stored_responses  # never finished, so never kept


def test_response_garbage_slow_and_bad_input(oa: openai.OpenAI, fake: FakeProvider) -> None:
    raw = oa.responses.with_raw_response.create(model="garbage", input="x")
    assert raw.http_response.text == "<<<not json"
    with pytest.raises(openai.APITimeoutError):
        oa.with_options(timeout=0.3).responses.create(model="slow-1", input="x")
    with httpx2.Client(base_url=fake.base_url, trust_env=False) as http:
        bad = http.post("/responses", json={"model": "m", "input": 5})
    assert bad.status_code == 400
    validate("ErrorResponse", bad.json())
    assert bad.json()["error"]["param"] == "input"


async def test_async_client_response_stream(fake: FakeProvider) -> None:
    async with (
        openai.AsyncOpenAI(base_url=fake.base_url, api_key="test", max_retries=0) as client,
        client.responses.stream(model="chunks-5", input="x") as events,
    ):
        parts = [e.delta async for e in events if e.type == "response.output_text.delta"]
        final = await events.get_final_response()
    assert "".join(parts) == final.output_text == "w1 w2 w3 w4 w5"


# -- failure behaviours ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "status", "error_type", "param"),
    [
        ("error-400", 400, "invalid_request_error", "messages"),
        ("error-401", 401, "invalid_request_error", None),
        ("error-429", 429, "requests", None),
        ("error-500", 500, "server_error", None),
        ("error-503", 503, "server_error", None),
    ],
)
def test_errors(oa: openai.OpenAI, model: str, status: int, error_type: str, param: str | None) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        oa.chat.completions.create(model=model, messages=USER)
    response = info.value.response
    assert response.status_code == status
    body = response.json()
    validate("ErrorResponse", body)
    assert body["error"]["type"] == error_type
    assert body["error"]["param"] == param
    if status == 429:
        assert response.headers["retry-after"] == str(RETRY_AFTER_SECONDS)
        assert body["error"]["code"] == "rate_limit_exceeded"


def test_errors_on_every_endpoint(oa: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError):
        oa.embeddings.create(model="error-500", input="x")
    with pytest.raises(openai.RateLimitError):
        oa.completions.create(model="error-429", prompt="x", stream=True)


def test_retries_are_counted(fake: FakeProvider) -> None:
    client = openai.OpenAI(base_url=fake.base_url, api_key="test", max_retries=2)
    with client, pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="error-500", messages=USER)
    assert fake.request_count("error-500") == 3
    retry_counts = [r.headers["x-stainless-retry-count"] for r in fake.requests_for("error-500")]
    assert retry_counts == ["0", "1", "2"]


def test_garbage(oa: openai.OpenAI) -> None:
    raw = oa.chat.completions.with_raw_response.create(model="garbage", messages=USER)
    assert raw.http_response.status_code == 200
    assert raw.http_response.headers["content-type"].startswith("application/json")
    assert raw.http_response.text == "<<<not json"
    # Surprise: the SDK lets the raw JSONDecodeError escape instead of an APIError.
    with pytest.raises(json.JSONDecodeError):
        raw.parse()


def test_slow_times_out(oa: openai.OpenAI, fake: FakeProvider) -> None:
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        oa.with_options(timeout=0.3).chat.completions.create(model="slow-1", messages=USER)
    assert time.monotonic() - started < 1
    assert fake.request_count("slow-1") == 1
    ok = oa.chat.completions.create(model="slow-0.2", messages=USER)
    assert ok.choices[0].message.content == "echo: hello big world"


def test_midstream_fail(oa: openai.OpenAI, fake: FakeProvider) -> None:
    received = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in oa.chat.completions.create(model="midstream-fail", messages=USER, stream=True):
            received.append(chunk)
    assert len(received) == MIDSTREAM_FAIL_CHUNKS
    [record] = fake.wait_for_streams()
    assert record.outcome == "aborted"
    assert fake.disconnects == 0


def test_midstream_fail_non_streaming(oa: openai.OpenAI) -> None:
    with pytest.raises(openai.APIConnectionError):
        oa.chat.completions.create(model="midstream-fail", messages=USER)


def test_client_disconnect_is_recorded(oa: openai.OpenAI, fake: FakeProvider) -> None:
    events = oa.chat.completions.create(model="slow-chunks-10", messages=USER, stream=True)
    for index, _ in enumerate(events):
        if index == 3:
            break
    events.close()
    assert fake.disconnected.wait(5)
    assert fake.disconnects == 1
    [record] = fake.wait_for_streams()
    assert record.outcome == "disconnected"
    assert 4 <= record.chunks_sent < 100


def test_api_key_enforced() -> None:
    with FakeProvider(api_key="sk-right") as fake:
        wrong = openai.OpenAI(base_url=fake.base_url, api_key="sk-wrong", max_retries=0)
        with wrong, pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model="m", messages=USER)
        with openai.OpenAI(base_url=fake.base_url, api_key="sk-right", max_retries=0) as client:
            assert client.chat.completions.create(model="m", messages=USER).choices
    assert fake.requests  # state stays readable after stop


def test_unknown_path_and_bad_body(fake: FakeProvider) -> None:
    with httpx2.Client(base_url=fake.base_url, trust_env=False) as http:
        missing = http.post("/nope", json={})
        assert missing.status_code == 404
        validate("ErrorResponse", missing.json())
        bad = http.post("/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert bad.status_code == 400
        validate("ErrorResponse", bad.json())
    assert fake.requests[-1].body is None
    assert fake.requests[-1].raw == b"{not json"


async def test_async_client_stream(fake: FakeProvider) -> None:
    async with openai.AsyncOpenAI(base_url=fake.base_url, api_key="test", max_retries=0) as client:
        events = await client.chat.completions.create(model="chunks-5", messages=USER, stream=True)
        parts = [chunk.choices[0].delta.content or "" async for chunk in events if chunk.choices]
    assert "".join(parts) == "w1 w2 w3 w4 w5"


# -- runtime faults ---------------------------------------------------------------------------

NESTED_OVERLOADED = {"message": "The model is overloaded.", "type": "server_error", "param": None, "code": "overloaded"}


def ok(client: openai.OpenAI, model: str = "m") -> bool:
    """Whether a chat request succeeds (False for any API error)."""
    try:
        client.chat.completions.create(model=model, messages=USER)
    except openai.APIError:
        return False
    return True


def sse_data(client: openai.OpenAI, kind: str = "chat", **params: Any) -> list[str]:
    """The ``data:`` payloads of a stream, raw (no [DONE] check)."""
    resource: Any = {"chat": client.chat.completions, "completions": client.completions,
                     "responses": client.responses}[kind]
    with resource.with_streaming_response.create(stream=True, **params) as response:
        assert response.status_code == 200
        return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


@pytest.mark.parametrize(
    ("status", "retry_after", "error"),
    [
        (429, 2, openai.RateLimitError),
        (429, None, openai.RateLimitError),
        (429, 0.25, openai.RateLimitError),
        (500, None, openai.InternalServerError),
        (503, 30, openai.InternalServerError),
        (400, None, openai.BadRequestError),
        (401, None, openai.AuthenticationError),
        (404, None, openai.NotFoundError),
        (413, None, openai.APIStatusError),
    ],
)
def test_fault_status(
    oa: openai.OpenAI, fake: FakeProvider, status: int, retry_after: float | None, error: type[openai.APIStatusError]
) -> None:
    rule = fake.set_fault(Fault("status", status=status, retry_after=retry_after))
    with pytest.raises(error) as info:
        oa.chat.completions.create(model="gpt-x", messages=USER)
    response = info.value.response
    assert response.status_code == status
    validate("ErrorResponse", response.json())
    assert response.json()["error"]["type"] == ("server_error" if status >= 500 else
                                                "requests" if status == 429 else "invalid_request_error")
    assert response.headers.get("retry-after") == (None if retry_after is None else f"{retry_after:g}")
    assert response.headers["x-request-id"]
    assert (rule.seen, rule.hits, fake.fault_hits) == (1, 1, 1)
    assert fake.request_count("gpt-x") == 1  # faulted requests are recorded


def test_fault_status_on_every_endpoint(oa: openai.OpenAI, fake: FakeProvider) -> None:
    fake.set_fault(Fault("status", status=503, retry_after=1))
    calls: list[Callable[[], Any]] = [
        lambda: oa.chat.completions.create(model="m", messages=USER, stream=True),
        lambda: oa.completions.create(model="m", prompt="x"),
        lambda: oa.completions.create(model="m", prompt="x", stream=True),
        lambda: oa.responses.create(model="m", input="x"),
        lambda: oa.responses.create(model="m", input="x", stream=True),
        lambda: oa.embeddings.create(model="m", input="x"),
    ]
    for call in calls:
        with pytest.raises(openai.InternalServerError) as info:
            call()
        assert info.value.response.headers["retry-after"] == "1"
    assert fake.fault_hits == fake.request_count("m") == len(calls)
    assert not fake.streams  # answered before any stream started
    # Other paths are not faulted.
    assert oa.models.list().data


def test_fault_hang(fake: FakeProvider) -> None:
    fake.set_fault(Fault("hang"), model="stuck")
    with openai.OpenAI(base_url=fake.base_url, api_key="test", max_retries=0, timeout=0.5) as client:
        for stream in (False, True):
            started = time.monotonic()
            with pytest.raises(openai.APITimeoutError):
                client.chat.completions.create(model="stuck", messages=USER, stream=stream)
            assert 0.5 <= time.monotonic() - started < 1.5
        with pytest.raises(openai.APITimeoutError):
            client.responses.create(model="stuck", input="x")
        # The provider notices those clients left on its own poll; only then does the count below mean one request.
        eventually(lambda: fake.hanging == 0, 2, "the timed-out requests to be let go")

        # While a request hangs, the provider answers others.
        pool = ThreadPoolExecutor(1)
        hung = pool.submit(ok, client, "stuck")
        eventually(lambda: fake.hanging == 1, 5, "the request to hang")
        assert client.chat.completions.create(model="m", messages=USER).choices[0].message.content
        assert hung.result(5) is False
        pool.shutdown()
    # Once the client gave up, the provider lets go of the request.
    eventually(lambda: fake.hanging == 0, 2, "the given-up request to be let go")
    assert fake.request_count("stuck") == fake.fault_hits == 4
    assert not fake.streams


def test_fault_hang_ends_at_stop() -> None:
    errors: list[BaseException] = []
    fake = FakeProvider()
    with fake, openai.OpenAI(base_url=fake.base_url, api_key="test", max_retries=0, timeout=30) as client:
        fake.set_fault(Fault("hang"))

        def call() -> None:
            try:
                client.chat.completions.create(model="m", messages=USER)
            except openai.APIError as exc:
                errors.append(exc)

        thread = threading.Thread(target=call)
        thread.start()
        assert fake.wait_for_requests(1)
        started = time.monotonic()
        fake.stop()
        assert time.monotonic() - started < 0.5
        thread.join(5)
    assert not thread.is_alive()
    [error] = errors
    assert isinstance(error, openai.APIConnectionError)  # dropped without an answer
    assert fake.hanging == 0


async def test_fault_hang_does_not_block_async_clients(fake: FakeProvider) -> None:
    fake.set_fault(Fault("hang"), model="stuck")
    async with openai.AsyncOpenAI(base_url=fake.base_url, api_key="test", max_retries=0, timeout=0.5) as client:
        hung = asyncio.ensure_future(client.chat.completions.create(model="stuck", messages=USER))
        answers = await asyncio.gather(*(client.chat.completions.create(model="m", messages=USER) for _ in range(5)))
        assert all(a.choices[0].message.content == "echo: hello big world" for a in answers)
        with pytest.raises(openai.APITimeoutError):
            await hung


def test_fault_reset_streams(oa: openai.OpenAI, fake: FakeProvider) -> None:
    rule = fake.set_fault(Fault("reset"))
    received: list[Any] = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in oa.chat.completions.create(model="chunks-20", messages=USER, stream=True):
            received.append(chunk)
    assert len(received) == 2
    [record] = fake.wait_for_streams()
    assert (record.outcome, record.chunks_sent) == ("aborted", 2)

    fake.set_fault(Fault("reset", after_chunks=3))
    with pytest.raises(openai.APIConnectionError):
        for piece in oa.completions.create(model="chunks-20", prompt="x", stream=True):
            received.append(piece)
    assert len(received) == 2 + 3

    events = []
    with pytest.raises(openai.APIConnectionError):
        for event in oa.responses.create(model="m", input="x", stream=True):
            events.append(event.type)
    assert events == ["response.created", "response.in_progress", "response.output_item.added"]
    assert not fake.stored_responses  # never finished, so never kept

    # More events than the answer has: all of them but the last, never the end of the stream.
    fake.set_fault(Fault("reset", after_chunks=1000))
    with pytest.raises(openai.APIConnectionError):
        for chunk in oa.chat.completions.create(model="chunks-3", messages=USER, stream=True):
            received.append(chunk)
    assert len(received) == 5 + 1 + 3  # role chunk and 3 words; no finish chunk, no [DONE]
    with pytest.raises(openai.APIConnectionError):
        for event in oa.responses.create(model="chunks-3", input="x", stream=True):
            events.append(event.type)
    assert events[-1] == "response.output_item.done"
    assert not fake.stored_responses

    # after_chunks=0: the headers, then the abort.
    fake.set_fault(Fault("reset", after_chunks=0))
    with oa.chat.completions.with_streaming_response.create(model="m", messages=USER, stream=True) as response:
        assert response.status_code == 200
        with pytest.raises(httpx2.RemoteProtocolError):
            list(response.iter_lines())
    records = fake.wait_for_streams(6)
    assert [r.outcome for r in records] == ["aborted"] * 6
    assert [r.chunks_sent for r in records] == [2, 3, 3, 4, len(text_events(3)) - 1, 0]
    assert rule.hits == 1
    assert not rule.active  # replaced
    assert fake.fault_hits == 6


def test_fault_reset_non_streaming(oa: openai.OpenAI, fake: FakeProvider) -> None:
    fake.set_fault(Fault("reset", after_chunks=0))
    with pytest.raises(openai.APIConnectionError) as info:
        oa.chat.completions.create(model="m", messages=USER)
    assert "without sending a response" in str(info.value.__cause__)

    fake.set_fault(Fault("reset"))
    for call in (
        lambda: oa.chat.completions.create(model="m", messages=USER),
        lambda: oa.completions.create(model="m", prompt="x"),
        lambda: oa.responses.create(model="m", input="x"),
        lambda: oa.embeddings.create(model="m", input="x"),
    ):
        with pytest.raises(openai.APIConnectionError) as info:
            call()
        assert "incomplete message body" in str(info.value.__cause__) or "complete message body" in str(
            info.value.__cause__
        )
    assert not fake.stored_responses
    assert fake.fault_hits == fake.request_count("m") == 5


def test_fault_slow(oa: openai.OpenAI, fake: FakeProvider) -> None:
    fake.set_fault(Fault("slow", delay=0.3))
    started = time.monotonic()
    assert oa.chat.completions.create(model="m", messages=USER).choices[0].message.content
    assert time.monotonic() - started >= 0.3
    with pytest.raises(openai.APITimeoutError):
        oa.with_options(timeout=0.1).chat.completions.create(model="m", messages=USER, stream=True)
    # Waited first, then the model-name behaviour.
    with pytest.raises(openai.InternalServerError):
        oa.chat.completions.create(model="error-500", messages=USER)
    assert fake.fault_hits == 3


def test_fault_slow_first_chunk(oa: openai.OpenAI, fake: FakeProvider) -> None:
    rule = fake.set_fault(Fault("slow_first_chunk", delay=0.5))
    assert rule.fault.stream is True  # implied by the kind
    started = time.monotonic()
    with oa.chat.completions.with_streaming_response.create(model="chunks-3", messages=USER, stream=True) as response:
        assert time.monotonic() - started < 0.4  # the headers come at once
        lines = response.iter_lines()
        first = next(line for line in lines if line)
        assert time.monotonic() - started >= 0.5
        rest = [line for line in lines if line]
    assert json.loads(first.removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"
    assert rest[-1] == "data: [DONE]"
    assert [s.outcome for s in fake.wait_for_streams()] == ["completed"]

    # A client reading with a shorter timeout gives up before the first byte.
    with pytest.raises(openai.APITimeoutError):
        for _ in oa.with_options(timeout=0.2).responses.create(model="m", input="x", stream=True):
            pass
    # Non-streaming requests are not matched.
    started = time.monotonic()
    assert ok(oa)
    assert time.monotonic() - started < 0.3
    assert (rule.seen, rule.hits) == (2, 2)


def test_fault_error_event_first(oa: openai.OpenAI, fake: FakeProvider) -> None:
    rule = fake.set_fault(Fault("error_event_first"))
    for kind, params in (("chat", {"messages": USER}), ("completions", {"prompt": "x"})):
        [payload] = sse_data(oa, kind, model="m", **params)
        assert json.loads(payload) == {"error": NESTED_OVERLOADED}
    [payload] = sse_data(oa, "responses", model="m", input="x")
    event = json.loads(payload)
    validate("ResponseStreamEvent", event)
    assert (event["type"], event["sequence_number"], event["error"]) == ("error", 0, NESTED_OVERLOADED)

    # The SDK raises a non-status APIError on it.
    with pytest.raises(openai.APIError, match="overloaded") as info:
        for _ in oa.chat.completions.create(model="m", messages=USER, stream=True):
            pass
    assert not isinstance(info.value, openai.APIStatusError)
    with pytest.raises(openai.APIError, match="overloaded"):
        for _ in oa.responses.create(model="m", input="x", stream=True):
            pass
    assert [s.outcome for s in fake.wait_for_streams(5)] == ["completed"] * 5
    # Non-streaming requests are answered (and not counted by the fault).
    assert oa.responses.create(model="m", input="hi").output_text == "echo: hi"
    assert (rule.seen, rule.hits, fake.fault_hits) == (5, 5, 5)


def test_fault_times(oa: openai.OpenAI, fake: FakeProvider) -> None:
    rule = fake.set_fault(Fault("status", status=500, times=2))
    assert [ok(oa) for _ in range(4)] == [False, False, True, True]
    assert (rule.seen, rule.hits, rule.active) == (2, 2, False)
    assert fake.faults == {}
    assert fake.request_count() == 4


def test_fault_every(oa: openai.OpenAI, fake: FakeProvider) -> None:
    rule = fake.set_fault(Fault("status", status=503, every=3))
    assert [ok(oa) for _ in range(9)] == [True, True, False] * 3
    assert (rule.seen, rule.hits, rule.active) == (9, 3, True)

    rule = fake.set_fault(Fault("reset", every=2, times=2))  # replaces, counting afresh
    assert [ok(oa) for _ in range(7)] == [True, False, True, False, True, True, True]
    assert (rule.seen, rule.hits, rule.active) == (4, 2, False)
    assert fake.fault_hits == 5


def test_fault_every_is_exact_under_concurrency(oa: openai.OpenAI, fake: FakeProvider) -> None:
    rule = fake.set_fault(Fault("status", status=429, every=2))
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: ok(oa), range(40)))
    assert results.count(False) == rule.hits == fake.fault_hits == 20
    assert rule.seen == fake.request_count() == 40


def test_fault_counts_sdk_retries(fake: FakeProvider) -> None:
    """Each attempt is a request; Retry-After (seconds, fractions allowed) paces the SDK's retries."""
    rule = fake.set_fault(Fault("status", status=429, retry_after=0.05, times=2))
    with openai.OpenAI(base_url=fake.base_url, api_key="test", max_retries=3) as client:
        answer = client.chat.completions.create(model="m", messages=USER)
    assert answer.choices[0].message.content == "echo: hello big world"
    assert fake.request_count("m") == 3
    assert rule.hits == fake.fault_hits == 2
    assert [r.headers["x-stainless-retry-count"] for r in fake.requests_for("m")] == ["0", "1", "2"]


def test_fault_model_scope(oa: openai.OpenAI, fake: FakeProvider) -> None:
    a = fake.set_fault(Fault("status", status=500), model="a")
    assert not ok(oa, "a")
    assert ok(oa, "b")
    assert ok(oa, "a" + MODEL_SUFFIX)  # the name as requested, not as served
    assert (a.seen, a.hits) == (1, 1)

    # A model's fault owns its requests, even those it lets through; the global fault takes the rest.
    glob = fake.set_fault(Fault("status", status=503))
    a = fake.set_fault(Fault("status", status=500, every=2, times=1), model="a")
    assert set(fake.faults) == {"a", None}
    assert [ok(oa, "a") for _ in range(2)] == [True, False]
    assert not ok(oa, "b")
    assert (a.seen, a.hits, glob.seen, glob.hits) == (2, 1, 1, 1)
    # Used up, the model's fault leaves its requests to the global one.
    with pytest.raises(openai.InternalServerError) as info:
        oa.chat.completions.create(model="a", messages=USER)
    assert info.value.status_code == 503
    assert set(fake.faults) == {None}

    fake.clear_fault(model=None)
    assert not glob.active
    assert ok(oa, "a")
    assert fake.fault_hits == 4


def test_fault_stream_filter(oa: openai.OpenAI, fake: FakeProvider) -> None:
    rule = fake.set_fault(Fault("status", status=500, stream=False), model="m")
    glob = fake.set_fault(Fault("reset", stream=True))
    assert not ok(oa)
    assert oa.embeddings.create(model="x", input="x").data  # not a stream: the global fault skips it
    with pytest.raises(openai.APIConnectionError):
        for _ in oa.chat.completions.create(model="m", messages=USER, stream=True):
            pass
    assert (rule.seen, rule.hits, glob.seen, glob.hits) == (1, 1, 1, 1)


def test_clear_faults_and_reset(oa: openai.OpenAI, fake: FakeProvider) -> None:
    rules = [fake.set_fault(Fault("status", status=500)), fake.set_fault(Fault("hang"), model="h")]
    assert not ok(oa)
    fake.clear_faults()
    assert fake.faults == {}
    assert not any(r.active for r in rules)
    assert ok(oa)
    assert ok(oa, "h")
    assert fake.fault_hits == 1  # kept until reset

    rule = fake.set_fault(Fault("status", status=500), model="m")
    fake.clear_fault(model="other")  # nothing set there: no-op
    assert rule.active
    fake.reset()
    assert (fake.fault_hits, fake.faults, fake.request_count(), rule.active) == (0, {}, 0, False)
    assert ok(oa)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Fault("bogus"),  # type: ignore[arg-type]
        lambda: Fault("status", status=200),
        lambda: Fault("status", retry_after=-1),
        lambda: Fault("hang", retry_after=1),
        lambda: Fault("reset", after_chunks=-1),
        lambda: Fault("slow", delay=-0.1),
        lambda: Fault("status", times=0),
        lambda: Fault("status", every=0),
        lambda: Fault("slow_first_chunk", stream=False),
        lambda: Fault("error_event_first", stream=False),
    ],
)
def test_fault_validation(make: Callable[[], Fault]) -> None:
    with pytest.raises(ValueError):
        make()
