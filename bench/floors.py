"""The floors of the fixed stack: what Hypercorn, Quart and the ``openai`` client cost before any gateway logic.

Helios' added latency at concurrency 1 is, to a first approximation, its CPU time per request. The design
fixes three parts of that: Hypercorn (the server), Quart (the framework) and the official ``openai`` client
(every call to a provider). This module measures each alone, so the gateway's figures can be read against
the lowest they could be:

- ``serve``: Hypercorn, configured as Helios runs it (uvloop, no access log), serving a minimal app that
  answers every request with a fixed chat completion: raw ASGI (the server alone) or Quart (server and
  framework). The benchmark drives it with ``wrk`` like the gateways.
- ``client``: the ``openai`` client posting to the provider imitation back to back, the way the remote
  backend calls it (raw response, body relayed), on its default httpx transport and on its aiohttp transport:
  CPU and wall time per call, non-streaming and to the first chunk of a stream. Prints one JSON object.

    python -m bench.floors serve --app asgi|quart --port PORT
    python -m bench.floors client --port PROVIDER_PORT [--calls N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

_BODY = (b'{"id":"chatcmpl-floor","object":"chat.completion","created":1700000000,"model":"m","choices":[{"index":0,'
         b'"message":{"role":"assistant","content":"tok0 tok1 tok2"},"finish_reason":"stop"}]}')
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(_BODY)).encode())]
_REQUEST = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello!"}],
                       "max_tokens": 16}).encode()


async def _asgi_app(scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                    send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:  # read the whole body, as any handler must
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _BODY})


def _quart_app() -> Any:
    from quart import Quart, Response, request

    app = Quart("floor")

    @app.route("/<path:_path>", methods=["GET", "POST"])
    async def answer(_path: str) -> Response:
        await request.get_data(cache=False, as_text=False, parse_form_data=False)
        return Response(_BODY, content_type="application/json")

    return app


def serve(app_kind: str, port: int) -> None:
    import uvloop
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    app = _asgi_app if app_kind == "asgi" else _quart_app()
    uvloop.run(hypercorn_serve(app, config))  # type: ignore[arg-type]  # both are ASGI apps


async def _client_floor(port: int, calls: int, transport: str) -> dict[str, float]:
    import httpx2
    import openai

    http_client = openai.DefaultAioHttpClient() if transport == "aiohttp" else None
    client = openai.AsyncOpenAI(api_key="sk-floor", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0,
                                timeout=httpx2.Timeout(600, connect=5), http_client=http_client)
    options: Any = {"headers": {"Content-Type": "application/json"}}
    stream_body = _REQUEST.replace(b'"max_tokens": 16', b'"max_tokens": 256, "stream": true')

    async def call() -> None:
        response = await client.post("/chat/completions", cast_to=httpx2.Response, content=_REQUEST,
                                     options=options, stream=False)
        response.content  # noqa: B018  # the body, as the backend reads it

    async def first_chunk() -> None:
        response = await client.post("/chat/completions", cast_to=httpx2.Response, content=stream_body,
                                     options=options, stream=True)
        async for _ in response.aiter_bytes():
            break
        await response.aclose()

    out: dict[str, float] = {}
    try:
        for name, one in (("call", call), ("stream_first_chunk", first_chunk)):
            for _ in range(min(200, calls)):
                await one()
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(calls):
                await one()
            out[f"{name}_cpu_us"] = (time.process_time() - cpu) / calls * 1e6
            out[f"{name}_wall_us"] = (time.perf_counter() - wall) / calls * 1e6
    finally:
        await client.close()
    return out


def client_floor(port: int, calls: int) -> None:
    import uvloop

    result = {transport: uvloop.run(_client_floor(port, calls, transport)) for transport in ("httpx", "aiohttp")}
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    server = sub.add_parser("serve")
    server.add_argument("--app", choices=("asgi", "quart"), required=True)
    server.add_argument("--port", type=int, required=True)
    client = sub.add_parser("client")
    client.add_argument("--port", type=int, required=True)
    client.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.app, args.port)
    else:
        client_floor(args.port, args.calls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
