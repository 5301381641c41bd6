"""The embedded engine dying under load: vLLM's EngineCore process is killed while streams and plain requests
run. Every request in flight ends with an OpenAI-shaped 5xx (or, for a stream, an ``error`` event), /ready and
/health turn 503 naming the engine, new requests to its model are refused at once, and other models still serve."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.e2e.gateway import eventually
from tests.support.engine import ENGINE_SETTINGS, engine_env, paced
from tests.support.fake_provider import FakeProvider, remote_model
from tests.support.openapi import validate
from tests.support.server import HeliosProcess

USER = [{"role": "user", "content": "hi"}]
#: still running (2,000 steps of at least 5 ms) when the engine is killed a second after they start
LONG = {"max_tokens": 2000, "ignore_eos": True, **paced(5)}


@dataclass
class Death:
    gateway: HeliosProcess
    engine_pid: int
    worker_pids: list[int]
    killed: float
    streams: list[tuple[int, list[str]]]
    plain: list[httpx2.Response]


async def _stream(http: httpx2.AsyncClient) -> tuple[int, list[str]]:
    body = {"model": "tiny", "messages": USER, "stream": True, **LONG}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        return response.status_code, [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]


async def _under_load(gateway: HeliosProcess, engine_pid: int) -> tuple[float, list[Any], list[Any]]:
    async with httpx2.AsyncClient(base_url=gateway.base_url, timeout=httpx2.Timeout(30)) as http:
        streams = [asyncio.ensure_future(_stream(http)) for _ in range(4)]
        plain = [asyncio.ensure_future(http.post("/v1/chat/completions",
                                                 json={"model": "tiny", "messages": USER, **LONG}))
                 for _ in range(4)]
        await asyncio.sleep(1.0)  # all admitted and generating
        assert not any(task.done() for task in (*streams, *plain)), "requests ended before the engine was killed"
        os.kill(engine_pid, signal.SIGKILL)
        killed = time.monotonic()
        # Bounded: a request the dead engine never answers fails the test instead of hanging it.
        done = await asyncio.wait_for(asyncio.gather(*streams, *plain), 30)
    return killed, list(done[:4]), list(done[4:])


@pytest.fixture(scope="module")
def death(demo_model_dir: Path, fake_provider: FakeProvider,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Death]:
    """One appliance (the demo model and a remote one) whose EngineCore is killed under load."""
    scratch = tmp_path_factory.mktemp("engine-faults")
    model = {**ENGINE_SETTINGS, "name": "tiny", "model": str(demo_model_dir), "max_model_len": 2048}
    config = {"models": [model, remote_model(fake_provider, "remote", "gpt-4o")]}
    gateway = HeliosProcess(config, engine_env(scratch), workdir=scratch)
    try:
        gateway.start(wait_ready=True, timeout=420)
        group = gateway.group()
        engines = [pid for pid, cmd in group.items() if cmd.startswith("VLLM::EngineCore")]
        assert len(engines) == 1, group
        workers = [pid for pid, cmd in group.items() if cmd.startswith("VLLM::Worker")]
        killed, streams, plain = asyncio.run(_under_load(gateway, engines[0]))
        yield Death(gateway, engines[0], workers, killed, streams, plain)
    finally:
        gateway.close()


def test_streams_in_flight_end_with_an_error_event(death: Death) -> None:
    for status, events in death.streams:
        assert status == 200
        assert events and "[DONE]" not in events, events[-2:]
        last = json.loads(events[-1])
        validate("ErrorResponse", last)
        assert last["error"]["type"] == "service_unavailable_error"
        assert "'tiny' has died" in last["error"]["message"]
        for payload in events[:-1]:
            validate("CreateChatCompletionStreamResponse", json.loads(payload))


def test_plain_requests_in_flight_get_an_openai_shaped_503(death: Death) -> None:
    for response in death.plain:
        assert response.status_code == 503, response.text
        validate("ErrorResponse", response.json())
        assert "'tiny' has died" in response.json()["error"]["message"]


def test_probes_name_the_dead_engine(death: Death) -> None:
    base = death.gateway.base_url
    ready = httpx2.get(f"{base}/ready", timeout=5)
    assert ready.status_code == 503
    validate("ErrorResponse", ready.json())
    assert "tiny: engine has died" in ready.json()["error"]["message"]
    assert ready.json()["models"]["remote"] == "ready"

    health = httpx2.get(f"{base}/health", timeout=5)
    # Not 200: a liveness probe (the Dockerfile's HEALTHCHECK, the chart's livenessProbe) restarts the process.
    assert health.status_code == 503, health.text
    body = health.json()
    validate("ErrorResponse", body)
    assert body["status"] == "unhealthy"
    assert body["error"]["code"] == "unhealthy"
    assert list(body["models"]) == ["tiny"]
    assert body["models"]["tiny"].startswith("engine has died")
    assert "killed by SIGKILL" in body["models"]["tiny"], body


def test_new_requests_are_refused_quickly_and_other_models_serve(death: Death) -> None:
    base = death.gateway.base_url
    for stream in (False, True):
        started = time.monotonic()
        refused = httpx2.post(f"{base}/v1/chat/completions", timeout=10,
                              json={"model": "tiny", "messages": USER, "stream": stream, "max_tokens": 5})
        assert time.monotonic() - started < 2.0
        assert refused.status_code == 503, refused.text
        validate("ErrorResponse", refused.json())
        assert refused.json()["error"]["code"] == "not_ready"
        assert "Model 'tiny' is not ready: engine has died" in refused.json()["error"]["message"]
    remote = httpx2.post(f"{base}/v1/chat/completions", timeout=10, json={"model": "remote", "messages": USER})
    assert remote.status_code == 200, remote.text


def test_no_engine_process_is_left_behind(death: Death) -> None:
    # Once /health reported the death (the probes test ran), nothing of the engine keeps a core busy.
    engine = {death.engine_pid, *death.worker_pids}
    try:
        eventually(lambda: not set(death.gateway.group()) & engine, 15, "the engine's processes to end")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {death.gateway.group()}") from None
    assert death.gateway.is_running(), "the appliance keeps serving its other models until restarted"
    assert death.gateway.terminate(signal.SIGTERM, timeout=30) == 0
