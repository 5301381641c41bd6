"""Self-checks of the OpenAPI validator, including the spec's quirks."""

from __future__ import annotations

import copy
import datetime
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.support import openapi, openapi_trim
from tests.support.openapi import COMPLETION_STREAM_SCHEMA, is_valid, validate

USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}

CHAT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1741570283,
    "model": "gpt-4o-2024-08-06",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hi", "refusal": None, "annotations": []},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": USAGE,
    "service_tier": "default",
    "system_fingerprint": "fp_1",
}

CHUNK = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1741570283,
    "model": "gpt-4o-2024-08-06",
    "system_fingerprint": "fp_1",
    "choices": [{"index": 0, "delta": {"content": "Hi"}, "logprobs": None, "finish_reason": None}],
    "usage": None,
}

COMPLETION = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 1589478378,
    "model": "gpt-3.5-turbo-instruct",
    "choices": [{"text": "Hi", "index": 0, "logprobs": None, "finish_reason": "length"}],
    "usage": USAGE,
}

EMBEDDINGS = {
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2]}],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 1, "total_tokens": 1},
}

MODEL = {"id": "gpt-4o", "object": "model", "created": 1686935002, "owned_by": "openai"}

ERROR = {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}


def changed(instance: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Deep copy of ``instance`` with a dotted path (ints index lists) set to value."""
    result = copy.deepcopy(instance)
    *parents, last = path.split(".")
    node: Any = result
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return result


VALID = [
    ("CreateChatCompletionResponse", CHAT),
    ("CreateChatCompletionStreamResponse", CHUNK),
    ("CreateCompletionResponse", COMPLETION),
    ("CreateEmbeddingResponse", EMBEDDINGS),
    ("ListModelsResponse", {"object": "list", "data": [MODEL]}),
    ("Model", MODEL),
    ("ErrorResponse", ERROR),
]

INVALID = [
    ("CreateChatCompletionResponse", changed(CHAT, "choices.0.finish_reason", "done"), "finish_reason"),
    ("CreateChatCompletionResponse", changed(CHAT, "object", "chat.completion.chunk"), "object"),
    ("CreateChatCompletionStreamResponse", changed(CHUNK, "choices.0.index", "0"), "index"),
    ("CreateChatCompletionStreamResponse", changed(CHUNK, "usage", {"prompt_tokens": 1}), "usage"),
    ("CreateCompletionResponse", changed(COMPLETION, "choices.0.text", None), "text"),
    ("CreateEmbeddingResponse", changed(EMBEDDINGS, "data.0.embedding", ["x"]), "embedding"),
    ("ListModelsResponse", {"object": "list", "data": [{"id": "m"}]}, "data[0]"),
    ("Model", changed(MODEL, "created", "yesterday"), "created"),
    ("ErrorResponse", {"error": {"message": "boom", "type": "server_error"}}, "param"),
]


@pytest.mark.parametrize(("schema", "instance"), VALID, ids=[name for name, _ in VALID])
def test_valid_examples(schema: str, instance: object) -> None:
    validate(schema, instance)


@pytest.mark.parametrize(("schema", "instance", "mentions"), INVALID, ids=[s for s, _, _ in INVALID])
def test_invalid_examples(schema: str, instance: object, mentions: str) -> None:
    with pytest.raises(AssertionError, match=schema) as info:
        validate(schema, instance)
    assert mentions in str(info.value)


def test_error_message_lists_every_error_with_location() -> None:
    bad = changed(changed(CHUNK, "choices.0.delta.role", "robot"), "created", "now")
    with pytest.raises(AssertionError) as info:
        validate("CreateChatCompletionStreamResponse", bad)
    message = str(info.value)
    assert message.startswith("2 error(s)")
    assert "$.choices[0].delta.role: 'robot' is not one of" in message
    assert "$.created: 'now' is not of type 'integer'" in message


def test_final_usage_chunk_with_empty_choices() -> None:
    validate("CreateChatCompletionStreamResponse", {**CHUNK, "choices": [], "usage": USAGE})


def test_nullable_logprobs_and_finish_reason() -> None:
    # Both are OpenAPI 3.0 `nullable: true` in the chunk schema (finish_reason with an enum).
    validate("CreateChatCompletionStreamResponse", CHUNK)
    finish = changed(CHUNK, "choices.0.finish_reason", "stop")
    validate("CreateChatCompletionStreamResponse", changed(finish, "choices.0.delta", {}))
    validate("CreateChatCompletionResponse", CHAT)


def test_logprobs_objects() -> None:
    entry = {"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}
    logprobs = {"content": [entry], "refusal": None}
    validate("CreateChatCompletionResponse", changed(CHAT, "choices.0.logprobs", logprobs))
    validate("CreateChatCompletionStreamResponse", changed(CHUNK, "choices.0.logprobs", logprobs))
    # Both keys are required once logprobs is an object.
    assert not is_valid("CreateChatCompletionResponse", changed(CHAT, "choices.0.logprobs", {"content": []}))


def test_tool_call_deltas() -> None:
    first = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}],
        "refusal": None,
    }
    validate("CreateChatCompletionStreamResponse", changed(CHUNK, "choices.0.delta", first))
    more = {"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}
    validate("CreateChatCompletionStreamResponse", changed(CHUNK, "choices.0.delta", more))
    assert not is_valid("CreateChatCompletionStreamResponse", changed(CHUNK, "choices.0.delta", {"tool_calls": [{}]}))


def test_tool_calls_message() -> None:
    message = {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    }
    chat = changed(changed(CHAT, "choices.0.message", message), "choices.0.finish_reason", "tool_calls")
    validate("CreateChatCompletionResponse", chat)


def test_error_body_with_string_param_and_code() -> None:
    validate("ErrorResponse", changed(changed(ERROR, "error.param", "messages"), "error.code", "empty_array"))


def test_completion_stream_chunks_need_the_relaxed_schema() -> None:
    # Quirk: real streamed text_completion chunks carry finish_reason/usage null, which the
    # spec's CreateCompletionResponse forbids; the helios-local schema allows exactly that.
    chunk = {**changed(COMPLETION, "choices.0.finish_reason", None), "usage": None}
    assert not is_valid("CreateCompletionResponse", chunk)
    validate(COMPLETION_STREAM_SCHEMA, chunk)
    validate(COMPLETION_STREAM_SCHEMA, {**COMPLETION, "choices": [], "usage": USAGE})
    assert not is_valid(COMPLETION_STREAM_SCHEMA, changed(chunk, "choices.0.finish_reason", "done"))


def test_base64_embeddings_are_not_in_the_spec() -> None:
    # Quirk: encoding_format=base64 (the openai SDK's default!) returns a string the spec rejects.
    assert not is_valid("CreateEmbeddingResponse", changed(EMBEDDINGS, "data.0.embedding", "AAAAAA=="))


def test_nullable_conversion() -> None:
    converted = openapi._convert(
        {
            "type": "object",
            "x-oaiTypeLabel": "map",
            "properties": {
                "a": {"type": "string", "enum": ["x"], "nullable": True},
                "b": {"$ref": "#/components/schemas/B", "nullable": True, "description": "d"},
                "c": {"allOf": [{"$ref": "#/components/schemas/C"}, {"nullable": True}]},
                "d": {"type": "number", "minimum": 0, "exclusiveMinimum": True},
                "nullable": {"type": "boolean"},
            },
            "example": {"nullable": True},
        }
    )
    assert "x-oaiTypeLabel" not in converted
    props = converted["properties"]
    assert props["a"] == {"type": ["string", "null"], "enum": ["x", None]}
    assert props["b"] == {"description": "d", "anyOf": [{"$ref": "#/components/schemas/B"}, {"type": "null"}]}
    assert props["c"] == {"anyOf": [{"allOf": [{"$ref": "#/components/schemas/C"}]}, {"type": "null"}]}
    assert props["d"] == {"type": "number", "exclusiveMinimum": 0}
    assert props["nullable"] == {"type": "boolean"}
    assert converted["example"] == {"nullable": True}


def test_no_openapi_only_keywords_left() -> None:
    text = repr(openapi.load_schemas())
    assert "'nullable'" not in text
    assert "x-oai" not in text


def test_unknown_schema_name() -> None:
    with pytest.raises(KeyError, match="NoSuchSchema"):
        validate("NoSuchSchema", {})


def test_spec_path_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(openapi.SPEC_ENV, raising=False)
    assert openapi.spec_path() == openapi.DEFAULT_SPEC_PATH
    assert openapi.DEFAULT_SPEC_PATH.is_file()
    monkeypatch.setenv(openapi.SPEC_ENV, str(tmp_path / "spec.json"))
    assert openapi.spec_path() == tmp_path / "spec.json"


def test_trimmed_spec_is_self_contained() -> None:
    document = json.loads(openapi_trim.TRIMMED_PATH.read_text(encoding="utf-8"))
    schemas = document["components"]["schemas"]
    assert set(openapi_trim.ROOTS) <= set(schemas)
    for name, schema in schemas.items():
        assert openapi_trim.references(schema) <= set(schemas), name
    header = document[openapi_trim.SOURCE_KEY]
    assert "Copyright (c) 2020 OpenAI" in header["license"]["text"]
    assert header["spec"]["sha256"] and header["spec"]["info_version"]


def test_trim_strips_documentation_keywords_only() -> None:
    schemas = {
        "Root": {
            "type": "object",
            "title": "Root",
            "description": "documentation",
            "x-oaiMeta": {"name": "root"},
            "example": {"description": "x"},
            "required": ["description", "title"],
            "properties": {
                "description": {"type": "string", "description": "a property called description"},
                "title": {"$ref": "#/components/schemas/Title"},
                "kind": {"type": "string", "enum": ["description"], "default": "description"},
            },
        },
        "Title": {"anyOf": [{"type": "string", "title": "T"}, {"$ref": "#/components/schemas/Leaf"}]},
        "Leaf": {"type": "integer", "examples": [1]},
        "Unused": {"type": "boolean"},
    }
    assert openapi_trim.trim(schemas, ["Root"]) == {
        "Root": {
            "type": "object",
            "required": ["description", "title"],
            "properties": {
                "description": {"type": "string"},
                "title": {"$ref": "#/components/schemas/Title"},
                "kind": {"type": "string", "enum": ["description"], "default": "description"},
            },
        },
        "Title": {"anyOf": [{"type": "string"}, {"$ref": "#/components/schemas/Leaf"}]},
        "Leaf": {"type": "integer"},
    }


def test_trimmed_spec_is_up_to_date() -> None:
    """Regenerating the trimmed file from the full spec gives the committed bytes (CI has the full spec)."""
    full = openapi_trim.full_spec_path()
    if not full.is_file() or full.resolve() == openapi_trim.TRIMMED_PATH.resolve():
        message = f"the full OpenAI spec is not at {full} (set {openapi_trim.SPEC_ENV})"
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(f"{message}; CI must check the trimmed copy against it")
        pytest.skip(message)
    committed = openapi_trim.TRIMMED_PATH.read_text(encoding="utf-8")
    # Another day's run regenerates the same bytes: the header's date is kept while nothing else changes.
    later = datetime.date.today() + datetime.timedelta(days=400)
    regenerated = openapi_trim.generate(full, previous=committed, today=later)
    assert regenerated == committed, (
        f"{openapi_trim.TRIMMED_PATH} is out of date with {full}: run `python -m tests.support.openapi_trim`"
    )
