"""The Responses API routes. Like the other /v1 routes they find a backend by name and never learn its kind;
conversations, storage and background runs are the service's (``app.responses.service``)."""

from __future__ import annotations

from quart import Blueprint, Response, g, request
from quart_schema import document_request, document_response

from app.errors import invalid_request
from app.protocol import ErrorResponse
from app.responses.protocol import ResponseList, ResponsesRequest
from app.responses.service import ResponsesService
from app.routes.calls import find_backend, json_response, read_body, stream_response, timed
from app.state import app_state
from app.streaming import RESPONSES_FRAMING

blueprint = Blueprint("responses", __name__, url_prefix="/v1/responses")
#: the hosted tools a translated model was not shown, by type
DROPPED_TOOLS = "X-Helios-Dropped-Tools"


def _service() -> ResponsesService:
    return app_state().responses


def _owner() -> str:
    owner: str = g.get("owner", "")
    return owner


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise invalid_request(f"Invalid value for '{name}': expected an integer from {low} to {high}.", name)
    return value


def _streamed() -> bool:
    raw = request.args.get("stream", "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise invalid_request("Invalid value for 'stream': expected true or false.", "stream")
    return raw in ("true", "1")


@blueprint.post("")
@document_request(ResponsesRequest)
@document_response(ErrorResponse, 400)
@document_response(ErrorResponse, 404)
@document_response(ErrorResponse, 415)
async def create_response() -> Response:
    """Create a model response; with `stream: true` an SSE stream of Response events."""
    req, body = await read_body(ResponsesRequest)
    backend = find_backend(req.model)
    exchange = g.exchange
    answer, dropped = await timed(_service().create(req, body, backend, _owner(), exchange.stats))
    response = json_response(answer) if isinstance(answer, bytes) else await stream_response(answer,
                                                                                            RESPONSES_FRAMING)
    if dropped:
        response.headers[DROPPED_TOOLS] = ", ".join(dropped)
    return response


@blueprint.get("/<response_id>")
@document_response(ErrorResponse, 404)
async def get_response(response_id: str) -> Response:
    """A stored response; with `stream=true` its events again, after `starting_after`."""
    if _streamed():
        after = _int_arg("starting_after", -1, -1, 2**31)
        return await stream_response(await _service().replay(response_id, _owner(), after), RESPONSES_FRAMING)
    return json_response(await _service().retrieve(response_id, _owner()))


@blueprint.delete("/<response_id>")
@document_response(ErrorResponse, 404)
async def delete_response(response_id: str) -> Response:
    """Delete a stored response."""
    return json_response(await _service().delete(response_id, _owner()))


@blueprint.post("/<response_id>/cancel")
@document_response(ErrorResponse, 404)
async def cancel_response(response_id: str) -> Response:
    """Cancel a background response."""
    return json_response(await _service().cancel(response_id, _owner()))


@blueprint.get("/<response_id>/input_items")
@document_response(ResponseList, 200)
@document_response(ErrorResponse, 404)
async def list_input_items(response_id: str) -> Response:
    """The input items of a stored response, a page at a time."""
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid_request("Invalid value for 'order': expected 'asc' or 'desc'.", "order")
    limit = _int_arg("limit", 20, 1, 100)
    return json_response(await _service().input_items(response_id, _owner(), limit=limit, order=order,
                                                      after=request.args.get("after")))
