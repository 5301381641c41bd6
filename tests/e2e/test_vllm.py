"""The embedded vLLM engine on the CPU, serving the tiny demo model through the same routes as remote models."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx2
import jsonschema
import openai
import pytest

from tests.e2e.gateway import client, eventually, stream_payloads, validated_chunks, wait_for_log
from tests.support.engine import (
    CAPPED,
    CAPPED_ALIAS,
    CAPPED_RETRY_AFTER,
    CAPPED_RUNNING,
    CAPPED_WAITING,
    EMBED,
    ENGINE_SETTINGS,
    HERMES,
    LOCAL,
    LORA_BASE,
    PLAIN,
    REMOTE,
    SMALL_CONTEXT,
    TEMPLATE_CHECK,
    THINK,
    engine_env,
    override_template,
    paced,
)
from tests.support.openapi import COMPLETION_STREAM_SCHEMA, validate
from tests.support.server import HeliosProcess, run_cli

MODEL = CAPPED
USER = [{"role": "user", "content": "Tell me about the weather in Paris."}]
# ignore_eos makes lengths exact: a random model may otherwise emit EOS at any step.
EXACT = {"ignore_eos": True}
CAPACITY = CAPPED_RUNNING + CAPPED_WAITING


@pytest.fixture(scope="module")
def gateway(engine_gateway: HeliosProcess) -> HeliosProcess:
    return engine_gateway


@pytest.fixture()
def oa(gateway: HeliosProcess) -> openai.OpenAI:
    return client(gateway.base_url, timeout=120)


def _metric(gateway: HeliosProcess, name: str, labels: str) -> float:
    return _sample(httpx2.get(f"{gateway.base_url}/metrics").text, name, labels)


def _sample(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{[^}}]*{re.escape(labels)}[^}}]*\}} (\S+)$", text, re.M)
    assert match, f"{name}{{{labels}}} not exposed"
    return float(match[1])


def test_chat_and_model_listing_side_by_side_with_a_remote_model(oa: openai.OpenAI) -> None:
    ids = {m.id for m in oa.models.list().data}
    assert {MODEL, CAPPED_ALIAS, REMOTE} <= ids
    raw = oa.chat.completions.with_raw_response.create(model=CAPPED_ALIAS, messages=USER, max_tokens=8)
    data = raw.http_response.json()
    validate("CreateChatCompletionResponse", data)
    assert data["model"] == CAPPED_ALIAS
    assert data["choices"][0]["message"]["role"] == "assistant"
    assert data["choices"][0]["finish_reason"] in ("stop", "length")
    remote = oa.chat.completions.create(model=REMOTE, messages=USER)
    assert remote.choices[0].message.content == "echo: " + USER[0]["content"]


def test_max_tokens_gives_length_with_exactly_n_tokens(oa: openai.OpenAI) -> None:
    for n in (1, 7, 30):
        reply = oa.chat.completions.create(model=MODEL, messages=USER, max_tokens=n, extra_body=EXACT)
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage is not None and reply.usage.completion_tokens == n
    reply = oa.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=5, extra_body=EXACT)
    assert reply.usage is not None and reply.usage.completion_tokens == 5


def test_prompt_tokens_match_the_templated_prompt(oa: openai.OpenAI, demo_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_model_dir))
    messages = [{"role": "system", "content": "Be terse."}, *USER]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = len(tokenizer.encode(text, add_special_tokens=False))
    reply = oa.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert reply.usage is not None and reply.usage.prompt_tokens == expected
    # The configured chat_template override is the one applied.
    check = [{"role": "user", "content": TEMPLATE_CHECK}]
    own = len(tokenizer.apply_chat_template(check, add_generation_prompt=True, tokenize=True))
    override = override_template(demo_model_dir)
    overridden = tokenizer.encode(tokenizer.apply_chat_template(
        check, chat_template=override, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    assert len(overridden) > own
    reply = oa.chat.completions.create(model=MODEL, messages=check, max_tokens=2)
    assert reply.usage is not None and reply.usage.prompt_tokens == len(overridden)
    prompt_ids = tokenizer.encode("one two three")
    completion = oa.completions.create(model=MODEL, prompt="one two three", max_tokens=2)
    assert completion.usage is not None and completion.usage.prompt_tokens == len(prompt_ids)


def test_streaming_with_usage_and_n2(oa: openai.OpenAI) -> None:
    chunks = validated_chunks(stream_payloads(oa, model=MODEL, messages=USER, n=2, max_tokens=12,
                                              stream_options={"include_usage": True}, extra_body=EXACT))
    assert chunks[-1]["choices"] == []
    usage = chunks[-1]["usage"]
    tokens: dict[int, int] = {0: 0, 1: 0}
    finishes: dict[int, str] = {}
    for chunk in chunks[:-1]:
        for choice in chunk["choices"]:
            if choice["finish_reason"]:
                assert choice["index"] not in finishes, "each choice finishes once"
                finishes[choice["index"]] = choice["finish_reason"]
            assert choice["index"] not in finishes or choice["finish_reason"], "no chunk after a choice finished"
    assert finishes == {0: "length", 1: "length"}
    assert usage["completion_tokens"] == 24 and usage["total_tokens"] == usage["prompt_tokens"] + 24
    assert tokens.keys() == {0, 1}
    plain = validated_chunks(stream_payloads(oa, model=MODEL, messages=USER, max_tokens=3))
    assert all(c["choices"] for c in plain), "no usage chunk unless asked"
    assert {c["model"] for c in plain} == {MODEL}


def test_non_streaming_n2_and_seed_reproducibility(oa: openai.OpenAI) -> None:
    params: dict[str, Any] = dict(model=MODEL, messages=USER, max_tokens=16, temperature=1.0, seed=1234, n=2)
    first = oa.chat.completions.create(**params)
    second = oa.chat.completions.create(**params)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    other = oa.chat.completions.create(**{**params, "seed": 99})
    assert [c.message.content for c in other.choices] != [c.message.content for c in first.choices]


def test_stop_strings_end_the_answer(oa: openai.OpenAI) -> None:
    base: dict[str, Any] = dict(model=MODEL, messages=USER, max_tokens=40, temperature=1.0, seed=7, extra_body=EXACT)
    free = oa.chat.completions.create(**base).choices[0].message.content or ""
    stop = free[10:13]
    assert len(stop) == 3
    stopped = oa.chat.completions.create(**base, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.message.content == free[: free.index(stop)]


def test_logprobs_and_top_logprobs(oa: openai.OpenAI) -> None:
    raw = oa.chat.completions.with_raw_response.create(model=MODEL, messages=USER, max_tokens=6, logprobs=True,
                                                       top_logprobs=3, extra_body=EXACT)
    data = raw.http_response.json()
    validate("CreateChatCompletionResponse", data)
    content = data["choices"][0]["logprobs"]["content"]
    assert len(content) == 6
    for entry in content:
        assert len(entry["top_logprobs"]) == 3
        assert entry["logprob"] <= 0
        ranked = [t["logprob"] for t in entry["top_logprobs"]]
        assert ranked == sorted(ranked, reverse=True)
    # Tokens that split a UTF-8 character decode to U+FFFD in the text but to "" as a lone token.
    assert "".join(e["token"] for e in content).replace("\ufffd", "") == data["choices"][0]["message"][
        "content"].replace("\ufffd", "")
    completion = oa.completions.create(model=MODEL, prompt="hello", max_tokens=4, logprobs=2, extra_body=EXACT)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and len(logprobs.tokens or []) == 4
    assert all(len(top) == 2 for top in logprobs.top_logprobs or [])


def test_json_schema_response_format_terminates_even_at_temperature_zero(oa: openai.OpenAI) -> None:
    # A random model prefers whitespace, which JSON allows between tokens; the demo configuration's compact
    # structured outputs (disable_any_whitespace) keep it from filling max_tokens with it.
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 24},
                                               "temperature": {"type": "integer"}},
              "required": ["capital", "temperature"], "additionalProperties": False}
    for temperature in (0.0, 1.0):
        reply = oa.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=200, seed=3, temperature=temperature,
            response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}},
        )
        assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
        jsonschema.validate(json.loads(reply.choices[0].message.content or ""), schema)
    json_object = oa.chat.completions.create(model=MODEL, messages=USER, max_tokens=200, seed=3,
                                             response_format={"type": "json_object"})
    if json_object.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(json_object.choices[0].message.content or ""), dict)
    # vLLM's own structured_outputs extra: a regex, on chat and on completions.
    regex = oa.chat.completions.create(model=MODEL, messages=USER, max_tokens=20,
                                       extra_body={"structured_outputs": {"regex": "(yes|no), [0-9]{3}"}})
    assert re.fullmatch("(yes|no), [0-9]{3}", regex.choices[0].message.content or "")
    choice = oa.completions.create(model=MODEL, prompt="pick", max_tokens=5,
                                   extra_body={"structured_outputs": {"choice": ["red", "blue"]}})
    assert choice.choices[0].text in ("red", "blue")
    with pytest.raises(openai.BadRequestError) as both:
        oa.chat.completions.create(model=MODEL, messages=USER, response_format={"type": "json_object"},
                                   extra_body={"structured_outputs": {"regex": "a"}})
    assert both.value.param == "structured_outputs"


def test_completions_prompt_forms(oa: openai.OpenAI) -> None:
    raw = oa.completions.with_raw_response.create(model=MODEL, prompt=["one", "two three"], n=2, max_tokens=3,
                                                  extra_body=EXACT)
    data = raw.http_response.json()
    validate("CreateCompletionResponse", data)
    assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
    assert data["usage"]["completion_tokens"] == 12
    by_ids = oa.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=2, extra_body=EXACT)
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == 4
    batch = oa.completions.create(model=MODEL, prompt=[[5, 6], [7, 8, 9]], max_tokens=2, extra_body=EXACT)
    assert len(batch.choices) == 2 and batch.usage is not None and batch.usage.prompt_tokens == 5
    payloads = stream_payloads(oa, "completions", model=MODEL, prompt=["a", "b"], max_tokens=4,
                               stream_options={"include_usage": True}, extra_body=EXACT)
    chunks = validated_chunks(payloads, COMPLETION_STREAM_SCHEMA)
    assert chunks[-1]["usage"]["completion_tokens"] == 8
    assert {c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]} == {0, 1}


def test_bad_requests_are_400(oa: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as long_prompt:
        oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 800}])
    assert long_prompt.value.code == "context_length_exceeded"
    assert f"maximum context length is {SMALL_CONTEXT} tokens" in long_prompt.value.message
    validate("ErrorResponse", long_prompt.value.response.json())
    with pytest.raises(openai.BadRequestError) as unsupported:
        oa.chat.completions.create(model=MODEL, messages=USER, extra_body={"best_of_luck": 3})
    assert unsupported.value.param == "best_of_luck"
    with pytest.raises(openai.BadRequestError) as auto_tools:
        oa.chat.completions.create(model=MODEL, messages=USER, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    assert auto_tools.value.param == "tool_choice"
    assert "tool_call_parser" in auto_tools.value.message
    with pytest.raises(openai.BadRequestError) as too_long:
        oa.chat.completions.create(model=MODEL, messages=USER, max_tokens=100_000)
    assert too_long.value.param == "max_tokens" and too_long.value.code == "context_length_exceeded"
    assert f"100000 > {SMALL_CONTEXT} - " in too_long.value.message
    with pytest.raises(openai.BadRequestError) as too_long:
        oa.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=SMALL_CONTEXT + 88)
    assert too_long.value.param == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError) as too_long:
        oa.completions.create(model=MODEL, prompt="hello", max_tokens=SMALL_CONTEXT)
    assert too_long.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as image:
        oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    assert image.value.param == "messages[0].content[0]"
    with pytest.raises(openai.BadRequestError) as wrong_type:
        oa.chat.completions.create(model=MODEL, messages=USER, extra_body={"top_k": "many"})
    assert wrong_type.value.param == "top_k"
    with pytest.raises(openai.BadRequestError) as xargs_shape:
        oa.chat.completions.create(model=MODEL, messages=USER, extra_body={"vllm_xargs": {"pace_ms": {"a": 1}}})
    assert xargs_shape.value.param == "vllm_xargs"
    # A custom logits processor's own validate_params refuses what it cannot take (tests.support.pacing).
    with pytest.raises(openai.BadRequestError) as xargs_value:
        oa.chat.completions.create(model=MODEL, messages=USER, extra_body=paced(5000))
    assert "pace_ms must be a number of milliseconds" in xargs_value.value.message
    with pytest.raises(openai.BadRequestError) as embeddings:
        oa.embeddings.create(model=MODEL, input="hi", encoding_format="float")
    assert embeddings.value.param == "model"


def test_vllm_xargs_reach_the_engines_custom_logits_processors(oa: openai.OpenAI) -> None:
    # The test engines load tests.support.pacing, which makes each step of a request with pace_ms last that long.
    started = time.monotonic()
    answer = oa.chat.completions.create(model=MODEL, messages=USER, max_tokens=40, extra_body={**EXACT, **paced(25)})
    assert time.monotonic() - started >= 40 * 0.025
    assert answer.usage is not None and answer.usage.completion_tokens == 40


def test_tools_are_rendered_into_the_prompt(oa: openai.OpenAI) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "description": "weather for a city",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}}}}}
    plain = oa.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
    with_tools = oa.chat.completions.create(model=MODEL, messages=USER, max_tokens=1, tools=[tool],
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert plain.usage is not None and with_tools.usage is not None
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 10


def _concurrent_streams(gateway: HeliosProcess, count: int) -> list[list[bytes] | BaseException]:
    """``count`` streams sent at once from one event loop (threads would queue behind the GIL)."""

    async def one(oa: openai.AsyncOpenAI) -> list[bytes]:
        payloads: list[bytes] = []
        async with oa.chat.completions.with_streaming_response.create(
            model=MODEL, messages=USER, max_tokens=400, stream=True, extra_body=EXACT  # type: ignore[arg-type]
        ) as response:
            async for line in response.iter_lines():
                if line.startswith("data: "):
                    payloads.append(line[6:].encode())
        return payloads

    async def burst() -> list[list[bytes] | BaseException]:
        oa = openai.AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        async with oa:
            return await asyncio.gather(*(one(oa) for _ in range(count)), return_exceptions=True)

    return asyncio.run(burst())


def test_concurrent_streams_all_complete(gateway: HeliosProcess) -> None:
    for outcome in _concurrent_streams(gateway, CAPACITY):
        assert not isinstance(outcome, BaseException), outcome
        chunks = validated_chunks(outcome)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_requests_beyond_the_queue_limit_get_429(gateway: HeliosProcess, oa: openai.OpenAI) -> None:
    # 24 streams arrive together: 8 run and 8 wait inside vLLM, the rest are refused rather than piled up.
    results = _concurrent_streams(gateway, CAPACITY + 8)
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    served = [r for r in results if not isinstance(r, BaseException)]
    assert len(limited) + len(served) == len(results), [r for r in results if isinstance(r, BaseException)]
    assert limited, "the queue limit never answered 429"
    assert len(served) >= CAPACITY
    refusal = limited[0]
    assert refusal.response.headers["retry-after"] == str(CAPPED_RETRY_AFTER)
    validate("ErrorResponse", refusal.response.json())
    for outcome in served:
        assert validated_chunks(outcome)[-1]["choices"][0]["finish_reason"] == "length"
    # After the burst the engine accepts work again.
    assert oa.chat.completions.create(model=MODEL, messages=USER, max_tokens=2).choices


def test_client_disconnect_aborts_the_engine_request(gateway: HeliosProcess) -> None:
    async def disconnect_mid_stream() -> float:
        body = {"model": MODEL, "messages": USER, "max_tokens": 480, "n": 16, "stream": True, **EXACT, **paced(10)}
        async with (
            httpx2.AsyncClient(base_url=gateway.base_url, timeout=60) as http,
            http.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            lines = response.aiter_lines()
            assert (await anext(lines)).startswith("data: ")
            scrape = await http.get("/metrics")
            # Leaving the block closes the connection mid-stream.
        return _sample(scrape.text, "helios_engine_requests", f'model="{MODEL}"')

    # 480 steps of at least 10 ms keep the engine busy for seconds, so the disconnect lands mid-generation.
    assert asyncio.run(disconnect_mid_stream()) >= 1
    eventually(lambda: _metric(gateway, "helios_engine_requests", f'model="{MODEL}"') == 0, 10,
               "the engine request to be aborted")
    eventually(lambda: _metric(gateway, "vllm:num_requests_running", f'model_name="{MODEL}"') == 0, 10,
               "vLLM's own running count to drop")
    eventually(lambda: _metric(gateway, "helios_requests_in_flight", f'model="{MODEL}"') == 0, 10,
               "the request to leave the in-flight gauge")
    wait_for_log(gateway, f'"model": "{MODEL}"', '"client_disconnected": true')


def test_vllm_metrics_are_exposed_unchanged(gateway: HeliosProcess) -> None:
    text = httpx2.get(f"{gateway.base_url}/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:generation_tokens_total"):
        assert re.search(rf'^{re.escape(name)}\{{[^}}]*model_name="{MODEL}"', text, re.M), name
    # Prometheus asks for OpenMetrics; the names must survive that format too.
    openmetrics = httpx2.get(f"{gateway.base_url}/metrics",
                             headers={"Accept": "application/openmetrics-text;version=1.0.0"})
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert re.search(rf'^vllm:num_requests_running\{{[^}}]*model_name="{MODEL}"', openmetrics.text, re.M)
    assert openmetrics.text.rstrip().endswith("# EOF")
    assert _metric(gateway, "helios_backend_ready", f'model="{MODEL}"') == 1


def test_every_engines_vllm_metrics_are_exposed(engine_gateway: HeliosProcess) -> None:
    # vLLM's own logger drops the vllm:* metrics already registered when an engine starts: with several
    # engines in one process, only the last one loaded used to be on /metrics.
    text = httpx2.get(f"{engine_gateway.base_url}/metrics").text
    for name in ("vllm:num_requests_running", "vllm:prompt_tokens_total", "vllm:kv_cache_usage_perc"):
        served = set(re.findall(rf'^{re.escape(name)}\{{[^}}]*model_name="([^"]+)"', text, re.M))
        assert served == {PLAIN, HERMES, THINK, EMBED, CAPPED, LORA_BASE, LOCAL}, (name, served)
    # One family per name, as Prometheus requires: the engines' samples merged under one HELP and TYPE.
    family = "vllm:num_requests_running"
    assert len(re.findall(rf"^# (?:HELP|TYPE) {re.escape(family)} ", text, re.M)) == 2


def test_engine_refuses_several_workers_and_reports_load_failures(tmp_path: Path) -> None:
    model = {"name": "tiny", "model": "/nonexistent/model", **ENGINE_SETTINGS}
    workers = run_cli([], {"server": {"workers": 2}, "models": [model]}, timeout=30)
    assert workers.returncode == 2
    assert "server.workers: must be 1 when an embedded vllm model is configured" in workers.stderr
    started = time.monotonic()
    failed = run_cli([], {"models": [model]}, env=engine_env(tmp_path), timeout=240)
    assert failed.returncode == 3, failed.stderr[-2000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("helios-serve: start-up failed: model 'tiny' failed to start:")
    assert time.monotonic() - started < 240
