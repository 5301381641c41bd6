"""A vLLM logits processor that paces the engine, for tests that must act while a generation is still running.

The demo model generates thousands of tokens a second and the fastest CI machine finishes a 2,000-token
stream before a test can kill the engine, signal the appliance or hang up. A request that sends
``vllm_xargs: {"pace_ms": N}`` makes every engine step that includes it last at least N ms, so "still
generating" holds for a known time whatever the machine's speed. Requests without it are not slowed (unless
they share a step with a paced one). Loaded into the test engines with
``engine_args = {logits_processors = ["tests.support.pacing:Pace"]}`` (``tests.support.engine.PACER``; the
request fields come from ``tests.support.engine.paced``, so test modules need not import torch).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

if TYPE_CHECKING:
    from vllm.config import VllmConfig

ARG = "pace_ms"


def _pace_of(params: SamplingParams) -> float:
    value = (params.extra_args or {}).get(ARG)
    return 0.0 if value is None else float(value) / 1000


class Pace(LogitsProcessor):
    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self._paces: dict[int, float] = {}  # batch index -> seconds per step

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        value = (sampling_params.extra_args or {}).get(ARG)
        if value is not None and (not isinstance(value, int | float) or not 0 <= value <= 1000):
            raise ValueError(f"{ARG} must be a number of milliseconds from 0 to 1000")

    def is_argmax_invariant(self) -> bool:
        return True  # it never changes the logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        # Called before every forward pass: the sleep lengthens the step of every request in it.
        if batch_update is not None:
            for index in batch_update.removed:
                self._paces.pop(index, None)
            for index, params, _, _ in batch_update.added:
                pace = _pace_of(params)
                if pace:
                    self._paces[index] = pace
                else:
                    self._paces.pop(index, None)
            for source, target, direction in batch_update.moved:
                # A one-way move overwrites the target; a swap trades the two places.
                moving, staying = self._paces.pop(source, None), self._paces.pop(target, None)
                if direction is MoveDirectionality.SWAP and staying is not None:
                    self._paces[source] = staying
                if moving is not None:
                    self._paces[target] = moving
        if self._paces:
            time.sleep(max(self._paces.values()))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
