"""/v1/responses over remote models (translated onto Chat Completions) and agents, driven by the official client.

Every Response object and every stream event is validated against OpenAI's own schemas; the imitation provider
records what reached it, so the tests see the chat request each Responses request became.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest

from app.settings import OpenAIModelSettings
from tests.e2e.agents_support import calc, results
from tests.e2e.gateway import client, created_response, eventually, output_text, response_events
from tests.support.fake_provider import FakeProvider, remote_model
from tests.support.mcp_servers import SERVER_MODULE
from tests.support.openapi import validate
from tests.support.server import REPO_ROOT, HeliosProcess

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}


@pytest.fixture(scope="module")
def gateway(fake_provider: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeliosProcess]:
    scratch = tmp_path_factory.mktemp("responses")
    config = {
        "models": [
            remote_model(fake_provider, "chat-model", "gpt-4o"),
            remote_model(fake_provider, "words", "chunks-12"),
            remote_model(fake_provider, "slow", "slow-chunks-50"),
            remote_model(fake_provider, "breaks", "midstream-fail"),
            remote_model(fake_provider, "error-first", "error-event"),
            remote_model(fake_provider, "limited", "error-429"),
            remote_model(fake_provider, "scripted", "tool-script"),
            remote_model(fake_provider, "native", "gpt-4o", responses_api="native"),
            remote_model(fake_provider, "native-words", "chunks-30", responses_api="native"),
            remote_model(fake_provider, "native-error-first", "error-event", responses_api="native"),
            remote_model(fake_provider, "native-breaks", "midstream-fail", responses_api="native"),
            remote_model(fake_provider, "native-limited", "error-429", responses_api="native"),
        ],
        "agents": [{"name": "agent", "model": "scripted", "tools": ["calculator"],
                    "mcp_servers": [{"name": "files", "command": sys.executable, "cwd": str(REPO_ROOT),
                                     "args": ["-m", SERVER_MODULE, "stdio"]}]}],
    }
    process = HeliosProcess(config, workdir=scratch)
    try:
        process.start(wait_ready=True, timeout=60)
        yield process
    finally:
        process.close()


@pytest.fixture()
def oa(gateway: HeliosProcess, provider: FakeProvider) -> openai.OpenAI:
    return client(gateway.base_url, timeout=30)






def _script_input(*rounds: list[dict[str, Any]]) -> str:
    return json.dumps({"rounds": list(rounds)})




# ---- the translation onto Chat Completions -----------------------------------------------------------


def test_a_response_is_a_chat_call_underneath(oa: openai.OpenAI, provider: FakeProvider) -> None:
    data = created_response(oa, model="chat-model", instructions="Be brief.", input="hello responses",
                   max_output_tokens=50, temperature=0.5, metadata={"team": "a"}, user="u-1",
                   text={"format": {"type": "json_schema", "name": "reply", "strict": True,
                                    "schema": {"type": "object", "properties": {}}}})
    assert data["model"] == "chat-model" and data["status"] == "completed" and data["object"] == "response"
    assert data["metadata"] == {"team": "a"} and data["instructions"] == "Be brief."
    assert output_text(data) == "echo: hello responses"
    assert data["usage"]["input_tokens"] > 0 and data["usage"]["output_tokens"] == 3
    sent = provider.last_request
    assert sent.path == "/v1/chat/completions"
    assert sent.body["messages"] == [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "hello responses"}]
    assert sent.body["model"] == "gpt-4o" and sent.body["max_tokens"] == 50 and sent.body["temperature"] == 0.5
    assert sent.body["user"] == "u-1"
    assert sent.body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "reply", "strict": True, "schema": {"type": "object", "properties": {}}}}
    # The official client's typed view agrees.
    typed = oa.responses.retrieve(data["id"])
    assert typed.output_text == "echo: hello responses"


def test_input_items_of_every_kind_become_chat_messages(oa: openai.OpenAI, provider: FakeProvider) -> None:
    created_response(oa, model="chat-model", input=[
        {"role": "developer", "content": "dev rules"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "part one"},
                                                        {"type": "input_text", "text": "part two"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "cold"},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "thinking"}]},
        {"role": "user", "content": "and now?"},
    ], tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False)
    body = provider.last_request.body
    assert body["messages"] == [
        {"role": "developer", "content": "dev rules"},
        {"role": "user", "content": "part one\npart two"},
        {"role": "assistant", "content": "ok", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "cold"},
        {"role": "user", "content": "and now?"},
    ]
    assert body["tools"] == [{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False


def test_stream_events_follow_the_spec_and_match_the_stored_response(oa: openai.OpenAI) -> None:
    events = response_events(oa, model="words", input="count")
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[4:16] == ["response.output_text.delta"] * 12
    assert kinds[16:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    item_id = events[2]["item"]["id"]
    assert all(e["item_id"] == item_id and e["output_index"] == 0 for e in events[3:-2])
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == " ".join(f"w{i}" for i in range(1, 13)) and events[-4]["text"] == text
    final = events[-1]["response"]
    assert final["id"] == events[0]["response"]["id"] and final["output"][0]["id"] == item_id
    assert final["usage"]["output_tokens"] == 12
    stored = oa.responses.with_raw_response.retrieve(final["id"]).http_response.json()
    assert stored == final
    # The stored stream replays from any point, with the same numbers.
    with oa.responses.with_streaming_response.retrieve(final["id"], stream=True, starting_after=15) as replay:
        replayed = [json.loads(line[6:]) for line in replay.iter_lines() if line.startswith("data: ")]
    assert replayed == events[16:]


def test_the_official_stream_helper_rebuilds_the_response(oa: openai.OpenAI) -> None:
    with oa.responses.stream(model="words", input="count") as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert len(deltas) == 12 and final.output_text == "".join(deltas) and final.status == "completed"


def test_max_output_tokens_gives_an_incomplete_response(oa: openai.OpenAI) -> None:
    data = created_response(oa, model="words", input="count", max_output_tokens=4)
    assert data["status"] == "incomplete" and data["incomplete_details"] == {"reason": "max_output_tokens"}
    events = response_events(oa, model="words", input="count", max_output_tokens=4)
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_a_function_tool_round_trip_through_previous_response_id(oa: openai.OpenAI, provider: FakeProvider) -> None:
    first = created_response(oa, model="scripted", tools=[WEATHER],
                    input=_script_input([{"name": "get_weather", "arguments": {"city": "Paris"}}]))
    calls = [item for item in first["output"] if item["type"] == "function_call"]
    assert len(calls) == 1 and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    second = created_response(oa, model="scripted", tools=[WEATHER], previous_response_id=first["id"],
                     input=[{"type": "function_call_output", "call_id": calls[0]["call_id"], "output": "sunny"}])
    assert results(output_text(second)) == {calls[0]["call_id"]: "sunny"}
    # The stored input and output came first: the whole conversation reached the provider.
    roles = [m["role"] for m in provider.last_request.body["messages"]]
    assert roles == ["user", "assistant", "tool"]
    items = oa.responses.input_items.list(second["id"], order="asc")
    assert [item.type for item in items.data] == ["message", "function_call", "function_call_output"]
    page = oa.responses.input_items.list(second["id"], order="asc", limit=2)
    assert page.has_more and len(page.data) == 2
    rest = oa.responses.input_items.list(second["id"], order="asc", after=page.data[-1].id)
    assert [item.type for item in rest.data] == ["function_call_output"] and not rest.has_more


def test_streamed_function_calls_have_argument_events(oa: openai.OpenAI) -> None:
    events = response_events(oa, model="scripted", tools=[WEATHER],
                     input=_script_input([{"name": "get_weather", "arguments": {"city": "Rome"}}]))
    added = [e for e in events if e["type"] == "response.output_item.added" and e["item"]["type"] == "function_call"]
    assert len(added) == 1
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert json.loads(deltas) == {"city": "Rome"} and done["arguments"] == deltas and done["name"] == "get_weather"
    final = events[-1]["response"]["output"]
    assert final[-1]["type"] == "function_call" and final[-1]["arguments"] == deltas


# ---- bad input and faults ------------------------------------------------------------------------


@pytest.mark.parametrize(("params", "param"), [
    ({"temperature": 5}, "temperature"),
    ({"tools": [{"type": "namespace", "name": "ns", "description": "d", "tools": []}]}, "tools[0].tools"),
    ({"tools": [{"type": "custom", "name": "c", "format": {"type": "grammar", "syntax": "ebnf"}}]}, "tools[0].format"),
    ({"tools": [{"type": "function", "name": "bad name!"}]}, "tools[0].name"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"input": [{"type": "computer_call_output", "call_id": "x"}]}, "input[0].type"),
    ({"input": [{"role": "wizard", "content": "hi"}]}, "input[0].role"),
    ({"text": {"format": {"type": "json_schema"}}}, "text.format"),
    ({"tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"background": True, "store": False}, "background"),
])
def test_bad_requests_are_400s_naming_the_field(oa: openai.OpenAI, params: dict[str, Any], param: str) -> None:
    body = {"model": "chat-model", "input": "hi", **params}
    with pytest.raises(openai.BadRequestError) as caught:
        oa.responses.create(**body)
    assert caught.value.param == param, caught.value.message


def test_unknown_models_and_ids_are_404s(oa: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        oa.responses.create(model="no-such-model", input="hi")
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as caught:
        oa.responses.create(model="chat-model", input="hi", previous_response_id="resp_missing")
    assert caught.value.param == "previous_response_id"
    for call in (oa.responses.retrieve, oa.responses.delete, oa.responses.cancel, oa.responses.input_items.list):
        with pytest.raises(openai.NotFoundError):
            call("resp_missing")


def test_provider_errors_keep_their_class(oa: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError):
        oa.responses.create(model="limited", input="hi")
    # An error event before the first chunk is still an HTTP error, as for chat.
    with pytest.raises(openai.APIStatusError) as caught:
        oa.responses.create(model="error-first", input="hi", stream=True)
    assert caught.value.status_code == 502


def test_a_stream_that_breaks_ends_with_response_failed(oa: openai.OpenAI) -> None:
    events = response_events(oa, model="breaks", input="hi")
    assert events[-1]["type"] == "response.failed"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert not any(e["type"] == "response.completed" for e in events)
    assert oa.responses.retrieve(failed["id"]).status == "failed"


def test_store_false_keeps_nothing(oa: openai.OpenAI) -> None:
    data = created_response(oa, model="chat-model", input="forget me", store=False)
    assert data["store"] is False
    with pytest.raises(openai.NotFoundError):
        oa.responses.retrieve(data["id"])


def test_delete(oa: openai.OpenAI, gateway: HeliosProcess) -> None:
    data = created_response(oa, model="chat-model", input="delete me")
    answer = httpx2.delete(f"{gateway.base_url}/v1/responses/{data['id']}", timeout=10)
    assert answer.status_code == 200 and answer.json() == {"id": data["id"], "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        oa.responses.retrieve(data["id"])


def test_a_client_that_leaves_closes_the_provider_stream(oa: openai.OpenAI, provider: FakeProvider) -> None:
    with oa.responses.with_streaming_response.create(model="slow", input="hi", stream=True) as response:
        for line in response.iter_lines():
            if "output_text.delta" in line:
                break
    eventually(lambda: [s.outcome for s in provider.streams] == ["disconnected"],
               what="the provider stream to be closed")


# ---- background ------------------------------------------------------------------------------------


def test_background_runs_after_answering_queued(oa: openai.OpenAI) -> None:
    queued = created_response(oa, model="words", input="count", background=True)
    assert queued["status"] == "queued" and queued["background"] is True

    def finished() -> bool:
        return oa.responses.retrieve(queued["id"]).status == "completed"

    eventually(finished, what="the background response to complete")
    done = oa.responses.with_raw_response.retrieve(queued["id"]).http_response.json()
    validate("Response", done)
    assert output_text(done) == " ".join(f"w{i}" for i in range(1, 13))
    # Its events can be read afterwards, from any point.
    with oa.responses.with_streaming_response.retrieve(queued["id"], stream=True) as replay:
        kinds = [json.loads(line[6:])["type"] for line in replay.iter_lines() if line.startswith("data: ")]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"


def test_cancel_stops_a_background_response(oa: openai.OpenAI, provider: FakeProvider) -> None:
    queued = created_response(oa, model="slow", input="hi", background=True)
    eventually(lambda: oa.responses.retrieve(queued["id"]).status == "in_progress", what="in progress")
    eventually(lambda: len(provider.streams) == 1, what="the provider stream to start")
    cancelled = oa.responses.cancel(queued["id"])
    assert cancelled.status == "cancelled"
    eventually(lambda: [s.outcome for s in provider.streams] == ["disconnected"],
               what="the provider stream to be closed")
    assert oa.responses.retrieve(queued["id"]).status == "cancelled"
    # Cancelling again changes nothing; a response that was not in the background cannot be cancelled.
    assert oa.responses.cancel(queued["id"]).status == "cancelled"
    plain = created_response(oa, model="chat-model", input="hi")
    with pytest.raises(openai.BadRequestError):
        oa.responses.cancel(plain["id"])


def test_a_background_stream_can_be_followed_while_it_runs(oa: openai.OpenAI) -> None:
    events = response_events(oa, model="words", input="count", background=True)
    assert events[0]["response"]["background"] is True and events[-1]["type"] == "response.completed"
    response_id = events[0]["response"]["id"]
    with oa.responses.with_streaming_response.retrieve(response_id, stream=True, starting_after=3) as replay:
        numbers = [json.loads(line[6:])["sequence_number"] for line in replay.iter_lines()
                   if line.startswith("data: ")]
    assert numbers == list(range(4, len(events)))


# ---- agents: their tool calls as output items --------------------------------------------------------


def test_an_agent_shows_its_tool_calls_as_items(oa: openai.OpenAI) -> None:
    data = created_response(oa, model="agent", input=_script_input(
        [calc("6 * 7"), {"name": "add", "arguments": {"a": 2, "b": 3}}]))
    kinds = [item["type"] for item in data["output"]]
    assert kinds == ["mcp_call", "mcp_call", "message"], kinds
    builtin, mcp, _ = data["output"]
    assert builtin["server_label"] == "builtin" and builtin["name"] == "calculator"
    assert json.loads(builtin["arguments"]) == {"expression": "6 * 7"} and builtin["output"] == "42"
    assert mcp["server_label"] == "files" and mcp["name"] == "add" and mcp["output"] == "5" and mcp["error"] is None
    assert builtin["status"] == mcp["status"] == "completed"
    quoted = results(output_text(data))
    assert sorted(quoted.values()) == ["42", "5"]
    # The steps are items, not reasoning text.
    assert not any(item["type"] == "reasoning" for item in data["output"])


def test_an_agent_streams_its_tool_calls_as_item_events(oa: openai.OpenAI) -> None:
    events = response_events(oa, model="agent",
                             input=_script_input([calc("1 + 1")], [{"name": "fail", "arguments": {}}]))
    kinds = [e["type"] for e in events]
    assert kinds.count("response.mcp_call.in_progress") == 2 and "response.mcp_call.failed" in kinds
    assert kinds.count("response.mcp_call.completed") == 1
    final = events[-1]["response"]["output"]
    assert [item["type"] for item in final] == ["mcp_call", "mcp_call", "message"]
    assert final[0]["output"] == "2"
    failed = final[1]
    assert failed["status"] == "failed" and failed["error"]["type"] == "mcp_tool_execution_error"
    # Every item announced in the stream is in the final response, under the same id and place.
    for event in events:
        if event["type"] == "response.output_item.done":
            assert final[event["output_index"]] == event["item"]
        if event["type"] == "response.output_item.added":
            assert final[event["output_index"]]["id"] == event["item"]["id"]


def test_the_agents_sdk_runs_against_a_helios_agent(gateway: HeliosProcess) -> None:
    # The SDK runs function_call items itself and fails on one it does not know; an agent's own calls are
    # mcp_call items, which it records as calls a server ran.
    from agents import Agent, OpenAIResponsesModel, Runner, set_tracing_disabled

    set_tracing_disabled(True)
    sdk_client = openai.AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0)
    agent = Agent(name="sdk", model=OpenAIResponsesModel("agent", sdk_client))
    result = Runner.run_sync(agent, _script_input([calc("3 * 3")]), max_turns=2)
    assert results(result.final_output) == {"call_s0_0": "9"}
    assert any(getattr(item.raw_item, "type", None) == "mcp_call" for item in result.new_items)


def test_an_agent_conversation_continues_with_its_tool_items(oa: openai.OpenAI, provider: FakeProvider) -> None:
    first = created_response(oa, model="agent", input=_script_input([calc("2 + 2")]))
    created_response(oa, model="agent", previous_response_id=first["id"], input="thanks")
    messages = provider.last_request.body["messages"]
    # The earlier server-side round reached the model again: assistant call, tool result, answer, new question.
    roles = [m["role"] for m in messages]
    assert roles[-5:] == ["user", "assistant", "tool", "assistant", "user"], roles
    assert messages[-3]["content"] == "4"


# ---- relayed to a provider that speaks the Responses API ---------------------------------------------


def test_openai_itself_is_relayed_natively_by_default() -> None:
    assert OpenAIModelSettings(name="m", backend="openai").speaks_responses
    assert not OpenAIModelSettings(name="m", backend="openai", base_url="http://127.0.0.1:1/v1").speaks_responses
    assert OpenAIModelSettings(name="m", backend="openai", base_url="http://127.0.0.1:1/v1",
                               responses_api="native").speaks_responses
    assert not OpenAIModelSettings(name="m", backend="openai", responses_api="chat").speaks_responses


def test_a_native_provider_gets_the_request_as_sent(oa: openai.OpenAI, provider: FakeProvider) -> None:
    data = created_response(oa, model="native", input="hello native", instructions="Be brief.", metadata={"k": "v"})
    sent = provider.last_request
    assert sent.path == "/v1/responses" and sent.body["model"] == "gpt-4o"
    assert sent.body["input"] == "hello native" and sent.body["metadata"] == {"k": "v"}
    assert data["model"] == "native" and output_text(data) == "echo: hello native"
    # The provider's ids are kept, so the provider can continue its own conversation.
    assert data["id"] in provider.stored_responses
    assert oa.responses.retrieve(data["id"]).output_text == "echo: hello native"
    follow = created_response(oa, model="native", input="again", previous_response_id=data["id"])
    assert provider.last_request.body["previous_response_id"] == data["id"]
    assert output_text(follow) == "echo: again"


def test_a_native_stream_is_relayed_with_our_model_name(oa: openai.OpenAI) -> None:
    events = response_events(oa, model="native-words", input="count")
    assert events[-1]["type"] == "response.completed"
    assert all(e["response"]["model"] == "native-words" for e in events if "response" in e)
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert len(deltas) == 30
    final = events[-1]["response"]
    stored = oa.responses.with_raw_response.retrieve(final["id"]).http_response.json()
    assert stored == final
    with oa.responses.with_streaming_response.retrieve(final["id"], stream=True, starting_after=2) as replay:
        replayed = [json.loads(line[6:]) for line in replay.iter_lines() if line.startswith("data: ")]
    assert replayed == events[3:]


def test_a_conversation_moves_from_a_chat_model_to_a_native_one(oa: openai.OpenAI, provider: FakeProvider) -> None:
    first = created_response(oa, model="chat-model", input="first turn")
    second = created_response(oa, model="native", input="second turn", previous_response_id=first["id"])
    sent = provider.last_request.body
    # The native provider never saw the first turn, so it gets the whole conversation instead of the id.
    assert "previous_response_id" not in sent
    assert [item.get("role") for item in sent["input"]] == ["user", "assistant", "user"]
    assert output_text(second) == "echo: second turn"


def test_native_failures(oa: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError):
        oa.responses.create(model="native-limited", input="hi")
    with pytest.raises(openai.APIStatusError) as caught:
        oa.responses.create(model="native-error-first", input="hi", stream=True)
    assert caught.value.status_code == 502
    events = response_events(oa, model="native-breaks", input="hi")
    assert events[-1]["type"] == "error"
    assert not any(e["type"] == "response.completed" for e in events)


def test_a_native_background_response_is_kept_under_our_id(oa: openai.OpenAI, provider: FakeProvider) -> None:
    queued = created_response(oa, model="native-words", input="count", background=True)
    eventually(lambda: oa.responses.retrieve(queued["id"]).status == "completed", what="completion")
    done = oa.responses.with_raw_response.retrieve(queued["id"]).http_response.json()
    assert done["id"] == queued["id"] and done["background"] is True and len(output_text(done).split()) == 30
    # The provider was asked for a stream, not a background job: ours can be followed and cancelled.
    assert "background" not in provider.last_request.body and provider.last_request.body["stream"] is True
