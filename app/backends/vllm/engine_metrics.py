"""vLLM's own Prometheus metrics (``vllm:*``) for every embedded engine, not only the last one started.

vLLM's ``PrometheusStatLogger`` registers its metrics in prometheus_client's global registry and, when it is
created, unregisters every ``vllm:*`` metric already there: in one process with several engines, only the
engine whose logger came last was on /metrics, and which one that was depended on which finished loading
last. Here each engine's logger registers in a registry of its own, and one collector in the global registry
yields every engine's samples, family by family (they differ in their ``model_name`` label), so /metrics
shows them as vLLM's own server would, one engine after another.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import REGISTRY, Collector

# The class attributes through which vLLM's loggers create their metrics.
_METRIC_CLASSES = ("_gauge_cls", "_counter_cls", "_histogram_cls")
# The helpers PrometheusStatLogger creates, which create metrics the same way.
_HELPERS = ("_spec_decoding_cls", "_kv_connector_cls", "_ec_connector_cls", "_perf_metrics_cls")


class _Engines(Collector):
    """Every engine's registry, merged."""

    def __init__(self) -> None:
        self._registries: list[CollectorRegistry] = []
        self._lock = threading.Lock()  # engines load in threads; /metrics may be scraped from another

    def add(self) -> CollectorRegistry:
        registry = CollectorRegistry(auto_describe=True)
        with self._lock:
            self._registries.append(registry)
        return registry

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            registries = list(self._registries)
        families: dict[str, Metric] = {}
        for registry in registries:
            for family in registry.collect():
                merged = families.get(family.name)
                if merged is None:
                    families[family.name] = merged = Metric(family.name, family.documentation, family.type,
                                                            family.unit)
                merged.samples += family.samples
        yield from families.values()


_ENGINES = _Engines()
REGISTRY.register(_ENGINES)


def _bound(cls: type, registry: CollectorRegistry, **extra: Any) -> type:
    """``cls`` with its metric classes creating their metrics in ``registry``."""
    namespace = {name: partial(getattr(cls, name), registry=registry) for name in _METRIC_CLASSES
                 if hasattr(cls, name)}
    return type(cls.__name__, (cls,), {**namespace, **extra})


def stat_logger() -> type:
    """A vLLM stat logger factory (for ``AsyncLLM.from_engine_args``'s ``stat_loggers``) writing one engine's
    Prometheus metrics to a registry of its own that /metrics exposes."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    registry = _ENGINES.add()
    helpers = {name: _bound(getattr(PrometheusStatLogger, name), registry) for name in _HELPERS}
    return _bound(PrometheusStatLogger, registry, **helpers)
