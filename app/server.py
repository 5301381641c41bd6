"""Running the app under Hypercorn, configured from our settings."""

from __future__ import annotations

import importlib.util
import logging

from hypercorn.config import Config
from hypercorn.run import run

from app.settings import Settings

APPLICATION_PATH = "app.asgi:app"


def hypercorn_config(settings: Settings) -> Config:
    server = settings.server
    config = Config()
    host = f"[{server.host}]" if ":" in server.host else server.host
    config.bind = [f"{host}:{server.port}"]
    # Hypercorn's "0 workers" runs the server in this process, which keeps a single-worker set-up free
    # of the supervisor process and its extra memory.
    config.workers = 0 if server.workers == 1 else server.workers
    config.keep_alive_timeout = server.keep_alive_timeout
    config.graceful_timeout = server.graceful_timeout
    config.application_path = APPLICATION_PATH
    config.worker_class = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    config.accesslog = None  # our own access log carries model, tokens and the request id
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


def serve(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT, draining in-flight requests for the graceful timeout."""
    return run(hypercorn_config(settings))
