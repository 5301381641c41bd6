"""The Responses API's tool types onto chat tools and back (app.responses.tools), in-process."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.errors import APIError
from app.responses.events import ChatEvents
from app.responses.protocol import ResponsesRequest
from app.responses.tools import ToolSet
from app.responses.translate import ResponseShape, chat_body, input_items, response_from_chat
from tests.support.openapi import validate

SHELL = {"type": "function", "name": "exec_command", "description": "Run a command.", "strict": False,
         "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}}
AGENTS = {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents.", "tools": [
    {"type": "function", "name": "close_agent", "description": "Close one.",
     "parameters": {"type": "object", "properties": {"target": {"type": "string"}}}},
    {"type": "custom", "name": "note", "description": "A free note."}]}
PATCH = {"type": "custom", "name": "apply_patch", "description": "Apply a patch.",
         "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}}
DIGITS = {"type": "custom", "name": "digits", "format": {"type": "grammar", "syntax": "regex", "definition": "[0-9]+"}}
HOSTED = [{"type": "web_search", "external_web_access": False}, {"type": "file_search", "vector_store_ids": ["v"]},
          {"type": "local_shell"}, {"type": "mcp", "server_label": "x", "server_url": "http://127.0.0.1:1"}]


def _names(tools: ToolSet) -> list[str]:
    return [tool["function"]["name"] for tool in tools.tools]


def test_namespaces_are_flattened_custom_tools_take_one_string_and_hosted_tools_are_dropped() -> None:
    tools = ToolSet([SHELL, AGENTS, HOSTED[0], PATCH, DIGITS, *HOSTED[1:]], "auto", "drop")
    assert _names(tools) == ["exec_command", "multi_agent_v1__close_agent", "multi_agent_v1__note", "apply_patch",
                             "digits"]
    assert tools.dropped == ["web_search", "file_search", "local_shell", "mcp"]
    assert tools.choice == "auto"
    close, note, patch, digits = (tool["function"] for tool in tools.tools[1:])
    assert close["description"] == "Sub-agents.\nClose one."
    assert note["parameters"] == {"type": "object", "properties": {"input": {
        "type": "string", "description": "The tool's whole input, as free-form text."}}, "required": ["input"],
        "additionalProperties": False}
    # A Lark grammar is told to the model; a regex is also the schema's pattern, which a constrained call keeps.
    assert "start: /.+/" in patch["description"] and "pattern" not in patch["parameters"]["properties"]["input"]
    assert digits["parameters"]["properties"]["input"]["pattern"] == "[0-9]+"


def test_reject_keeps_the_strict_behaviour() -> None:
    with pytest.raises(APIError) as caught:
        ToolSet([SHELL, *HOSTED], None, "reject")
    assert (caught.value.status, caught.value.param, caught.value.code) == (400, "tools[1].type",
                                                                             "unsupported_tool_type")


@pytest.mark.parametrize(("choice", "param"), [
    ({"type": "web_search"}, "tool_choice"),
    ({"type": "file_search"}, "tool_choice"),
    ({"type": "function", "name": "nope"}, "tool_choice"),
    ({"type": "custom", "name": "exec_command"}, "tool_choice"),
    ({"type": "function"}, "tool_choice"),
    ({"type": "allowed_tools", "mode": "auto", "tools": [{"type": "web_search"}]}, "tool_choice.tools[0]"),
])
def test_a_choice_of_a_tool_the_model_cannot_run_is_a_400_naming_it(choice: dict[str, Any], param: str) -> None:
    with pytest.raises(APIError) as caught:
        ToolSet([SHELL, AGENTS, HOSTED[0]], choice, "drop")
    assert (caught.value.status, caught.value.param) == (400, param)


@pytest.mark.parametrize(("choice", "chat"), [
    ({"type": "function", "name": "close_agent", "namespace": "multi_agent_v1"},
     {"type": "function", "function": {"name": "multi_agent_v1__close_agent"}}),
    ({"type": "custom", "name": "apply_patch"}, {"type": "function", "function": {"name": "apply_patch"}}),
    ({"type": "function", "name": "exec_command"}, {"type": "function", "function": {"name": "exec_command"}}),
])
def test_forced_choices_name_the_flat_function(choice: dict[str, Any], chat: dict[str, Any]) -> None:
    assert ToolSet([SHELL, AGENTS, PATCH], choice, "drop").choice == chat


def test_allowed_tools_narrow_what_the_model_sees() -> None:
    tools = ToolSet([SHELL, AGENTS, PATCH], {"type": "allowed_tools", "mode": "required", "tools": [
        {"type": "namespace", "name": "multi_agent_v1"}, {"type": "custom", "name": "apply_patch"}]}, "drop")
    assert tools.choice == "required"
    assert _names(tools) == ["multi_agent_v1__close_agent", "multi_agent_v1__note", "apply_patch"]


def test_names_too_long_or_twice_are_400s() -> None:
    long = {"type": "namespace", "name": "n" * 40, "description": "d",
            "tools": [{"type": "function", "name": "f" * 30}]}
    with pytest.raises(APIError) as caught:
        ToolSet([long], None, "drop")
    assert caught.value.param == "tools[0].tools[0].name"
    with pytest.raises(APIError) as caught:
        ToolSet([SHELL, SHELL], None, "drop")
    assert caught.value.param == "tools[1].name"


def _request(**fields: Any) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", "input": "hi", **fields})


def test_every_tool_hosted_with_required_is_a_400_and_with_auto_no_choice() -> None:
    request = _request(tools=[HOSTED[0]], tool_choice="required")
    with pytest.raises(APIError) as caught:
        ToolSet(request.tools, request.tool_choice, "drop")
    assert caught.value.param == "tool_choice"
    request = _request(tools=[HOSTED[0]], tool_choice="auto")
    body = chat_body(request, ToolSet(request.tools, request.tool_choice, "drop"), [], input_items(request),
                     stream=False)
    assert "tools" not in body and "tool_choice" not in body


def test_earlier_namespaced_and_custom_calls_become_chat_tool_calls_and_tool_messages() -> None:
    request = _request(tools=[AGENTS, PATCH], input=[
        {"role": "user", "content": "go"},
        {"type": "function_call", "call_id": "c1", "namespace": "multi_agent_v1", "name": "close_agent",
         "arguments": '{"target": "a"}'},
        {"type": "custom_tool_call", "call_id": "c2", "name": "apply_patch", "input": "*** Begin Patch"},
        {"type": "function_call_output", "call_id": "c1", "output": "closed"},
        {"type": "custom_tool_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "done"}]},
    ])
    body = chat_body(request, ToolSet(request.tools, None, "drop"), [], input_items(request), stream=False)
    user, assistant, first, second = body["messages"]
    assert user == {"role": "user", "content": "go"}
    assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in assistant["tool_calls"]] == [("c1", "multi_agent_v1__close_agent", {"target": "a"}),
                                                  ("c2", "apply_patch", {"input": "*** Begin Patch"})]
    assert first == {"role": "tool", "tool_call_id": "c1", "content": "closed"}
    assert second == {"role": "tool", "tool_call_id": "c2", "content": "done"}


def _chat_answer(calls: list[tuple[str, str, str]]) -> bytes:
    return json.dumps({"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            for call_id, name, arguments in calls]}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}).encode()


CALLS = [("c1", "multi_agent_v1__close_agent", '{"target": "a"}'), ("c2", "apply_patch", '{"input": "P1\\nP2"}'),
         ("c3", "multi_agent_v1__note", "not json")]


def _check_items(output: list[dict[str, Any]]) -> None:
    first, second, third = output
    assert (first["type"], first["namespace"], first["name"], first["arguments"]) == (
        "function_call", "multi_agent_v1", "close_agent", '{"target": "a"}')
    assert (second["type"], second["name"], second["input"], "namespace" in second) == (
        "custom_tool_call", "apply_patch", "P1\nP2", False)
    # A model that wrote no JSON object still gives the custom tool what it wrote.
    assert (third["type"], third["namespace"], third["name"], third["input"]) == (
        "custom_tool_call", "multi_agent_v1", "note", "not json")
    assert [item["call_id"] for item in output] == ["c1", "c2", "c3"]


def test_a_whole_answer_names_calls_as_the_client_knows_them() -> None:
    request = _request(tools=[AGENTS, PATCH])
    tools = ToolSet(request.tools, None, "drop")
    response = response_from_chat(ResponseShape(request, "m"), tools, _chat_answer(CALLS), None)
    validate("Response", response)
    _check_items(response["output"])


def _events(frames: list[bytes]) -> list[dict[str, Any]]:
    return [json.loads(frame.split(b"\ndata: ", 1)[1]) for frame in frames]


def test_a_stream_names_calls_the_same_and_sends_custom_input_whole() -> None:
    request = _request(tools=[AGENTS, PATCH])
    events = ChatEvents(ResponseShape(request, "m"), ToolSet(request.tools, None, "drop"))
    frames = events.start()
    for index, (call_id, name, arguments) in enumerate(CALLS):
        for piece, first in ((arguments[:3], True), (arguments[3:], False)):
            call: dict[str, Any] = {"index": index, "function": {"arguments": piece}}
            if first:
                call.update(id=call_id, type="function")
                call["function"]["name"] = name
            frames += events.feed([json.dumps({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]}).encode()])
    frames += events.feed([b'{"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}'])
    closing, body = events.finish()
    parsed = _events(frames + closing)
    for event in parsed:
        validate("ResponseStreamEvent", event)
    _check_items(body["output"])
    kinds = [event["type"] for event in parsed]
    assert kinds.count("response.function_call_arguments.delta") == 2, "only the function call streams arguments"
    [done] = [e for e in parsed if e["type"] == "response.custom_tool_call_input.done" and e["output_index"] == 1]
    assert done["input"] == "P1\nP2"
    added = [e["item"] for e in parsed if e["type"] == "response.output_item.added"]
    assert [(item["type"], item.get("namespace"), item["name"]) for item in added] == [
        ("function_call", "multi_agent_v1", "close_agent"), ("custom_tool_call", None, "apply_patch"),
        ("custom_tool_call", "multi_agent_v1", "note")]


def test_a_message_cut_by_the_token_limit_is_incomplete_whole_and_streamed() -> None:
    request = _request()
    tools = ToolSet(None, None, "drop")
    answer = json.dumps({"choices": [{"index": 0, "finish_reason": "length", "message": {
        "role": "assistant", "content": "cut"}}]}).encode()
    whole = response_from_chat(ResponseShape(request, "m"), tools, answer, None)
    assert (whole["status"], whole["output"][0]["status"]) == ("incomplete", "incomplete")
    events = ChatEvents(ResponseShape(request, "m"), tools)
    events.start()
    events.feed([b'{"choices": [{"index": 0, "delta": {"content": "cut"}, "finish_reason": "length"}]}'])
    closing, body = events.finish()
    assert (body["status"], body["output"][0]["status"]) == ("incomplete", "incomplete")
    done = [e for e in _events(closing) if e["type"] == "response.output_item.done"]
    assert done[0]["item"]["status"] == "incomplete"


def test_a_clients_bookkeeping_is_not_passed_to_the_model() -> None:
    request = _request(client_metadata={"thread_id": "t"}, top_k=3)
    body = chat_body(request, ToolSet(None, None, "drop"), [], input_items(request), stream=False)
    assert "client_metadata" not in body and body["top_k"] == 3


@pytest.mark.parametrize("kind", ["web\nsearch", "X-Evil: 1", "", "a" * 65])
def test_a_type_that_names_no_tool_is_refused_not_echoed(kind: str) -> None:
    with pytest.raises(APIError) as caught:
        ToolSet([SHELL, {"type": kind}], None, "drop")
    assert (caught.value.param, caught.value.code) == ("tools[1].type", "unsupported_tool_type")
