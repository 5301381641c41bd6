"""GET /metrics: Prometheus exposition, text or OpenMetrics as the scraper asks."""

from __future__ import annotations

from quart import Blueprint, Response, request
from quart_schema import hide

from app import metrics
from app.auth import KeyChecker
from app.settings import MetricsSettings
from app.state import app_state


def metrics_blueprint(settings: MetricsSettings) -> Blueprint:
    blueprint = Blueprint("metrics", __name__)
    token = KeyChecker([settings.bearer_token] if settings.bearer_token else [])

    @blueprint.get(settings.path)
    @hide
    async def scrape() -> Response:
        if token.enabled:
            token.check(request.headers.get("Authorization"))
        refresh_readiness()
        # Rendered on the event loop on purpose: it takes milliseconds, while a worker thread competing for
        # the GIL with a busy loop (streams in flight) can wait seconds for its turn.
        body, content_type = metrics.exposition(metrics.scrape_registry(), request.headers.get("Accept"))
        return Response(body, content_type=content_type)

    return blueprint


def refresh_readiness() -> None:
    for name, reason in app_state().registry.readiness().items():
        metrics.backend_ready.labels(name).set(0 if reason else 1)
