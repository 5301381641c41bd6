"""Model names and aliases to backend instances; the only place that knows which backend is which."""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import Any

from app import fatal
from app.backends.base import Backend
from app.settings import AgentSettings, ModelSettings, PoolSettings, RoutingSettings

log = logging.getLogger(__name__)


def build_backends(settings: ModelSettings) -> list[tuple[Backend, list[str], tuple[str, str, str]]]:
    """The backends one configured model serves: (backend, its served names, its (name, kind, upstream))."""
    names = [] if settings.internal else settings.served_names
    if settings.backend == "openai":
        from app.backends.remote import RemoteBackend

        return [(RemoteBackend(settings), names, (settings.name, settings.backend, settings.upstream_name))]
    from app.backends.vllm import VLLMBackend
    from app.backends.vllm.adapters import LoRAAdapterBackend

    base = VLLMBackend(settings)
    built: list[tuple[Backend, list[str], tuple[str, str, str]]] = [
        (base, names, (settings.name, settings.backend, settings.upstream_name))]
    for adapter in settings.lora_adapters:
        built.append((LoRAAdapterBackend(base, adapter.name), [adapter.name],
                      (adapter.name, "vllm-lora", str(adapter.path))))
    return built


def build_agent(settings: AgentSettings, model: Backend) -> Backend:
    from app.agents.builtins import Builtins
    from app.agents.loop import AgentBackend
    from app.agents.tools import ToolSource

    sources: list[ToolSource] = [Builtins(settings)]
    if settings.mcp_servers:
        from app.agents.mcp import McpToolSource

        sources += [McpToolSource(server, settings.tool_timeout, settings.max_tool_output_bytes)
                    for server in settings.mcp_servers]
    return AgentBackend(settings, model, sources)


def _routed(models: list[ModelSettings], pools: list[PoolSettings]) -> set[str]:
    """Models a router calls: the ``openai`` client's own retries are turned off for them, so that the
    router's attempts do not multiply with the client's."""
    routed = {member for pool in pools for member in pool.members}
    for model in models:
        if model.fallbacks or model.context_window_fallbacks:
            routed.add(model.name)
    return routed


class Registry:
    def __init__(self, models: list[ModelSettings], agents: list[AgentSettings] | None = None,
                 pools: list[PoolSettings] | None = None, routing: RoutingSettings | None = None) -> None:
        self.created = int(time.time())
        self.backends: list[Backend] = []
        self._described: list[tuple[str, str, str]] = []
        self._starting: set[asyncio.Task[None]] = set()
        self._by_name: dict[str, Backend] = {}
        pools = pools or []
        routing = routing or RoutingSettings()
        routed = _routed(models, pools)
        #: every model and pool by every name, internal ones included: what routers and agents call
        everything: dict[str, Backend] = {}
        for configured in models:
            model = configured
            if model.name in routed and model.backend == "openai" and model.max_retries:
                model = model.model_copy(update={"max_retries": 0})
            for backend, names, described in build_backends(model):
                self.backends.append(backend)
                self._described.append(described)
                for served in names:
                    self._by_name[served] = backend
                everything[backend.name] = backend
            for served in model.served_names:
                everything[served] = everything[model.name]
        self._routers(models, pools, routing, everything)
        # Agents last: each calls one model or pool (the settings reject agents calling agents).
        for agent in agents or ():
            backend = build_agent(agent, everything[agent.model])
            self.backends.append(backend)
            self._described.append((agent.name, "agent", agent.model))
            for served in agent.served_names:
                self._by_name[served] = backend

    def _routers(self, models: list[ModelSettings], pools: list[PoolSettings], routing: RoutingSettings,
                 everything: dict[str, Backend]) -> None:
        """Pools, and models with fallbacks (served through a router of their own). Fallbacks may name pools
        and routed models, so routers are made in an order where each one's fallbacks exist already (the
        settings reject cycles)."""
        from app.routing.pool import RouterBackend

        pending: list[tuple[str, list[str], list[str], list[str], Any]] = []
        for pool in pools:
            pending.append((pool.name, pool.served_names, pool.members, pool.fallbacks + pool.context_window_fallbacks,
                            pool))
        for model in models:
            if model.fallbacks or model.context_window_fallbacks:
                pending.append((model.name, [] if model.internal else model.served_names, [model.name],
                                model.fallbacks + model.context_window_fallbacks, model))
        routers: dict[str, Backend] = {}
        while pending:
            ready = [p for p in pending if all(self._canonical(t, pools, models) not in
                                               {q[0] for q in pending} for t in p[3])]
            if not ready:
                raise ValueError("routers' fallbacks form a cycle: " + ", ".join(p[0] for p in pending))
            for name, served, members, _, source in ready:
                lookup = {**everything, **routers}
                router = RouterBackend(
                    name, [(m, everything[m]) for m in members],
                    [(f, lookup[f]) for f in source.fallbacks],
                    [(f, lookup[f]) for f in source.context_window_fallbacks], routing,
                    strategy=getattr(source, "strategy", "priority"), weights=getattr(source, "weights", None))
                self.backends.append(router)
                if isinstance(source, PoolSettings):
                    self._described.append((name, "pool", ",".join(members)))
                for alias in ([source.name, *source.aliases]):
                    routers[alias] = router
                for alias in served:
                    self._by_name[alias] = router
            pending = [p for p in pending if p not in ready]
        everything.update(routers)

    @staticmethod
    def _canonical(name: str, pools: list[PoolSettings], models: list[ModelSettings]) -> str:
        for source in [*pools, *models]:
            if name in source.served_names:
                return source.name
        return name

    def find(self, name: str) -> Backend | None:
        """The backend serving ``name`` (a model name or alias), if any."""
        return self._by_name.get(name)

    def served_names(self) -> dict[str, Backend]:
        return self._by_name

    def describe(self) -> list[tuple[str, str, str]]:
        """(name, backend kind, upstream model) of every served model."""
        return self._described

    async def start(self) -> None:
        """Start every backend in the background: /health answers while a slow one loads, and /ready
        tells when all are done. A backend that fails to start stops the process."""
        for backend in self.backends:
            task = asyncio.create_task(backend.start(), name=f"start {backend.name}")
            self._starting.add(task)
            task.add_done_callback(partial(self._started, backend))
        # Instant starters (remote clients) are ready before the first request arrives.
        await asyncio.sleep(0)

    def _started(self, backend: Backend, task: asyncio.Task[None]) -> None:
        self._starting.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            fatal.fail(f"model '{backend.name}' failed to start: {_one_line(error)}")
            return
        reason = backend.not_ready_reason()
        if reason:
            log.warning("model %s is not ready: %s", backend.name, reason)
        else:
            log.info("model %s is ready", backend.name)

    async def close(self) -> None:
        for task in list(self._starting):
            task.cancel()
        results = await asyncio.gather(*(b.close() for b in self.backends), return_exceptions=True)
        for backend, result in zip(self.backends, results, strict=True):
            if isinstance(result, BaseException):
                log.error("closing model %s failed: %s", backend.name, result)

    def readiness(self) -> dict[str, str | None]:
        return {backend.name: backend.not_ready_reason() for backend in self.backends}

    def failures(self) -> dict[str, str]:
        """The backends that cannot serve again until a restart, and why."""
        return {backend.name: reason for backend in self.backends if (reason := backend.failure()) is not None}


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 500 else text[:497] + "..."
