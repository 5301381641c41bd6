"""The per-app state that routes reach through ``current_app``."""

from __future__ import annotations

from dataclasses import dataclass

from quart import current_app

from app.backends.registry import Registry
from app.responses.service import ResponsesService
from app.settings import Settings

_KEY = "helios"


@dataclass(slots=True)
class AppState:
    settings: Settings
    registry: Registry
    #: GET /v1/models answer, fixed for the life of the process
    models_body: bytes
    responses: ResponsesService


def app_state() -> AppState:
    state: AppState = current_app.extensions[_KEY]
    return state


def install_state(extensions: dict[str, object], state: AppState) -> None:
    extensions[_KEY] = state
