"""Running the app under Hypercorn, configured from our settings."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import os
import resource
import signal
import threading
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from multiprocessing.synchronize import Event as EventType
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import hypercorn.asyncio.run as hypercorn_asyncio_run
from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config, Sockets
from hypercorn.run import run
from hypercorn.utils import check_multiprocess_shutdown_event

from app import draining, metrics
from app.asgi_connection import HypercornApp
from app.auth import KeyChecker
from app.connections import HeliosConfig
from app.errors import APIError, not_ready
from app.settings import MetricsSettings, Settings

APPLICATION_PATH = "app.asgi:app"
#: seconds before the graceful timeout at which what is still in flight is ended (app.draining): time for
#: that last event or answer to reach the clients before Hypercorn closes their connections
END_EARLY = 0.5
log = logging.getLogger(__name__)


def hypercorn_config(settings: Settings) -> Config:
    server = settings.server
    config = HeliosConfig()
    config.bind = [f"{_host(server.host)}:{server.port}"]
    # Hypercorn's "0 workers" runs the server in this process, which keeps a single-worker set-up free
    # of the supervisor process and its extra memory.
    config.workers = 0 if server.workers == 1 else server.workers
    config.keep_alive_timeout = server.keep_alive_timeout
    config.keep_alive_max_requests = server.keep_alive_max_requests
    config.header_read_timeout = server.header_read_timeout
    config.backlog = server.backlog
    config.graceful_timeout = server.graceful_timeout
    config.application_path = APPLICATION_PATH
    config.worker_class = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    config.accesslog = None  # our own access log carries model, tokens and the request id
    config.include_server_header = False  # no software banner for scanners to match against
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


def raise_open_files_limit() -> int:
    """Lift the soft limit on open files to the hard one: every stream holds two sockets (client and provider),
    and systemd's default soft limit of 1,024 would refuse connections from about 500 streams on. Returns the
    soft limit now in force (tests and benchmarks holding many connections check it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):  # a hard limit the kernel refuses (above fs.nr_open): keep ours
            log.warning("cannot raise the open files limit from %d", soft)
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


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
    raise_open_files_limit()
    if settings.metrics.enabled and settings.metrics.port is not None:
        start_metrics_listener(settings.metrics, settings.server.host)
    config = hypercorn_config(settings)
    if config.workers:
        # Hypercorn's supervisor starts the workers by name: each runs _worker below.
        hypercorn_asyncio_run.asyncio_worker = hypercorn_asyncio_run.uvloop_worker = _worker
        return run(config)
    _serve(config, partial(_until_signalled, config.graceful_timeout))
    return 0


def _worker(config: Config, sockets: Sockets | None = None, shutdown_event: EventType | None = None) -> None:
    """A Hypercorn worker process (its ``uvloop_worker``), stopping on its supervisor's event with our drain."""
    assert shutdown_event is not None
    _serve(config, partial(_until_signalled, config.graceful_timeout, shutdown_event), sockets)


def _serve(config: Config, shutdown_trigger: Callable[[], Awaitable[None]], sockets: Sockets | None = None) -> None:
    """What Hypercorn's ``run`` does in a serving process, with our own shutdown trigger."""
    module, name = config.application_path.split(":")
    application = HypercornApp(getattr(importlib.import_module(module), name))
    loop_factory = None
    if config.worker_class == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(worker_serve(application, config, sockets=sockets, shutdown_trigger=shutdown_trigger))
    # Everything is closed. The interpreter's exit would still walk every object left for a last garbage
    # collection (seconds with torch imported); they die with the process anyway.
    gc.freeze()


async def _until_signalled(graceful_timeout: float, supervisor: EventType | None = None) -> None:
    """Return on SIGTERM or SIGINT, which starts Hypercorn's drain (listener closed, in-flight requests
    awaited for ``graceful_timeout``), after arming the end of what will still be in flight then: at the timeout
    Hypercorn closes their connections mid-stream, which a client cannot tell from a network failure.

    A worker returns on its supervisor's event (which the supervisor sets on SIGTERM or SIGINT; workers
    ignore SIGINT) or on a SIGTERM of its own. Once draining, a SIGTERM changes nothing: Hypercorn's supervisor
    sends one to every worker still draining as soon as one of them has exited."""
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    for number in (signal.SIGTERM, signal.SIGINT) if supervisor is None else (signal.SIGTERM,):
        loop.add_signal_handler(number, signalled.set)
    waits: list[asyncio.Future[object]] = [asyncio.ensure_future(signalled.wait())]
    if supervisor is not None:
        waits.append(asyncio.ensure_future(check_multiprocess_shutdown_event(supervisor, asyncio.sleep)))
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
    log.info("shutting down: new connections refused, in-flight requests get %g s to finish", graceful_timeout)
    loop.call_later(max(0.0, graceful_timeout - END_EARLY), _end_in_flight, graceful_timeout)


def _end_in_flight(graceful_timeout: float) -> None:
    error = not_ready(f"The server is shutting down and this response did not finish within its "
                      f"{graceful_timeout:g} s graceful timeout; retry the request.")
    streams, calls = draining.end_in_flight(error)
    if streams or calls:
        log.warning("graceful timeout: ended %d open stream(s) with an error event and answered %d waiting "
                    "request(s) with a 503", streams, calls)
