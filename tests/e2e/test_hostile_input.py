"""Hostile request bodies, sent raw: each gets a clear 4xx OpenAI error naming the field (or an answer, where
the input is legal), never a 5xx or a hang, and the appliance keeps serving others afterwards.

On a plain remote-model appliance (its own, with a short body read timeout for the body that never ends), and
on the shared engine appliance where the engine's cost depends on the input (counts, lengths, token budgets).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

from tests.support.engine import EMBED, PLAIN
from tests.support.fake_provider import FakeProvider, remote_model
from tests.support.openapi import validate
from tests.support.server import HeliosProcess

MODEL = "m"
USER = [{"role": "user", "content": "hi"}]
DEEP = 100_000
TEN_MB = 10 * 1024 * 1024
#: The body that never ends gets this long, then a 408 (the server's body_read_timeout).
BODY_READ_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def gateway(fake_provider: FakeProvider) -> Iterator[HeliosProcess]:
    config = {
        "server": {"body_read_timeout": BODY_READ_TIMEOUT},
        "models": [remote_model(fake_provider, MODEL, "gpt-4o")],
    }
    with HeliosProcess(config) as process:
        yield process
        assert "Traceback" not in process.logs()


@pytest.fixture(scope="module")
def http(gateway: HeliosProcess) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=gateway.base_url, timeout=60, trust_env=False) as client:
        yield client


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": MODEL, "messages": USER, **fields}).encode()


def post(http: httpx2.Client, body: bytes, path: str = "/v1/chat/completions",
         content_type: str | None = "application/json") -> httpx2.Response:
    headers = {"Content-Type": content_type} if content_type else {}
    return http.post(path, content=body, headers=headers)


def refused(response: httpx2.Response, status: int = 400, *, param: str | None = None,
            code: str | None = None) -> dict[str, Any]:
    """The response is an OpenAI error with this status, naming ``param`` (a prefix of it) and ``code``."""
    assert response.status_code == status, (response.status_code, response.text[:1000])
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    validate("ErrorResponse", body)
    error = body["error"]
    if param is not None:
        assert (error["param"] or "").startswith(param), error
        if code is None:
            assert param.split("[")[0].split(".")[0] in error["message"], error
    if code is not None:
        assert error["code"] == code, error
    return error


def answered(response: httpx2.Response) -> dict[str, Any]:
    assert response.status_code == 200, (response.status_code, response.text[:1000])
    body: dict[str, Any] = response.json()
    validate("CreateChatCompletionResponse", body)
    return body


def still_serving(process: HeliosProcess, http: httpx2.Client, model: str = MODEL) -> None:
    assert httpx2.get(process.url("/health"), timeout=10).status_code == 200
    answered(post(http, json.dumps({"model": model, "messages": USER, "max_tokens": 2}).encode()))


# ---- malformed JSON --------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    b'{"model": "m", "messages": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "extra": ' + b'{"a":' * DEEP
    + b"1" + b"}" * DEEP + b"}",
    b'{"model": "m", "messages": [{"role": "user", "content": "caf\xe9 \xff\xfe"}]}',
    b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]',
    b"",
], ids=["nested-100k", "nested-100k-extra", "invalid-utf8", "truncated", "empty"])
def test_malformed_json_is_refused(body: bytes, http: httpx2.Client, gateway: HeliosProcess) -> None:
    error = refused(post(http, body), code="invalid_json")
    assert "JSON" in error["message"]
    still_serving(gateway, http)


@pytest.mark.parametrize("body", [b"[]", b'[{"model": "m"}]', b'"hello"', b"42", b"null"],
                         ids=["array", "array-of-object", "string", "number", "null"])
def test_body_must_be_an_object(body: bytes, http: httpx2.Client) -> None:
    error = refused(post(http, body), code="invalid_json")
    assert error["message"] == "The request body must be a JSON object."


@pytest.mark.parametrize(("literal", "param"), [
    (b'"temperature": NaN', "temperature"), (b'"logit_bias": {"1": Infinity}', "logit_bias"),
    (b'"top_p": -Infinity', "top_p"), (b'"temperature": 1e400', "temperature"),
], ids=["nan", "infinity", "minus-infinity", "overflowing-literal"])
def test_non_finite_numbers_name_the_field(literal: bytes, param: str, http: httpx2.Client) -> None:
    """JSON has no NaN or Infinity, and no double holds 1e400; pydantic's parser reads them as floats, so they
    are refused as the field's value (every float field is bounded), never relayed."""
    refused(post(http, chat().replace(b'"messages"', literal + b', "messages"')), param=param)


def test_duplicate_keys_take_the_last(http: httpx2.Client, provider: FakeProvider) -> None:
    """As every JSON parser here does (Python's, pydantic's): the last duplicate is the one validated."""
    body = b'{"model": "m", "messages": [{"role": "user", "content": "first"}], "n": 10000, "n": 1, ' \
           b'"messages": [{"role": "user", "content": "second"}]}'
    reply = answered(post(http, body))
    assert reply["choices"][0]["message"]["content"] == "echo: second"
    assert len(reply["choices"]) == 1
    sent = provider.last_request.body
    assert sent["model"] == "gpt-4o" and sent["n"] == 1


# ---- sizes and counts ----------------------------------------------------------------------------


def test_ten_megabyte_string_is_answered(http: httpx2.Client) -> None:
    text = "a" * TEN_MB
    reply = answered(post(http, json.dumps({"model": MODEL, "messages": [{"role": "user", "content": text}]})
                          .encode()))
    assert reply["choices"][0]["message"]["content"] == f"echo: {text}"


def test_hundred_thousand_messages_are_answered(http: httpx2.Client) -> None:
    messages = [{"role": "user", "content": f"m{i}"} for i in range(100_000)]
    reply = answered(post(http, json.dumps({"model": MODEL, "messages": messages}).encode()))
    assert reply["choices"][0]["message"]["content"] == "echo: m99999"


@pytest.mark.parametrize(("fields", "param"), [
    ({"stop": [f"s{i}" for i in range(10_000)]}, "stop"),
    ({"logit_bias": {str(i): 1 for i in range(100_000)}}, "logit_bias"),
    ({"logit_bias": {"not-a-token": 1}}, "logit_bias"),
    ({"n": 10_000}, "n"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**30}, "max_tokens"),
    ({"max_completion_tokens": 2**64}, "max_completion_tokens"),
    ({"seed": 2**64}, "seed"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"stream": 1}, "stream"),
    ({"messages": [{"role": "hacker", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "hologram", "hologram": {}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "messages[0].content[0]"),
    ({"messages": []}, "messages"),
], ids=["stop-10k", "logit-bias-100k", "logit-bias-key", "n-10k", "max-tokens-negative", "max-tokens-zero",
        "max-tokens-enormous", "max-completion-tokens-2^64", "seed-2^64", "max-tokens-string", "stream-int",
        "unknown-role", "unknown-part-type", "part-without-type", "no-messages"])
def test_out_of_range_is_refused_by_name(fields: dict[str, Any], param: str, http: httpx2.Client,
                                         provider: FakeProvider) -> None:
    refused(post(http, chat(**fields)), param=param)
    assert provider.request_count() == 0, "refused before reaching the provider"


def test_largest_documented_values_are_relayed(http: httpx2.Client, provider: FakeProvider) -> None:
    fields = {"max_tokens": 2**31 - 1, "seed": 2**63 - 1, "n": 128, "stop": [f"s{i}" for i in range(16)],
              "logit_bias": {str(i): 100 for i in range(1024)}}
    answered(post(http, chat(**fields)))
    sent = provider.last_request.body
    assert {k: sent[k] for k in fields} == fields


# ---- the envelope --------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_wrong_content_type_is_refused(content_type: str, http: httpx2.Client) -> None:
    """Refused by name; the keep-alive connection it came on then carries the client's next request."""
    refused(post(http, chat(), content_type=content_type), 415, param="Content-Type", code="unsupported_media_type")
    answered(post(http, chat()))


@pytest.mark.parametrize("content_type", [None, "application/json; charset=utf-8", "application/merge-patch+json"])
def test_json_and_absent_content_types_are_read(content_type: str | None, http: httpx2.Client) -> None:
    answered(post(http, chat(), content_type=content_type))


def test_body_that_never_ends(gateway: HeliosProcess, http: httpx2.Client) -> None:
    """A chunked body that stops arriving: 408 after the body read timeout, others served meanwhile."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=BODY_READ_TIMEOUT + 20) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"mod\r\n")
        started = time.monotonic()
        still_serving(gateway, http)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            piece = sock.recv(65536)
            if not piece:
                break
            answer += piece
        waited = time.monotonic() - started
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:500]
    assert waited < BODY_READ_TIMEOUT + 10
    error = json.loads(body)
    validate("ErrorResponse", error)
    assert error["error"]["code"] == "request_timeout"
    still_serving(gateway, http)


# ---- on the engine -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_http(engine_gateway: HeliosProcess) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=engine_gateway.base_url, timeout=120, trust_env=False) as client:
        yield client


def engine_chat(**fields: Any) -> bytes:
    return json.dumps({"model": PLAIN, "messages": USER, "max_tokens": 2, **fields}).encode()


@pytest.mark.parametrize(("fields", "param", "code"), [
    ({"n": 10_000}, "n", None),
    ({"max_tokens": 10**30}, "max_tokens", None),
    ({"max_tokens": 2**31 - 1}, "max_tokens", "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": f"m{i}"} for i in range(100_000)]}, "messages",
     "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": "a " * (TEN_MB // 2)}]}, "messages", "context_length_exceeded"),
    ({"stop": [f"s{i}" for i in range(10_000)]}, "stop", None),
    ({"logit_bias": {"999999999": 5}}, "logit_bias", None),
], ids=["n-10k", "max-tokens-enormous", "max-tokens-beyond-context", "messages-100k", "ten-megabytes",
        "stop-10k", "logit-bias-outside-vocabulary"])
def test_engine_refuses_by_name(fields: dict[str, Any], param: str, code: str | None, engine_http: httpx2.Client,
                                engine_gateway: HeliosProcess) -> None:
    started = time.monotonic()
    refused(post(engine_http, engine_chat(**fields)), param=param, code=code)
    assert time.monotonic() - started < 60
    still_serving(engine_gateway, engine_http, PLAIN)


def test_engine_takes_the_largest_documented_values(engine_http: httpx2.Client) -> None:
    fields = {"seed": 2**63 - 1, "n": 4, "stop": [f"s{i}" for i in range(16)],
              "logit_bias": {str(i): 1 for i in range(300)}}
    assert len(answered(post(engine_http, engine_chat(**fields)))["choices"]) == 4


def test_engine_embeds_nothing_too_long(engine_http: httpx2.Client, engine_gateway: HeliosProcess) -> None:
    body = json.dumps({"model": EMBED, "input": "a " * (TEN_MB // 2)}).encode()
    refused(post(engine_http, body, "/v1/embeddings"), code="context_length_exceeded")
    assert "Traceback" not in engine_gateway.logs()
