"""Model names and aliases to backend instances; the only place that knows which backend is which."""

from __future__ import annotations

import asyncio
import logging
import time

from app.backends.base import Backend
from app.errors import model_not_found
from app.settings import ModelSettings

log = logging.getLogger(__name__)


def build_backend(settings: ModelSettings) -> Backend:
    if settings.backend == "openai":
        from app.backends.remote import RemoteBackend

        return RemoteBackend(settings)
    raise ValueError(f"unknown backend {settings.backend!r}")  # settings validation makes this unreachable


class Registry:
    def __init__(self, models: list[ModelSettings]) -> None:
        self.backends: list[Backend] = [build_backend(model) for model in models]
        self.created = int(time.time())
        self._models = models
        self._by_name: dict[str, Backend] = {}
        for model, backend in zip(models, self.backends, strict=True):
            for served in model.served_names:
                self._by_name[served] = backend

    def get(self, name: str) -> Backend:
        backend = self._by_name.get(name)
        if backend is None:
            raise model_not_found(name)
        return backend

    def served_names(self) -> dict[str, Backend]:
        return self._by_name

    def describe(self) -> list[tuple[str, str, str]]:
        """(name, backend kind, upstream model) of every configured model."""
        return [(m.name, m.backend, m.upstream_name) for m in self._models]

    def is_known(self, name: str) -> bool:
        return name in self._by_name

    async def start(self) -> None:
        await asyncio.gather(*(backend.start() for backend in self.backends))
        for backend in self.backends:
            reason = backend.not_ready_reason()
            if reason:
                log.warning("model %s is not ready: %s", backend.name, reason)

    async def close(self) -> None:
        results = await asyncio.gather(*(b.close() for b in self.backends), return_exceptions=True)
        for backend, result in zip(self.backends, results, strict=True):
            if isinstance(result, BaseException):
                log.error("closing model %s failed: %s", backend.name, result)

    def readiness(self) -> dict[str, str | None]:
        return {backend.name: backend.not_ready_reason() for backend in self.backends}
