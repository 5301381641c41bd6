"""The in-process response store: bounded by count and bytes, least recently used evicted first, with a TTL.

Two orderings of the same ids, both ``OrderedDict``: ``_records`` by last use (get or put) for eviction,
``_expiry`` by last put for the TTL. Every put sets ``expires = now + ttl`` with one ``ttl``, so put order
*is* expiry order: the expired records are always the oldest of ``_expiry``, and popping them from that
end on every call keeps the store free of expired records at O(1) amortised cost, without a background task.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import replace

from app.responses.store import ResponseStore, StoredResponse
from app.settings import ResponsesSettings


def _detached(record: StoredResponse) -> StoredResponse:
    # The bytes are immutable but the events list is not: a caller appending to its list after a put must
    # change neither what is stored nor the byte count the bound was checked against.
    return record if record.events is None else replace(record, events=list(record.events))


class MemoryStore(ResponseStore):
    """Responses kept in this process; nothing here awaits, so no call ever blocks the loop."""

    def __init__(self, settings: ResponsesSettings) -> None:
        self._ttl = settings.ttl
        self._max_responses = settings.max_responses
        self._max_bytes = settings.max_bytes
        #: id -> (record, its size), least recently used first
        self._records: OrderedDict[str, tuple[StoredResponse, int]] = OrderedDict()
        #: id -> monotonic time it expires at, oldest put first
        self._expiry: OrderedDict[str, float] = OrderedDict()
        self._bytes = 0
        #: records dropped to stay within max_responses / max_bytes (expired ones are not counted)
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._records)

    @property
    def bytes_held(self) -> int:
        """Sum of :meth:`StoredResponse.size` over the records kept."""
        return self._bytes

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self._records.clear()
        self._expiry.clear()
        self._bytes = 0

    async def put(self, record: StoredResponse) -> None:
        now = time.monotonic()
        self._purge(now)
        self._drop(record.id)
        size = record.size()
        if size > self._max_bytes:
            # Making room for it would empty the store and still not fit: it is the one evicted.
            self.evicted += 1
            return
        self._records[record.id] = (_detached(record), size)
        self._expiry[record.id] = now + self._ttl
        self._bytes += size
        # The new record is the most recently used, so it is never the one evicted here.
        while len(self._records) > self._max_responses or self._bytes > self._max_bytes:
            oldest = next(iter(self._records))
            self._drop(oldest)
            self.evicted += 1

    async def get(self, response_id: str) -> StoredResponse | None:
        self._purge(time.monotonic())
        kept = self._records.get(response_id)
        if kept is None:
            return None
        self._records.move_to_end(response_id)
        return _detached(kept[0])

    async def delete(self, response_id: str) -> bool:
        self._purge(time.monotonic())
        return self._drop(response_id)

    def _drop(self, response_id: str) -> bool:
        kept = self._records.pop(response_id, None)
        if kept is None:
            return False
        del self._expiry[response_id]
        self._bytes -= kept[1]
        return True

    def _purge(self, now: float) -> None:
        """Drop every expired record: they are the oldest of ``_expiry`` (see the module docstring)."""
        expiry = self._expiry
        while expiry:
            response_id, expires = next(iter(expiry.items()))
            if expires > now:
                return
            self._drop(response_id)
