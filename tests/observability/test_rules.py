"""promtool over the Prometheus configuration and alert rules of the compose stack."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.observability.dashboard import ALERTS, ALERTS_TEST, PROMETHEUS_CONFIG, load_yaml
from tests.support.prometheus import PrometheusTools, promtool

pytestmark = pytest.mark.timeout(60)

EXPECTED_ALERTS = {
    "HeliosHighErrorRatio",
    "HeliosTimeToFirstTokenHigh",
    "HeliosBackendNotReady",
    "HeliosEngineQueueGrowing",
    "HeliosScrapeMissing",
    "HeliosAgentToolErrorRatio",
    "HeliosPoolMemberFlapping",
}
# Where compose mounts ./config/prometheus.
COMPOSE_DIR = "/etc/prometheus"


def _alert_rules() -> list[dict[str, Any]]:
    groups = load_yaml(ALERTS)["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_scrape_config_targets_the_gateway() -> None:
    """One job scraping helios:8000 and helios-gpu:8000 /metrics every 15s, rules read from the compose mount.

    Both compose services are found by DNS (a service that is not running resolves to nothing, so it is no
    target rather than a target that is always down), and named by service rather than by container IP.
    """
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["rule_files"] == [f"{COMPOSE_DIR}/{ALERTS.name}"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "helios-serve"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scrape_interval", config["global"]["scrape_interval"]) == "15s"
    assert "static_configs" not in job, "a static helios-gpu target would be down whenever the gpu profile is off"
    (dns,) = job["dns_sd_configs"]
    assert dns["names"] == ["helios", "helios-gpu"] and dns.get("type", "SRV") == "A" and dns["port"] == 8000
    (relabel,) = job["relabel_configs"]
    assert relabel["source_labels"] == ["__meta_dns_name"] and relabel["target_label"] == "instance"
    assert relabel["replacement"] == "${1}:8000"


def test_promtool_check_config(prometheus_tools: PrometheusTools, tmp_path: Path) -> None:
    """The config is valid once its compose paths resolve (here: to the repo's files)."""
    config = load_yaml(PROMETHEUS_CONFIG)
    # promtool follows rule_files, and /etc/prometheus only exists inside the container.
    config["rule_files"] = [
        str(PROMETHEUS_CONFIG.parent / Path(path).relative_to(COMPOSE_DIR)) for path in config["rule_files"]
    ]
    copy = tmp_path / "prometheus.yml"
    copy.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = promtool("check", "config", str(copy))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in result.stdout


def test_promtool_check_rules(prometheus_tools: PrometheusTools) -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests(prometheus_tools: PrometheusTools) -> None:
    result = promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alerts_are_the_expected_ones() -> None:
    rules = _alert_rules()
    assert {rule["alert"] for rule in rules} == EXPECTED_ALERTS
    assert len(rules) == len(EXPECTED_ALERTS), "an alert name is used twice"
    assert [group["name"] for group in load_yaml(ALERTS)["groups"]] == ["helios-serve"]


@pytest.mark.parametrize("rule", _alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_has_severity_annotations_and_for(rule: dict[str, Any]) -> None:
    assert rule["labels"]["severity"] in {"critical", "warning", "info"}
    assert {"summary", "description"} <= set(rule["annotations"])
    assert rule.get("for"), "a single bad evaluation must not page"


def test_every_alert_has_firing_and_silent_unit_tests() -> None:
    """alerts_test.yml covers each alert with at least one firing and one silent expectation."""
    firing: set[str] = set()
    silent: set[str] = set()
    for case in load_yaml(ALERTS_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    assert firing == EXPECTED_ALERTS
    assert silent == EXPECTED_ALERTS
