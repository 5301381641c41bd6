"""Stored responses end to end: a Redis store shared by replicas, its outages, per-key isolation, the LRU bound.

Everything is a real process on loopback: one ``redis-server`` with a password (module-wide), two appliances
sharing it as replicas A and B, and the session's imitation provider, which records the chat requests each
Responses call became. Every Response object received is validated against OpenAI's schema. Processes are
stopped by PID (HeliosProcess / RedisServer) at module teardown.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx2
import openai
import pytest

from tests.e2e.gateway import client, eventually, wait_for_log
from tests.support.fake_provider import SLOW_CHUNKS_LENGTH, FakeProvider, remote_model
from tests.support.openapi import validate
from tests.support.redis import RedisServer
from tests.support.server import HeliosProcess

pytestmark = pytest.mark.timeout(120)

PASSWORD = "e2e-redis-pw-7f3a9c2d41"
KEY_A = "key-a"
KEY_B = "key-b"
FAST = "chat"  # echoes the last user text at once
SLOW = "slow"  # 1000 words, 2 ms apart: a background response that runs for a few seconds
CRAWL = "crawl"  # 1000 words, 50 ms apart: runs until it is cancelled
RESUBSCRIBED = "Subscribed to response cancel announcements again"


# ---- processes -------------------------------------------------------------------------------------------


def _start(config: dict[str, Any], workdir: Path) -> HeliosProcess:
    process = HeliosProcess(config, workdir=workdir)
    try:
        process.start(wait_ready=True, timeout=60)
    except BaseException:
        process.close()
        raise
    return process


def _config(provider: FakeProvider, responses: dict[str, Any], api_keys: list[str] | None = None) -> dict[str, Any]:
    return {
        "auth": {"api_keys": api_keys or []},
        "responses": responses,
        "models": [
            remote_model(provider, FAST, "gpt-4o"),
            remote_model(provider, SLOW, "slow-chunks-2", timeout=60),
            remote_model(provider, CRAWL, "slow-chunks-50", timeout=120),
        ],
    }


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(password=PASSWORD, workdir=tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(autouse=True)
def _redis_running(redis_server: RedisServer) -> None:
    # An outage test that failed half-way must not leave the next test without a server.
    if not redis_server.running:
        redis_server.start()


@dataclass
class Replicas:
    """Two appliances sharing one Redis store; ``restart_a`` replaces A with a new process, same config."""

    config: dict[str, Any]
    mktemp: Callable[[str], Path]
    a: HeliosProcess
    b: HeliosProcess

    def restart_a(self) -> HeliosProcess:
        self.a.terminate()
        self.a = _start(self.config, self.mktemp("replica-a"))
        return self.a

    def close(self) -> None:
        for process in (self.a, self.b):
            process.close()


@pytest.fixture(scope="module")
def replicas(fake_provider: FakeProvider, redis_server: RedisServer,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    config = _config(fake_provider, {"store": "redis", "redis_url": redis_server.url, "redis_timeout": 1.0,
                                     "redis_prefix": "e2e:shared:"}, [KEY_A, KEY_B])
    # Started side by side: each takes seconds to come up.
    with ThreadPoolExecutor(2) as pool:
        starting = [pool.submit(_start, config, tmp_path_factory.mktemp(name)) for name in ("replica-a", "replica-b")]
    started = [future.result() for future in starting if future.exception() is None]
    if len(started) < 2:
        for process in started:
            process.close()
        raise next(f.exception() for f in starting if f.exception() is not None)  # type: ignore[misc]
    pair = Replicas(config, tmp_path_factory.mktemp, *started)
    try:
        yield pair
    finally:
        pair.close()


@pytest.fixture(scope="module", params=["memory", "redis"])
def isolation(request: pytest.FixtureRequest, fake_provider: FakeProvider,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``.a`` and ``.b``: where a response is made and where other calls go (one process for memory)."""
    if request.param == "redis":
        yield request.getfixturevalue("replicas")
        return
    process = _start(_config(fake_provider, {"store": "memory"}, [KEY_A, KEY_B]), tmp_path_factory.mktemp("memory"))
    try:
        yield SimpleNamespace(a=process, b=process)
    finally:
        process.close()


@pytest.fixture(scope="module")
def bounded(fake_provider: FakeProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeliosProcess]:
    process = _start(_config(fake_provider, {"store": "memory", "max_responses": 5}), tmp_path_factory.mktemp("lru"))
    try:
        yield process
    finally:
        process.close()


# ---- helpers ---------------------------------------------------------------------------------------------


def _client(process: HeliosProcess, key: str = KEY_A) -> openai.OpenAI:
    return client(process.base_url, api_key=key, timeout=30)


def _create(cl: openai.OpenAI, **params: Any) -> dict[str, Any]:
    params.setdefault("model", FAST)
    data: dict[str, Any] = cl.responses.with_raw_response.create(**params).http_response.json()
    validate("Response", data)
    return data


def _retrieve(cl: openai.OpenAI, response_id: str) -> dict[str, Any]:
    data: dict[str, Any] = cl.responses.with_raw_response.retrieve(response_id).http_response.json()
    validate("Response", data)
    return data


def _cancel(cl: openai.OpenAI, response_id: str) -> dict[str, Any]:
    data: dict[str, Any] = cl.responses.with_raw_response.cancel(response_id).http_response.json()
    validate("Response", data)
    return data


def _input_items(cl: openai.OpenAI, response_id: str, **params: Any) -> dict[str, Any]:
    data: dict[str, Any] = cl.responses.input_items.with_raw_response.list(response_id, **params).http_response.json()
    validate("ResponseItemList", data)
    return data


def _text(response: dict[str, Any]) -> str:
    return "".join(part["text"] for item in response["output"] if item["type"] == "message"
                   for part in item["content"] if part["type"] == "output_text")


def _item_texts(items: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(item["role"], "".join(part["text"] for part in item["content"])) for item in items]


def _sse_events(response: Any) -> list[dict[str, Any]]:
    """The events of a streamed answer as sent; ``event:`` lines name their data's type.

    Every event carrying a Response is validated, and the first of every other type (validating each of a
    thousand deltas against the spec's event union would take ~15 s).
    """
    assert response.headers["content-type"].startswith("text/event-stream")
    events: list[dict[str, Any]] = []
    kind = None
    validated: set[str] = set()
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            event = json.loads(line[6:])
            assert event["type"] == kind, line
            if "response" in event or event["type"] not in validated:
                validate("ResponseStreamEvent", event)
                validated.add(event["type"])
            events.append(event)
        else:
            assert line == "" or line.startswith(":"), line
    return events


def _conversation(provider: FakeProvider) -> list[dict[str, Any]]:
    """The chat messages of the last request the provider got."""
    sent = provider.last_request
    assert sent.path == "/v1/chat/completions"
    messages: list[dict[str, Any]] = sent.body["messages"]
    return messages


def _status_error(exc: openai.APIStatusError, status: int, code: str) -> dict[str, Any]:
    assert exc.status_code == status, exc
    body: dict[str, Any] = exc.response.json()
    validate("ErrorResponse", body)
    assert body["error"]["code"] == code, body
    return body


def _assert_store_unavailable(exc: openai.APIStatusError, redis: RedisServer) -> None:
    body = _status_error(exc, 503, "store_unavailable")
    assert body["error"]["type"] == "service_unavailable_error"
    text = exc.response.text
    for secret in (PASSWORD, redis.url, f"127.0.0.1:{redis.port}", str(redis.port)):
        assert secret not in text, f"{secret!r} leaked in {text!r}"


def _crawling_stream(provider: FakeProvider, count: int = 1) -> None:
    eventually(lambda: len(provider.streams) >= count and provider.streams[-1].chunks_sent > 0, timeout=10,
               what="the provider stream to start")


def _disconnected(provider: FakeProvider) -> None:
    eventually(lambda: [s.outcome for s in provider.streams] == ["disconnected"], timeout=10,
               what="the provider stream to be closed")


# ---- 1. one store, two replicas ----------------------------------------------------------------------------


def test_a_response_made_on_one_replica_lives_on_the_other(replicas: Replicas, provider: FakeProvider) -> None:
    on_a, on_b = _client(replicas.a), _client(replicas.b)
    first = _create(on_a, input="first turn")
    assert first["status"] == "completed" and first["store"] is True and _text(first) == "echo: first turn"

    seen = _retrieve(on_b, first["id"])
    assert seen == first
    assert on_b.responses.retrieve(first["id"]).output_text == "echo: first turn"  # the typed view agrees

    second = _create(on_b, input="second turn", previous_response_id=first["id"])
    assert second["previous_response_id"] == first["id"] and _text(second) == "echo: second turn"
    assert _conversation(provider) == [{"role": "user", "content": "first turn"},
                                       {"role": "assistant", "content": "echo: first turn"},
                                       {"role": "user", "content": "second turn"}]

    items = _input_items(on_b, second["id"], order="asc")
    assert _item_texts(items["data"]) == [("user", "first turn"), ("assistant", "echo: first turn"),
                                          ("user", "second turn")]
    assert items["data"][1]["id"] == first["output"][0]["id"] and items["has_more"] is False
    assert _input_items(on_a, second["id"], order="asc") == items  # the same record from either replica

    deleted = on_b.responses.with_raw_response.delete(second["id"]).http_response.json()
    assert deleted == {"id": second["id"], "object": "response", "deleted": True}
    for cl in (on_a, on_b):
        with pytest.raises(openai.NotFoundError) as missing:
            cl.responses.retrieve(second["id"])
        _status_error(missing.value, 404, "not_found")
    with pytest.raises(openai.NotFoundError):
        on_a.responses.delete(second["id"])
    # Deleting the second turn leaves the first.
    assert _retrieve(on_a, first["id"])["id"] == first["id"]


def test_a_streamed_response_is_replayed_by_the_other_replica(replicas: Replicas) -> None:
    on_a, on_b = _client(replicas.a), _client(replicas.b)
    with on_a.responses.with_streaming_response.create(model=FAST, input="stream me", stream=True) as live:
        sent = _sse_events(live)
    assert sent[-1]["type"] == "response.completed"
    response_id = sent[-1]["response"]["id"]
    with on_b.responses.with_streaming_response.retrieve(response_id, stream=True) as replay:
        assert _sse_events(replay) == sent
    with on_b.responses.with_streaming_response.retrieve(response_id, stream=True, starting_after=2) as rest:
        assert _sse_events(rest) == sent[3:]
    assert _retrieve(on_b, response_id) == sent[-1]["response"]


# ---- 2. a replica restarts -----------------------------------------------------------------------------------


def test_a_restarted_replica_continues_the_conversation(replicas: Replicas, provider: FakeProvider) -> None:
    first = _create(_client(replicas.a), input="before the restart")
    # A background response still running when A stops: A must not leave it "in_progress" for ever.
    running = _create(_client(replicas.a), model=CRAWL, input="interrupted", background=True)
    _crawling_stream(provider)
    old_pid = replicas.a.pid
    replicas.restart_a()
    assert replicas.a.pid != old_pid
    on_a = _client(replicas.a)

    assert _retrieve(on_a, first["id"]) == first
    second = _create(on_a, input="after the restart", previous_response_id=first["id"])
    assert _text(second) == "echo: after the restart"
    assert _conversation(provider) == [{"role": "user", "content": "before the restart"},
                                       {"role": "assistant", "content": "echo: before the restart"},
                                       {"role": "user", "content": "after the restart"}]
    third = _create(_client(replicas.b), input="and on B", previous_response_id=second["id"])
    assert [m["content"] for m in _conversation(provider)] == [
        "before the restart", "echo: before the restart", "after the restart", "echo: after the restart", "and on B"]
    assert third["status"] == "completed"

    interrupted = _retrieve(_client(replicas.b), running["id"])
    assert interrupted["status"] == "cancelled", interrupted["status"]
    _disconnected(provider)


# ---- 3. Redis goes away ------------------------------------------------------------------------------------


def test_a_redis_outage_is_a_clear_503_and_heals_by_itself(replicas: Replicas, redis_server: RedisServer,
                                                           provider: FakeProvider) -> None:
    on_a, on_b = _client(replicas.a), _client(replicas.b)
    kept = _create(on_a, input="kept before the outage")
    redis_server.stop()
    try:
        with pytest.raises(openai.InternalServerError) as create_error:
            on_a.responses.create(model=FAST, input="stored during the outage")
        _assert_store_unavailable(create_error.value, redis_server)
        with pytest.raises(openai.InternalServerError) as retrieve_error:
            on_b.responses.retrieve(kept["id"])
        _assert_store_unavailable(retrieve_error.value, redis_server)
        calls: list[Callable[[], Any]] = [
            lambda: on_b.responses.create(model=FAST, input="more", previous_response_id=kept["id"], store=False),
            lambda: on_a.responses.create(model=SLOW, input="queued", background=True),
            lambda: on_b.responses.delete(kept["id"]),
            lambda: on_b.responses.input_items.list(kept["id"]),
            lambda: on_a.responses.cancel(kept["id"]),
        ]
        for call in calls:
            with pytest.raises(openai.InternalServerError) as error:
                call()
            _assert_store_unavailable(error.value, redis_server)

        # What needs no store goes on.
        provider.reset()
        unstored = _create(on_b, input="no store needed", store=False)
        assert unstored["store"] is False and _text(unstored) == "echo: no store needed"
        with on_a.responses.with_streaming_response.create(model=FAST, input="s", store=False, stream=True) as live:
            assert _sse_events(live)[-1]["type"] == "response.completed"
        chat = on_a.chat.completions.create(model=FAST, messages=[{"role": "user", "content": "plain chat"}])
        assert chat.choices[0].message.content == "echo: plain chat"

        # A stored stream has sent its 200 before the store fails: it ends with an error event instead.
        with on_a.responses.with_streaming_response.create(model=FAST, input="s", stream=True) as live:
            events = _sse_events(live)
        assert events[-1]["type"] == "error" and events[-1]["code"] == "store_unavailable", events[-1]
        assert PASSWORD not in json.dumps(events) and str(redis_server.port) not in events[-1]["message"]

        for process in (replicas.a, replicas.b):
            ready = httpx2.get(process.url("/ready"), timeout=5)
            assert ready.status_code == 200, ready.text  # readiness follows the models, not the store
    finally:
        redis_server.start()

    # Back without restarting either appliance (Redis kept nothing: it persists nothing).
    after = _create(on_a, input="after the outage")
    assert _retrieve(on_b, after["id"]) == after
    with pytest.raises(openai.NotFoundError):
        on_b.responses.retrieve(kept["id"])
    for process in (replicas.a, replicas.b):
        # The cancel channel comes back too (its back-off is at most 2 s).
        wait_for_log(process, RESUBSCRIBED, timeout=15)
        logs = process.logs()
        assert PASSWORD not in logs
        assert redis_server.url not in logs


# ---- 4. one key's responses are invisible to another --------------------------------------------------------


def test_responses_are_private_to_their_api_key(isolation: Any, provider: FakeProvider) -> None:
    mine_a, mine_b, theirs = _client(isolation.a), _client(isolation.b), _client(isolation.b, KEY_B)
    mine = _create(mine_a, input="private words")
    running = _create(mine_a, model=CRAWL, input="private background", background=True)

    calls: dict[str, Callable[[str], Any]] = {
        "retrieve": theirs.responses.retrieve,
        "replay": lambda rid: theirs.responses.retrieve(rid, stream=True).close(),
        "continue": lambda rid: theirs.responses.create(model=FAST, input="x", previous_response_id=rid),
        "input_items": theirs.responses.input_items.list,
        "cancel": theirs.responses.cancel,
        "delete": theirs.responses.delete,
    }
    for response_id in (mine["id"], running["id"]):
        for name, call in calls.items():
            with pytest.raises(openai.NotFoundError) as missing:
                call(response_id)
            body = _status_error(missing.value, 404, "not_found")
            # The same answer as for an id that does not exist.
            assert body["error"]["message"] == f"No response found with id '{response_id}'.", name
            assert body["error"]["param"] == ("previous_response_id" if name == "continue" else "response_id")
    with pytest.raises(openai.AuthenticationError):
        _client(isolation.b, "not-a-key").responses.retrieve(mine["id"])

    # Nothing key-b did touched them.
    assert _retrieve(mine_b, mine["id"]) == mine
    assert _retrieve(mine_b, running["id"])["status"] in ("queued", "in_progress")
    provider.reset()
    continued = _create(mine_b, input="more words", previous_response_id=mine["id"])
    assert [m["content"] for m in _conversation(provider)] == ["private words", "echo: private words", "more words"]
    assert _item_texts(_input_items(mine_b, continued["id"], order="asc")["data"])[0] == ("user", "private words")
    cancelled = _cancel(mine_b, running["id"])
    assert cancelled["status"] == "cancelled"
    mine_b.responses.delete(mine["id"])
    with pytest.raises(openai.NotFoundError):
        mine_a.responses.retrieve(mine["id"])


# ---- 5. the in-process store's bound --------------------------------------------------------------------------


def test_the_memory_store_keeps_the_most_recently_used(bounded: HeliosProcess) -> None:
    cl = client(bounded.base_url)
    made = [_create(cl, input=f"number {n}")["id"] for n in range(8)]
    for response_id in made[:3]:
        with pytest.raises(openai.NotFoundError):
            cl.responses.retrieve(response_id)
    for response_id in made[3:]:
        assert _retrieve(cl, response_id)["id"] == response_id
    # Reading the oldest kept one makes it the most recently used: the next one made evicts its successor.
    _retrieve(cl, made[3])
    made.append(_create(cl, input="number 8")["id"])
    with pytest.raises(openai.NotFoundError):
        cl.responses.retrieve(made[4])
    for response_id in (made[3], *made[5:]):
        assert _retrieve(cl, response_id)["id"] == response_id
    # Least recently used first: 3, 5, 6, 7, 8. Continuing a conversation reads (so refreshes) its previous
    # response too: after it, 5 and then 6 are the ones evicted, not 3.
    _create(cl, input="follow-up", previous_response_id=made[3])
    _create(cl, input="number 10")
    for gone in (made[5], made[6]):
        with pytest.raises(openai.NotFoundError):
            cl.responses.retrieve(gone)
    assert _retrieve(cl, made[3])["id"] == made[3]


# ---- 6. background responses across replicas ---------------------------------------------------------------


def test_a_background_response_on_a_is_followed_on_b(replicas: Replicas, provider: FakeProvider) -> None:
    on_a, on_b = _client(replicas.a), _client(replicas.b)
    queued = _create(on_a, model=SLOW, input="count", background=True)
    assert queued["status"] == "queued" and queued["background"] is True
    statuses: list[str] = []

    def finished() -> bool:
        statuses.append(_retrieve(on_b, queued["id"])["status"])
        return statuses[-1] not in ("queued", "in_progress")

    eventually(finished, timeout=60, what="the background response to finish")
    assert statuses[0] in ("queued", "in_progress") and statuses[-1] == "completed", statuses
    assert set(statuses) <= {"queued", "in_progress", "completed"}
    done = _retrieve(on_b, queued["id"])
    assert _text(done) == " ".join(f"w{i}" for i in range(1, SLOW_CHUNKS_LENGTH + 1))
    assert done["background"] is True and done["id"] == queued["id"]
    # Its events are in the store: B replays them although A made them.
    with on_b.responses.with_streaming_response.retrieve(queued["id"], stream=True) as replay:
        events = _sse_events(replay)
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
    assert events[-1]["response"] == done
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_b_streams_a_background_response_that_a_runs(replicas: Replicas) -> None:
    on_a, on_b = _client(replicas.a), _client(replicas.b)
    queued = _create(on_a, model=SLOW, input="count", background=True)
    with on_b.responses.with_streaming_response.retrieve(queued["id"], stream=True) as follow:
        events = _sse_events(follow)
    assert events[-1]["type"] == "response.completed" and events[-1]["response"]["id"] == queued["id"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    validate("Response", events[-1]["response"])


def test_a_cancel_on_b_stops_the_response_running_on_a(replicas: Replicas, provider: FakeProvider) -> None:
    on_a, on_b = _client(replicas.a), _client(replicas.b)
    queued = _create(on_a, model=CRAWL, input="long", background=True)
    _crawling_stream(provider)
    eventually(lambda: _retrieve(on_b, queued["id"])["status"] == "in_progress", what="in progress on B")
    cancelled = _cancel(on_b, queued["id"])
    assert cancelled["status"] == "cancelled" and cancelled["id"] == queued["id"]
    _disconnected(provider)
    assert provider.disconnects == 1 and provider.streams[0].chunks_sent < SLOW_CHUNKS_LENGTH
    assert _retrieve(on_a, queued["id"])["status"] == "cancelled"
    # Cancelling again, anywhere, answers the final response unchanged.
    assert _cancel(on_a, queued["id"]) == cancelled
