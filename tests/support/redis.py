"""A real Redis server (Debian's ``redis-server`` package) on loopback, for the response store tests.

:func:`ensure_redis` installs the package when ``redis-server`` is missing. Debian's maintainer scripts may
start the packaged service; any ``redis-server`` process that appears during the install is killed by PID,
so only servers started by :class:`RedisServer` ever run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from tests.support.prometheus import kill_pid, pids_named
from tests.support.server import free_port

__all__ = ["RedisError", "RedisServer", "RedisUnavailable", "ensure_redis"]

_LOOPBACK = "127.0.0.1"
_APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}
# Wait for a concurrent apt/dpkg run instead of failing on its lock.
_APT_LOCK = ("-o", "DPkg::Lock::Timeout=300")


class RedisUnavailable(RuntimeError):
    """redis-server is missing and cannot be installed here (e.g. not root, no apt)."""


class RedisError(RuntimeError):
    """The server failed to start."""


def _which() -> Path | None:
    # Debian puts it in /usr/bin, but a PATH without it should not trigger a reinstall.
    found = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/local/bin:/usr/bin:/usr/sbin")
    return Path(found) if found else None


def ensure_redis() -> Path:
    """The ``redis-server`` binary, installing Debian's ``redis-server`` package first if needed."""
    found = _which()
    if found is not None:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise RedisUnavailable("redis-server not installed, and apt-get as root is not available")
    before = pids_named("redis-server")
    env = {**os.environ, **_APT_ENV}
    try:
        subprocess.run(["apt-get", *_APT_LOCK, "update"], env=env, check=True, capture_output=True,
                       timeout=600)
        subprocess.run(
            ["apt-get", *_APT_LOCK, "install", "-y", "--no-install-recommends", "redis-server"],
            env=env, check=True, capture_output=True, timeout=900,
        )
    except subprocess.CalledProcessError as exc:
        raise RedisUnavailable(f"apt-get failed: {exc.stderr.decode(errors='replace')[-2000:]}") from exc
    finally:
        # The postinst may start the packaged service on 6379 (no policy-rc.d outside Docker): stop exactly those.
        for pid in pids_named("redis-server") - before:
            kill_pid(pid)
    found = _which()
    if found is None:
        raise RedisUnavailable("the redis-server package installed, but redis-server is not on PATH")
    return found


def _answers(port: int) -> bool:
    """Whether something on the port speaks RESP (a PONG, or NOAUTH when a password is required)."""
    try:
        with socket.create_connection((_LOOPBACK, port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError:
        return False
    return reply.startswith((b"+PONG", b"-NOAUTH"))


class RedisServer:
    """A redis-server subprocess on a free loopback port, without persistence; use as a context manager."""

    def __init__(self, *, password: str | None = None, workdir: Path | None = None) -> None:
        """``password`` sets ``requirepass`` (and goes into :attr:`url`); ``workdir`` holds its log."""
        self.binary = ensure_redis()
        self.password = password
        self._owns_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="redis-")) if workdir is None else Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "redis.log"
        # Chosen once: restart() comes back on the same port, as a restarted Redis would for its clients.
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:PORT/0``."""
        auth = f":{self.password}@" if self.password is not None else ""
        return f"redis://{auth}{_LOOPBACK}:{self.port}/0"

    @property
    def pid(self) -> int:
        """PID of the running server."""
        if self._process is None:
            raise RuntimeError("not started")
        return self._process.pid

    @property
    def running(self) -> bool:
        """Whether the server process is alive (started and not stopped)."""
        return self._process is not None and self._process.poll() is None

    def logs(self) -> str:
        """The server's output so far (every start appends)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 15.0) -> RedisServer:
        """Start the server and wait until it answers PING."""
        if self.running:
            raise RuntimeError("already running")
        command = [
            str(self.binary), "--port", str(self.port), "--bind", _LOOPBACK, "--save", "", "--appendonly", "no",
            "--dir", str(self.workdir), "--daemonize", "no", "--logfile", "",
        ]
        if self.password is not None:
            command += ["--requirepass", self.password]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C aimed at pytest must not kill it before we clean up
            )
        deadline = time.monotonic() + timeout
        while not _answers(self.port):
            if self._process.poll() is not None:
                raise RedisError(f"redis-server exited with {self._process.returncode}:\n{self.logs()[-4000:]}")
            if time.monotonic() >= deadline:
                self.stop()
                raise RedisError(f"redis-server not answering after {timeout}s:\n{self.logs()[-4000:]}")
            time.sleep(0.05)
        return self

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

    def restart(self) -> RedisServer:
        """Stop, then start again on the same port (with no data: nothing is persisted)."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and remove an owned work directory."""
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
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
