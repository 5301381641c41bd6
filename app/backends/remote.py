"""Remote models: an OpenAI-compatible provider reached through the official ``openai`` client.

The client gives us its retries, back-off, timeouts and error classes; we ask it for the raw HTTP
response so the provider's bytes are relayed, with only ``model`` rewritten, instead of being parsed
into objects and serialised again. It runs on its aiohttp transport: about a third less CPU per call
than its default httpx stack, which is most of what the gateway itself costs per request.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai

from app.backends.base import Backend, CallStats, ChunkStream
from app.errors import APIError, upstream_timeout, upstream_unavailable
from app.jsonbytes import encode_string, prepend_field, replace_model, set_fields
from app.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from app.settings import OpenAIModelSettings
from app.streaming import DONE, sse_data

_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_FINISH_REASON = re.compile(rb'"finish_reason"\s*:\s*"([a-z_]+)"')
_ERROR_EVENT = re.compile(rb'^\s*\{\s*"error"\s*:')
# A Responses stream ends with one of these (an error event included); no [DONE] follows.
_LAST_EVENT = re.compile(rb'^\s*\{\s*"type"\s*:\s*"(?:response\.(?:completed|incomplete|failed)|error)"')
_RETRY_HEADER = "x-stainless-retry-count"
_JSON_HEADERS: dict[str, str | openai.Omit] = {"Content-Type": "application/json"}
# The client's telemetry headers (x-stainless-os, -arch, -runtime-version, ...) describe this appliance, not
# the caller, and each one costs every request three copies (the client's, the transport's, aiohttp's), held
# for a stream's whole life. The retry count stays: it is how retries are counted.
_TELEMETRY = "x-stainless-"
# Statuses whose provider message is about the client's own request, so it is passed on as it is.
_CLIENT_STATUSES = frozenset({400, 404, 409, 413, 422})
_INCLUDE_USAGE = b'{"include_usage":true}'


class RemoteBackend(Backend):
    def __init__(self, settings: OpenAIModelSettings) -> None:
        super().__init__(settings.name)
        self.settings = settings
        self.owned_by = settings.upstream_name.split("/")[0] if "/" in settings.upstream_name else "remote"
        self._client: openai.AsyncOpenAI | None = None
        self._headers = _JSON_HEADERS
        self._upstream_name = encode_string(settings.upstream_name)
        self._encoded_names = {name: encode_string(name) for name in settings.served_names}
        self.relays_responses = settings.speaks_responses

    async def start(self) -> None:
        if self.settings.missing_key_reason() is not None:
            return
        key = self.settings.resolved_api_key
        self._client = openai.AsyncOpenAI(
            # Key-less servers (Ollama, a local vLLM) ignore the header; the client insists on a value.
            api_key=key.get_secret_value() if key else "EMPTY",
            base_url=self.settings.resolved_base_url,
            timeout=httpx2.Timeout(self.settings.timeout, connect=self.settings.connect_timeout),
            max_retries=self.settings.max_retries,
            default_headers=self.settings.extra_headers or None,
            http_client=openai.DefaultAioHttpClient(),
        )
        # The client fills these from OPENAI_ORG_ID / OPENAI_PROJECT_ID when unset, which would send one
        # provider's account headers to every provider configured here.
        self._client.organization = self.settings.organization
        self._client.project = self.settings.project
        kept = {_RETRY_HEADER, *(name.lower() for name in self.settings.extra_headers)}
        omitted = [name for name in (*self._client.default_headers, f"{_TELEMETRY}read-timeout")
                   if name.lower().startswith(_TELEMETRY) and name.lower() not in kept]
        self._headers = {**_JSON_HEADERS, **dict.fromkeys(omitted, openai.omit)}

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def not_ready_reason(self) -> str | None:
        if self._client is None:
            return self.settings.missing_key_reason() or "not started"
        return None

    # ---- calls -----------------------------------------------------------------------------------

    async def chat(
        self, request: ChatCompletionRequest, body: bytes, served_as: str, stats: CallStats
    ) -> bytes:
        return await self._call("/chat/completions", request.model, body, served_as, stats)

    async def chat_stream(
        self, request: ChatCompletionRequest, body: bytes, served_as: str, stats: CallStats
    ) -> ChunkStream:
        return await self._stream("/chat/completions", request, body, served_as, stats)

    async def completion(
        self, request: CompletionRequest, body: bytes, served_as: str, stats: CallStats
    ) -> bytes:
        return await self._call("/completions", request.model, body, served_as, stats)

    async def completion_stream(
        self, request: CompletionRequest, body: bytes, served_as: str, stats: CallStats
    ) -> ChunkStream:
        return await self._stream("/completions", request, body, served_as, stats)

    async def embeddings(
        self, request: EmbeddingRequest, body: bytes, served_as: str, stats: CallStats
    ) -> bytes:
        return await self._call("/embeddings", request.model, body, served_as, stats)

    async def responses(self, body: bytes, served_as: str, stats: CallStats) -> bytes:
        return await self._call("/responses", served_as, body, served_as, stats)

    async def responses_stream(self, body: bytes, served_as: str, stats: CallStats) -> ChunkStream:
        response = await self._send("/responses", self._upstream_body(body, served_as), stats, stream=True)
        await self._expect_events(response, stats)
        return self._relay_events(response, stats)

    # ---- plumbing --------------------------------------------------------------------------------

    def _encoded(self, served_as: str) -> bytes:
        # A router serves this model under its own name (a pool's), which is not one of the model's.
        encoded = self._encoded_names.get(served_as)
        return encoded if encoded is not None else encode_string(served_as)

    def _upstream_body(self, body: bytes, client_model: str) -> bytes:
        if client_model == self.settings.upstream_name:
            return body
        return replace_model(body, self._upstream_name)

    async def _call(self, path: str, client_model: str, body: bytes, served_as: str, stats: CallStats) -> bytes:
        response = await self._send(path, self._upstream_body(body, client_model), stats, stream=False)
        content = response.content
        try:
            data = json.loads(content)
        except ValueError:
            stats.error_kind = "invalid_response"
            raise upstream_unavailable(
                f"The provider for model '{self.name}' answered with a body that is not JSON."
            ) from None
        # A Response object has an "error" field of its own (null, or why it failed): it is an answer.
        if not isinstance(data, dict) or ("error" in data and data.get("object") != "response"):
            stats.error_kind = "invalid_response"
            raise _error_from_body(data, response.status_code)
        usage = data.get("usage")
        if isinstance(usage, dict):
            stats.prompt_tokens = usage.get("prompt_tokens")
            stats.completion_tokens = usage.get("completion_tokens")
        for choice in data.get("choices") or ():
            if isinstance(choice, dict) and choice.get("finish_reason"):
                stats.finish_reasons.append(choice["finish_reason"])
        return replace_model(content, self._encoded(served_as))

    async def _stream(
        self,
        path: str,
        request: ChatCompletionRequest | CompletionRequest,
        body: bytes,
        served_as: str,
        stats: CallStats,
    ) -> ChunkStream:
        payload = self._upstream_body(body, request.model)
        wants_usage = request.wants_usage_chunk
        # Always ask for usage: token accounting needs the provider's real counts.
        if not wants_usage:
            if "stream_options" in request.model_fields_set:
                payload = set_fields(payload, {"stream_options": {"include_usage": True}})
            else:
                payload = prepend_field(payload, "stream_options", _INCLUDE_USAGE)
        response = await self._send(path, payload, stats, stream=True)
        await self._expect_events(response, stats)
        return self._relay(response, self._encoded(served_as),
                           wants_usage, stats)

    async def _expect_events(self, response: httpx2.Response, stats: CallStats) -> None:
        """Refuse a stream answer that is not an event stream (an error body, say), closing it."""
        content_type = response.headers.get("content-type", "")
        if content_type.startswith("text/event-stream"):
            return
        stats.error_kind = "invalid_response"
        try:
            data: Any = json.loads(await response.aread())
        except ValueError:
            data = None
        finally:
            await response.aclose()
        raise _error_from_body(data, response.status_code) if isinstance(data, dict) and "error" in data \
            else upstream_unavailable(
                f"The provider for model '{self.name}' answered a stream request with '{content_type}'."
            )

    async def _relay_events(self, response: httpx2.Response, stats: CallStats) -> AsyncIterator[list[bytes]]:
        """A Responses stream's event payloads as they come; the caller frames them and names the model."""
        ended = False
        try:
            async for batch in sse_data(_body(response)):
                if not ended and _LAST_EVENT.match(batch[-1]):
                    ended = True
                yield batch
                del batch  # see app.streaming.sse_data
        except (httpx2.HTTPError, ValueError) as exc:
            raise self._broken(exc, stats) from None
        finally:
            await response.aclose()
        if not ended:
            stats.error_kind = "stream_broken"
            raise upstream_unavailable(f"The stream from the provider for model '{self.name}' ended early.")

    async def _relay(
        self, response: httpx2.Response, encoded_name: bytes, wants_usage: bool, stats: CallStats
    ) -> AsyncIterator[list[bytes]]:
        finished = False
        try:
            async for batch in sse_data(_body(response)):
                relayed: list[bytes] = []
                for data in batch:
                    if data == DONE:
                        finished = True
                        break
                    if _ERROR_EVENT.match(data):
                        stats.error_kind = "stream_error"
                        if relayed:
                            yield relayed
                        raise _error_from_body(_loads(data), 502)
                    if _USAGE_OBJECT.search(data):
                        chunk = _loads(data)
                        usage = chunk.get("usage") or {}
                        stats.prompt_tokens = usage.get("prompt_tokens")
                        stats.completion_tokens = usage.get("completion_tokens")
                        if not wants_usage and not chunk.get("choices"):
                            continue
                    if b'"finish_reason"' in data:
                        stats.finish_reasons.extend(m.decode() for m in _FINISH_REASON.findall(data))
                    relayed.append(replace_model(data, encoded_name))
                if relayed:
                    yield relayed
                if finished:
                    break
                del batch, relayed, data  # see app.streaming.sse_data
        except (httpx2.HTTPError, ValueError) as exc:
            raise self._broken(exc, stats) from None
        finally:
            await response.aclose()
        if not finished and not stats.finish_reasons:
            stats.error_kind = "stream_broken"
            raise upstream_unavailable(f"The stream from the provider for model '{self.name}' ended early.")

    def _broken(self, exc: BaseException, stats: CallStats) -> APIError:
        """A stream that failed while it was read."""
        if _timed_out(exc):
            stats.error_kind = "timeout"
            return upstream_timeout(f"The provider for model '{self.name}' stopped sending mid-stream.")
        stats.error_kind = "stream_broken"
        return upstream_unavailable(
            f"The stream from the provider for model '{self.name}' broke: {_root(exc).__name__}."
        )

    async def _send(self, path: str, payload: bytes, stats: CallStats, *, stream: bool) -> httpx2.Response:
        if self._client is None:
            raise APIError(503, f"Model '{self.name}' is not ready: {self.not_ready_reason()}.",
                           type="service_unavailable_error", code="not_ready")
        try:
            response = await self._client.post(
                path, cast_to=httpx2.Response, content=payload,
                options={"headers": self._headers}, stream=stream,
            )
        except openai.APIConnectionError as exc:  # APITimeoutError included
            if _timed_out(exc):
                stats.error_kind = "timeout"
                raise upstream_timeout(f"The provider for model '{self.name}' did not answer in time.") from None
            stats.error_kind = "connection"
            raise upstream_unavailable(
                f"Cannot reach the provider for model '{self.name}': {_root(exc).__name__}."
            ) from None
        except openai.APIStatusError as exc:
            stats.retries = _retries(exc.response)
            stats.error_kind = f"status_{exc.status_code // 100}xx"
            raise _status_error(self.name, exc) from None
        stats.retries = _retries(response)
        return response


def _body(response: httpx2.Response) -> AsyncIterator[bytes]:
    """A streamed body as it is read, decoded if it has a content-encoding. Without one, decoding is a
    generator, a decoder and a chunker that pass every read through, and a held stream keeps them all its life."""
    return response.aiter_bytes() if "content-encoding" in response.headers else response.aiter_raw()


def _loads(data: bytes) -> dict[str, Any]:
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("not an object")
    return value


def _retries(response: httpx2.Response) -> int:
    try:
        return int(response.request.headers.get(_RETRY_HEADER, 0))
    except ValueError:
        return 0


def _root(exc: BaseException) -> type[BaseException]:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return type(exc)


def _timed_out(exc: BaseException) -> bool:
    """Whether a failure really was a timeout. The aiohttp transport reports every connection error
    (refused, reset, server gone) as a connect *timeout*; only the root cause tells a slow provider
    (504) from an unreachable one (502)."""
    return issubclass(_root(exc), (TimeoutError, httpx2.TimeoutException))


def _error_from_body(data: Any, status: int) -> APIError:
    """An error event or body from the provider, kept in OpenAI's shape."""
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return upstream_unavailable("The provider answered with an unexpected body.")
    return APIError(
        status if status >= 400 else 502,
        str(error.get("message") or "The provider reported an error."),
        type=str(error.get("type") or "upstream_error"),
        param=error.get("param") if isinstance(error.get("param"), str) else None,
        code=str(error["code"]) if error.get("code") is not None else None,
    )


def _status_error(name: str, exc: openai.APIStatusError) -> APIError:
    status = exc.status_code
    body = exc.body if isinstance(exc.body, dict) else {}
    # openai's client unwraps {"error": {...}} into .body already.
    detail = body.get("error", body) if isinstance(body.get("error", body), dict) else {}
    message = str(detail.get("message") or f"The provider answered HTTP {status}.")
    if status == 429:
        retry_after = exc.response.headers.get("retry-after")
        headers = {"Retry-After": retry_after} if retry_after else {}
        return APIError(429, message, type=str(detail.get("type") or "rate_limit_error"),
                        code=str(detail.get("code") or "rate_limit_exceeded"), headers=headers)
    if status in _CLIENT_STATUSES:
        param = detail.get("param")
        return APIError(status, message, type=str(detail.get("type") or "invalid_request_error"),
                        param=param if isinstance(param, str) else None,
                        code=str(detail["code"]) if detail.get("code") is not None else None)
    if status in (401, 403):
        # The gateway's own credentials were refused: not the client's fault, and the provider's
        # message may quote part of the key.
        return upstream_unavailable(f"The provider for model '{name}' rejected the gateway's credentials "
                                    f"(HTTP {status}).")
    if status in (408, 504):
        return upstream_timeout(f"The provider for model '{name}' timed out (HTTP {status}).")
    return upstream_unavailable(f"The provider for model '{name}' failed with HTTP {status}: {message}")
