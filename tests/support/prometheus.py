"""A real Prometheus server (Debian's ``prometheus`` package) on loopback, for observability tests.

:func:`ensure_prometheus` installs the package when ``promtool`` is missing. Debian's maintainer scripts may
try to start the packaged service; any ``prometheus`` process that appears during the install is killed by
PID, so only servers started by :class:`PrometheusServer` ever run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from tests.support.server import free_port

__all__ = [
    "PrometheusError",
    "PrometheusServer",
    "PrometheusTools",
    "PrometheusUnavailable",
    "ensure_prometheus",
    "promtool",
]

_LOOPBACK = "127.0.0.1"
# Bypass any *_proxy variables: every request here goes to loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}
# Wait for a concurrent apt/dpkg run instead of failing on its lock.
_APT_LOCK = ("-o", "DPkg::Lock::Timeout=300")


class PrometheusUnavailable(RuntimeError):
    """prometheus/promtool are missing and cannot be installed here (e.g. not root, no apt)."""


class PrometheusError(RuntimeError):
    """The server failed to start, or an API call failed."""


@dataclass(frozen=True)
class PrometheusTools:
    """Paths of the two binaries."""

    prometheus: str
    promtool: str


def pids_named(name: str) -> set[int]:
    """PIDs of running processes whose command name is ``name`` (a package's post-install may start one)."""
    pids: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (entry / "comm").read_text().strip() == name:
                pids.add(int(entry.name))
    return pids


def kill_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM one PID, SIGKILL it if it outlives ``timeout``."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _which() -> PrometheusTools | None:
    prometheus, tool = shutil.which("prometheus"), shutil.which("promtool")
    return PrometheusTools(prometheus, tool) if prometheus and tool else None


def ensure_prometheus() -> PrometheusTools:
    """The binaries, installing Debian's ``prometheus`` package first if needed."""
    found = _which()
    if found is not None:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise PrometheusUnavailable("prometheus/promtool not installed, and apt-get as root is not available")
    before = pids_named("prometheus")
    env = {**os.environ, **_APT_ENV}
    try:
        subprocess.run(["apt-get", *_APT_LOCK, "update"], env=env, check=True, capture_output=True,
                       timeout=600)
        subprocess.run(
            ["apt-get", *_APT_LOCK, "install", "-y", "--no-install-recommends", "prometheus"],
            env=env, check=True, capture_output=True, timeout=900,
        )
    except subprocess.CalledProcessError as exc:
        raise PrometheusUnavailable(f"apt-get failed: {exc.stderr.decode(errors='replace')[-2000:]}") from exc
    finally:
        # The postinst may start the packaged service (no policy-rc.d outside Docker): stop exactly those.
        for pid in pids_named("prometheus") - before:
            kill_pid(pid)
    found = _which()
    if found is None:
        raise PrometheusUnavailable("the prometheus package installed, but prometheus/promtool are not on PATH")
    return found


def promtool(*args: str, stdin: bytes | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``promtool *args`` (not checked: callers assert on returncode and output)."""
    tools = ensure_prometheus()
    return subprocess.run(
        [tools.promtool, *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def _get_json(url: str, timeout: float = 10.0) -> Any:
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        # The API answers errors (bad_data for a parse error) with a JSON body worth showing.
        raise PrometheusError(f"GET {url}: HTTP {exc.code}: {exc.read().decode(errors='replace')}") from exc
    payload = json.loads(body)
    if isinstance(payload, dict) and payload.get("status") == "error":
        raise PrometheusError(f"GET {url}: {payload.get('errorType')}: {payload.get('error')}")
    return payload


class PrometheusServer:
    """A Prometheus subprocess scraping loopback targets every second; use as a context manager."""

    def __init__(
        self,
        targets: Sequence[str],
        *,
        job: str = "helios-serve",
        metrics_path: str = "/metrics",
        rule_files: Sequence[Path | str] = (),
        workdir: Path | None = None,
    ) -> None:
        """``targets`` are ``127.0.0.1:PORT`` addresses; ``workdir`` holds config, data and log."""
        for target in targets:
            if not target.startswith(f"{_LOOPBACK}:"):
                raise ValueError(f"loopback targets only, got {target!r}")
        self.tools = ensure_prometheus()
        self.job = job
        self._owns_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="prometheus-")) if workdir is None else Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config_path = self.workdir / "prometheus.yml"
        self.log_path = self.workdir / "prometheus.log"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(Path(path).resolve()) for path in rule_files],
            "scrape_configs": [{
                "job_name": job,
                "metrics_path": metrics_path,
                "static_configs": [{"targets": list(targets)}],
            }],
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the server's web API."""
        return f"http://{_LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        """PID of the started server."""
        if self._process is None:
            raise RuntimeError("not started")
        return self._process.pid

    def logs(self) -> str:
        """The server's combined output so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        """Start the server and wait until /-/ready answers 200."""
        if self._process is not None:
            raise RuntimeError("already started")
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [
                    self.tools.prometheus,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address={_LOOPBACK}:{self.port}",
                    "--web.enable-lifecycle",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C aimed at pytest must not kill it before we clean up
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self._process.returncode}:\n{self.logs()}")
            with contextlib.suppress(OSError), _OPENER.open(f"{self.base_url}/-/ready", timeout=1) as response:
                if response.status == 200:
                    return self
            if time.monotonic() >= deadline:
                self.stop()
                raise PrometheusError(f"prometheus not ready after {timeout}s:\n{self.logs()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server by PID (SIGTERM, then SIGKILL); idempotent."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait(10)

    def close(self) -> None:
        """Stop the server and remove an owned work directory."""
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PrometheusServer:
        if self._process is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- HTTP API ---------------------------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        """``data`` of GET /api/v1/<path>; PrometheusError on an API error."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return _get_json(f"{self.base_url}/api/v1/{path}{query}")["data"]

    def query(self, expr: str, time_: float | None = None) -> list[dict[str, Any]]:
        """Instant query; the result list (vector samples, or one scalar as ``{"value": ...}``)."""
        params = {"query": expr}
        if time_ is not None:
            params["time"] = f"{time_:.3f}"
        data = self.api("query", **params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        """Range query; one ``{"metric": ..., "values": [[t, "v"], ...]}`` per series."""
        data = self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step}")
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        """Active scrape targets."""
        active: list[dict[str, Any]] = self.api("targets", state="active")["activeTargets"]
        return active

    def rules(self) -> list[dict[str, Any]]:
        """Loaded rule groups."""
        groups: list[dict[str, Any]] = self.api("rules")["groups"]
        return groups

    def scrape_count(self) -> int:
        """Fewest scrapes stored for any target of the job (0 before the first)."""
        # up gets one sample per scrape attempt, so counting them counts scrapes; 1h covers any test.
        result = self.query(f'count_over_time(up{{job="{self.job}"}}[1h])')
        if len(result) < len(self.targets()):
            return 0
        return min((int(float(sample["value"][1])) for sample in result), default=0)

    def wait_for_scrapes(self, n: int = 1, timeout: float = 30.0, *, healthy: bool = True) -> None:
        """Wait until every target has been scraped ``n`` more times (and, if ``healthy``, last scrape up)."""
        deadline = time.monotonic() + timeout
        goal = self.scrape_count() + n
        while True:
            count = self.scrape_count()
            targets = self.targets()
            ok = count >= goal and (not healthy or all(t["health"] == "up" for t in targets))
            if ok:
                return
            if self._process is not None and self._process.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self._process.returncode}:\n{self.logs()}")
            if time.monotonic() >= deadline:
                states = [(t["scrapeUrl"], t["health"], t["lastError"], t["lastScrapeDuration"]) for t in targets]
                raise PrometheusError(
                    f"{count}/{goal} scrapes after {timeout}s; targets: {states}\nlog:\n{self.logs()[-4000:]}"
                )
            time.sleep(0.2)
