"""Run the gateway (``python -m app``) as a real subprocess on a loopback port."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import tomli_w

__all__ = [
    "APP_COMMAND",
    "REPO_ROOT",
    "HeliosProcess",
    "HeliosStartError",
    "basic_config",
    "free_port",
    "run_cli",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
APP_COMMAND: tuple[str, ...] = (sys.executable, "-m", "app")
_LOOPBACK = "127.0.0.1"
# Bypass any *_proxy variables: every request here goes to loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

EnvOverrides = Mapping[str, str | None]


class HeliosStartError(RuntimeError):
    """The gateway exited early or never became healthy."""


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def basic_config(
    provider_base_url: str,
    *,
    name: str = "gpt-test",
    upstream_model: str = "gpt-4o",
    api_keys: Sequence[str] = (),
    **model_extra: Any,
) -> dict[str, Any]:
    """A minimal gateway config with one ``openai`` backend model."""
    model = {
        "name": name,
        "backend": "openai",
        "base_url": provider_base_url,
        "api_key": "sk-upstream",
        "upstream_model": upstream_model,
        "timeout": 30,
        "max_retries": 0,
        **model_extra,
    }
    return {
        "server": {"host": _LOOPBACK, "port": 0, "workers": 1, "log_level": "info", "log_format": "json"},
        "auth": {"api_keys": list(api_keys)},
        "models": [model],
    }


def _environment(overrides: Mapping[str, str | None]) -> dict[str, str]:
    """os.environ plus overrides; a None value removes the variable."""
    env = dict(os.environ)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _write_config(config: Mapping[str, Any], directory: Path) -> Path:
    path = directory / "helios.toml"
    path.write_text(tomli_w.dumps(dict(config)), encoding="utf-8")
    return path


class HeliosProcess:
    """The gateway as a subprocess; always stop it with terminate() or close()."""

    def __init__(
        self,
        config: Mapping[str, Any],
        env: EnvOverrides | None = None,
        *,
        workdir: Path | None = None,
        command: Sequence[str] = APP_COMMAND,
        cwd: Path = REPO_ROOT,
    ) -> None:
        """``workdir`` holds config and logs (a temp dir removed by close() when omitted)."""
        self._owns_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="helios-")) if workdir is None else Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config: dict[str, Any] = copy.deepcopy(dict(config))
        server = self.config.setdefault("server", {})
        server["host"] = _LOOPBACK
        server["port"] = self.port
        self.config_path = _write_config(self.config, self.workdir)
        overrides: dict[str, str | None] = {"PYTHONUNBUFFERED": "1", "HELIOS_CONFIG": str(self.config_path)}
        if env is None or "HELIOS_SECRETS_DIR" not in env:
            secrets = self.workdir / "secrets"
            secrets.mkdir(exist_ok=True)
            overrides["HELIOS_SECRETS_DIR"] = str(secrets)
        overrides.update(env or {})
        self.env = _environment(overrides)
        self.command = list(command)
        self.cwd = cwd
        self.stdout_path = self.workdir / "stdout.log"
        self.stderr_path = self.workdir / "stderr.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._files: list[IO[bytes]] = []
        self.stragglers_killed = False  # set when processes of its group outlived the gateway

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{_LOOPBACK}:{self.port}"

    def url(self, path: str) -> str:
        """Absolute URL of a path on the gateway."""
        return self.base_url + (path if path.startswith("/") else "/" + path)

    @property
    def pid(self) -> int:
        """PID of the started process."""
        if self._process is None:
            raise RuntimeError("process not started")
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """Exit code, or None while running / before start."""
        return None if self._process is None else self._process.poll()

    def is_running(self) -> bool:
        """Whether the process was started and has not exited."""
        return self._process is not None and self._process.poll() is None

    def group(self) -> dict[int, str]:
        """The live processes of its process group (itself, an engine's EngineCore and workers...): PID to
        command line (``VLLM::EngineCore``: vLLM sets process titles); zombies are left out."""
        members: dict[int, str] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                # After "(comm)": state, ppid, pgrp; comm itself may hold spaces and parentheses.
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
                if fields[0] == "Z" or int(fields[2]) != self.pid:
                    continue
                members[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except (OSError, IndexError, ValueError):
                continue  # it ended while being read
        return members

    def logs(self) -> str:
        """Captured stdout followed by stderr."""
        return self.stdout() + self.stderr()

    def stdout(self) -> str:
        """Captured stdout so far."""
        return self._read(self.stdout_path)

    def stderr(self) -> str:
        """Captured stderr so far."""
        return self._read(self.stderr_path)

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, wait_ready: bool = False, timeout: float = 30.0) -> HeliosProcess:
        """Spawn the process and wait until /health (or /ready) answers 200."""
        if self._process is not None:
            raise RuntimeError("already started")
        stdout = self.stdout_path.open("wb")
        stderr = self.stderr_path.open("wb")
        self._files = [stdout, stderr]
        # Own session so stragglers (e.g. worker processes) can be reaped as one group.
        self._process = subprocess.Popen(
            self.command,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
        try:
            self.wait_healthy("/ready" if wait_ready else "/health", timeout)
        except BaseException:
            self.terminate(signal.SIGKILL, timeout=5)
            raise
        return self

    def wait_healthy(self, path: str = "/health", timeout: float = 30.0) -> None:
        """Poll ``path`` until it answers 200; HeliosStartError if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            code = self.returncode
            if code is not None:
                raise HeliosStartError(f"gateway exited with {code} before {path} was ready:\n{self.logs()}")
            status, last = _probe(self.url(path))
            if status == 200:
                return
            if time.monotonic() >= deadline:
                raise HeliosStartError(f"{path} not 200 after {timeout}s (last: {last}):\n{self.logs()}")
            time.sleep(0.05)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit on its own; returns the exit code."""
        if self._process is None:
            raise RuntimeError("process not started")
        code = self._process.wait(timeout)
        self._after_exit()
        return code

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the gateway process only."""
        if self.is_running():
            os.kill(self.pid, sig)

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send ``sig``, wait up to ``timeout``, then SIGKILL; returns the exit code (idempotent)."""
        process = self._process
        if process is None:
            raise RuntimeError("process not started")
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                process.wait(10)
        self._after_exit()
        return process.returncode

    def _after_exit(self) -> None:
        process = self._process
        if process is None or process.returncode is None:
            return
        # The group id is the gateway's own PID (new session): kill only what it left behind.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, 0)
            self.stragglers_killed = True
            os.killpg(process.pid, signal.SIGKILL)
        for handle in self._files:
            handle.close()
        self._files = []

    def close(self) -> None:
        """Stop the process if needed and remove an owned temp dir."""
        if self._process is not None:
            self.terminate()
        else:
            for handle in self._files:
                handle.close()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> HeliosProcess:
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


def _probe(url: str) -> tuple[int | None, str]:
    """(status, description) of one GET; status None when nothing answered."""
    try:
        with _OPENER.open(url, timeout=2) as response:
            status: int = response.status
            return status, f"HTTP {status}"
    except urllib.error.HTTPError as exc:
        return exc.code, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return None, repr(exc)


def run_cli(
    args: Sequence[str],
    config: Mapping[str, Any] | None = None,
    env: EnvOverrides | None = None,
    timeout: float = 30.0,
    *,
    command: Sequence[str] = APP_COMMAND,
    cwd: Path = REPO_ROOT,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m app *args`` to completion (config written as TOML if given)."""
    with tempfile.TemporaryDirectory(prefix="helios-cli-") as tmp:
        directory = Path(tmp)
        secrets = directory / "secrets"
        secrets.mkdir()
        # Without a config, don't let an inherited HELIOS_CONFIG leak into the run.
        overrides: dict[str, str | None] = {
            "PYTHONUNBUFFERED": "1",
            "HELIOS_CONFIG": str(_write_config(config, directory)) if config is not None else None,
            "HELIOS_SECRETS_DIR": str(secrets),
        }
        overrides.update(env or {})
        return subprocess.run(
            [*command, *args],
            cwd=cwd,
            env=_environment(overrides),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
