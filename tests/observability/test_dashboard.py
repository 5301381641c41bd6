"""Static checks of the Grafana provisioning files and the Helios Serve dashboard."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.observability.dashboard import (
    DASHBOARD,
    DASHBOARD_PROVIDER,
    DATASOURCES,
    data_panels,
    load_dashboard,
    load_yaml,
    panel_queries,
)

# helios_ metrics without a model label (app/metrics.py); every other one must be filtered by $model
# (or, on the Agents row, by $agent; on the Routing row, by $pool).
NO_MODEL_LABEL = {"helios_overhead_seconds", "helios_build_info"}
# helios_ metrics labelled agent (the agent's name) instead of model (app/metrics.py).
AGENT_LABEL = {
    "helios_agent_steps",
    "helios_agent_tool_calls_total",
    "helios_agent_tool_duration_seconds",
    "helios_agent_step_limit_reached_total",
}
# The row whose panels are filtered by $agent; every other row's are filtered by $model (but Routing's).
AGENTS_ROW = "Agents"
# helios_ metrics of routing (app/metrics.py), with the label naming the pool (or name with fallbacks): only on
# the Routing row, filtered by $pool.
POOL_LABEL = {
    "helios_pool_attempts_total": "pool",
    "helios_pool_member_state": "pool",
    "helios_pool_cooldowns_total": "pool",
    "helios_spillovers_total": "pool",
    "helios_fallbacks_total": "from",
}
# The row whose panels are filtered by $pool.
ROUTING_ROW = "Routing"
# helios_pool_member_state's values (app/routing/health.py).
MEMBER_STATES = {"0": "healthy", "1": "cooling down", "2": "probing"}
# A metric name and its optional selector; ":" so recording-rule style names like vllm:x match too.
_SELECTOR = re.compile(r"\b((?:helios_|vllm:)[a-zA-Z0-9_:]*)(\{[^}]*\})?")
_RANGE = re.compile(r"\[([^\]]*)\]")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _base_name(metric: str) -> str:
    """The family name: histogram series suffixes stripped."""
    for suffix in _HISTOGRAM_SUFFIXES:
        if metric.endswith(suffix):
            return metric.removesuffix(suffix)
    return metric


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


@pytest.fixture(scope="module")
def datasource_uid() -> str:
    (source,) = load_yaml(DATASOURCES)["datasources"]
    uid: str = source["uid"]
    return uid


def test_datasource_provisioning() -> None:
    config = load_yaml(DATASOURCES)
    assert config["apiVersion"] == 1
    (source,) = config["datasources"]
    assert source["type"] == "prometheus"
    assert source["uid"] == "helios-prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert source["access"] == "proxy"
    assert source["isDefault"] is True


def test_dashboard_provider_provisioning() -> None:
    config = load_yaml(DASHBOARD_PROVIDER)
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    # compose mounts ./config/grafana/dashboards there.
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert DASHBOARD.parent.name == "dashboards"


def test_dashboard_identity(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "helios-serve"
    assert dashboard["title"] == "Helios Serve"
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert "id" not in dashboard or dashboard["id"] is None, "a fixed id clashes between Grafana instances"


def test_model_variable(dashboard: dict[str, Any], datasource_uid: str) -> None:
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    model = variables["model"]
    assert model["type"] == "query"
    query = model["query"]["query"] if isinstance(model["query"], dict) else model["query"]
    assert query == "label_values(helios_model_info, model)"
    assert model["multi"] is True
    assert model["includeAll"] is True
    assert model["datasource"]["uid"] == datasource_uid


def test_agent_variable(dashboard: dict[str, Any], datasource_uid: str) -> None:
    """$agent lists the configured agents; its "All" sends that list, never a regex matching everything."""
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    agent = variables["agent"]
    assert agent["type"] == "query"
    query = agent["query"]["query"] if isinstance(agent["query"], dict) else agent["query"]
    # Agents are in helios_model_info (backend "agent") from start-up, under the name their agent label carries.
    assert query == 'label_values(helios_model_info{backend="agent"}, model)'
    assert agent["multi"] is True
    assert agent["includeAll"] is True
    # Without allValue Grafana sends "All" as (a|b|...): model=~"$agent" then matches agents only, not models.
    assert not agent.get("allValue"), 'allValue ".*" would make model=~"$agent" match every model'
    assert agent["datasource"]["uid"] == datasource_uid


def test_pool_variable(dashboard: dict[str, Any], datasource_uid: str) -> None:
    """$pool lists the pools (and names with fallbacks) that made attempts; "All" sends that list, like $agent."""
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    pool = variables["pool"]
    assert pool["type"] == "query"
    query = pool["query"]["query"] if isinstance(pool["query"], dict) else pool["query"]
    assert query == "label_values(helios_pool_attempts_total, pool)"
    assert pool["multi"] is True
    assert pool["includeAll"] is True
    # The attempts per request divide by helios_requests_total{model=~"$pool"}: the pools' requests only.
    assert not pool.get("allValue"), 'allValue ".*" would make model=~"$pool" match every model'
    assert pool["datasource"]["uid"] == datasource_uid


def test_panels_listed_in_layout_order_without_overlap(dashboard: dict[str, Any]) -> None:
    """The list order is the layout order (so a panel belongs to the row listed before it), rows span the
    width, and no two panels cover the same cell."""
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels] + [nested["id"] for panel in panels for nested in panel.get("panels", [])]
    assert len(ids) == len(set(ids)), "row and panel ids must be unique too"
    positions = [(panel["gridPos"]["y"], panel["gridPos"]["x"]) for panel in panels]
    assert positions == sorted(positions), "panels are not listed in layout order"
    covered: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        if panel["type"] == "row":
            assert (grid["x"], grid["w"], grid["h"]) == (0, 24, 1), panel["title"]
        for y in range(grid["y"], grid["y"] + grid["h"]):
            for x in range(grid["x"], grid["x"] + grid["w"]):
                assert (y, x) not in covered, f"{panel['title']} overlaps {covered[(y, x)]}"
                covered[(y, x)] = panel["title"]


def test_panel_ids_unique_and_laid_out(dashboard: dict[str, Any]) -> None:
    panels = data_panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["type"] in {"timeseries", "stat", "state-timeline"}, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_every_panel_has_a_query(dashboard: dict[str, Any]) -> None:
    for panel in data_panels(dashboard):
        exprs = [target.get("expr", "") for target in panel.get("targets", [])]
        assert exprs, f"{panel['title']}: no targets"
        assert all(expr.strip() for expr in exprs), f"{panel['title']}: target without expr"


def test_datasource_referenced_by_uid(dashboard: dict[str, Any], datasource_uid: str) -> None:
    for panel in data_panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource_uid}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": datasource_uid}, panel["title"]


@pytest.mark.parametrize("query", panel_queries(load_dashboard()), ids=str)
def test_queries_filter_by_model_or_agent(query: Any) -> None:
    """Every selector is bounded by its row's variable: $agent on the Agents row, $model elsewhere.

    Outside the Agents row, helios_ series carrying a model label use model=~"$model" and vLLM's use
    model_name=~"$model". On it, agent series use agent=~"$agent" and model-labelled ones model=~"$agent"
    (agent requests are counted under the agent's name; test_agent_variable keeps "All" to the agents). On the
    Routing row, routing series use their pool label (fallbacks: from) =~"$pool" and requests model=~"$pool" (a
    pool's requests are counted under its name).
    """
    found = _SELECTOR.findall(query.expr)
    assert found, "no helios_ or vllm: metric in the query"
    if query.row == ROUTING_ROW:
        assert "$model" not in query.expr and "$agent" not in query.expr, f"the {ROUTING_ROW} row is filtered by $pool"
        for metric, selector in found:
            name = _base_name(metric)
            assert name in POOL_LABEL or name == "helios_requests_total", f"{metric}: no pool to filter by"
            label = POOL_LABEL.get(name, "model")
            assert f'{label}=~"$pool"' in selector, f"{metric} not filtered by {label}=~\"$pool\""
        return
    assert "$pool" not in query.expr, f"only the {ROUTING_ROW} row is filtered by $pool"
    if query.row == AGENTS_ROW:
        assert "$model" not in query.expr, f"the {AGENTS_ROW} row is filtered by $agent"
        for metric, selector in found:
            name = _base_name(metric)
            assert name not in NO_MODEL_LABEL and not metric.startswith("vllm:"), f"{metric}: no agent to filter by"
            label = "agent" if name in AGENT_LABEL else "model"
            assert f'{label}=~"$agent"' in selector, f"{metric} not filtered by {label}=~\"$agent\""
        return
    assert "$agent" not in query.expr, f"only the {AGENTS_ROW} row is filtered by $agent"
    for metric, selector in found:
        name = _base_name(metric)
        assert name not in AGENT_LABEL, f"{metric} belongs on the {AGENTS_ROW} row, filtered by $agent"
        assert name not in POOL_LABEL, f"{metric} belongs on the {ROUTING_ROW} row, filtered by $pool"
        if name in NO_MODEL_LABEL:
            assert "$model" not in selector, f"{metric} has no model label"
            continue
        label = "model_name" if metric.startswith("vllm:") else "model"
        assert f'{label}=~"$model"' in selector, f"{metric} not filtered by {label}=~\"$model\""


@pytest.mark.parametrize("query", panel_queries(load_dashboard()), ids=str)
def test_rate_windows_use_rate_interval(query: Any) -> None:
    """Fixed windows break when the scrape interval or the zoom changes."""
    for window in _RANGE.findall(query.expr):
        assert window == "$__rate_interval"


def test_required_panels_present(dashboard: dict[str, Any]) -> None:
    """The metric families the dashboard must chart (app/metrics.py and vLLM's own)."""
    used = {_base_name(metric) for query in panel_queries(dashboard) for metric, _ in _SELECTOR.findall(query.expr)}
    assert used >= {
        "helios_requests_total",
        "helios_requests_in_flight",
        "helios_request_duration_seconds",
        "helios_time_to_first_token_seconds",
        "helios_inter_token_latency_seconds",
        "helios_prompt_tokens_total",
        "helios_completion_tokens_total",
        "helios_finish_reasons_total",
        "helios_upstream_errors_total",
        "helios_upstream_retries_total",
        "helios_overhead_seconds",
        "helios_backend_ready",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        *AGENT_LABEL,
        *POOL_LABEL,
    }
    for quantile in ("0.5", "0.95", "0.99"):
        for family in ("request_duration_seconds", "time_to_first_token_seconds", "inter_token_latency_seconds",
                       "overhead_seconds"):
            assert any(
                f"histogram_quantile({quantile}," in query.expr and f"helios_{family}_bucket" in query.expr
                for query in panel_queries(dashboard)
            ), f"no p{quantile} of {family}"
    for quantile, family in (("0.5", "agent_steps"), ("0.95", "agent_steps"), ("0.95", "agent_tool_duration_seconds")):
        assert any(
            f"histogram_quantile({quantile}," in query.expr and f"helios_{family}_bucket" in query.expr
            for query in panel_queries(dashboard)
        ), f"no p{quantile} of {family}"


def test_agents_row(dashboard: dict[str, Any]) -> None:
    """The Agents row charts agent traffic, steps, tool calls, tool errors, tool duration and step-limit hits."""
    queries = [query for query in panel_queries(dashboard) if query.row == AGENTS_ROW]
    used = {_base_name(metric) for query in queries for metric, _ in _SELECTOR.findall(query.expr)}
    assert used == {"helios_requests_total", *AGENT_LABEL}
    # The tool error ratio: calls with any outcome but ok, over all calls, per agent and tool.
    assert any('outcome!="ok"' in query.expr and "sum by (agent, tool)" in query.expr and " / " in query.expr
               for query in queries)


def test_routing_row(dashboard: dict[str, Any]) -> None:
    """The Routing row charts attempts by outcome, attempts per request, fallbacks, member state, cool-downs and
    spill-overs."""
    queries = [query for query in panel_queries(dashboard) if query.row == ROUTING_ROW]
    used = {_base_name(metric) for query in queries for metric, _ in _SELECTOR.findall(query.expr)}
    assert used == {"helios_requests_total", *POOL_LABEL}
    exprs = [query.expr for query in queries]
    assert any("sum by (pool, outcome) (rate(helios_pool_attempts_total" in expr for expr in exprs)
    # Attempts per request: the pool's attempts over the requests counted under its name (model label), joined
    # on the pool name.
    (per_request,) = [expr for expr in exprs if "helios_requests_total" in expr]
    attempts, requests = per_request.split(" / on (pool) ")
    assert attempts.startswith("sum by (pool) (rate(helios_pool_attempts_total{")
    assert requests.startswith("label_replace(sum by (model) (rate(helios_requests_total{")
    assert requests.endswith('"pool", "$1", "model", "(.*)")')
    assert any("sum by (from, to, error_class) (rate(helios_fallbacks_total" in expr for expr in exprs)
    assert any("sum by (pool, member) (rate(helios_pool_cooldowns_total" in expr for expr in exprs)
    assert any("sum by (pool, reason) (rate(helios_spillovers_total" in expr for expr in exprs)


def test_member_state_panel_names_the_states(dashboard: dict[str, Any]) -> None:
    """The member state panel maps 0/1/2 to healthy, cooling down and probing."""
    (panel,) = [panel for panel in data_panels(dashboard)
                if any("helios_pool_member_state" in target["expr"] for target in panel["targets"])]
    assert panel["type"] in {"state-timeline", "stat"}
    (mapping,) = panel["fieldConfig"]["defaults"]["mappings"]
    assert mapping["type"] == "value"
    assert {value: option["text"] for value, option in mapping["options"].items()} == MEMBER_STATES
