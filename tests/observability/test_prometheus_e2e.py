"""A real Prometheus scraping a real gateway: every dashboard query returns data, the alert rules load.

Traffic goes through the official openai client to a gateway in front of the imitated provider, agents
included (their model is the provider's scripted ``tool-script``). Panels on vLLM's own series are checked
by a separate test with the tiny demo model on the embedded engine.
"""

from __future__ import annotations

import math
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.e2e.agents_support import calc, results, script
from tests.e2e.gateway import client
from tests.observability.dashboard import ALERTS, PanelQuery, load_dashboard, panel_queries, substitute
from tests.support.engine import engine_env
from tests.support.fake_provider import FakeProvider, remote_model
from tests.support.fixtures import HeliosFactory
from tests.support.prometheus import PrometheusServer, PrometheusTools, promtool
from tests.support.server import HeliosProcess

pytestmark = pytest.mark.timeout(60)

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there general kenobi"}]
# Wider than the whole test's traffic, so every rate() sees the increase between two phases.
RATE_WINDOW = "30s"
# What Grafana sends for $model when "All" is selected (the variable's allValue).
ALL_MODELS = ".*"
# Names of problems `promtool check metrics` reports for vLLM's series, which Helios exposes unchanged.
_VLLM_PROBLEM = re.compile(r"^vllm:")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

ALL_QUERIES = panel_queries(load_dashboard())
# Spill-overs come only from an embedded member, so those panels are checked with the engine.
_SPILL = "helios_spillovers"
HELIOS_QUERIES = [query for query in ALL_QUERIES if not query.needs_vllm and _SPILL not in query.expr]
VLLM_QUERIES = [query for query in ALL_QUERIES if query.needs_vllm or _SPILL in query.expr]
# Routing: a pool whose first member always fails (so it cools down at once), and a rate-limited model that
# falls back to a healthy one.
POOLS = [{"name": "pool-chat", "members": ["flaky", "gpt-test"]}]
ROUTING = {"allowed_fails": 1, "cooldown": 0.5}

# Agents over the scripted model ("scripted", below): "helper" runs whole scripts, "short" is allowed one round
# of tool calls, so a two-round script hits its step limit.
AGENTS: list[dict[str, Any]] = [
    {"name": "helper", "model": "scripted", "tools": ["calculator", "current_time"]},
    {"name": "short", "model": "scripted", "tools": ["calculator"], "max_steps": 1},
]
AGENT_NAMES = [agent["name"] for agent in AGENTS]


def _remote_models(provider: FakeProvider) -> list[dict[str, Any]]:
    return [
        remote_model(provider, "gpt-test", "gpt-4o"),
        remote_model(provider, "gpt-stream", "chunks-50"),
        remote_model(provider, "gpt-slow", "slow-chunks-20"),
        # One retry, so a failed request shows up in the retry and upstream error counters.
        remote_model(provider, "gpt-broken", "error-500", max_retries=1),
        remote_model(provider, "flaky", "error-503", internal=True),
        remote_model(provider, "gpt-limited", "error-429", fallbacks=["gpt-test"]),
        # The agents' model: it answers with the tool calls the user message scripts.
        remote_model(provider, "scripted", "tool-script"),
    ]


def _appliance(provider: FakeProvider) -> dict[str, Any]:
    """The remote models and the agents over them."""
    return {"models": _remote_models(provider), "agents": AGENTS, "pools": POOLS, "routing": ROUTING}


def _model_names(config: dict[str, Any]) -> list[str]:
    return [model["name"] for model in config["models"]]


def _multi_select(names: Sequence[str]) -> str:
    """$model as Grafana's Prometheus data source formats several selected values for =~."""
    # Regex metacharacters get a backslash that is itself escaped for the PromQL string: "tiny.v2" -> tiny\\.v2.
    return "(" + "|".join(re.sub(r"([$^*{}\[\]'+?.()|])", r"\\\\\1", name) for name in names) + ")"


def _chat_round(oa: openai.OpenAI, model: str, *, errors: bool) -> None:
    """One non-streaming and one streaming chat on ``model``; with ``errors``, a 5xx and a 404 too."""
    oa.chat.completions.create(model=model, messages=USER)
    oa.chat.completions.create(model=model, messages=USER, max_tokens=2)  # finish_reason "length"
    stream = oa.chat.completions.create(
        model=model, messages=USER, stream=True, stream_options={"include_usage": True}, max_tokens=40
    )
    for _ in stream:
        pass
    if errors:
        with pytest.raises(openai.InternalServerError):
            oa.chat.completions.create(model="gpt-broken", messages=USER)
        with pytest.raises(openai.NotFoundError):
            oa.chat.completions.create(model="no-such-model", messages=USER)


def _agent_round(oa: openai.OpenAI) -> None:
    """Agent requests whose tool calls succeed and fail, and one that runs into the step limit."""
    reply = oa.chat.completions.create(model="helper", messages=script(
        [calc("17 * 23"), calc("1/0"), {"name": "current_time", "arguments": {"timezone": "UTC"}}],
        [calc("2 ** 10")],
    ))
    quoted = results(reply.choices[0].message.content)
    assert quoted["call_s0_0"] == "391" and quoted["call_s1_0"] == "1024"
    assert "division by zero" in quoted["call_s0_1"]  # a failing call: outcome "error", the request still 200
    # Streamed, and two rounds asked of an agent allowed one: the second is never run.
    stream = oa.chat.completions.create(model="short", messages=script([calc("2 + 2")], [calc("3 * 3")]),
                                        stream=True)
    for _ in stream:
        pass


def _routing_round(oa: openai.OpenAI) -> None:
    """Requests through the pool (its failing member cools down, then is probed again) and a fallback."""
    for _ in range(3):
        oa.chat.completions.create(model="pool-chat", messages=USER)
        time.sleep(0.3)
    oa.chat.completions.create(model="gpt-limited", messages=USER)


def _remote_traffic(gateway: HeliosProcess) -> None:
    """One round of bounded traffic over every remote model, pool and agent."""
    oa = client(gateway.base_url)
    _chat_round(oa, "gpt-test", errors=True)
    _chat_round(oa, "gpt-stream", errors=False)
    _agent_round(oa)
    _routing_round(oa)


def _hold_slow_stream(gateway: HeliosProcess, chunks: int) -> threading.Thread:
    """Keep a slow stream (20 ms per chunk) open in the background, so a scrape sees it in flight."""

    def run() -> None:
        stream = client(gateway.base_url).chat.completions.create(
            model="gpt-slow", messages=USER, stream=True, max_tokens=chunks
        )
        for _ in stream:
            pass

    thread = threading.Thread(target=run, name="slow-stream", daemon=True)
    thread.start()
    return thread


def _run_in_phases(prometheus: PrometheusServer, traffic: Callable[[], None]) -> None:
    """Traffic before and after scrapes, so counters exist first and then increase inside the rate window."""
    prometheus.wait_for_scrapes(1)  # the baseline: series absent before any traffic
    traffic()
    prometheus.wait_for_scrapes(2)
    traffic()
    prometheus.wait_for_scrapes(2)


def _finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


def _evaluate(
    prometheus: PrometheusServer, queries: Sequence[PanelQuery], model: str, agent: str | None = None
) -> list[str]:
    """Problems of the queries with $model set to ``model`` and $agent to ``agent`` (by default: every agent,
    which is what Grafana sends for "All" since the variable has no allValue): parse errors, no data, only NaN."""
    agent = _multi_select(AGENT_NAMES) if agent is None else agent
    problems: list[str] = []
    for query in queries:
        expr = substitute(query.expr, model, RATE_WINDOW, agent=agent)
        try:
            result = prometheus.query(expr)
        except Exception as exc:  # collect every failing panel instead of stopping at the first
            problems.append(f"{query.panel} [{query.ref_id}] {expr}: {exc}")
            continue
        if not result:
            problems.append(f"{query.panel} [{query.ref_id}] {expr}: no data")
        elif not _finite(result):
            problems.append(f"{query.panel} [{query.ref_id}] {expr}: only NaN/Inf: {result}")
    return problems


def _scrape_text(gateway: HeliosProcess) -> bytes:
    """/metrics in the classic text format, the one promtool lints."""
    request = urllib.request.Request(gateway.url("/metrics"), headers={"Accept": "text/plain; version=0.0.4"})
    with _OPENER.open(request, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        body: bytes = response.read()
        return body


def _lint(body: bytes) -> list[str]:
    """`promtool check metrics` findings, except those about vLLM's series (its names, exposed unchanged)."""
    result = promtool("check", "metrics", stdin=body)
    # Findings go to stderr (a parse error too); exit code 3 means lint findings only.
    lines = (result.stdout + result.stderr).splitlines()
    problems = [line for line in lines if line.strip() and not _VLLM_PROBLEM.match(line)]
    if result.returncode not in (0, 3) and not problems:
        problems.append(f"promtool exited with {result.returncode}")
    return problems


def _target(gateway: HeliosProcess) -> str:
    return f"127.0.0.1:{gateway.port}"


def test_dashboard_queries_parse(prometheus_tools: PrometheusTools) -> None:
    """Every panel query, vLLM ones included, is valid PromQL once Grafana's variables are substituted."""
    with PrometheusServer([]) as prometheus:
        for query in ALL_QUERIES:
            for model, agent in ((ALL_MODELS, _multi_select(AGENT_NAMES)),
                                 (_multi_select(["gpt-test", "tiny.v2"]), _multi_select(["helper.v2"]))):
                prometheus.query(substitute(query.expr, model, RATE_WINDOW, agent=agent))  # raises on a parse error


def test_every_helios_panel_has_data(
    prometheus_tools: PrometheusTools, fake_provider: FakeProvider, helios: HeliosFactory
) -> None:
    """With "All" and with every model picked (and every agent), each non-vLLM panel query returns finite data."""
    config = _appliance(fake_provider)
    gateway = helios(config)
    with PrometheusServer([_target(gateway)]) as prometheus:
        slow: list[threading.Thread] = []

        def traffic() -> None:
            # 100 chunks at 20 ms: about 2 s in flight, spanning at least one 1 s scrape.
            slow.append(_hold_slow_stream(gateway, chunks=100))
            _remote_traffic(gateway)
            slow[-1].join(timeout=15)

        _run_in_phases(prometheus, traffic)
        problems = _evaluate(prometheus, HELIOS_QUERIES, ALL_MODELS)
        problems += _evaluate(prometheus, HELIOS_QUERIES, _multi_select(_model_names(config) + AGENT_NAMES))
        # The agent that hit its step limit, alone, has data on every Agents panel too.
        problems += _evaluate(prometheus, HELIOS_QUERIES, ALL_MODELS, agent=_multi_select(["short"]))
        assert not problems, "panels without data:\n" + "\n".join(problems)

        # The model variable's own query lists exactly the configured models and agents...
        listed = {sample["metric"]["model"] for sample in prometheus.query("helios_model_info")}
        assert listed == set(_model_names(config) + AGENT_NAMES + [pool["name"] for pool in POOLS])
        # ...the agent variable's the agents, under the names their own series are labelled with.
        agents = {sample["metric"]["model"] for sample in prometheus.query('helios_model_info{backend="agent"}')}
        assert agents == set(AGENT_NAMES)
        assert {sample["metric"]["agent"] for sample in prometheus.query("helios_agent_steps_count")} == agents
        in_flight = prometheus.query('max_over_time(helios_requests_in_flight{model="gpt-slow"}[1m])')
        assert in_flight and float(in_flight[0]["value"][1]) >= 1, "no scrape saw the slow stream in flight"
        errors = prometheus.query('increase(helios_requests_total{model="gpt-broken",status=~"5.."}[1m])')
        assert errors and float(errors[0]["value"][1]) > 0
        failed = prometheus.query(
            'increase(helios_agent_tool_calls_total{agent="helper",tool="calculator",outcome="error"}[1m])'
        )
        assert failed and float(failed[0]["value"][1]) > 0, "the failing calculator call was not counted"
        limited = prometheus.query('increase(helios_agent_step_limit_reached_total{agent="short"}[1m])')
        assert limited and float(limited[0]["value"][1]) > 0


def test_metrics_pass_promtool_lint(
    prometheus_tools: PrometheusTools, fake_provider: FakeProvider, helios: HeliosFactory
) -> None:
    """`promtool check metrics` finds nothing to complain about in the gateway's own series."""
    gateway = helios(_appliance(fake_provider))
    _remote_traffic(gateway)
    body = _scrape_text(gateway)
    assert b"helios_requests_total{" in body
    assert b"helios_agent_tool_calls_total{" in body
    problems = _lint(body)
    assert not problems, "\n".join(problems)


def test_alert_rules_load_and_evaluate(
    prometheus_tools: PrometheusTools, fake_provider: FakeProvider, helios: HeliosFactory
) -> None:
    """alerts.yml loads into a live server; the rules evaluate against real series and react to them."""
    # Its key variable is unset, so this backend never becomes ready.
    nokey = {key: value for key, value in remote_model(fake_provider, "nokey", "gpt-4o").items() if key != "api_key"}
    nokey["api_key_env"] = "HELIOS_TEST_UNSET_KEY"
    gateway = helios(
        {"models": [remote_model(fake_provider, "gpt-test", "gpt-4o"), nokey,
                    remote_model(fake_provider, "scripted", "tool-script")],
         "agents": [AGENTS[0]]},
        env={"HELIOS_TEST_UNSET_KEY": None},
    )
    oa = client(gateway.base_url)

    def failing_tools() -> None:
        # One round of 12 calculator calls, 8 of them failing: 2/3 not ok, and enough calls a minute to count.
        oa.chat.completions.create(model="helper", messages=script([calc("1 + 1")] * 4 + [calc("1/0")] * 8))

    with PrometheusServer([_target(gateway)], rule_files=[ALERTS]) as prometheus:
        _run_in_phases(prometheus, failing_tools)
        # A rule's health stays "unknown" until its group has been evaluated once after the scrapes.
        evaluated_after = time.time()
        deadline = time.monotonic() + 15
        while True:
            rules = [rule for group in prometheus.rules() for rule in group["rules"]]
            if rules and all(_evaluated_since(rule, evaluated_after) for rule in rules):
                break
            assert time.monotonic() < deadline, f"rules not evaluated: {rules}"
            time.sleep(0.2)

        assert [group["name"] for group in prometheus.rules()] == ["helios-serve"]
        unhealthy = [(rule["name"], rule["health"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"]
        assert not unhealthy
        states = {rule["name"]: rule["state"] for rule in rules}
        # up{job="helios-serve"} matches the job name the compose config uses, so no scrape alert...
        assert states["HeliosScrapeMissing"] == "inactive"
        # ...and the backend without a key is caught, pending until its "for: 5m" elapses.
        assert states["HeliosBackendNotReady"] == "pending"
        (not_ready,) = next(rule for rule in rules if rule["name"] == "HeliosBackendNotReady")["alerts"]
        assert not_ready["labels"]["model"] == "nokey"
        assert not_ready["annotations"]["summary"] == "Helios backend for model nokey is not ready"
        # The failing tool calls are caught per agent and tool, pending until "for: 10m" elapses; the agent's
        # requests themselves succeeded, so no request error alert.
        assert states["HeliosAgentToolErrorRatio"] == "pending"
        (tool_errors,) = next(rule for rule in rules if rule["name"] == "HeliosAgentToolErrorRatio")["alerts"]
        assert (tool_errors["labels"]["agent"], tool_errors["labels"]["tool"]) == ("helper", "calculator")
        assert tool_errors["annotations"]["summary"] == (
            "Helios agent helper: more than 20% of calculator tool calls fail"
        )
        assert states["HeliosHighErrorRatio"] == "inactive"


def _evaluated_since(rule: dict[str, Any], since: float) -> bool:
    stamp = rule.get("lastEvaluation", "")
    if not stamp or stamp.startswith("0001-"):
        return False
    # RFC 3339 with nanoseconds, which fromisoformat does not take: cut to microseconds.
    parsed = datetime.fromisoformat(re.sub(r"(\.\d{6})\d*", r"\1", stamp).replace("Z", "+00:00"))
    return parsed.timestamp() >= since


# Engine start-up on CPU dominates this test; the queries themselves take a second.
@pytest.mark.timeout(360)
def test_every_vllm_panel_has_data(
    prometheus_tools: PrometheusTools, fake_provider: FakeProvider, helios: HeliosFactory, demo_model_dir: Path,
    tmp_path: Path,
) -> None:
    """With an embedded engine, the vLLM panels (and the gateway's own) return data for that model."""
    model_dir = demo_model_dir
    tiny = {
        "name": "tiny",
        "backend": "vllm",
        "model": str(model_dir),
        "enforce_eager": True,
        "max_model_len": 512,
        "kv_cache_memory_bytes": 64 * 2**20,
    }
    # A pool over the engine and a provider: a prompt longer than the engine's context spills to the provider.
    config = {"models": [tiny, *_remote_models(fake_provider)], "agents": AGENTS,
              "pools": [*POOLS, {"name": "pool-local", "members": ["tiny", "gpt-test"]}], "routing": ROUTING}
    gateway = helios(config, env=engine_env(tmp_path))
    gateway.wait_healthy("/ready", timeout=150)
    with PrometheusServer([_target(gateway)]) as prometheus:

        def traffic() -> None:
            oa = client(gateway.base_url)
            _chat_round(oa, "tiny", errors=False)
            long_prompt = [{"role": "user", "content": "word " * 600}]
            spilled = oa.chat.completions.with_raw_response.create(model="pool-local", messages=long_prompt)
            assert spilled.headers["X-Helios-Served-By"] == "gpt-test"
            _remote_traffic(gateway)

        _run_in_phases(prometheus, traffic)
        # vLLM labels its series with the served model name, which must be the Helios model name.
        problems = _evaluate(prometheus, VLLM_QUERIES, ALL_MODELS)
        problems += _evaluate(prometheus, VLLM_QUERIES, _multi_select(["tiny"]))
        problems += _evaluate(prometheus, HELIOS_QUERIES, ALL_MODELS)
        assert not problems, "panels without data:\n" + "\n".join(problems)
        body = _scrape_text(gateway)
    problems = _lint(body)
    assert not problems, "\n".join(problems)
