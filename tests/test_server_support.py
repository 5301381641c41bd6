"""Light checks of the subprocess helpers against a throwaway stand-in for the gateway."""

from __future__ import annotations

import json
import signal
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from tests.support.fixtures import HeliosFactory
from tests.support.server import HeliosProcess, HeliosStartError, basic_config, run_cli

STAND_IN = textwrap.dedent(
    """
    import json, os, signal, sys, time, tomllib
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    mode = os.environ.get("STAND_IN_MODE", "ok")
    config = tomllib.load(open(os.environ["HELIOS_CONFIG"], "rb")) if os.environ.get("HELIOS_CONFIG") else None
    if mode == "print":
        print(json.dumps({"argv": sys.argv[1:], "config": config, "has_config": "HELIOS_CONFIG" in os.environ}))
        sys.exit(0)
    if mode == "crash":
        print("boom: invalid config", file=sys.stderr)
        sys.exit(3)
    started = time.monotonic()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            ready = time.monotonic() - started > 0.5
            status = {"/health": 200, "/ready": 200 if ready else 503, "/env": 200}.get(self.path, 404)
            body = json.dumps({
                "secrets": os.listdir(os.environ["HELIOS_SECRETS_DIR"]),
                "secrets_dir": os.environ["HELIOS_SECRETS_DIR"],
                "extra": os.environ.get("EXTRA"),
                "home": os.environ.get("HOME"),
                "cwd": os.getcwd(),
            }).encode()
            self.send_response(status)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):
            print("access", self.path, file=sys.stderr, flush=True)

    # A shell's background job inherits SIGINT ignored; the gateway installs its own handler, so must this.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM", flush=True), os._exit(0)))
    server = ThreadingHTTPServer((config["server"]["host"], config["server"]["port"]), Handler)
    print("listening on", config["server"]["port"], flush=True)
    server.serve_forever()
    """
)


@pytest.fixture
def stand_in(tmp_path: Path) -> list[str]:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    return [sys.executable, str(script)]


def get_json(url: str) -> dict[str, object]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as response:
        result: dict[str, object] = json.load(response)
        return result


def test_start_logs_and_terminate(stand_in: list[str]) -> None:
    config = basic_config("http://127.0.0.1:9/v1")
    with HeliosProcess(config, {"EXTRA": "yes", "HOME": None}, command=stand_in) as gateway:
        assert gateway.is_running() and gateway.pid > 0
        assert gateway.base_url == f"http://127.0.0.1:{gateway.port}"
        written = gateway.config_path.read_text()
        assert f"port = {gateway.port}" in written and 'host = "127.0.0.1"' in written
        env = get_json(gateway.url("/env"))
        assert env["secrets"] == []
        assert env["extra"] == "yes"
        assert env["home"] is None
        assert env["cwd"] == str(Path(__file__).resolve().parents[1])
        assert f"listening on {gateway.port}" in gateway.logs()
        assert "access /health" in gateway.logs()
        assert gateway.terminate() == 0
        assert gateway.terminate() == 0  # idempotent
        assert "got SIGTERM" in gateway.stdout()
    assert not gateway.workdir.exists()
    assert config["server"]["port"] == 0  # the caller's dict is not modified


def test_wait_ready(stand_in: list[str]) -> None:
    gateway = HeliosProcess(basic_config("http://x/v1"), command=stand_in)
    try:
        gateway.start(wait_ready=True)
        assert "access /ready" in gateway.logs()
    finally:
        gateway.close()


def test_early_exit_reports_stderr(stand_in: list[str]) -> None:
    gateway = HeliosProcess({}, {"STAND_IN_MODE": "crash"}, command=stand_in)
    with pytest.raises(HeliosStartError, match=r"exited with 3(.|\n)*boom: invalid config"):
        gateway.start()
    assert gateway.returncode == 3
    gateway.close()


def test_sigterm_ignored_gets_sigkill(stand_in: list[str]) -> None:
    gateway = HeliosProcess({}, {"STAND_IN_MODE": "ignore-term"}, command=stand_in).start()
    try:
        assert gateway.terminate(timeout=0.5) == -signal.SIGKILL
    finally:
        gateway.close()


def test_factory_fixture_stops_everything(helios: HeliosFactory, stand_in: list[str]) -> None:
    first = helios({}, command=stand_in)
    second = helios({}, {"EXTRA": "2"}, True, command=stand_in)
    assert first.port != second.port
    assert get_json(second.url("/env"))["extra"] == "2"
    # A generous wait: on a loaded machine the stand-in's interpreter can take seconds to handle the signal.
    assert first.terminate(signal.SIGINT, timeout=20) == -signal.SIGINT
    # `second` is stopped by the fixture's teardown.


def test_run_cli(stand_in: list[str]) -> None:
    result = run_cli(["--print-config"], {"server": {"port": 1}}, {"STAND_IN_MODE": "print"}, command=stand_in)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["argv"] == ["--print-config"]
    assert printed["config"] == {"server": {"port": 1}}

    result = run_cli([], None, {"STAND_IN_MODE": "print"}, command=stand_in)
    assert json.loads(result.stdout)["has_config"] is False

    result = run_cli([], {}, {"STAND_IN_MODE": "crash"}, command=stand_in)
    assert result.returncode == 3
    assert "boom" in result.stderr
