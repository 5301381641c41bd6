"""One engine request: its admission into the engine's queue, its outputs, and how its failures are told."""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator
from typing import Any

from app.backends.base import ChunkStream
from app.backends.vllm.names import VLLMNames
from app.errors import APIError, internal_error, invalid_request, not_ready

log = logging.getLogger(__name__)


class Admission:
    """How many requests the engine runs or queues; beyond ``capacity`` new ones get 429 at once."""

    def __init__(self, model: str, retry_after: int) -> None:
        self.model = model
        self.retry_after = retry_after
        self.capacity = 0
        self.active = 0

    def admit(self) -> Slot:
        if self.active >= self.capacity:
            raise APIError(
                429, f"Model '{self.model}' is at capacity ({self.active} requests running or queued); "
                     "retry shortly.",
                type="rate_limit_error", code="queue_full", headers={"Retry-After": str(self.retry_after)},
            )
        self.active += 1
        return Slot(self)


class Slot:
    """One admitted request's place in the engine's queue, released exactly once.

    For a stream the place is held until the stream ends; if the stream is never iterated (the client
    left before the body started) it is released when the stream object is collected.
    """

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission
        self._kept = False

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._kept:
            self.release()

    def keep(self, stream: ChunkStream) -> ChunkStream:
        """Hand the place over to ``stream``, which releases it when it ends (or is collected unstarted)."""
        self._kept = True
        weakref.finalize(stream, self.release)
        return stream

    def release(self) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission.active -= 1


class Generation:
    """One engine request: its first output (already received) and the rest; closing it aborts it."""

    def __init__(self, engine: Any, generator: Any, first: Any, request_id: str, vllm: VLLMNames) -> None:
        self._engine = engine
        self._generator = generator
        self._first: Any = first
        self._request_id = request_id
        self._vllm = vllm
        self.finished = False

    @classmethod
    async def open(cls, engine: Any, generator: Any, request_id: str, vllm: VLLMNames) -> Generation:
        """Wait for the first output of ``generator``, so that refusals become HTTP statuses."""
        try:
            first = await generator.__anext__()
        except BaseException as exc:
            await generator.aclose()
            raise engine_error(exc, vllm, engine) from None
        return cls(engine, generator, first, request_id, vllm)

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> Any:
        if self.finished:
            raise StopAsyncIteration
        if self._first is not None:
            output, self._first = self._first, None
        else:
            try:
                output = await self._generator.__anext__()
            except StopAsyncIteration:
                raise
            except Exception as exc:
                raise engine_error(exc, self._vllm, self._engine) from None
        self.finished = bool(output.finished)
        return output

    async def final(self) -> Any:
        """The finished output (for FINAL_ONLY requests), closing the request either way."""
        try:
            async for output in self:
                if output.finished:
                    return output
        finally:
            await self.close()
        raise internal_error()

    async def close(self) -> None:
        await self._generator.aclose()
        if not self.finished:
            # Closing the generator aborts in vLLM already; saying it explicitly costs nothing.
            await self._engine.abort(self._request_id)


class TokenCount:
    """Token ids seen so far for one choice (delta outputs carry only the new ones)."""

    __slots__ = ("token_ids",)

    def __init__(self) -> None:
        self.token_ids: list[int] = []

    @classmethod
    def add(cls, count: TokenCount | None, completion: Any) -> TokenCount:
        count = count or cls()
        count.token_ids.extend(completion.token_ids)
        return count


async def merge(generations: list[Generation]) -> AsyncIterator[tuple[int, Any]]:
    """Outputs of several generations as they come, tagged with the generation's position."""
    if len(generations) == 1:
        async for output in generations[0]:
            yield 0, output
        return
    pending = {asyncio.ensure_future(g.__anext__()): i for i, g in enumerate(generations)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = pending.pop(task)
                try:
                    output = task.result()
                except StopAsyncIteration:
                    continue
                yield index, output
                pending[asyncio.ensure_future(generations[index].__anext__())] = index
    finally:
        for task in pending:
            task.cancel()


def client_error(exc: BaseException) -> APIError:
    """A refusal of vLLM's (bad parameter values) as a 400 naming the parameter where vLLM says which."""
    parameter = getattr(exc, "parameter", None)
    message = str(exc).split(" (parameter=")[0]
    return invalid_request(message, parameter if isinstance(parameter, str) else None)


def engine_error(exc: BaseException, vllm: VLLMNames, engine: Any) -> BaseException:
    if isinstance(exc, APIError | asyncio.CancelledError):
        return exc
    if isinstance(exc, vllm.VLLMClientError | ValueError):
        return client_error(exc)
    if isinstance(exc, vllm.EngineDeadError):
        return not_ready(f"The engine of model '{engine.model_config.served_model_name}' has died; the appliance "
                         "must be restarted.")
    log.error("engine request failed", exc_info=exc)
    return internal_error()
