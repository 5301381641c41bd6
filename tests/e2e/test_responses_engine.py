"""/v1/responses on the embedded engine (real vLLM on the CPU, the tiny demo model), translated onto chat.

The session's shared engine appliance serves it: the demo model with vLLM's hermes tool parser, so
``tool_choice`` "required" (forced calls) and "auto" (what the Agents SDK sends after a call) both work.
The model has random weights and rarely emits EOS by itself, so where a test needs a finished answer it makes
one: ``min_tokens`` plus a logit bias towards EOS gives a short answer ending with ``stop``, and a seed makes it
repeatable. Forced calls use a tool whose one argument is an enum, so the grammar leaves the model no free text
inside the call; ``parallel_tool_calls: false`` makes it one call.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import agents
import httpx2
import jsonschema
import openai
import pytest
from openai import AsyncOpenAI

from tests.e2e.gateway import client, created_response, eventually, output_text, response_events
from tests.support.engine import HERMES, paced
from tests.support.openapi import validate
from tests.support.server import HeliosProcess

MODEL = HERMES
EOS = 2  # the demo model's </s> (app.demo_model: pad=0, bos=1, eos=2)


def short_answer(tokens: int, seed: int) -> dict[str, Any]:
    """Extra body fields for an answer of exactly ``tokens`` tokens that then stops (EOS, ``completed``)."""
    return {"seed": seed, "min_tokens": tokens, "logit_bias": {str(EOS): 100}}


TIME = {"type": "object", "properties": {"timezone": {"type": "string", "enum": ["UTC", "CET", "JST"]}},
        "required": ["timezone"], "additionalProperties": False}
TIME_TOOL = {"type": "function", "name": "get_time", "description": "The time in a zone", "parameters": TIME,
             "strict": True}
MOOD = {"type": "object", "properties": {"mood": {"type": "string", "enum": ["happy", "sad", "calm"]},
                                         "level": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["mood", "level"], "additionalProperties": False}
MOOD_FORMAT = {"format": {"type": "json_schema", "name": "mood", "schema": MOOD, "strict": True}}


@pytest.fixture(scope="module")
def gateway(engine_gateway: HeliosProcess) -> HeliosProcess:
    return engine_gateway


@pytest.fixture()
def oa(gateway: HeliosProcess) -> openai.OpenAI:
    return client(gateway.base_url, timeout=120)








def _without_parsed(value: Any) -> Any:
    """A dump of the stream helper's ParsedResponse without the ``parsed`` fields a plain Response lacks."""
    if isinstance(value, dict):
        return {k: _without_parsed(v) for k, v in value.items() if k != "parsed"}
    if isinstance(value, list):
        return [_without_parsed(v) for v in value]
    return value


def _metrics(gateway: HeliosProcess) -> str:
    return httpx2.get(f"{gateway.base_url}/metrics").text


def _sample(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{[^}}]*{re.escape(labels)}[^}}]*\}} (\S+)$", text, re.M)
    assert match, f"{name}{{{labels}}} not exposed"
    return float(match[1])


# ---- one response at a time ------------------------------------------------------------------------


def test_a_response_from_the_engine(oa: openai.OpenAI) -> None:
    data = created_response(oa, model=MODEL, input="Tell me about the weather.", extra_body=short_answer(4, 1))
    assert data["object"] == "response" and data["model"] == MODEL and data["status"] == "completed"
    assert data["id"].startswith("resp_") and data["completed_at"] and data["incomplete_details"] is None
    [item] = data["output"]
    assert item["type"] == "message" and item["role"] == "assistant" and item["status"] == "completed"
    assert item["id"].startswith("msg_")
    [part] = item["content"]
    assert part["type"] == "output_text" and part["text"]
    usage = data["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    stored = oa.responses.with_raw_response.retrieve(data["id"]).http_response.json()
    assert stored == data
    assert oa.responses.retrieve(data["id"]).output_text == part["text"]


def test_max_output_tokens_makes_an_incomplete_response(oa: openai.OpenAI) -> None:
    # ignore_eos (vLLM's extra) makes the length exact: the random model might otherwise stop at any token.
    data = created_response(oa, model=MODEL, input="Tell me about the weather.", max_output_tokens=5,
                   extra_body={"ignore_eos": True})
    assert data["status"] == "incomplete" and data["incomplete_details"] == {"reason": "max_output_tokens"}
    assert data["completed_at"] is None and data["max_output_tokens"] == 5
    assert output_text(data) and data["output"][0]["type"] == "message"
    assert data["usage"]["output_tokens"] == 5 and data["usage"]["input_tokens"] > 0


def test_stream_events_in_order_and_the_stored_response(oa: openai.OpenAI) -> None:
    params: dict[str, Any] = dict(model=MODEL, input="Tell me about the weather.", max_output_tokens=40,
                                  extra_body=short_answer(8, 3))
    events = response_events(oa, **params)
    kinds = [e["type"] for e in events]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert deltas
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * len(deltas),
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.completed"], kinds
    created, completed = events[0]["response"], events[-1]["response"]
    assert created["status"] == events[1]["response"]["status"] == "in_progress" and created["output"] == []
    assert events[1]["response"]["id"] == created["id"] == completed["id"]
    item_id = events[2]["item"]["id"]
    assert events[2]["item"]["status"] == "in_progress" and events[2]["output_index"] == 0
    assert all(e["item_id"] == item_id and e["output_index"] == 0 for e in events[3:-2])
    assert all(e["content_index"] == 0 for e in events[3:-3])
    text = "".join(e["delta"] for e in deltas)
    assert text and events[-4]["text"] == text and events[-3]["part"]["text"] == text
    assert events[-2]["item"] == completed["output"][0]
    assert completed["output"][0]["id"] == item_id and output_text(completed) == text
    assert completed["status"] == "completed" and completed["usage"]["output_tokens"] > 0
    assert completed["usage"]["input_tokens"] > 0
    stored = oa.responses.with_raw_response.retrieve(completed["id"]).http_response.json()
    assert stored == completed
    # The stored events replay as they were sent.
    with oa.responses.with_streaming_response.retrieve(completed["id"], stream=True) as replay:
        replayed = [json.loads(line[6:]) for line in replay.iter_lines() if line.startswith("data: ")]
    assert replayed == events

    # The official stream helper over the same request: one seed, one answer, and the response it rebuilds
    # from the events is the stored one.
    with oa.responses.stream(**params) as stream:
        helper_deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(helper_deltas) == text and final.output_text == text
    assert final.id != completed["id"] and final.status == "completed"
    assert _without_parsed(final.model_dump(mode="json")) == oa.responses.retrieve(final.id).model_dump(mode="json")


def test_logprobs_of_the_output_text(oa: openai.OpenAI) -> None:
    params: dict[str, Any] = dict(model=MODEL, input="Tell me about the weather.", top_logprobs=2,
                                  include=["message.output_text.logprobs"], extra_body=short_answer(4, 5))
    data = created_response(oa, **params)  # the spec's LogProb needs "bytes", in each entry and each alternative
    [part] = data["output"][0]["content"]
    logprobs = part["logprobs"]
    assert logprobs and all(len(entry["top_logprobs"]) == 2 for entry in logprobs)
    assert all(bytes(entry["bytes"]).decode(errors="replace") == entry["token"] for entry in logprobs
               if entry["token"].isascii())
    assert data["top_logprobs"] == 2
    events = response_events(oa, **params)
    streamed = [lp for e in events if e["type"] == "response.output_text.delta" for lp in e["logprobs"]]
    assert streamed == events[-1]["response"]["output"][0]["content"][0]["logprobs"] == logprobs, "one seed"


def test_n_is_refused_by_name(oa: openai.OpenAI) -> None:
    # Chat's "n" would make several answers, of which a Response can show one.
    with pytest.raises(openai.BadRequestError) as refused:
        oa.responses.create(model=MODEL, input="hi", extra_body={"n": 2})
    assert refused.value.param == "n" and refused.value.code == "unsupported_parameter"
    validate("ErrorResponse", refused.value.response.json())


@pytest.mark.parametrize("seed", [1, 2])
def test_a_json_schema_text_format_constrains_the_answer(oa: openai.OpenAI, seed: int) -> None:
    data = created_response(oa, model=MODEL, input="How do you feel?", text=MOOD_FORMAT, max_output_tokens=60,
                   extra_body={"seed": seed})
    assert data["status"] == "completed", data
    assert data["text"]["format"] == MOOD_FORMAT["format"]
    jsonschema.validate(json.loads(output_text(data)), MOOD)
    # Streamed, the text put together from the deltas is the same kind of JSON.
    events = response_events(oa, model=MODEL, input="How do you feel?", text=MOOD_FORMAT, max_output_tokens=60,
                     extra_body={"seed": seed})
    assert events[-1]["type"] == "response.completed"
    streamed = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    jsonschema.validate(json.loads(streamed), MOOD)
    assert streamed == output_text(data), "one seed, one answer"


def test_a_required_function_call_then_its_output_via_previous_response_id(oa: openai.OpenAI) -> None:
    first = created_response(oa, model=MODEL, input="What time is it in Berlin?", tools=[TIME_TOOL],
                             tool_choice="required", parallel_tool_calls=False, max_output_tokens=200,
                             extra_body={"seed": 1})
    assert first["status"] == "completed" and first["tool_choice"] == "required"
    assert first["tools"] == [{**TIME_TOOL}]
    [call] = first["output"]
    assert call["type"] == "function_call" and call["name"] == "get_time" and call["status"] == "completed"
    assert call["id"].startswith("fc_") and re.fullmatch(r"call_[0-9a-f]{24}", call["call_id"]), call
    jsonschema.validate(json.loads(call["arguments"]), TIME)

    second = created_response(oa, model=MODEL, previous_response_id=first["id"], tools=[TIME_TOOL],
                     input=[{"type": "function_call_output", "call_id": call["call_id"], "output": "12:00"}],
                     max_output_tokens=40, extra_body=short_answer(4, 2))
    assert second["status"] == "completed" and second["previous_response_id"] == first["id"]
    [answer] = second["output"]
    assert answer["type"] == "message" and output_text(second)
    # The whole conversation reached the model: more prompt than the first turn had.
    assert second["usage"]["input_tokens"] > first["usage"]["input_tokens"]
    items = oa.responses.input_items.list(second["id"], order="asc").data
    assert [item.type for item in items] == ["message", "function_call", "function_call_output"]
    assert items[1].id == call["id"] and items[2].call_id == call["call_id"]  # type: ignore[union-attr]


def test_a_client_that_leaves_mid_stream_aborts_the_engine_request(gateway: HeliosProcess) -> None:
    before = _sample(_metrics(gateway), "vllm:generation_tokens_total", f'model_name="{MODEL}"')
    # Paced (900 steps of at least 5 ms), so the engine is surely still generating when the client leaves.
    body = {"model": MODEL, "input": "Tell me about the weather.", "max_output_tokens": 900, "ignore_eos": True,
            "stream": True, **paced(5)}
    with httpx2.Client(base_url=gateway.base_url, timeout=60) as http:
        with http.stream("POST", "/v1/responses", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(lines) == "event: response.created"
            running = _sample(http.get("/metrics").text, "helios_engine_requests", f'model="{MODEL}"')
            # Leaving the block closes the connection mid-stream.
        assert running == 1
    eventually(lambda: _sample(_metrics(gateway), "helios_engine_requests", f'model="{MODEL}"') == 0, 10,
               "the engine request to be aborted")
    eventually(lambda: _sample(_metrics(gateway), "vllm:num_requests_running", f'model_name="{MODEL}"') == 0, 10,
               "vLLM's own running count to drop")
    eventually(lambda: _sample(_metrics(gateway), "helios_requests_in_flight", f'model="{MODEL}"') == 0, 10,
               "the request to leave the in-flight gauge")
    generated = _sample(_metrics(gateway), "vllm:generation_tokens_total", f'model_name="{MODEL}"') - before
    assert 0 < generated < 900, "the engine stopped before the 900 tokens ignore_eos asked for"

    def logged() -> bool:
        return any('"path": "/v1/responses"' in line and '"client_disconnected": true' in line
                   for line in gateway.logs().splitlines())

    eventually(logged, 10, "the access log to record the disconnect")


# ---- the OpenAI Agents SDK in its default (Responses) mode -----------------------------------------------


async def test_the_agents_sdk_runs_a_tool_on_the_engine(gateway: HeliosProcess) -> None:
    # Tracing would export spans to OpenAI; this process must reach nothing but the gateway.
    agents.set_tracing_disabled(True)
    ran: list[str] = []

    @agents.function_tool
    def get_time(timezone: Literal["UTC", "CET", "JST"]) -> str:
        """The time in a zone."""
        ran.append(timezone)
        return f"It is 12:00 in {timezone}."

    # tool_choice "required" forces the first turn's call; the SDK then resets it (reset_tool_choice), so the
    # second turn is "auto" (the hermes parser) and the short answer from the EOS bias ends the run.
    settings = agents.ModelSettings(tool_choice="required", parallel_tool_calls=False,
                                    extra_body=short_answer(3, 1))
    async with AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0,
                           timeout=120) as http:
        provider = agents.OpenAIProvider(openai_client=http, use_responses=True)
        agent = agents.Agent(name="clock", instructions="Use the tool.", model=MODEL, tools=[get_time],
                             model_settings=settings)
        assert agent.reset_tool_choice is True
        run = await agents.Runner.run(agent, "What time is it in Tokyo?", max_turns=3,
                                      run_config=agents.RunConfig(model_provider=provider))
        stored = [await http.responses.retrieve(r.response_id or "") for r in run.raw_responses]
    assert len(ran) == 1 and ran[0] in ("UTC", "CET", "JST")
    assert isinstance(run.final_output, str) and run.final_output
    kinds = [item.type for item in run.new_items]
    assert kinds == ["tool_call_item", "tool_call_output_item", "message_output_item"], kinds
    assert run.new_items[1].output == f"It is 12:00 in {ran[0]}."  # type: ignore[union-attr]
    # Both turns went through /v1/responses and were stored: the forced call, then an "auto" answer.
    assert [r.tool_choice for r in stored] == ["required", "auto"]
    assert [r.status for r in stored] == ["completed", "completed"]
    assert stored[0].output[0].type == "function_call" and stored[1].output_text == run.final_output
