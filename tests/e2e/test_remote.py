"""The gateway in front of an imitated OpenAI provider, driven by the official openai client."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest

from tests.e2e.gateway import client, stream_payloads, validated_chunks, wait_for_log
from tests.support.fake_provider import FakeProvider, remote_model
from tests.support.openapi import COMPLETION_STREAM_SCHEMA, validate
from tests.support.server import HeliosProcess, free_port

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
USER = [{"role": "user", "content": "hello there general kenobi"}]


@pytest.fixture(scope="module")
def gateway(fake_provider: FakeProvider) -> Iterator[HeliosProcess]:
    closed_port = free_port()
    config = {
        "server": {"max_body_bytes": 64 * 1024, "cors_allow_origins": ["https://app.example"]},
        "models": [
            remote_model(fake_provider, "gpt-test", "gpt-4o", aliases=["alias-a", "team/alias-b"]),
            remote_model(fake_provider, "long", "chunks-300"),
            remote_model(fake_provider, "slowstream", "slow-chunks-20"),
            remote_model(fake_provider, "midstream", "midstream-fail"),
            remote_model(fake_provider, "gzipped", "gzip-stream"),
            remote_model(fake_provider, "stalls", "slow-chunks-1500", timeout=0.5),
            remote_model(fake_provider, "error-first", "error-event"),
            remote_model(fake_provider, "e400", "error-400"),
            remote_model(fake_provider, "e401", "error-401"),
            remote_model(fake_provider, "e429", "error-429"),
            remote_model(fake_provider, "e500", "error-500", max_retries=2),
            remote_model(fake_provider, "garbage", "garbage"),
            remote_model(fake_provider, "slow", "slow-5", timeout=1),
            {**remote_model(fake_provider, "headed", "gpt-4o"),
             "extra_headers": {"X-Team": "search", "X-Stainless-Lang": "helios"}},
            {**remote_model(fake_provider, "down", "gpt-4o"), "base_url": f"http://127.0.0.1:{closed_port}/v1"},
            {**{k: v for k, v in remote_model(fake_provider, "nokey", "gpt-4o").items() if k != "api_key"},
             "api_key_env": "HELIOS_TEST_UNSET_KEY"},
        ],
        "endpoints": [
            {"method": "GET", "path": "/hello", "status": 200, "response": {"hello": "world"}},
            {"method": "post", "path": "/hooks/accepted", "status": 202, "response": ["queued"],
             "headers": {"X-Custom": "yes"}},
        ],
    }
    with HeliosProcess(config, {"OPENAI_ORG_ID": "org-from-env"}) as process:
        yield process


@pytest.fixture()
def oa(gateway: HeliosProcess) -> openai.OpenAI:
    return client(gateway.base_url)


def _raw_json(response: Any, schema: str) -> dict[str, Any]:
    data: dict[str, Any] = response.http_response.json()
    validate(schema, data)
    return data


# ---- chat --------------------------------------------------------------------------------------


def test_chat_non_streaming_relays_the_provider_answer(oa: openai.OpenAI, fake_provider: FakeProvider) -> None:
    raw = oa.chat.completions.with_raw_response.create(model="gpt-test", messages=USER, n=2, seed=7,
                                                       extra_body={"top_k": 5})
    data = _raw_json(raw, "CreateChatCompletionResponse")
    assert data["model"] == "gpt-test"
    assert [c["index"] for c in data["choices"]] == [0, 1]
    assert data["choices"][0]["message"]["content"] == "echo: hello there general kenobi"
    assert data["system_fingerprint"]
    sent = fake_provider.requests[-1]
    assert sent.body["model"] == "gpt-4o"
    assert sent.body["n"] == 2 and sent.body["seed"] == 7
    assert sent.body["top_k"] == 5, "unmodelled provider extras must pass through"
    assert sent.headers["authorization"] == "Bearer sk-upstream-secret"
    assert "openai-organization" not in sent.headers, "OPENAI_ORG_ID of the gateway's env must not leak"
    # Usage is the provider's own count (it counts words), relayed unchanged.
    usage = data["usage"]
    assert usage["prompt_tokens"] == 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_provider_calls_carry_no_client_telemetry_headers(oa: openai.OpenAI, fake_provider: FakeProvider) -> None:
    for model in ("gpt-test", "headed"):
        oa.chat.completions.create(model=model, messages=USER)
        sent = fake_provider.requests[-1].headers
        stainless = {name for name in sent if name.startswith("x-stainless-")}
        if model == "gpt-test":
            # The retry count stays: the appliance counts retries by it.
            assert stainless == {"x-stainless-retry-count"}, sent
        else:
            assert stainless == {"x-stainless-retry-count", "x-stainless-lang"}, sent
            assert (sent["x-stainless-lang"], sent["x-team"]) == ("helios", "search")
        assert sent["user-agent"].startswith("AsyncOpenAI/Python")
        assert sent["authorization"] == "Bearer sk-upstream-secret"


def test_alias_with_slash_is_echoed_as_asked(oa: openai.OpenAI) -> None:
    reply = oa.chat.completions.create(model="team/alias-b", messages=USER)
    assert reply.model == "team/alias-b"
    assert reply.choices[0].finish_reason == "stop"


def test_all_openai_parameters_are_accepted_and_forwarded(oa: openai.OpenAI, fake_provider: FakeProvider) -> None:
    messages: list[Any] = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "name": "ann", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
        ]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "user", "content": "thanks"},
    ]
    params: dict[str, Any] = dict(
        temperature=0.5, top_p=0.9, stop=["\n", "END"], max_completion_tokens=50, presence_penalty=0.1,
        frequency_penalty=0.2, logit_bias={"50256": -100}, user="u-1", parallel_tool_calls=False,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
    )
    oa.chat.completions.create(model="gpt-test", messages=messages, **params)
    body = fake_provider.requests[-1].body
    for key, value in params.items():
        assert body[key] == value
    assert body["messages"] == messages


def test_chat_streaming_ends_with_done_and_hides_usage_unless_asked(
    oa: openai.OpenAI, fake_provider: FakeProvider
) -> None:
    chunks = validated_chunks(stream_payloads(oa, model="alias-a", messages=USER))
    assert {c["model"] for c in chunks} == {"alias-a"}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "echo: hello there general kenobi"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"] for c in chunks), "the usage chunk the gateway asked for must be stripped"
    # ...but it was asked for, so tokens can be accounted.
    assert fake_provider.requests[-1].body["stream_options"] == {"include_usage": True}


def test_chat_streaming_include_usage(oa: openai.OpenAI) -> None:
    chunks = validated_chunks(stream_payloads(oa, model="gpt-test", messages=USER,
                                              stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last["choices"] == []
    assert last["usage"]["prompt_tokens"] == 4
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"]


def test_streaming_n2_each_choice_finishes(oa: openai.OpenAI) -> None:
    chunks = validated_chunks(stream_payloads(oa, model="gpt-test", messages=USER, n=2))
    finished = {ch["index"] for c in chunks for ch in c["choices"] if ch["finish_reason"]}
    assert finished == {0, 1}


def test_a_gzip_encoded_provider_stream_is_decoded(oa: openai.OpenAI, fake_provider: FakeProvider) -> None:
    # Only a stream with a content-encoding goes through the client's decoding; it must still arrive whole.
    plain = validated_chunks(stream_payloads(oa, model="gpt-test", messages=USER))
    chunks = validated_chunks(stream_payloads(oa, model="gzipped", messages=USER))
    assert fake_provider.requests[-1].model == "gzip-stream"
    text = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
    assert text == "".join(ch["delta"].get("content") or "" for c in plain for ch in c["choices"]) != ""
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_tools_non_streaming(oa: openai.OpenAI) -> None:
    raw = oa.chat.completions.with_raw_response.create(model="gpt-test", messages=USER, tools=[WEATHER_TOOL],
                                                       tool_choice="auto")
    data = _raw_json(raw, "CreateChatCompletionResponse")
    call = data["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert data["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_call_deltas_stream_through(oa: openai.OpenAI) -> None:
    chunks = validated_chunks(stream_payloads(oa, model="gpt-test", messages=USER, tools=[WEATHER_TOOL],
                                              tool_choice={"type": "function",
                                                           "function": {"name": "get_weather"}}))
    deltas = [d for c in chunks for ch in c["choices"] for d in ch["delta"].get("tool_calls") or []]
    assert len(deltas) > 1
    assert deltas[0]["function"]["name"] == "get_weather" and deltas[0]["id"]
    arguments = "".join(d["function"].get("arguments", "") for d in deltas)
    assert json.loads(arguments) == {"city": "Paris"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_logprobs_pass_through(oa: openai.OpenAI) -> None:
    raw = oa.chat.completions.with_raw_response.create(model="gpt-test", messages=USER, logprobs=True,
                                                       top_logprobs=2)
    data = _raw_json(raw, "CreateChatCompletionResponse")
    content = data["choices"][0]["logprobs"]["content"]
    assert content and len(content[0]["top_logprobs"]) == 2


# ---- completions and embeddings ----------------------------------------------------------------


def test_completions(oa: openai.OpenAI) -> None:
    raw = oa.completions.with_raw_response.create(model="gpt-test", prompt=["one two", "three"], max_tokens=5)
    data = _raw_json(raw, "CreateCompletionResponse")
    assert data["model"] == "gpt-test"
    assert len(data["choices"]) == 2
    assert data["usage"]["prompt_tokens"] > 0


def test_completions_streaming(oa: openai.OpenAI) -> None:
    chunks = validated_chunks(stream_payloads(oa, "completions", model="gpt-test", prompt="say hi",
                                              stream_options={"include_usage": True}),
                              COMPLETION_STREAM_SCHEMA)
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]).strip()


def test_embeddings_float_and_base64(oa: openai.OpenAI) -> None:
    raw = oa.embeddings.with_raw_response.create(model="gpt-test", input=["a b", "c"], encoding_format="float")
    data = _raw_json(raw, "CreateEmbeddingResponse")
    assert data["model"] == "gpt-test" and len(data["data"]) == 2
    raw64 = oa.embeddings.with_raw_response.create(model="gpt-test", input=["a b", "c"],
                                                   encoding_format="base64")
    # OpenAI's schema types every embedding as a float array, so the base64 form is checked by decoding.
    data64 = raw64.http_response.json()
    assert data64["model"] == "gpt-test" and data64["object"] == "list"
    decoded = base64.b64decode(data64["data"][0]["embedding"])
    floats = struct.unpack(f"<{len(decoded) // 4}f", decoded)
    assert floats == pytest.approx(data["data"][0]["embedding"])


# ---- models ------------------------------------------------------------------------------------


def test_model_listing_includes_aliases(oa: openai.OpenAI) -> None:
    raw = oa.models.with_raw_response.list()
    data = _raw_json(raw, "ListModelsResponse")
    ids = [m["id"] for m in data["data"]]
    assert {"gpt-test", "alias-a", "team/alias-b", "long", "down"} <= set(ids)
    one = oa.models.with_raw_response.retrieve("team/alias-b")
    assert _raw_json(one, "Model")["id"] == "team/alias-b"
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("nope")


def test_unknown_model_is_404_model_not_found(oa: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        oa.chat.completions.create(model="no-such-model", messages=USER)
    validate("ErrorResponse", info.value.response.json())
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"


# ---- errors ------------------------------------------------------------------------------------


def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    body: dict[str, Any] = exc.response.json()
    validate("ErrorResponse", body)
    return body["error"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "gpt-test"}, "messages"),
        ({"model": "gpt-test", "messages": []}, "messages"),
        ({"model": "gpt-test", "messages": USER, "temperature": "hot"}, "temperature"),
        ({"model": "gpt-test", "messages": USER, "temperature": 3}, "temperature"),
        ({"model": "gpt-test", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "gpt-test", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
         "messages[0].content[0].text"),
        ({"model": "gpt-test", "messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),
        ({"model": "gpt-test", "messages": USER, "n": 0}, "n"),
        ({"model": "gpt-test", "messages": USER, "stop": 5}, "stop"),
        ({"model": "gpt-test", "messages": USER, "tools": [{"type": "function"}]}, "tools[0].function"),
        ({"messages": USER}, "model"),
    ],
)
def test_invalid_fields_are_400_naming_the_field(oa: openai.OpenAI, body: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oa.post("/chat/completions", body=body, cast_to=httpx2.Response)
    assert _error(info.value)["param"] == param


def test_malformed_json_is_400(gateway: HeliosProcess) -> None:
    response = httpx2.post(f"{gateway.base_url}/v1/chat/completions", content=b'{"model": ',
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    validate("ErrorResponse", response.json())
    assert response.json()["error"]["code"] == "invalid_json"


def test_body_over_limit_is_413(oa: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        oa.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x" * 100_000}])
    assert info.value.status_code == 413
    _error(info.value)


def test_unknown_route_and_wrong_method(gateway: HeliosProcess, oa: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        oa.get("/no/such/route", cast_to=httpx2.Response)
    _error(info.value)
    with pytest.raises(openai.APIStatusError) as info405:
        oa.delete("/models", cast_to=httpx2.Response)
    assert info405.value.status_code == 405
    assert "GET" in info405.value.response.headers["allow"]
    _error(info405.value)


def test_provider_errors_map_to_the_right_exceptions(oa: openai.OpenAI, fake_provider: FakeProvider) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        oa.chat.completions.create(model="e400", messages=USER)
    assert _error(bad.value)["param"] == "messages"

    with pytest.raises(openai.RateLimitError) as limited:
        oa.chat.completions.create(model="e429", messages=USER)
    assert limited.value.response.headers["retry-after"] == "7"
    _error(limited.value)

    with pytest.raises(openai.InternalServerError) as upstream_auth:
        oa.chat.completions.create(model="e401", messages=USER)
    assert upstream_auth.value.status_code == 502
    assert "sk-" not in upstream_auth.value.response.text

    before = fake_provider.request_count("error-500")
    with pytest.raises(openai.InternalServerError) as failed:
        oa.chat.completions.create(model="e500", messages=USER)
    assert failed.value.status_code == 502
    assert fake_provider.request_count("error-500") - before == 3, "max_retries=2 means three attempts"

    with pytest.raises(openai.InternalServerError) as garbage:
        oa.chat.completions.create(model="garbage", messages=USER)
    assert garbage.value.status_code == 502
    _error(garbage.value)

    with pytest.raises(openai.InternalServerError) as down:
        oa.chat.completions.create(model="down", messages=USER)
    assert down.value.status_code == 502
    _error(down.value)

    with pytest.raises(openai.InternalServerError) as slow:
        oa.chat.completions.create(model="slow", messages=USER)
    assert slow.value.status_code == 504
    _error(slow.value)

    with pytest.raises(openai.InternalServerError) as unready:
        oa.chat.completions.create(model="nokey", messages=USER)
    assert unready.value.status_code == 503
    assert "HELIOS_TEST_UNSET_KEY" in _error(unready.value)["message"]


def test_streaming_refusals_keep_their_status(oa: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError):
        oa.chat.completions.create(model="e429", messages=USER, stream=True)
    with pytest.raises(openai.InternalServerError) as down:
        oa.chat.completions.create(model="down", messages=USER, stream=True)
    assert down.value.status_code == 502


def test_stream_failing_before_its_first_chunk_gets_an_http_status(oa: openai.OpenAI) -> None:
    # Nothing was sent to the client yet, so the provider's error event becomes a real error response.
    with pytest.raises(openai.InternalServerError) as failed:
        oa.chat.completions.create(model="error-first", messages=USER, stream=True)
    assert failed.value.status_code == 502
    error = _error(failed.value)
    assert (error["message"], error["code"]) == ("The model is overloaded.", "overloaded")


def test_midstream_failure_is_an_error_event_not_a_fake_stop(oa: openai.OpenAI) -> None:
    payloads = stream_payloads(oa, model="midstream", messages=USER)
    assert b"[DONE]" not in payloads
    last = json.loads(payloads[-1])
    validate("ErrorResponse", last)
    # The provider reset the connection: a broken upstream (502), not a slow one.
    assert (last["error"]["type"], last["error"]["code"]) == ("upstream_error", "bad_gateway")
    for payload in payloads[:-1]:
        chunk = json.loads(payload)
        assert all(c["finish_reason"] is None for c in chunk["choices"]), "no fake finish_reason"
    with pytest.raises(openai.APIError):
        for _ in oa.chat.completions.create(model="midstream", messages=USER, stream=True):
            pass


def test_stalled_stream_is_a_timeout_event(oa: openai.OpenAI) -> None:
    # The provider sends a chunk, then nothing for longer than the model's timeout.
    payloads = stream_payloads(oa, model="stalls", messages=USER)
    assert b"[DONE]" not in payloads
    last = json.loads(payloads[-1])
    validate("ErrorResponse", last)
    assert (last["error"]["type"], last["error"]["code"]) == ("timeout_error", "upstream_timeout")
    assert "stopped sending" in last["error"]["message"]
    assert len(payloads) >= 2, "the chunk sent before the stall is relayed"


def test_readiness_names_the_model_without_key(gateway: HeliosProcess) -> None:
    response = httpx2.get(f"{gateway.base_url}/ready")
    assert response.status_code == 503
    body = response.json()
    validate("ErrorResponse", body)
    assert body["models"]["nokey"].startswith("no API key")
    assert body["models"]["gpt-test"] == "ready"
    assert httpx2.get(f"{gateway.base_url}/health").json() == {"status": "ok"}


# ---- custom endpoints, request ids, CORS, docs ---------------------------------------------------


def test_custom_endpoints(gateway: HeliosProcess) -> None:
    hello = httpx2.get(f"{gateway.base_url}/hello")
    assert (hello.status_code, hello.json()) == (200, {"hello": "world"})
    accepted = httpx2.post(f"{gateway.base_url}/hooks/accepted")
    assert (accepted.status_code, accepted.json(), accepted.headers["x-custom"]) == (202, ["queued"], "yes")
    assert httpx2.get(f"{gateway.base_url}/hooks/accepted").status_code == 405


def test_request_id_is_taken_or_generated_and_logged(gateway: HeliosProcess, oa: openai.OpenAI) -> None:
    raw = oa.chat.completions.with_raw_response.create(model="gpt-test", messages=USER,
                                                       extra_headers={"X-Request-ID": "trace-abc-123"})
    assert raw.headers["x-request-id"] == "trace-abc-123"
    assert "server" not in raw.headers, "no server banner"
    generated = oa.models.with_raw_response.list().headers["x-request-id"]
    assert len(generated) >= 16 and generated != "trace-abc-123"
    line = wait_for_log(gateway, '"request_id": "trace-abc-123"')
    entry = json.loads(line)
    assert entry["model"] == "gpt-test" and entry["status"] == 200
    assert entry["prompt_tokens"] == 4 and entry["completion_tokens"] > 0
    assert "hello there" not in line, "message contents are not logged"
    assert "sk-upstream-secret" not in gateway.logs()


def test_cors_only_for_configured_origins(gateway: HeliosProcess) -> None:
    url = f"{gateway.base_url}/v1/models"
    allowed = httpx2.get(url, headers={"Origin": "https://app.example"})
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx2.get(url, headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    preflight = httpx2.options(url, headers={"Origin": "https://app.example",
                                             "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 204
    assert "Authorization" in preflight.headers["access-control-allow-headers"]


def test_openapi_document_and_docs(gateway: HeliosProcess) -> None:
    spec = httpx2.get(f"{gateway.base_url}/openapi.json").json()
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    schema = chat["requestBody"]["content"]["application/json"]["schema"]
    assert {"model", "messages"} <= set(schema["required"])
    assert {"tools", "response_format", "stream_options", "max_completion_tokens"} <= set(schema["properties"])
    assert "200" in chat["responses"] and "400" in chat["responses"]
    assert httpx2.get(f"{gateway.base_url}/docs").status_code == 200


# ---- flow control --------------------------------------------------------------------------------


def test_slow_reader_loses_no_chunk(gateway: HeliosProcess) -> None:
    """A client that reads slowly must receive every chunk: the relay slows down instead."""
    import time

    body = {"model": "long", "messages": USER, "stream": True}
    received: list[bytes] = []
    with httpx2.stream("POST", f"{gateway.base_url}/v1/chat/completions", json=body, timeout=60) as response:
        for i, line in enumerate(response.iter_lines()):
            if i < 40:
                time.sleep(0.02)  # read slower than the provider writes
            if line.startswith("data: "):
                received.append(line[6:].encode())
    chunks = validated_chunks(received)
    words = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert len([w for w in words if w]) == 300, "the provider sent 300 content chunks; all must arrive"


def test_client_disconnect_closes_upstream(gateway: HeliosProcess, fake_provider: FakeProvider) -> None:
    fake_provider.disconnected.clear()
    body = {"model": "slowstream", "messages": USER, "stream": True}
    with httpx2.stream("POST", f"{gateway.base_url}/v1/chat/completions", json=body, timeout=30) as response:
        for n, _ in enumerate(response.iter_lines()):
            if n > 10:
                break
    # Closing the response drops the connection; the gateway must drop its upstream stream promptly.
    assert fake_provider.disconnected.wait(5), "provider never saw the upstream connection go away"
    wait_for_log(gateway, '"client_disconnected": true')


def test_auth_is_off_without_keys(oa: openai.OpenAI) -> None:
    assert oa.models.list().data
