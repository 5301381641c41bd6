"""Agents over a remote model: the server-side tool loop, driven by a scripted imitation provider.

The provider's ``tool-script`` model answers with the tool calls a test puts in the user message, round after
round, then with text quoting every tool result it received (``results: <call id>=<content> | ...``), so the
tests see exactly what reached the model, in which order, under which call ids.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest

from tests.e2e.agents_support import calc, results, script
from tests.e2e.gateway import client, stream_payloads, validated_chunks
from tests.support.fake_provider import FakeProvider, remote_model
from tests.support.openapi import validate
from tests.support.server import HeliosProcess

AGENT = "helper"
STEP_LIMIT = 2


@pytest.fixture(scope="module")
def gateway(fake_provider: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeliosProcess]:
    scratch = tmp_path_factory.mktemp("agents")
    prompt = scratch / "prompt.txt"
    prompt.write_text("You are a careful assistant. Use the tools.")
    common = {"model": "scripted", "tools": ["calculator", "current_time", "http_fetch"],
              "http_allow_hosts": ["127.0.0.1"], "tool_timeout": 3}
    config = {
        "models": [remote_model(fake_provider, "scripted", "tool-script"),
                   remote_model(fake_provider, "limited", "error-429"),
                   remote_model(fake_provider, "plain", "gpt-4o")],
        "agents": [
            {**common, "name": AGENT, "aliases": ["helper-alias"], "system_prompt_file": str(prompt),
             "max_tool_output_bytes": 300},
            {**common, "name": "short", "max_steps": STEP_LIMIT, "system_prompt": "Be brief."},
            {**common, "name": "serial", "parallel_tool_calls": False},
            {"name": "broken", "model": "limited", "tools": ["calculator"]},
        ],
    }
    process = HeliosProcess(config, workdir=scratch)
    try:
        process.start(wait_ready=True, timeout=60)
        yield process
    finally:
        process.close()


@pytest.fixture()
def oa(gateway: HeliosProcess, provider: FakeProvider) -> openai.OpenAI:
    return client(gateway.base_url, timeout=60)


def _steps(text: str) -> str:
    """Step lines without their timings, which differ between runs."""
    return re.sub(r" in \d+ ms", "", text)


def test_agent_runs_tools_and_the_results_reach_the_model(oa: openai.OpenAI, provider: FakeProvider) -> None:
    raw = oa.chat.completions.with_raw_response.create(
        model=AGENT, messages=script([calc("2 + 3 * 4"), calc("(1.5 + 2.5) / 8"),
                                      {"name": "current_time", "arguments": {"timezone": "Europe/Paris"}}]))
    data = raw.http_response.json()
    validate("CreateChatCompletionResponse", data)
    assert data["model"] == AGENT
    choice = data["choices"][0]
    assert choice["finish_reason"] == "stop"
    quoted = results(choice["message"]["content"])
    assert quoted["call_s0_0"] == "14" and quoted["call_s0_1"] == "0.5"
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+0[12]:00 ", quoted["call_s0_2"])
    steps = choice["message"]["reasoning_content"]
    assert '[step 1] → calculator({"expression": "2 + 3 * 4"})' in steps
    assert re.search(r"\[step 1\] ← calculator in \d+ ms: 14\n", steps)
    # What the model got on its second call: system prompt first, then the conversation, the assistant's
    # calls and one tool result per call id, in order.
    second = provider.requests_for("tool-script")[-1].body
    roles = [m["role"] for m in second["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "tool", "tool"]
    assert second["messages"][0]["content"] == "You are a careful assistant. Use the tools."
    assert [m["tool_call_id"] for m in second["messages"][3:]] == ["call_s0_0", "call_s0_1", "call_s0_2"]
    assert [t["function"]["name"] for t in second["tools"]] == ["calculator", "current_time", "http_fetch"]
    # Usage is the sum over both model calls.
    calls = provider.requests_for("tool-script")[-2:]
    assert len(calls) == 2
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"]
    assert data["usage"]["completion_tokens"] > 0


def test_streaming_shows_the_steps_and_streams_only_the_answer_as_content(oa: openai.OpenAI) -> None:
    messages = script([calc("6 * 7")], [calc("2 ** 10")])
    whole = oa.chat.completions.create(model=AGENT, messages=messages)
    chunks = validated_chunks(stream_payloads(oa, model=AGENT, messages=messages,
                                              stream_options={"include_usage": True}))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    content = "".join(d.get("content") or "" for d in deltas)
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    assert content == whole.choices[0].message.content
    assert results(content) == {"call_s0_0": "42", "call_s1_0": "1024"}
    whole_steps = whole.choices[0].message.model_extra["reasoning_content"]  # type: ignore[index]
    assert _steps(reasoning) == _steps(whole_steps)
    assert "[step 2] → calculator" in reasoning
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == ["stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    assert len({c["id"] for c in chunks}) == 1 and {c["model"] for c in chunks} == {AGENT}
    # The official client's stream helper parses it.
    with oa.chat.completions.stream(model=AGENT, messages=messages) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert final.choices[0].message.content == content


def test_the_step_limit_forces_an_answer(oa: openai.OpenAI, provider: FakeProvider) -> None:
    messages = script(*[[calc(f"{i} + 1")] for i in range(5)])
    reply = oa.chat.completions.create(model="short", messages=messages)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert results(choice.message.content) == {"call_s0_0": "1", "call_s1_0": "2"}
    assert f"[step limit] {STEP_LIMIT} rounds" in choice.message.model_extra["reasoning_content"]  # type: ignore[index]
    last = provider.requests_for("tool-script")[-1].body
    assert last["tool_choice"] == "none"
    assert len(provider.requests_for("tool-script")) == STEP_LIMIT + 1
    chunks = validated_chunks(stream_payloads(oa, model="short", messages=messages))
    text = "".join(c["choices"][0]["delta"].get("reasoning_content", "") for c in chunks if c["choices"])
    assert f"[step limit] {STEP_LIMIT} rounds" in text


def test_tool_failures_become_results_the_model_can_read(oa: openai.OpenAI, gateway: HeliosProcess) -> None:
    reply = oa.chat.completions.create(model=AGENT, messages=script([
        {"name": "calculator", "raw": '{"expression": "1 +'},
        {"name": "calculator", "arguments": {"formula": "1 + 1"}},
        {"name": "no_such_tool", "arguments": {}},
        calc("1 / 0"),
        {"name": "current_time", "arguments": {"timezone": "Mars/Olympus"}},
    ]))
    quoted = results(reply.choices[0].message.content)
    assert quoted["call_s0_0"].startswith("error: the arguments are not valid JSON")
    assert quoted["call_s0_1"].startswith("error: invalid arguments")
    assert quoted["call_s0_2"].startswith("error: there is no tool named 'no_such_tool'")
    assert quoted["call_s0_3"] == "error: division by zero"
    assert "unknown timezone" in quoted["call_s0_4"]
    metrics = httpx2.get(f"{gateway.base_url}/metrics").text
    for tool, outcome in (("calculator", "invalid_arguments"), ("_unknown", "unknown_tool"),
                          ("calculator", "error"), ("current_time", "error")):
        assert re.search(rf'helios_agent_tool_calls_total\{{agent="{AGENT}",outcome="{outcome}",tool="{tool}"\}} '
                         r"[1-9]", metrics), (tool, outcome)


def test_long_tool_output_is_cut_and_the_model_told(oa: openai.OpenAI, fake_provider: FakeProvider) -> None:
    reply = oa.chat.completions.create(model=AGENT, messages=script([calc("7 ** 200")]))
    # 7**200 has 170 digits, all exact, under the 300-byte cap: it arrives whole.
    assert results(reply.choices[0].message.content)["call_s0_0"] == str(7**200)
    big = f"{fake_provider.base_url.removesuffix('/v1')}/v1/models"
    reply = oa.chat.completions.create(model=AGENT, messages=script([{"name": "http_fetch",
                                                                        "arguments": {"url": big}}]))
    fetched = results(reply.choices[0].message.content)["call_s0_0"]
    assert fetched.startswith("HTTP 200")
    assert "[output cut:" in fetched and len(fetched.split(" [output cut")[0].encode()) <= 300


def test_http_fetch_refuses_unlisted_hosts_and_redirects_to_them(oa: openai.OpenAI,
                                                                fake_provider: FakeProvider) -> None:
    root = fake_provider.base_url.removesuffix("/v1")
    port = root.rsplit(":", 1)[1]
    other = f"http://localhost:{port}/pages/sleep/0"
    reply = oa.chat.completions.create(model=AGENT, messages=script([
        {"name": "http_fetch", "arguments": {"url": f"{root}/pages/sleep/0"}},
        {"name": "http_fetch", "arguments": {"url": other}},
        {"name": "http_fetch", "arguments": {"url": f"{root}/pages/redirect?to={other}"}},
        {"name": "http_fetch", "arguments": {"url": f"{root}/pages/redirect?to={root}/pages/sleep/0"}},
        {"name": "http_fetch", "arguments": {"url": "file:///etc/passwd"}},
    ]))
    quoted = results(reply.choices[0].message.content)
    assert quoted["call_s0_0"] == "HTTP 200 slept 0 s"
    assert quoted["call_s0_1"].startswith("error: host 'localhost' is not allowed")
    assert quoted["call_s0_2"].startswith("error: host 'localhost' is not allowed")
    assert quoted["call_s0_3"] == "HTTP 200 slept 0 s"
    assert quoted["call_s0_4"].startswith("error: only http and https")


def test_slow_tools_time_out_and_run_concurrently(oa: openai.OpenAI, fake_provider: FakeProvider) -> None:
    root = fake_provider.base_url.removesuffix("/v1")
    fetch = {"name": "http_fetch", "arguments": {"url": f"{root}/pages/sleep/1"}}
    started = time.monotonic()
    reply = oa.chat.completions.create(model=AGENT, messages=script([fetch, fetch, fetch]))
    parallel = time.monotonic() - started
    assert set(results(reply.choices[0].message.content).values()) == {"HTTP 200 slept 1 s"}
    started = time.monotonic()
    oa.chat.completions.create(model="serial", messages=script([fetch, fetch, fetch]))
    serial = time.monotonic() - started
    assert parallel < 2.5 < serial, (parallel, serial)
    slow = {"name": "http_fetch", "arguments": {"url": f"{root}/pages/sleep/10"}}
    reply = oa.chat.completions.create(model=AGENT, messages=script([slow]))
    assert results(reply.choices[0].message.content)["call_s0_0"] == "error: the tool took longer than 3 s"


def test_costly_calculator_calls_hold_up_no_other_request(gateway: HeliosProcess) -> None:
    """The attack: four calculator calls of a 995-character sum of fractional powers in one round (seconds of
    CPU each before their cost was bounded). Meanwhile another client's /health and a plain remote request
    answer at once."""
    costly = calc("+".join(["9**.9"] * 166))

    async def attack() -> tuple[Any, list[float]]:
        async with httpx2.AsyncClient(base_url=gateway.base_url, timeout=30) as http:
            # Connections (client to gateway, gateway to provider) opened before the clock starts.
            await http.post("/v1/chat/completions", json={"model": "plain", "messages": [
                {"role": "user", "content": "hi"}]})
            agent = asyncio.create_task(http.post("/v1/chat/completions", json={
                "model": AGENT, "messages": script([costly] * 4, [costly] * 4)}))
            waits: list[float] = []
            while not agent.done() or len(waits) < 4:
                started = time.monotonic()
                health = await http.get("/health")
                plain = await http.post("/v1/chat/completions", json={
                    "model": "plain", "messages": [{"role": "user", "content": "hi"}]})
                assert health.status_code == 200 and plain.status_code == 200, plain.text
                waits.append((time.monotonic() - started) / 2)
            return await agent, waits

    reply, waits = asyncio.run(attack())
    assert reply.status_code == 200, reply.text
    quoted = results(reply.json()["choices"][0]["message"]["content"])
    assert len(quoted) == 8 and len(set(quoted.values())) == 1 and quoted["call_s0_0"].startswith("1199.29589"), quoted
    # The 100 ms, with room for a CI machine that loads engines meanwhile; unbounded, the waits were the
    # calculator's whole run, seconds.
    assert max(waits) < 0.3, waits


def test_fifty_concurrent_requests_are_not_serialised(gateway: HeliosProcess, fake_provider: FakeProvider) -> None:
    root = fake_provider.base_url.removesuffix("/v1")
    messages = script([{"name": "http_fetch", "arguments": {"url": f"{root}/pages/sleep/1"}}])

    async def burst() -> tuple[float, list[Any]]:
        async with openai.AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key="x", max_retries=0,
                                      timeout=60) as aoa:
            started = time.monotonic()
            replies = await asyncio.gather(*(aoa.chat.completions.create(model=AGENT, messages=messages)
                                             for _ in range(50)))
            return time.monotonic() - started, replies

    elapsed, replies = asyncio.run(burst())
    assert all(results(r.choices[0].message.content)["call_s0_0"] == "HTTP 200 slept 1 s" for r in replies)
    assert elapsed < 10, elapsed


def test_client_tools_are_handed_back_and_the_loop_resumes(oa: openai.OpenAI) -> None:
    lookup = {"type": "function", "function": {"name": "lookup_order", "parameters": {
        "type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}}}
    messages = script([calc("10 - 3")], [{"name": "lookup_order", "arguments": {"id": "A7"}}])
    first = oa.chat.completions.create(model=AGENT, messages=messages, tools=[lookup])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("call_s1_0", "lookup_order", {"id": "A7"})]
    streamed = validated_chunks(stream_payloads(oa, model=AGENT, messages=messages, tools=[lookup]))
    passed = [d for c in streamed if c["choices"] for d in c["choices"][0]["delta"].get("tool_calls", [])]
    assert passed[0]["index"] == 0 and passed[0]["id"] == "call_s1_0"
    assert "".join(d["function"].get("arguments", "") for d in passed) == '{"id": "A7"}'
    assert [c["choices"][0]["finish_reason"] for c in streamed if c["choices"] and
            c["choices"][0]["finish_reason"]] == ["tool_calls"]
    # The client answers its own call; the loop goes on from there.
    resumed = oa.chat.completions.create(model=AGENT, tools=[lookup], messages=[
        *messages, choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": "call_s1_0", "content": "shipped"}])
    assert results(resumed.choices[0].message.content) == {"call_s1_0": "shipped"}


def test_request_mistakes_and_model_errors(oa: openai.OpenAI) -> None:
    shadow = {"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as shadowed:
        oa.chat.completions.create(model=AGENT, messages=script(), tools=[shadow])
    assert shadowed.value.param == "tools[0].function.name"
    with pytest.raises(openai.BadRequestError) as several:
        oa.chat.completions.create(model=AGENT, messages=script(), n=2)
    assert several.value.param == "n"
    with pytest.raises(openai.BadRequestError) as completions:
        oa.completions.create(model=AGENT, prompt="hi")
    assert completions.value.param == "model"
    with pytest.raises(openai.RateLimitError) as limited:
        oa.chat.completions.create(model="broken", messages=script([calc("1")]))
    validate("ErrorResponse", limited.value.response.json())
    with pytest.raises(openai.RateLimitError):
        oa.chat.completions.create(model="broken", messages=script([calc("1")]), stream=True)


def test_agents_are_listed_and_observed(oa: openai.OpenAI, gateway: HeliosProcess) -> None:
    cards = {m.id: m for m in oa.models.list().data}
    assert "agent" in cards[AGENT].owned_by and "agent" in cards["helper-alias"].owned_by
    assert "agent" not in cards["scripted"].owned_by
    oa.chat.completions.create(model=AGENT, messages=script([calc("1 + 1")]))
    metrics = httpx2.get(f"{gateway.base_url}/metrics").text
    assert re.search(rf'helios_agent_steps_count\{{agent="{AGENT}"\}} [1-9]', metrics)
    assert re.search(rf'helios_agent_tool_duration_seconds_count\{{agent="{AGENT}",tool="calculator"\}} [1-9]',
                     metrics)
    assert re.search(r'helios_agent_step_limit_reached_total\{agent="short"\} [1-9]', metrics)
    log = [json.loads(line) for line in gateway.logs().splitlines() if line.startswith("{")]
    access = [e for e in log if e.get("logger") == "helios.access" and e.get("model") == AGENT]
    assert access and access[-1]["steps"] == 2 and access[-1]["tool_calls"] == 1
    tools = [e for e in log if e.get("message") == "tool call" and e.get("agent") == AGENT]
    assert tools and {"tool", "outcome", "duration_ms", "request_id"} <= tools[-1].keys()
    assert not any("arguments" in e for e in tools), "arguments are logged at debug only"
