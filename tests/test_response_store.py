"""The stores of /v1/responses: the in-process one, and the Redis one against a real redis-server.

The Redis server (Debian's package, installed on first use) runs for the whole module with a password, so
every test also checks authentication; it is stopped by PID at the end. A missing redis-server fails these
tests rather than skipping them: CI must run them. Each test writes under its own key prefix.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager

import pytest
import redis.asyncio
from pydantic import SecretStr

from app.errors import APIError
from app.responses.memory_store import MemoryStore
from app.responses.redis_store import RedisStore
from app.responses.store import ResponseStore, StoredResponse, build_store
from app.settings import ResponsesSettings
from tests.support.redis import RedisServer

PASSWORD = "s3cret-redis-pw-0123456789"
LISTENER_LOG = "app.responses.redis_store"
# Frames that a separator-based encoding would get wrong: blank lines, NULs, an empty frame, non-UTF-8.
AWKWARD_EVENTS = [
    b"event: response.created\ndata: {\"type\":\"response.created\"}\n\n",
    b"",
    b"\x00\x00\x00\x05\n\n\r\n",
    "data: {\"delta\":\"h\u00e9llo \u2603\"}\n\n".encode(),
    bytes(range(256)) * 40,
]


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer(password=PASSWORD) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    # An outage test that failed half-way must not leave the next test without a server.
    if not redis_server.running:
        redis_server.start()
    return redis_server.url


def memory_settings(**extra: object) -> ResponsesSettings:
    return ResponsesSettings.model_validate(extra)


def redis_settings(url: str, prefix: str | None = None, **extra: object) -> ResponsesSettings:
    prefix = prefix if prefix is not None else f"test:{uuid.uuid4().hex}:"
    return ResponsesSettings.model_validate(
        {"store": "redis", "redis_url": SecretStr(url), "redis_prefix": prefix, **extra}
    )


@asynccontextmanager
async def opened(
    settings: ResponsesSettings, on_cancel: Callable[[str], None] | None = None
) -> AsyncIterator[ResponseStore]:
    store = build_store(settings)
    if on_cancel is not None:
        store.on_cancel(on_cancel)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def raw_client(url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


def record(response_id: str = "resp_1", *, events: list[bytes] | None = None, status: str = "completed",
           padding: int = 0) -> StoredResponse:
    response = f'{{"id":"{response_id}","object":"response","status":"{status}","pad":"{"x" * padding}"}}'
    return StoredResponse(
        id=response_id, owner="fp-\u00e9t\u00e9", model="gpt-4o-mini", response=response.encode(),
        input_items=b'[{"type":"message","role":"user","content":"hi \xe2\x98\x83"}]', events=events,
    )


async def eventually(check: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {within}s")
        await asyncio.sleep(0.02)


async def wait_for_subscribers(url: str, channel: str, count: int, within: float = 10.0) -> None:
    """Until ``count`` clients listen on ``channel``: pub/sub drops what is published before that."""
    deadline = time.monotonic() + within
    async with raw_client(url) as client:
        while True:
            (_, subscribers), = await client.pubsub_numsub(channel)
            if subscribers == count:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{subscribers} subscribers on {channel}, not {count}, after {within}s")
            await asyncio.sleep(0.02)


def assert_no_secret(text: str, server: RedisServer) -> None:
    assert PASSWORD not in text
    assert server.url not in text
    assert f"127.0.0.1:{server.port}" not in text


def assert_unavailable(error: APIError, server: RedisServer) -> None:
    assert error.status == 503
    assert error.code == "store_unavailable"
    assert error.type == "service_unavailable_error"
    # What the appliance could log: the message and the whole chain of causes.
    assert_no_secret("".join(traceback.format_exception(error)), server)


# ---- both stores ---------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def any_settings(request: pytest.FixtureRequest) -> ResponsesSettings:
    if request.param == "memory":
        return memory_settings()
    return redis_settings(request.getfixturevalue("redis_url"))


async def test_round_trip_keeps_every_byte(any_settings: ResponsesSettings) -> None:
    async with opened(any_settings) as store:
        streamed, plain, empty = (record("resp_s", events=AWKWARD_EVENTS), record("resp_p"),
                                  record("resp_e", events=[]))
        for one in (streamed, plain, empty):
            await store.put(one)
        assert await store.get("resp_s") == streamed
        assert await store.get("resp_p") == plain
        got_empty = await store.get("resp_e")
        assert got_empty is not None
        assert got_empty.events == []
        assert await store.get("resp_missing") is None


async def test_put_replaces_the_whole_record(any_settings: ResponsesSettings) -> None:
    async with opened(any_settings) as store:
        await store.put(record(status="queued", events=[b"data: 1\n\n"]))
        await store.put(record(status="completed"))
        got = await store.get("resp_1")
        assert got == record(status="completed")
        assert got is not None
        assert got.events is None


async def test_delete_says_whether_it_existed(any_settings: ResponsesSettings) -> None:
    async with opened(any_settings) as store:
        await store.put(record(events=[b"data: 1\n\n"]))
        assert await store.delete("resp_1") is True
        assert await store.get("resp_1") is None
        assert await store.delete("resp_1") is False


async def test_expired_records_are_gone(any_settings: ResponsesSettings) -> None:
    async with opened(any_settings.model_copy(update={"ttl": 0.5})) as store:
        await store.put(record(events=[b"data: 1\n\n"]))
        assert await store.get("resp_1") is not None
        await asyncio.sleep(0.7)
        assert await store.get("resp_1") is None
        assert await store.delete("resp_1") is False


# ---- memory ------------------------------------------------------------------------------------


async def test_memory_evicts_the_least_recently_used_by_count() -> None:
    store = MemoryStore(memory_settings(max_responses=3))
    for name in ("a", "b", "c"):
        await store.put(record(name))
    assert await store.get("a") is not None  # a is now more recent than b and c
    await store.put(record("d"))
    assert await store.get("b") is None
    assert [await store.get(n) is not None for n in ("a", "c", "d")] == [True, True, True]
    assert store.evicted == 1
    await store.put(record("c", status="in_progress"))  # a put is a use, and replacing evicts nothing
    await store.put(record("e"))
    assert await store.get("a") is None
    assert len(store) == 3
    assert store.evicted == 2


async def test_memory_evicts_the_least_recently_used_by_bytes() -> None:
    store = MemoryStore(memory_settings(max_bytes=1024 * 1024))
    for name in ("a", "b", "c"):
        await store.put(record(name, padding=300_000))
    assert await store.get("a") is not None
    await store.put(record("d", padding=300_000))
    assert await store.get("b") is None
    assert len(store) == 3
    assert store.evicted == 1
    assert store.bytes_held == sum(r.size() for r in (record(n, padding=300_000) for n in ("a", "c", "d")))
    # One record over the bound is not kept, and does not empty the store trying to make room for it.
    await store.put(record("huge", padding=2 * 1024 * 1024))
    assert await store.get("huge") is None
    assert len(store) == 3
    assert store.evicted == 2


async def test_memory_purges_expired_records_without_reading_them() -> None:
    store = MemoryStore(memory_settings(ttl=0.5))
    await store.put(record("old"))
    await asyncio.sleep(0.3)
    await store.put(record("new"))
    assert await store.get("old") is not None  # a read is a use but does not extend the TTL
    await asyncio.sleep(0.3)
    assert await store.get("new") is not None
    assert len(store) == 1
    assert store.bytes_held == record("new").size()
    await asyncio.sleep(0.3)
    await store.put(record("newer"))
    assert len(store) == 1
    assert store.evicted == 0  # expiry is not eviction


async def test_memory_keeps_its_own_copy_of_the_events() -> None:
    store = MemoryStore(memory_settings())
    events = [b"data: 1\n\n"]
    await store.put(record(events=events))
    events.append(b"data: 2\n\n")
    got = await store.get("resp_1")
    assert got is not None
    assert got.events == [b"data: 1\n\n"]
    assert got.events is not None
    got.events.append(b"data: 3\n\n")
    again = await store.get("resp_1")
    assert again is not None
    assert again.events == [b"data: 1\n\n"]
    assert store.bytes_held == record(events=[b"data: 1\n\n"]).size()


async def test_memory_cancel_announcements_stay_local() -> None:
    heard: list[str] = []
    async with opened(memory_settings(), on_cancel=heard.append) as store:
        await store.announce_cancel("resp_1")
        await asyncio.sleep(0.05)
    assert heard == []


# ---- redis -------------------------------------------------------------------------------------


async def test_redis_writes_one_hash_with_the_ttl(redis_url: str) -> None:
    settings = redis_settings(redis_url, ttl=100)
    async with opened(settings) as store, raw_client(redis_url) as raw:
        await store.put(record(events=[b"data: 1\n\n"]))
        key = f"{settings.redis_prefix}resp_1"
        assert set(await raw.hkeys(key)) == {b"owner", b"model", b"response", b"input_items", b"events"}
        assert 99 <= await raw.ttl(key) <= 100
        assert await raw.keys(f"{settings.redis_prefix}*") == [key.encode()]
        await store.put(record())
        assert set(await raw.hkeys(key)) == {b"owner", b"model", b"response", b"input_items"}
        assert 99 <= await raw.ttl(key) <= 100


async def test_redis_fractional_ttl(redis_url: str) -> None:
    settings = redis_settings(redis_url, ttl=0.5)
    async with opened(settings) as store, raw_client(redis_url) as raw:
        await store.put(record())
        assert 0 < await raw.pttl(f"{settings.redis_prefix}resp_1") <= 500


async def test_redis_malformed_record_answers_503(redis_url: str, redis_server: RedisServer) -> None:
    settings = redis_settings(redis_url)
    async with opened(settings) as store, raw_client(redis_url) as raw:
        await raw.hset(f"{settings.redis_prefix}resp_1", mapping={"owner": "x", "events": b"\x00\x00\x00\x09abc"})
        with pytest.raises(APIError) as caught:
            await store.get("resp_1")
        assert_unavailable(caught.value, redis_server)


async def test_redis_down_answers_503_then_recovers(redis_url: str, redis_server: RedisServer) -> None:
    async with opened(redis_settings(redis_url)) as store:
        await store.put(record())  # leaves a pooled connection for Redis to drop
        redis_server.stop()
        try:
            calls: list[Callable[[], Awaitable[object]]] = [
                lambda: store.get("resp_1"), lambda: store.put(record()), lambda: store.delete("resp_1"),
                lambda: store.announce_cancel("resp_1"),
            ]
            for call in calls:
                started = time.monotonic()
                with pytest.raises(APIError) as caught:
                    await call()
                assert time.monotonic() - started < 1.0  # refused connections answer at once
                assert_unavailable(caught.value, redis_server)
                assert caught.value.message == "The response store is unavailable: cannot reach Redis."
        finally:
            redis_server.start()
        # The same store, not restarted; the data went with the server (it persists nothing).
        assert await store.get("resp_1") is None
        await store.put(record())
        assert await store.get("resp_1") == record()


async def test_redis_store_starts_while_redis_is_down(redis_url: str, redis_server: RedisServer) -> None:
    redis_server.stop()
    try:
        async with opened(redis_settings(redis_url)) as store:
            with pytest.raises(APIError) as caught:
                await store.put(record())
            assert_unavailable(caught.value, redis_server)
            redis_server.start()
            await store.put(record())
            assert await store.get("resp_1") == record()
    finally:
        if not redis_server.running:
            redis_server.start()


async def test_redis_wrong_password_answers_503(redis_url: str, redis_server: RedisServer) -> None:
    wrong = redis_url.replace(PASSWORD, "not-the-password")
    async with opened(redis_settings(wrong)) as store:
        with pytest.raises(APIError) as caught:
            await store.get("resp_1")
    assert caught.value.message == "The response store is unavailable: Redis refused the credentials."
    assert_unavailable(caught.value, redis_server)
    assert "not-the-password" not in "".join(traceback.format_exception(caught.value))


async def test_redis_cancel_announcements_reach_other_replicas(redis_url: str) -> None:
    settings = redis_settings(redis_url)
    channel = f"{settings.redis_prefix}cancel"
    early: list[str] = []
    late: list[str] = []
    elsewhere: list[str] = []
    async with (
        opened(settings, on_cancel=early.append) as announcer,
        opened(settings) as listener,
        opened(redis_settings(redis_url), on_cancel=elsewhere.append),  # another prefix: another appliance
    ):
        listener.on_cancel(late.append)  # after start() as well as before
        await wait_for_subscribers(redis_url, channel, 2)
        await announcer.announce_cancel("resp_a")
        await listener.announce_cancel("resp_b")
        await eventually(lambda: early == late == ["resp_a", "resp_b"])
        await asyncio.sleep(0.1)
        assert elsewhere == []
    # close() ended the listeners.
    await wait_for_subscribers(redis_url, channel, 0)


async def test_redis_cancel_listener_survives_a_restart(
    redis_url: str, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LISTENER_LOG)
    settings = redis_settings(redis_url)
    channel = f"{settings.redis_prefix}cancel"
    heard: list[str] = []
    async with opened(settings, on_cancel=heard.append), opened(settings) as announcer:
        await wait_for_subscribers(redis_url, channel, 1)
        redis_server.stop()
        try:
            await asyncio.sleep(2.0)  # several reconnect attempts, all failing
        finally:
            redis_server.start()
        await wait_for_subscribers(redis_url, channel, 1)
        await announcer.announce_cancel("resp_after")
        await eventually(lambda: heard == ["resp_after"])
    warnings = [r for r in caplog.records if r.name == LISTENER_LOG and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "cannot reach Redis" in warnings[0].getMessage()
    assert any(r.name == LISTENER_LOG and r.levelno == logging.INFO for r in caplog.records)
    assert_no_secret(caplog.text, redis_server)


async def test_redis_cancel_callback_failure_does_not_stop_the_listener(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = redis_settings(redis_url)
    heard: list[str] = []

    def callback(response_id: str) -> None:
        heard.append(response_id)
        if response_id == "resp_bad":
            raise RuntimeError("callback bug")

    async with opened(settings, on_cancel=callback), opened(settings) as announcer:
        await wait_for_subscribers(redis_url, f"{settings.redis_prefix}cancel", 1)
        await announcer.announce_cancel("resp_bad")
        await announcer.announce_cancel("resp_good")
        await eventually(lambda: heard == ["resp_bad", "resp_good"])
    assert any(r.name == LISTENER_LOG and r.exc_info for r in caplog.records)


def test_build_store_picks_the_configured_store(redis_url: str) -> None:
    assert isinstance(build_store(memory_settings()), MemoryStore)
    assert isinstance(build_store(redis_settings(redis_url)), RedisStore)
