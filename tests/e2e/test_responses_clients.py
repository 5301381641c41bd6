"""Client frameworks on /v1/responses against a remote model the gateway translates onto chat: the OpenAI Agents
SDK in its default (Responses) mode, and LangChain's ChatOpenAI with ``use_responses_api``.

The SDK runs the tool loop itself: it sends ``/v1/responses`` requests, gets ``function_call`` items back, runs
its ``@function_tool`` and sends the conversation again with the ``function_call_output``. The imitation
provider's ``tool-script`` model, reached over Chat Completions, calls the tool with the scripted arguments and
then answers quoting the tool's result (``results: call_s0_0=...``), so the final output proves each step.
(The same SDK against the embedded engine is in ``test_responses_engine.py``, beside its one engine.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import agents
import pytest
from langchain_core.messages import BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from openai import AsyncOpenAI

from tests.e2e.agents_support import results, script
from tests.support.fake_provider import FakeProvider, remote_model
from tests.support.openapi import validate
from tests.support.server import HeliosProcess

MODEL = "scripted"
ORDER = script([{"name": "lookup_order", "arguments": {"order_id": "A-17"}}])[0]["content"]


@pytest.fixture(scope="module")
def gateway(fake_provider: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeliosProcess]:
    # Not api.openai.com, so /v1/responses is translated onto the provider's Chat Completions.
    config = {"models": [remote_model(fake_provider, MODEL, "tool-script")]}
    process = HeliosProcess(config, workdir=tmp_path_factory.mktemp("responses-clients"))
    try:
        process.start(wait_ready=True, timeout=60)
        yield process
    finally:
        process.close()


def _agent(ran: list[dict[str, Any]]) -> agents.Agent[Any]:
    @agents.function_tool
    def lookup_order(order_id: str) -> str:
        """Where an order is."""
        ran.append({"order_id": order_id})
        return f"order {order_id} shipped"

    return agents.Agent(name="orders", instructions="Answer with what the tool said.", model=MODEL,
                        tools=[lookup_order])


def _run_config(http: AsyncOpenAI) -> agents.RunConfig:
    # The SDK's default API is the Responses API; a provider of our own keeps the client out of the SDK's
    # process-wide defaults, which other modules' tests share.
    return agents.RunConfig(model_provider=agents.OpenAIProvider(openai_client=http, use_responses=True))


def _check_chat_requests(provider: FakeProvider) -> None:
    """What reached the provider: two chat calls, the second carrying the SDK's tool call and its output."""
    sent = provider.requests_for("tool-script")
    assert [r.path for r in sent] == ["/v1/chat/completions"] * 2
    first, second = (r.body for r in sent)
    assert [t["function"]["name"] for t in first["tools"]] == ["lookup_order"]
    assert first["tools"][0]["function"]["strict"] is True, "the SDK's strict schema reaches the provider"
    assert [(m["role"], m.get("content")) for m in first["messages"]] == [
        ("system", "Answer with what the tool said."), ("user", ORDER)]
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "tool"]
    [call] = second["messages"][2]["tool_calls"]
    assert call["id"] == "call_s0_0" and call["function"]["name"] == "lookup_order"
    assert json.loads(call["function"]["arguments"]) == {"order_id": "A-17"}
    assert second["messages"][3] == {"role": "tool", "tool_call_id": "call_s0_0", "content": "order A-17 shipped"}


async def test_the_agents_sdk_runs_a_function_tool_through_a_translated_model(
    gateway: HeliosProcess, provider: FakeProvider
) -> None:
    # Tracing would export spans to OpenAI; this process must reach nothing but the gateway.
    agents.set_tracing_disabled(True)
    ran: list[dict[str, Any]] = []
    async with AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0, timeout=30) as http:
        run = await agents.Runner.run(_agent(ran), ORDER, max_turns=3, run_config=_run_config(http))
        stored = [(await http.responses.with_raw_response.retrieve(r.response_id or "")).http_response.json()
                  for r in run.raw_responses]
    assert ran == [{"order_id": "A-17"}], "the SDK ran its tool once, with the scripted arguments"
    assert results(run.final_output) == {"call_s0_0": "order A-17 shipped"}
    assert [item.type for item in run.new_items] == ["tool_call_item", "tool_call_output_item",
                                                     "message_output_item"]
    _check_chat_requests(provider)
    # Two stored Responses, valid for OpenAI's schema: the call as a function_call item, then the answer.
    first, second = stored
    for data in (first, second):
        validate("Response", data)
        assert data["model"] == MODEL and data["status"] == "completed"
    assert [(i["type"], i["call_id"], i["name"]) for i in first["output"]] == [
        ("function_call", "call_s0_0", "lookup_order")]
    assert [i["type"] for i in second["output"]] == ["message"]
    assert second["output"][0]["content"][0]["text"] == run.final_output


async def test_the_agents_sdk_streams_a_run_through_a_translated_model(
    gateway: HeliosProcess, provider: FakeProvider
) -> None:
    agents.set_tracing_disabled(True)
    ran: list[dict[str, Any]] = []
    async with AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0, timeout=30) as http:
        streamed = agents.Runner.run_streamed(_agent(ran), ORDER, max_turns=3, run_config=_run_config(http))
        raw = [event.data async for event in streamed.stream_events() if event.type == "raw_response_event"]
    assert ran == [{"order_id": "A-17"}]
    assert results(streamed.final_output) == {"call_s0_0": "order A-17 shipped"}
    _check_chat_requests(provider)
    # The SDK read the gateway's Responses events: two streams, a call's argument events, then text deltas.
    kinds = [event.type for event in raw]
    assert kinds.count("response.created") == 2 and kinds.count("response.completed") == 2, kinds
    arguments = "".join(e.delta for e in raw if e.type == "response.function_call_arguments.delta")
    assert json.loads(arguments) == {"order_id": "A-17"}
    text = "".join(e.delta for e in raw if e.type == "response.output_text.delta")
    assert text == streamed.final_output


def test_langchain_on_the_responses_api_calls_a_tool_and_reads_its_result(
    gateway: HeliosProcess, provider: FakeProvider
) -> None:
    @tool
    def lookup_order(order_id: str) -> str:
        """Where an order is."""
        return f"order {order_id} shipped"

    llm = ChatOpenAI(model=MODEL, base_url=f"{gateway.base_url}/v1", api_key="unused", use_responses_api=True,
                     max_retries=0, timeout=30).bind_tools([lookup_order])
    messages: list[BaseMessage] = [HumanMessage(ORDER)]
    call = llm.invoke(messages)
    assert call.tool_calls == [{"name": "lookup_order", "args": {"order_id": "A-17"}, "id": "call_s0_0",
                                "type": "tool_call"}]
    assert call.response_metadata["model_name"] == MODEL and call.response_metadata["status"] == "completed"
    messages += [call, ToolMessage(lookup_order.invoke(call.tool_calls[0]["args"]), tool_call_id="call_s0_0")]
    answer = llm.invoke(messages)
    assert results(answer.text) == {"call_s0_0": "order A-17 shipped"} and not answer.tool_calls
    streamed = "".join(chunk.text for chunk in llm.stream(messages))
    assert streamed == answer.text
    sent = provider.requests_for("tool-script")
    assert [r.path for r in sent] == ["/v1/chat/completions"] * 3
    assert sent[1].body["messages"][1:] == sent[2].body["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_s0_0", "type": "function",
             "function": {"name": "lookup_order", "arguments": '{"order_id": "A-17"}'}}]},
        {"role": "tool", "tool_call_id": "call_s0_0", "content": "order A-17 shipped"}]
