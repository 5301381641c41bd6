"""OpenAI-shaped errors: one exception type carrying status, body fields and extra headers.

The ``openai`` client picks its exception class from the status code, so the status is the contract;
``type`` and ``code`` follow what OpenAI itself sends for the same situation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError


class APIError(Exception):
    """An error answered to the client as ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code},
            **self.extra,
        }

    def to_json(self) -> bytes:
        return json.dumps(self.body(), ensure_ascii=False).encode()


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def model_not_found(model: str) -> APIError:
    return APIError(
        404, f"The model '{model}' does not exist or you do not have access to it.",
        param="model", code="model_not_found",
    )


def not_ready(message: str) -> APIError:
    return APIError(503, message, type="service_unavailable_error", code="not_ready")


def upstream_unavailable(message: str) -> APIError:
    return APIError(502, message, type="upstream_error", code="bad_gateway")


def upstream_timeout(message: str) -> APIError:
    return APIError(504, message, type="timeout_error", code="upstream_timeout")


def internal_error() -> APIError:
    return APIError(500, "The server had an error while processing your request.", type="server_error")


def from_http_status(status: int, description: str) -> APIError:
    """Errors raised by the HTTP layer itself (unknown route, wrong method, body too large)."""
    if status == 404:
        return APIError(404, "Unknown route.", code="not_found")
    if status == 405:
        return APIError(405, description or "Method not allowed.", code="method_not_allowed")
    if status == 413:
        return APIError(413, "Request body is larger than the configured limit.", code="request_too_large")
    if status >= 500:
        return internal_error()
    return APIError(status, description or "Bad request.")


def param_path(loc: Sequence[int | str]) -> str:
    """Render a pydantic location as OpenAI renders parameters: ``messages[0].content``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


# Union members appear in pydantic locations ("str", "list[int]", tags named "type=text"); clients never
# wrote them, so they are left out of the parameter name.
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _user_loc(loc: Sequence[int | str]) -> list[int | str]:
    return [
        p for p in loc
        if isinstance(p, int) or not ("[" in p or "=" in p or p in _TYPE_NAMES or p.startswith("constrained-"))
    ]


def from_validation_error(exc: ValidationError) -> APIError:
    """The first problem of a request body, as a 400 naming the field."""
    errors = exc.errors(include_url=False, include_context=False)
    error = errors[0]
    if error["type"] == "json_invalid":
        return invalid_request(f"The request body is not valid JSON: {error['msg']}.", code="invalid_json")
    if error["type"] == "model_type" and not error["loc"]:
        return invalid_request("The request body must be a JSON object.", code="invalid_json")
    # A value matching no member of a union gets one error per member; the deepest one is the member the
    # client was aiming for (a list of parts, not a string, when the value is a list).
    error = max(errors, key=lambda e: len(_user_loc(e["loc"])))
    loc = _user_loc(error["loc"])
    param = param_path(loc) or None
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        message = f"Missing required parameter: '{param}'."
    elif error["type"] == "extra_forbidden":
        message = f"Unrecognized request argument supplied: '{param}'."
    else:
        message = f"Invalid value for '{param}': {message}." if param else f"{message}."
    return invalid_request(message, param=param, code="missing_required_parameter"
                           if error["type"] == "missing" else "invalid_value")
