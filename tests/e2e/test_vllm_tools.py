"""Tool calling, reasoning and embeddings on the embedded engine, with vLLM's own parsers (real engine, CPU).

The demo model has random weights, so where a test needs the model to write a parser's format it is made to:
vLLM's structured outputs constrain it to a regex, and a logit bias makes it pick the parsers' single marker
tokens (``<tool_call>``, ``</think>``) where the regex allows them, instead of spelling them out in pieces.
"""

from __future__ import annotations

import base64
import json
import re
import struct
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from tests.e2e.gateway import client, stream_payloads, validated_chunks
from tests.support.engine import AGENT, EMBED, ENGINE_SETTINGS, HERMES, PLAIN, THINK, engine_env
from tests.support.openapi import validate
from tests.support.server import HeliosProcess, run_cli

USER = [{"role": "user", "content": "What is the weather in Paris, and what time is it there?"}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 9}},
           "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "enum": ["UTC", "CET", "JST"]}},
        "required": ["timezone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a zone", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
HERMES_CALL = r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "[a-z]{3,8}", "days": [1-9]\}\}</tool_call>'


@pytest.fixture(scope="module")
def gateway(engine_gateway: HeliosProcess) -> HeliosProcess:
    return engine_gateway


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_model_dir))


@pytest.fixture(scope="module")
def markers(tokenizer: Any) -> dict[str, float]:
    """A logit bias towards the parsers' marker tokens."""
    ids = tokenizer.convert_tokens_to_ids(["<think>", "</think>", "<tool_call>", "</tool_call>"])
    assert len(set(ids)) == 4 and tokenizer.unk_token_id not in ids
    return {str(i): 100.0 for i in ids}


@pytest.fixture()
def oa(gateway: HeliosProcess) -> openai.OpenAI:
    return client(gateway.base_url, timeout=120)


def _check_calls(calls: list[Any]) -> list[tuple[str, Any]]:
    """Every call well-formed, with arguments valid for its tool; returns (name, arguments) pairs."""
    ids = [call.id for call in calls]
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids) and len(set(ids)) == len(ids), ids
    parsed = []
    for call in calls:
        assert call.type == "function"
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        parsed.append((call.function.name, arguments))
    return parsed


def _streamed_calls(payloads: list[bytes]) -> tuple[list[Any], list[Any]]:
    """Validate a tool-call stream's shape as OpenAI streams it; returns (chunks, calls rebuilt by the
    official client's ChatCompletionStreamState)."""
    chunks = validated_chunks(payloads)
    seen: set[int] = set()
    finishes = []
    for chunk in chunks:
        for choice in chunk["choices"]:
            if choice["finish_reason"]:
                finishes.append(choice["finish_reason"])
            for delta in choice["delta"].get("tool_calls", []):
                if delta["index"] not in seen:
                    seen.add(delta["index"])
                    assert delta["id"].startswith("call_") and delta["type"] == "function", delta
                    assert delta["function"]["name"] in SCHEMAS
                else:
                    assert set(delta) == {"index", "function"} and set(delta["function"]) == {"arguments"}, delta
    assert finishes == ["tool_calls"], finishes
    state = ChatCompletionStreamState()
    for payload in payloads[:-1]:
        state.handle_chunk(openai.types.chat.ChatCompletionChunk.model_validate_json(payload))
    message = state.get_final_completion().choices[0].message
    return chunks, list(message.tool_calls or [])


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_forced_tool_choice_on_a_model_without_parser(oa: openai.OpenAI, tool_choice: Any) -> None:
    params: dict[str, Any] = dict(model=PLAIN, messages=USER, tools=TOOLS, tool_choice=tool_choice, max_tokens=300,
                                  seed=11, temperature=1.0)
    raw = oa.chat.completions.with_raw_response.create(**params)
    validate("CreateChatCompletionResponse", raw.http_response.json())
    reply = raw.parse()
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = _check_calls(choice.message.tool_calls or [])
    assert calls
    if tool_choice != "required":
        assert [name for name, _ in calls] == ["get_time"]
    again = oa.chat.completions.create(**params)
    assert _check_calls(again.choices[0].message.tool_calls or []) == calls, "one seed, one answer"
    _, streamed = _streamed_calls(stream_payloads(oa, **params))
    assert _check_calls(streamed) == calls
    # The client's own stream helper accumulates the same calls.
    with oa.chat.completions.stream(**params) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert _check_calls(final.choices[0].message.tool_calls or []) == calls


def test_parallel_tool_calls_false_gives_one_call(oa: openai.OpenAI) -> None:
    params: dict[str, Any] = dict(model=PLAIN, messages=USER, tools=TOOLS, tool_choice="required",
                                  parallel_tool_calls=False, max_tokens=300, temperature=1.0)
    for seed in (1, 2, 3):
        reply = oa.chat.completions.create(**params, seed=seed)
        assert len(_check_calls(reply.choices[0].message.tool_calls or [])) == 1
        _, streamed = _streamed_calls(stream_payloads(oa, **params, seed=seed))
        assert len(streamed) == 1


def test_auto_tool_choice_with_the_hermes_parser(oa: openai.OpenAI, markers: dict[str, float]) -> None:
    constraint = {"structured_outputs": {"regex": r"Let me check\. " + HERMES_CALL}}
    params: dict[str, Any] = dict(model=HERMES, messages=USER, tools=TOOLS, max_tokens=80, seed=5,
                                  logit_bias=markers, extra_body=constraint)
    raw = oa.chat.completions.with_raw_response.create(**params)
    validate("CreateChatCompletionResponse", raw.http_response.json())
    choice = raw.parse().choices[0]
    assert choice.finish_reason == "tool_calls"
    assert (choice.message.content or "").strip() == "Let me check."
    calls = _check_calls(choice.message.tool_calls or [])
    assert [name for name, _ in calls] == ["get_weather"]
    chunks, streamed = _streamed_calls(stream_payloads(oa, **params))
    assert _check_calls(streamed) == calls
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.strip() == "Let me check.", "the parser keeps the markup out of the content"


def test_tool_choice_none_is_never_parsed(oa: openai.OpenAI, markers: dict[str, float]) -> None:
    reply = oa.chat.completions.create(model=HERMES, messages=USER, tools=TOOLS, tool_choice="none", max_tokens=80,
                                       seed=5, logit_bias=markers,
                                       extra_body={"structured_outputs": {"regex": HERMES_CALL}})
    choice = reply.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"
    assert (choice.message.content or "").startswith('<tool_call>{"name": "get_weather"')


def test_two_turn_tool_conversation(oa: openai.OpenAI, tokenizer: Any) -> None:
    first = oa.chat.completions.create(model=PLAIN, messages=USER, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=300, seed=4)
    call = (first.choices[0].message.tool_calls or [])[0]
    conversation: list[dict[str, Any]] = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny", "celsius": 21}'},
    ]
    second = oa.chat.completions.create(model=PLAIN, messages=conversation, tools=TOOLS, tool_choice="none",
                                        max_tokens=8)
    assert second.choices[0].finish_reason in ("stop", "length")
    # The template got the call (arguments as an object, as Hugging Face templates expect) and the result.
    rendered = tokenizer.apply_chat_template(
        [*USER, {"role": "assistant", "content": None, "tool_calls": [
            {**call.model_dump(), "function": {"name": call.function.name,
                                               "arguments": json.loads(call.function.arguments)}}]},
         conversation[2]],
        add_generation_prompt=True, tokenize=False)
    assert f'<tool_call>{{"name": "{call.function.name}", "arguments": {{' in rendered
    assert '<|tool|>\n{"forecast": "sunny", "celsius": 21}' in rendered
    assert second.usage is not None
    assert second.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))


def test_reasoning_is_split_from_the_answer(oa: openai.OpenAI, markers: dict[str, float]) -> None:
    params: dict[str, Any] = dict(
        model=THINK, messages=USER, max_tokens=60, seed=9, logit_bias=markers,
        extra_body={"structured_outputs": {"regex": "<think>[a-z]{3,9} [a-z]{3,9}</think>[a-z]{3,9}"}})
    raw = oa.chat.completions.with_raw_response.create(**params)
    data = raw.http_response.json()
    validate("CreateChatCompletionResponse", data)
    message = data["choices"][0]["message"]
    assert re.fullmatch("[a-z]{3,9} [a-z]{3,9}", message["reasoning_content"]), message
    assert message["reasoning"] == message["reasoning_content"]
    assert re.fullmatch("[a-z]{3,9}", message["content"]), message
    chunks = validated_chunks(stream_payloads(oa, **params))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
    assert "".join(d.get("reasoning", "") for d in deltas) == message["reasoning_content"]
    assert "".join(d.get("content") or "" for d in deltas) == message["content"]
    # include_reasoning: false (vLLM's extra) drops the thinking and keeps the answer.
    hidden = oa.chat.completions.with_raw_response.create(
        **{**params, "extra_body": {**params["extra_body"], "include_reasoning": False}}).http_response.json()
    assert "reasoning_content" not in hidden["choices"][0]["message"]
    assert hidden["choices"][0]["message"]["content"] == message["content"]


def test_reasoning_then_a_tool_call(oa: openai.OpenAI, markers: dict[str, float]) -> None:
    params: dict[str, Any] = dict(
        model=THINK, messages=USER, tools=TOOLS, max_tokens=80, seed=9, logit_bias=markers,
        extra_body={"structured_outputs": {"regex": "<think>[a-z]{3,9}</think>" + HERMES_CALL}})
    raw = oa.chat.completions.with_raw_response.create(**params)
    data = raw.http_response.json()
    validate("CreateChatCompletionResponse", data)
    choice = data["choices"][0]
    assert re.fullmatch("[a-z]{3,9}", choice["message"]["reasoning_content"])
    assert choice["finish_reason"] == "tool_calls" and not choice["message"].get("content")
    calls = _check_calls(raw.parse().choices[0].message.tool_calls or [])
    assert [name for name, _ in calls] == ["get_weather"]
    chunks, streamed = _streamed_calls(stream_payloads(oa, **params))
    assert _check_calls(streamed) == calls
    assert "".join(c["choices"][0]["delta"].get("reasoning_content", "") for c in chunks if c["choices"]) == \
        choice["message"]["reasoning_content"]


def test_tool_choice_mistakes_are_400(oa: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as unknown:
        oa.chat.completions.create(model=PLAIN, messages=USER, tools=TOOLS,
                                   tool_choice={"type": "function", "function": {"name": "nope"}})
    assert unknown.value.param == "tool_choice.function.name"
    validate("ErrorResponse", unknown.value.response.json())
    with pytest.raises(openai.BadRequestError) as no_tools:
        oa.chat.completions.create(model=PLAIN, messages=USER, tool_choice="required")
    assert no_tools.value.param == "tool_choice"
    with pytest.raises(openai.BadRequestError) as auto:
        oa.chat.completions.create(model=PLAIN, messages=USER, tools=TOOLS, tool_choice="auto")
    assert auto.value.param == "tool_choice"
    assert "tool_call_parser" in auto.value.message and "enable_auto_tool_choice" in auto.value.message


def test_embeddings_from_a_pooling_model(oa: openai.OpenAI, tokenizer: Any) -> None:
    raw = oa.embeddings.with_raw_response.create(model=EMBED, input=["the weather in Paris", "hello"],
                                                 encoding_format="float")
    data = raw.http_response.json()
    validate("CreateEmbeddingResponse", data)
    vectors = [item["embedding"] for item in data["data"]]
    assert [item["index"] for item in data["data"]] == [0, 1]
    assert len(vectors[0]) == len(vectors[1]) > 0 and vectors[0] != vectors[1]
    expected = len(tokenizer.encode("the weather in Paris")) + len(tokenizer.encode("hello"))
    assert data["usage"] == {"prompt_tokens": expected, "total_tokens": expected}
    single = oa.embeddings.create(model=EMBED, input="hello", encoding_format="float")
    assert single.data[0].embedding == pytest.approx(vectors[1], abs=1e-5)
    packed = oa.embeddings.with_raw_response.create(model=EMBED, input="hello", encoding_format="base64")
    encoded = packed.http_response.json()["data"][0]["embedding"]
    decoded = struct.unpack(f"<{len(vectors[1])}f", base64.b64decode(encoded))
    assert list(decoded) == pytest.approx(vectors[1], abs=1e-5)
    ids = tokenizer.encode("hello")
    by_ids = oa.embeddings.create(model=EMBED, input=ids, encoding_format="float")
    assert by_ids.data[0].embedding == pytest.approx(vectors[1], abs=1e-5)
    assert by_ids.usage.prompt_tokens == len(ids)
    batch = oa.embeddings.create(model=EMBED, input=[ids, ids[:2]], encoding_format="float")
    assert len(batch.data) == 2 and batch.usage.prompt_tokens == len(ids) + 2
    with pytest.raises(openai.BadRequestError) as dimensions:
        oa.embeddings.create(model=EMBED, input="hello", dimensions=8)
    assert dimensions.value.param == "dimensions"
    with pytest.raises(openai.BadRequestError) as too_long:
        oa.embeddings.create(model=EMBED, input="word " * 1500)
    assert too_long.value.code == "context_length_exceeded"


def test_pooling_and_generative_models_refuse_each_others_routes(oa: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as chat:
        oa.chat.completions.create(model=EMBED, messages=USER)
    assert chat.value.param == "model" and "only serves /v1/embeddings" in chat.value.message
    with pytest.raises(openai.BadRequestError) as completion:
        oa.completions.create(model=EMBED, prompt="hi")
    assert completion.value.param == "model"
    with pytest.raises(openai.BadRequestError) as embeddings:
        oa.embeddings.create(model=PLAIN, input="hi")
    assert embeddings.value.param == "model"
    # Side by side in one appliance, both answer their own routes.
    assert oa.chat.completions.create(model=PLAIN, messages=USER, max_tokens=2).choices
    assert oa.embeddings.create(model=EMBED, input="hi").data


def test_parser_settings_are_checked_at_start_up(demo_model_dir: Path, tmp_path: Path) -> None:
    model = {**ENGINE_SETTINGS, "name": PLAIN, "model": str(demo_model_dir)}
    unknown = run_cli([], {"models": [{**model, "tool_call_parser": "hermes2000"}]}, env=engine_env(tmp_path),
                      timeout=120)
    assert unknown.returncode == 3, unknown.stderr[-2000:]
    last = unknown.stderr.strip().splitlines()[-1]
    assert "tool_call_parser 'hermes2000' is not one of vLLM" in last and "hermes, " in last
    reasoning = run_cli([], {"models": [{**model, "reasoning_parser": "nope"}]}, env=engine_env(tmp_path),
                        timeout=120)
    assert reasoning.returncode == 3
    assert "reasoning_parser 'nope'" in reasoning.stderr and "deepseek_r1" in reasoning.stderr
    auto = run_cli([], {"models": [{**model, "enable_auto_tool_choice": True}]}, timeout=30)
    assert auto.returncode == 2
    assert "models[0]: enable_auto_tool_choice needs tool_call_parser to be set" in auto.stderr


def test_an_agent_loop_driven_by_the_engine(oa: openai.OpenAI) -> None:
    # The demo model never calls a tool by itself; tool_choice "required" makes it call one every round, so
    # the loop runs the tools max_steps times and then makes it answer.
    params: dict[str, Any] = dict(model=AGENT, messages=USER, tool_choice="required", seed=2, temperature=1.0)
    raw = oa.chat.completions.with_raw_response.create(**params)
    data = raw.http_response.json()
    validate("CreateChatCompletionResponse", data)
    message = data["choices"][0]["message"]
    steps = message["reasoning_content"]
    for step in (1, 2):
        assert re.search(rf"\[step {step}\] → (calculator|current_time)\(", steps), steps
        assert re.search(rf"\[step {step}\] ← (calculator|current_time)", steps), steps
    assert "[step limit] 2 rounds" in steps
    assert data["choices"][0]["finish_reason"] in ("stop", "length")
    assert data["usage"]["prompt_tokens"] > 3 * 300, "three model calls, each with the tool schemas"
    chunks = validated_chunks(stream_payloads(oa, **params))
    streamed = "".join(c["choices"][0]["delta"].get("reasoning_content", "") for c in chunks if c["choices"])
    assert _timeless(streamed) == _timeless(steps), "one seed, the same steps"


def _timeless(steps: str) -> str:
    """Step lines without what differs between two runs: durations and the clock's readings."""
    return re.sub(r" in \d+ ms|\d{4}-\d\d-\d\dT[\d:]+[+-]\d\d:\d\d", "", steps)


def test_reasoning_becomes_a_reasoning_item_over_responses(oa: openai.OpenAI, markers: dict[str, float]) -> None:
    extra = {"seed": 9, "logit_bias": markers,
             "structured_outputs": {"regex": "<think>[a-z]{3,9} [a-z]{3,9}</think>[a-z]{3,9}"}}
    raw = oa.responses.with_raw_response.create(model=THINK, input=USER[0]["content"], max_output_tokens=60,
                                                extra_body=extra)
    data = raw.http_response.json()
    validate("Response", data)
    reasoning, message = data["output"]
    assert reasoning["type"] == "reasoning" and message["type"] == "message"
    thought = reasoning["summary"][0]["text"]
    assert re.fullmatch("[a-z]{3,9} [a-z]{3,9}", thought), reasoning
    assert re.fullmatch("[a-z]{3,9}", message["content"][0]["text"]), message
    events: list[dict[str, Any]] = []
    with oa.responses.with_streaming_response.create(model=THINK, input=USER[0]["content"], max_output_tokens=60,
                                                     stream=True, extra_body=extra) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                validate("ResponseStreamEvent", events[-1])
    kinds = [e["type"] for e in events]
    assert kinds.index("response.reasoning_summary_part.added") < kinds.index("response.content_part.added")
    streamed = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_summary_text.delta")
    assert streamed == thought
    assert events[-1]["response"]["output"][0]["summary"] == [{"type": "summary_text", "text": thought}]
