"""Endpoints declared in TOML: a fixed JSON answer on a fixed path, checked against built-in routes."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from quart import Quart, Response
from werkzeug.exceptions import MethodNotAllowed, NotFound

from app.settings import ConfigError, EndpointSettings


def register_custom_endpoints(app: Quart, endpoints: list[EndpointSettings]) -> None:
    """Add each endpoint; call after every built-in route is registered so collisions are seen."""
    adapter = app.url_map.bind("localhost")
    for index, endpoint in enumerate(endpoints):
        try:
            adapter.match(endpoint.path, method=endpoint.method)
        except NotFound:
            pass
        except MethodNotAllowed:
            raise ConfigError(_collision(index, endpoint)) from None
        else:
            raise ConfigError(_collision(index, endpoint))
        app.add_url_rule(
            endpoint.path,
            endpoint=f"custom_{index}",
            view_func=_responder(endpoint),
            methods=[endpoint.method],
        )


def _collision(index: int, endpoint: EndpointSettings) -> str:
    return (f"endpoints[{index}].path: {endpoint.path!r} collides with a built-in route "
            "(source: configuration)")


def _responder(endpoint: EndpointSettings) -> Callable[[], Awaitable[Response]]:
    body = json.dumps(endpoint.response).encode()
    headers = {"Content-Type": "application/json", **endpoint.headers}

    async def respond() -> Response:
        return Response(body, status=endpoint.status, headers=headers)

    return respond
