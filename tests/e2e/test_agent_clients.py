"""Third-party agent frameworks as clients of an agent model: LangChain and the OpenAI Agents SDK.

They see an ordinary chat model; the gateway runs the tool loop behind it. The scripted provider model makes
the agent call its built-in calculator, then answers quoting the result, so each framework's answer proves the
loop ran (``results: call_s0_0=42``).
"""

from __future__ import annotations

from collections.abc import Iterator

import agents
import pytest
from langchain_openai import ChatOpenAI
from openai import AsyncOpenAI

from tests.e2e.agents_support import calc, results, script
from tests.support.fake_provider import FakeProvider, remote_model
from tests.support.server import HeliosProcess

AGENT = "client-helper"
SIX_BY_SEVEN = script([calc("6 * 7")])
QUOTED = {"call_s0_0": "42"}


@pytest.fixture(scope="module")
def gateway(fake_provider: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeliosProcess]:
    config = {
        "models": [remote_model(fake_provider, "scripted", "tool-script")],
        "agents": [{"name": AGENT, "model": "scripted", "tools": ["calculator"], "system_prompt": "Use the tools."}],
    }
    process = HeliosProcess(config, workdir=tmp_path_factory.mktemp("agent-clients"))
    try:
        process.start(wait_ready=True, timeout=60)
        yield process
    finally:
        process.close()


def test_langchain_chat_openai_invokes_and_streams_an_agent(gateway: HeliosProcess, provider: FakeProvider) -> None:
    llm = ChatOpenAI(model=AGENT, base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0, timeout=30)
    answer = llm.invoke(SIX_BY_SEVEN)
    assert isinstance(answer.content, str)
    assert results(answer.content) == QUOTED
    assert not answer.tool_calls, "the gateway ran the calculator; nothing is handed back to the client"
    assert answer.response_metadata["model_name"] == AGENT
    assert answer.response_metadata["finish_reason"] == "stop"
    # The gateway, not LangChain, called the model twice: once for the call, once for the answer.
    assert len(provider.requests_for("tool-script")) == 2
    streamed = "".join(str(chunk.content) for chunk in llm.stream(SIX_BY_SEVEN))
    assert streamed == answer.content


async def test_openai_agents_sdk_runs_an_agent_model(gateway: HeliosProcess, provider: FakeProvider) -> None:
    # Tracing would export spans to OpenAI; this process must reach nothing but the gateway.
    agents.set_tracing_disabled(True)
    async with AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0,
                           timeout=30) as client:
        agent = agents.Agent(name="sdk-client", instructions="Answer with what the tools said.",
                             model=agents.OpenAIChatCompletionsModel(model=AGENT, openai_client=client))
        run = await agents.Runner.run(agent, SIX_BY_SEVEN[0]["content"])
    assert results(run.final_output) == QUOTED
    # The SDK's instructions reach the model after the agent's own system prompt.
    first = provider.requests_for("tool-script")[0].body
    assert [(m["role"], m["content"]) for m in first["messages"]] == [
        ("system", "Use the tools."), ("system", "Answer with what the tools said."),
        ("user", SIX_BY_SEVEN[0]["content"])]
    assert [t["function"]["name"] for t in first["tools"]] == ["calculator"]
