"""The Redis response store, shared by every replica, and its channel of cancel announcements.

One hash per response under ``{prefix}{id}`` with the fields ``owner``, ``model``, ``response``,
``input_items`` and, for a streamed or background response, ``events``: its frames, each preceded by its
length as 4 bytes big-endian, so any bytes split back exactly and an empty list stays distinct from none.
A put replaces the whole hash and sets its TTL in one MULTI, so a reader never sees half a record.

Cancels go over pub/sub on ``{prefix}cancel``. Pub/sub keeps nothing: an announcement made while a
replica's subscription is down does not reach it.

The URL may hold a password, so no message or log line here carries the URL or a Redis exception's text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import cast

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT, FieldT

from app.responses.store import ResponseStore, StoredResponse, store_unavailable
from app.settings import ResponsesSettings

log = logging.getLogger(__name__)

_LENGTH = 4
# The cancel listener's reconnect back-off: short, as cancels announced meanwhile are lost.
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 2.0


def _join(frames: list[bytes]) -> bytes:
    return b"".join(part for frame in frames for part in (len(frame).to_bytes(_LENGTH, "big"), frame))


def _split(data: bytes) -> list[bytes]:
    frames: list[bytes] = []
    offset = 0
    while offset < len(data):
        start = offset + _LENGTH
        end = start + int.from_bytes(data[offset:start], "big")
        if end > len(data):
            raise ValueError("truncated events")
        frames.append(data[start:end])
        offset = end
    return frames


def _reason(exc: BaseException, timeout: float) -> str:
    """Why a call failed, from the exception's type alone (its text may hold the host or a path)."""
    if isinstance(exc, TimeoutError | RedisTimeoutError):
        return f"Redis did not answer within {timeout:g}s"
    if isinstance(exc, AuthenticationError):
        return "Redis refused the credentials"
    if isinstance(exc, RedisConnectionError | OSError):
        return "cannot reach Redis"
    return f"Redis failed ({type(exc).__name__})"


class RedisStore(ResponseStore):
    """Responses in Redis; every Redis failure answers :func:`store_unavailable` (503)."""

    def __init__(self, settings: ResponsesSettings) -> None:
        if settings.redis_url is None:
            raise ValueError("RedisStore needs responses.redis_url")
        self._url = settings.redis_url
        self._prefix = settings.redis_prefix
        self._channel = f"{settings.redis_prefix}cancel"
        self._timeout = settings.redis_timeout
        # PEXPIRE: the TTL may be fractional; at least 1 ms, as 0 would delete the key at once.
        self._ttl_ms = max(1, round(settings.ttl * 1000))
        self._client: redis.asyncio.Redis | None = None
        self._listener: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Connects lazily: a Redis that is down now makes calls answer 503, not the appliance fail to start.
        self._client = redis.asyncio.from_url(
            self._url.get_secret_value(),
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            # One immediate retry covers a pooled connection Redis closed; the default (10, with back-off)
            # would hold every call for seconds while Redis is down instead of answering 503.
            retry=Retry(NoBackoff(), 1),
        )
        self._start_listener()

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def put(self, record: StoredResponse) -> None:
        key = self._key(record.id)
        fields: dict[FieldT, EncodableT] = {
            "owner": record.owner, "model": record.model, "response": record.response,
            "input_items": record.input_items,
        }
        if record.events is not None:
            fields["events"] = _join(record.events)
        async with self._guard() as client, client.pipeline(transaction=True) as pipe:
            # DEL first: a field the new record lacks (events) must not survive from the old one.
            pipe.delete(key)
            pipe.hset(key, mapping=fields)
            pipe.pexpire(key, self._ttl_ms)
            await pipe.execute()

    async def get(self, response_id: str) -> StoredResponse | None:
        async with self._guard() as client:
            # decode_responses is off: keys and values are bytes.
            fields = cast(dict[bytes, bytes], await client.hgetall(self._key(response_id)))
        if not fields:
            return None
        try:
            events = fields.get(b"events")
            return StoredResponse(
                id=response_id, owner=fields[b"owner"].decode(), response=fields[b"response"],
                input_items=fields[b"input_items"], model=fields[b"model"].decode(),
                events=None if events is None else _split(events),
            )
        except (KeyError, ValueError):  # UnicodeDecodeError is a ValueError
            raise store_unavailable("a record in Redis is malformed") from None

    async def delete(self, response_id: str) -> bool:
        async with self._guard() as client:
            return bool(await client.delete(self._key(response_id)))

    async def announce_cancel(self, response_id: str) -> None:
        async with self._guard() as client:
            await client.publish(self._channel, response_id)

    def on_cancel(self, callback: Callable[[str], None]) -> None:
        super().on_cancel(callback)
        self._start_listener()

    def _key(self, response_id: str) -> str:
        return f"{self._prefix}{response_id}"

    @contextlib.asynccontextmanager
    async def _guard(self) -> AsyncIterator[redis.asyncio.Redis]:
        """The client, for calls that must end within ``redis_timeout`` and fail as :func:`store_unavailable`."""
        if self._client is None:
            raise RuntimeError("RedisStore.start() was not called")
        try:
            async with asyncio.timeout(self._timeout):
                yield self._client
        except (RedisError, OSError) as exc:
            # from None: the chained exception's text names the host (and a unix socket's path).
            raise store_unavailable(_reason(exc, self._timeout)) from None

    def _start_listener(self) -> None:
        callback = self._cancel_callback
        if self._client is None or callback is None or self._listener is not None:
            return
        self._listener = asyncio.create_task(self._listen(self._client, callback), name="responses-cancel-listener")

    async def _listen(self, client: redis.asyncio.Redis, callback: Callable[[str], None]) -> None:
        """Deliver announced ids to ``callback`` until cancelled, resubscribing after every outage."""
        down = False
        delay = _BACKOFF_FIRST
        while True:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                if down:
                    log.info("Subscribed to response cancel announcements again")
                    down, delay = False, _BACKOFF_FIRST
                async for message in pubsub.listen():
                    self._deliver(callback, message["data"])
            except (RedisError, OSError) as exc:
                if not down:
                    log.warning("Lost the subscription to response cancel announcements (%s); retrying until Redis "
                                "is back, cancels announced meanwhile are missed", _reason(exc, self._timeout))
                    down = True
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(_BACKOFF_MAX, delay * 2)

    @staticmethod
    def _deliver(callback: Callable[[str], None], data: bytes) -> None:
        try:
            callback(data.decode(errors="replace"))
        except Exception:
            # The listener serves every later cancel: one failing callback must not end it.
            log.exception("The response cancel callback failed")
