"""Liveness and readiness probes (open even when API keys are required)."""

from __future__ import annotations

import json

from quart import Blueprint, Response
from quart_schema import hide

from app.errors import APIError, not_ready
from app.state import app_state

blueprint = Blueprint("health", __name__)


@blueprint.get("/health")
@hide
async def health() -> Response:
    """Liveness: 200 while the process serves; 503 once a backend failed for good (an embedded engine died),
    so that the orchestrator restarts the process."""
    failures = app_state().registry.failures()
    if failures:
        detail = "; ".join(f"{name}: {reason}" for name, reason in failures.items())
        raise APIError(503, f"Unhealthy: {detail}; the process must be restarted.",
                       type="service_unavailable_error", code="unhealthy",
                       extra={"status": "unhealthy", "models": failures})
    return Response(b'{"status":"ok"}', content_type="application/json")


@blueprint.get("/ready")
@hide
async def ready() -> Response:
    """Readiness: 200 only when every configured backend can serve."""
    readiness = app_state().registry.readiness()
    waiting = {name: reason for name, reason in readiness.items() if reason is not None}
    models = {name: reason or "ready" for name, reason in readiness.items()}
    if waiting:
        detail = "; ".join(f"{name}: {reason}" for name, reason in waiting.items())
        error = not_ready(f"Not ready: {detail}.")
        error.extra["models"] = models
        raise error
    return Response(json.dumps({"status": "ready", "models": models}), content_type="application/json")
