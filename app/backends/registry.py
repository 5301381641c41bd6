"""Model names and aliases to backend instances; the only place that knows which backend is which."""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial

from app import fatal
from app.backends.base import Backend
from app.settings import AgentSettings, ModelSettings

log = logging.getLogger(__name__)


def build_backends(settings: ModelSettings) -> list[tuple[Backend, list[str], tuple[str, str, str]]]:
    """The backends one configured model serves: (backend, its served names, its (name, kind, upstream))."""
    if settings.backend == "openai":
        from app.backends.remote import RemoteBackend

        return [(RemoteBackend(settings), settings.served_names,
                 (settings.name, settings.backend, settings.upstream_name))]
    from app.backends.vllm import VLLMBackend
    from app.backends.vllm.adapters import LoRAAdapterBackend

    base = VLLMBackend(settings)
    built: list[tuple[Backend, list[str], tuple[str, str, str]]] = [
        (base, settings.served_names, (settings.name, settings.backend, settings.upstream_name))]
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


class Registry:
    def __init__(self, models: list[ModelSettings], agents: list[AgentSettings] | None = None) -> None:
        self.created = int(time.time())
        self.backends: list[Backend] = []
        self._described: list[tuple[str, str, str]] = []
        self._starting: set[asyncio.Task[None]] = set()
        self._by_name: dict[str, Backend] = {}
        for model in models:
            for backend, names, described in build_backends(model):
                self.backends.append(backend)
                self._described.append(described)
                for served in names:
                    self._by_name[served] = backend
        # Agents after models: each calls one served model (the settings reject agents calling agents).
        for agent in agents or ():
            backend = build_agent(agent, self._by_name[agent.model])
            self.backends.append(backend)
            self._described.append((agent.name, "agent", agent.model))
            for served in agent.served_names:
                self._by_name[served] = backend

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


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 500 else text[:497] + "..."
