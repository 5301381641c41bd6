"""The repo's Prometheus/Grafana configuration files and the queries of the Helios Serve dashboard."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.server import REPO_ROOT

__all__ = [
    "ALERTS",
    "ALERTS_TEST",
    "ALL_POOLS",
    "DASHBOARD",
    "DASHBOARD_PROVIDER",
    "DATASOURCES",
    "PROMETHEUS_CONFIG",
    "PanelQuery",
    "data_panels",
    "load_dashboard",
    "load_yaml",
    "panel_queries",
    "panel_rows",
    "substitute",
]

CONFIG = REPO_ROOT / "config"
PROMETHEUS_CONFIG = CONFIG / "prometheus" / "prometheus.yml"
ALERTS = CONFIG / "prometheus" / "alerts.yml"
ALERTS_TEST = CONFIG / "prometheus" / "alerts_test.yml"
DATASOURCES = CONFIG / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER = CONFIG / "grafana" / "provisioning" / "dashboards" / "helios.yml"
DASHBOARD = CONFIG / "grafana" / "dashboards" / "helios-serve.json"


def _variable(name: str) -> re.Pattern[str]:
    """Grafana's three spellings of a template variable: $name, ${name} (with a format), [[name]]."""
    return re.compile(rf"\${name}\b|\$\{{{name}(?::[a-z]+)?\}}|\[\[{name}\]\]")


_MODEL_VARIABLE = _variable("model")
_AGENT_VARIABLE = _variable("agent")
_POOL_VARIABLE = _variable("pool")
# label_replace's references to its regex's groups ($1, ${1}): PromQL's, not Grafana variables (Grafana leaves a
# $name it has no variable for as it is).
_CAPTURE_REFERENCE = re.compile(r"\$(?:\d+|\{\d+\})")
#: $pool in :func:`substitute` unless told otherwise: every pool (Grafana sends the listed pools for "All").
ALL_POOLS = ".*"


@dataclass(frozen=True)
class PanelQuery:
    """One target of one panel, and the title of the row the panel is in ("" above the first row)."""

    panel: str
    ref_id: str
    expr: str
    row: str = ""

    @property
    def needs_vllm(self) -> bool:
        """vLLM's own series exist only for models served by an embedded engine."""
        return "vllm:" in self.expr

    def __str__(self) -> str:
        return f"{self.panel} [{self.ref_id}]: {self.expr}"


def load_yaml(path: Path) -> Any:
    """A YAML file, parsed safely."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    """The dashboard JSON."""
    dashboard: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return dashboard


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Panels in order, rows flattened (collapsed rows nest theirs)."""
    flat: list[dict[str, Any]] = []
    for panel in panels:
        flat.append(panel)
        flat.extend(_panels(panel.get("panels", [])))
    return flat


def data_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """All panels that are not rows."""
    return [panel for panel in _panels(dashboard["panels"]) if panel.get("type") != "row"]


def panel_rows(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every panel that is not a row, with the title of its row.

    A panel belongs to the last row before it in the list (test_dashboard checks that the list is in layout
    order, so that is the row it is shown under), or to the collapsed row that nests it.
    """
    rows: list[tuple[str, dict[str, Any]]] = []
    row = ""
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            row = panel.get("title", "")
            rows.extend((row, nested) for nested in panel.get("panels", []))
        else:
            rows.append((row, panel))
    return rows


def panel_queries(dashboard: dict[str, Any]) -> list[PanelQuery]:
    """Every PromQL target of every panel."""
    return [
        PanelQuery(panel["title"], target.get("refId", "?"), target["expr"], row)
        for row, panel in panel_rows(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def substitute(
    expr: str, model: str, rate_interval: str = "30s", *, agent: str | None = None, pool: str = ALL_POOLS
) -> str:
    """The query as Grafana would send it: the model (agent, pool) variables and the interval macros replaced."""
    # A function, not a template: backslashes in the value (escaped regex) must stay as they are.
    expr = _MODEL_VARIABLE.sub(lambda _: model, expr)
    if agent is not None:
        expr = _AGENT_VARIABLE.sub(lambda _: agent, expr)
    expr = _POOL_VARIABLE.sub(lambda _: pool, expr)
    for macro, value in (("$__rate_interval", rate_interval), ("$__interval", "15s"), ("$__range", "1h")):
        expr = expr.replace(macro, value)
    if "$" in _CAPTURE_REFERENCE.sub("", expr):
        raise ValueError(f"unsubstituted variable left in {expr!r}")
    return expr
