"""``create_app(settings)``: assembles routes, auth, errors, docs and backends into one Quart app."""

from __future__ import annotations

import gc
import logging
import os
import re
import uuid

from quart import Quart, Response, g, request
from quart_schema import Info, QuartSchema
from werkzeug.exceptions import HTTPException

from app import __version__, metrics
from app.asgi_connection import HTTPConnection, NoSessions, Request
from app.auth import KeyChecker
from app.backends.registry import Registry
from app.errors import APIError, from_http_status, internal_error
from app.exchange import Exchange
from app.logs import request_id
from app.responses.service import ResponsesService
from app.responses.store import build_store
from app.routes import custom, health, openai, responses
from app.routes import metrics as metrics_routes
from app.settings import Settings
from app.state import AppState, install_state

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/=+-]{1,128}$")
_CORS_HEADERS = ("Authorization, Content-Type, X-Request-ID, OpenAI-Organization, OpenAI-Project, "
                 "X-Helios-No-Fallback, X-Helios-Max-Attempts")


def create_app(settings: Settings) -> Quart:
    app = Quart("helios-serve")
    app.request_class = Request
    app.asgi_http_class = HTTPConnection
    app.session_interface = NoSessions()
    app.config["MAX_CONTENT_LENGTH"] = settings.server.max_body_bytes
    # Generation can legitimately take minutes: no 60 s response cut-off. HTTPConnection applies none; the
    # setting says the same to any Quart code that reads it.
    app.config["RESPONSE_TIMEOUT"] = None
    QuartSchema(
        app,
        info=Info(title="Helios Serve", version=__version__,
                  description="OpenAI-compatible API for remote and embedded models."),
        scalar_ui_path=None,
    )
    registry = Registry(settings.models, settings.agents, settings.pools, settings.routing)
    service = ResponsesService(build_store(settings.responses), registry.find,
                               settings.responses.unsupported_tools)
    install_state(app.extensions, AppState(
        settings=settings, registry=registry, models_body=openai.models_body(registry.served_names(),
                                                                            registry.created),
        responses=service,
    ))
    app.register_blueprint(openai.blueprint)
    app.register_blueprint(responses.blueprint)
    app.register_blueprint(health.blueprint)
    if settings.metrics.enabled and settings.metrics.port is None:
        app.register_blueprint(metrics_routes.metrics_blueprint(settings.metrics))
    metrics.record_static(registry.describe())
    custom.register_custom_endpoints(app, settings.endpoints)
    _install_hooks(app, settings)
    _install_error_handlers(app)

    @app.before_serving
    async def open_backends() -> None:
        await service.start()
        await registry.start()
        metrics_routes.refresh_readiness()
        # What start-up built lives as long as the process: out of the collector's way, a full collection
        # walks only what requests leave behind (hundreds of thousands of module objects otherwise).
        gc.freeze()
        # A young collection walks every object of every request in flight, so with Python's default of one
        # per 700 allocations concurrency made each request pay for the others (measured: 0.3 ms more CPU per
        # /v1/responses request at c=64 than at c=1). Reference counting frees nearly everything a request
        # makes; the collector is only for the rare cycle, which can wait for 50,000 allocations.
        gc.set_threshold(50_000, 20, 20)
        if settings.responses.store == "memory" and settings.server.workers > 1:
            log.warning("responses.store is 'memory' with %d workers: each worker keeps its own stored responses, "
                        "so previous_response_id and GET /v1/responses/{id} fail on the others; use 'redis'",
                        settings.server.workers)

    @app.after_serving
    async def close_backends() -> None:
        await service.close()
        await registry.close()
        metrics.mark_worker_dead(os.getpid())

    return app


def _install_hooks(app: Quart, settings: Settings) -> None:
    keys = KeyChecker(settings.auth.api_keys)
    origins = frozenset(settings.server.cors_allow_origins)

    @app.before_request
    async def begin() -> Response | None:
        rid = request.headers.get("X-Request-ID", "")
        rid = rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex
        request_id.set(rid)
        g.request_id = rid
        rule = request.url_rule
        g.exchange = Exchange(request.method, request.path, rule.rule if rule else metrics.UNMATCHED_ROUTE)
        if origins and request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return Response(status=204, headers={
                "Access-Control-Allow-Methods": "GET, POST, PUT, PATCH, DELETE, OPTIONS",
                "Access-Control-Allow-Headers": _CORS_HEADERS,
                "Access-Control-Max-Age": "600",
            })
        if keys.enabled and request.path.startswith("/v1/"):
            g.owner = keys.check(request.headers.get("Authorization"))
        return None

    @app.after_request
    async def end(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.get("request_id") or ""
        origin = request.headers.get("Origin")
        if origin and ("*" in origins or origin in origins):
            response.headers["Access-Control-Allow-Origin"] = "*" if "*" in origins else origin
            response.headers["Access-Control-Expose-Headers"] = ("X-Request-ID, Retry-After, X-Helios-Served-By, "
                                                                 "X-Helios-Attempts, X-Helios-Dropped-Tools")
            if "*" not in origins:
                response.vary.add("Origin")
        exchange: Exchange | None = g.get("exchange")
        if exchange is not None and exchange.in_flight:
            # Which configured model answered, and in how many upstream attempts (routers change both).
            stats = exchange.stats
            response.headers["X-Helios-Served-By"] = stats.served_by or exchange.model
            response.headers["X-Helios-Attempts"] = str(stats.attempts if stats.attempts is not None else 1)
        if exchange is not None and not exchange.stream:
            exchange.finish(response.status_code)
        return response

    @app.teardown_request
    async def abandoned(_: BaseException | None) -> None:
        # A client that leaves before its answer cancels the handler: after_request never runs, yet the
        # request must still leave the in-flight gauge and be counted (499, as nginx logs it).
        exchange: Exchange | None = g.get("exchange")
        if exchange is not None and not exchange.stream and not exchange.finished:
            exchange.finish(499, disconnected=True)


def _error_response(error: APIError) -> Response:
    return Response(error.to_json(), status=error.status, content_type="application/json",
                    headers=error.headers)


def _install_error_handlers(app: Quart) -> None:
    @app.errorhandler(APIError)
    async def api_error(error: APIError) -> Response:
        return _error_response(error)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        api = from_http_status(error.code or 500, error.description or "")
        response = _error_response(api)
        for name, value in error.get_headers():
            if name.lower() == "allow":
                response.headers["Allow"] = value
        return response

    @app.errorhandler(Exception)
    async def unexpected(error: Exception) -> Response:
        log.error("unhandled error", exc_info=error)
        return _error_response(internal_error())
