"""The fake provider, driven by the official openai client, must speak valid OpenAI."""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.support.fake_provider import (
    MIDSTREAM_FAIL_CHUNKS,
    MODEL_SUFFIX,
    RETRY_AFTER_SECONDS,
    FakeProvider,
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
def fake(fake_provider: FakeProvider) -> FakeProvider:
    fake_provider.reset()
    return fake_provider


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
