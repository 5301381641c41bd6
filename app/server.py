"""Running the app under Hypercorn, configured from our settings."""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from hypercorn.config import Config
from hypercorn.run import run

from app import metrics
from app.auth import KeyChecker
from app.errors import APIError
from app.settings import MetricsSettings, Settings

APPLICATION_PATH = "app.asgi:app"
log = logging.getLogger(__name__)


def hypercorn_config(settings: Settings) -> Config:
    server = settings.server
    config = Config()
    config.bind = [f"{_host(server.host)}:{server.port}"]
    # Hypercorn's "0 workers" runs the server in this process, which keeps a single-worker set-up free
    # of the supervisor process and its extra memory.
    config.workers = 0 if server.workers == 1 else server.workers
    config.keep_alive_timeout = server.keep_alive_timeout
    config.keep_alive_max_requests = server.keep_alive_max_requests
    config.graceful_timeout = server.graceful_timeout
    config.application_path = APPLICATION_PATH
    config.worker_class = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    config.accesslog = None  # our own access log carries model, tokens and the request id
    config.include_server_header = False  # no software banner for scanners to match against
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def prepare_multiprocess_metrics(settings: Settings) -> None:
    """With several workers, point prometheus-client at a fresh shared directory before they start."""
    if settings.server.workers == 1 or not settings.metrics.enabled:
        return
    directory = settings.metrics.multiprocess_dir
    directory.mkdir(parents=True, exist_ok=True)
    # Files of a previous run would be summed into this one's counters.
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ[metrics.MULTIPROC_ENV] = str(directory)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not worth a log line each
        pass


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def start_metrics_listener(settings: MetricsSettings, host: str) -> WSGIServer:
    """Serve /metrics on its own port, in a thread of this process (the supervisor when multi-worker)."""
    token = KeyChecker([settings.bearer_token] if settings.bearer_token else [])

    def scrape(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != settings.path:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        try:
            if token.enabled:
                token.check(environ.get("HTTP_AUTHORIZATION"))
        except APIError as exc:
            start_response("401 Unauthorized", [("Content-Type", "application/json"), *exc.headers.items()])
            return [exc.to_json()]
        body, content_type = metrics.exposition(metrics.scrape_registry(), environ.get("HTTP_ACCEPT"))
        start_response("200 OK", [("Content-Type", content_type)])
        return [body]

    assert settings.port is not None
    server = make_server(host, settings.port, scrape, _ThreadingWSGIServer, _QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("serving metrics on http://%s:%d%s", _host(host), settings.port, settings.path)
    return server


def serve(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT, draining in-flight requests for the graceful timeout."""
    prepare_multiprocess_metrics(settings)
    if settings.metrics.enabled and settings.metrics.port is not None:
        start_metrics_listener(settings.metrics, settings.server.host)
    return run(hypercorn_config(settings))
