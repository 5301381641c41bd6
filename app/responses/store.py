"""Stored responses: what ``store: true`` keeps so ``previous_response_id``, GET, DELETE and ``input_items`` work.

A record holds bytes that are already JSON (the Response as answered, the input items, the stream's events),
so storing and reading cost no serialisation beyond one envelope. Two implementations: ``memory`` (this
process, bounded) and ``redis`` (shared by replicas). The service checks ``owner`` itself: a store only keeps it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from app.errors import APIError
from app.settings import ResponsesSettings


@dataclass(slots=True)
class StoredResponse:
    id: str
    #: fingerprint of the API key that created it ("" when the appliance has no keys)
    owner: str
    #: the Response object's JSON, as GET answers it (its status moves queued -> in_progress -> final)
    response: bytes
    #: JSON array of every input item the model saw, ids included: previous turns, then this request's
    input_items: bytes
    #: the served name it was created with
    model: str
    #: for a streamed (or background) response, its SSE events in order, each a whole ``event:/data:`` frame
    events: list[bytes] | None = None

    def size(self) -> int:
        """Bytes the record holds, for the memory store's bound."""
        events = sum(map(len, self.events)) if self.events else 0
        return len(self.response) + len(self.input_items) + len(self.id) + len(self.owner) + len(self.model) + events


def store_unavailable(detail: str) -> APIError:
    return APIError(503, f"The response store is unavailable: {detail}.", type="service_unavailable_error",
                    code="store_unavailable")


class ResponseStore(ABC):
    """Keeps responses for ``ttl`` seconds. Failures of the store itself raise :func:`store_unavailable`.

    It also carries cancel announcements between replicas: a background response runs on one replica while
    its ``POST /v1/responses/{id}/cancel`` may reach another. A store in one process has no one to tell, so
    the defaults below do nothing; the service cancels its own tasks itself either way.
    """

    _cancel_callback: Callable[[str], None] | None = None

    @abstractmethod
    async def start(self) -> None:
        """Open connections; must not fail when the store is down (calls answer 503 until it is back)."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def put(self, record: StoredResponse) -> None:
        """Insert or replace (a background response is put again as its status changes)."""

    @abstractmethod
    async def get(self, response_id: str) -> StoredResponse | None: ...

    @abstractmethod
    async def delete(self, response_id: str) -> bool:
        """True when it existed."""

    async def announce_cancel(self, response_id: str) -> None:  # noqa: B027  # a no-op unless shared
        """Tell every replica that ``response_id`` is to be cancelled."""

    def on_cancel(self, callback: Callable[[str], None]) -> None:
        """Have ``callback(response_id)`` called for the cancels every replica announces, its own included.

        Before or after :meth:`start`. The callback runs on the event loop, so it must not block, and it gets
        ids of responses this replica is not running. A store without replicas never calls it.
        """
        self._cancel_callback = callback


def build_store(settings: ResponsesSettings) -> ResponseStore:
    if settings.store == "redis":
        from app.responses.redis_store import RedisStore

        return RedisStore(settings)
    from app.responses.memory_store import MemoryStore

    return MemoryStore(settings)
