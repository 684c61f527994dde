"""The HTTP side of `tiaoyu serve`: an ASGI app (Starlette), served by uvicorn (serve/server.py).

    GET  /                      the chat page (static/index.html: no build step, no CDN)
    GET  /v1/models, /v1/models/{id}
    POST /v1/chat/completions   messages → answer; `"stream": true` sends Server-Sent Events
    POST /v1/completions        plain text continuation
    GET  /health                JSON: status, model, batch counters
    GET  /metrics               Prometheus text: requests, tokens, decode steps, batch and queue gauges

Each request is a coroutine on uvicorn's event loop: it validates the body (serve/api.py), submits a
job to the engine's scheduler thread (serve/engine.py) and awaits the job's events, which the
scheduler hands over with `loop.call_soon_threadsafe` — no thread per request. A client that
disconnects cancels its job (streaming: the send fails or Starlette sees `http.disconnect`;
non-streaming: polled while waiting), so its row in the running batch is freed at the next step.

Limits and errors as before: the body size (413, checked from Content-Length before reading),
chunked bodies (411), bad JSON or fields (400), an unknown model (404), a full queue (503), a request
past its deadline (504) — every error a JSON body {"error": {...}}; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import traceback
from importlib import resources

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tiaoyu_cli.io import check_json_nesting
from tiaoyu_cli.serve.api import MAX_NESTING, API, Collector, StreamBuilder
from tiaoyu_cli.serve.engine import APIError, Job

DISCONNECT_POLL_S = 0.25  # non-streaming: how often to check that the client is still there


def page_html() -> bytes:
    return resources.files("tiaoyu_cli.serve").joinpath("static/index.html").read_bytes()


def _dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def error_response(api: API, e: APIError, close: bool = False) -> Response:
    api.http_errors[e.status] = api.http_errors.get(e.status, 0) + 1
    headers = {"Cache-Control": "no-store"}
    if close:
        headers["Connection"] = "close"
    return Response(_dumps(e.body()), status_code=e.status, media_type="application/json", headers=headers)


async def read_body(request: Request, limit: int) -> dict:
    if "chunked" in (request.headers.get("transfer-encoding") or "").lower():
        raise APIError(411, "send the body with a Content-Length (chunked requests are not accepted)")
    try:
        length = int(request.headers.get("content-length") or 0)
    except ValueError:
        raise APIError(400, "invalid Content-Length header") from None
    if length > limit:
        raise APIError(413, f"the request body is {length} bytes; the limit is {limit}", code="request_too_large")
    raw = await request.body()
    if len(raw) > limit:
        raise APIError(413, f"the request body is {len(raw)} bytes; the limit is {limit}", code="request_too_large")
    if not raw.strip():
        raise APIError(400, "the request body is empty; send a JSON object")
    # deeper bodies serve no request and could exhaust the recursion of code that walks them later
    # (templates, JSON encoders): refused before parsing, by one scan of the text
    problem = check_json_nesting(raw, MAX_NESTING)
    if problem is not None:
        raise APIError(400, f"the request body is {problem}")
    try:  # orjson: strict JSON (no NaN or Infinity)
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def make_app(api: API) -> Starlette:
    engine = api.engine

    async def page(request: Request) -> Response:
        return Response(page_html(), media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-store"})

    async def models(request: Request) -> Response:
        return JSONResponse(api.models())

    async def model(request: Request) -> Response:
        name = request.path_params["name"]
        if name == api.model_name:
            return JSONResponse(api.models()["data"][0])
        return error_response(api, APIError(404, f"the model '{name}' does not exist", "model", "model_not_found"))

    async def health(request: Request) -> Response:
        return JSONResponse(api.health(), headers={"Cache-Control": "no-store"})

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(api.metrics(), media_type="text/plain; version=0.0.4")

    async def generate(request: Request) -> Response:
        chat = request.url.path == "/v1/chat/completions"
        if request.method != "POST":
            return error_response(api, APIError(405, f"{request.url.path} takes POST", code="method_not_allowed"))
        try:
            body = await read_body(request, engine.config.max_request_bytes)
            job = api.make_job(body, chat)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise APIError(400, "'stream' must be true or false", "stream")
            opts = body.get("stream_options") or {}
            include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
            job.stream = stream
            job.bind(asyncio.get_running_loop())
            engine.submit(job)
        except APIError as e:
            return error_response(api, e, close=e.status in (411, 413))
        if stream:
            return StreamingResponse(sse(job, StreamBuilder(api, job, chat, include_usage)),
                                     media_type="text/event-stream; charset=utf-8",
                                     headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        return await whole(request, job, chat)

    async def whole(request: Request, job: Job, chat: bool) -> Response:
        col = Collector()
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(job.next_event(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancelled.set()
                        return Response(status_code=499)
                    continue
                if col.feed(ev):
                    break
        except APIError as e:
            return error_response(api, e)
        finally:
            if col.finish is None:
                job.cancelled.set()
        return JSONResponse(api.response(job, chat, col.result()))

    async def sse(job: Job, sb: StreamBuilder):
        try:
            for c in sb.start():
                yield b"data: " + _dumps(c) + b"\n\n"
            while not sb.done:
                for c in sb.feed(await job.next_event()):
                    yield b"data: " + _dumps(c) + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:  # finished, or the client went away (the send failed / the task was cancelled)
            if not sb.done:
                job.cancelled.set()

    async def not_found(request: Request) -> Response:
        close = request.method not in ("GET", "HEAD")  # do not read a body we will not use
        return error_response(api, APIError(404, f"no such endpoint: {request.method} {request.url.path}",
                                            code="not_found"), close=close)

    async def on_error(request: Request, exc: Exception) -> Response:  # a bug must not take the server down
        traceback.print_exception(exc)
        return error_response(api, APIError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error"),
                              close=True)

    def get_only(handler):
        async def route(request: Request) -> Response:
            if request.method not in ("GET", "HEAD"):
                return error_response(api, APIError(405, f"{request.url.path} takes GET", code="method_not_allowed"),
                                      close=True)
            return await handler(request)
        return route

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    routes = [
        *(Route(path, get_only(h), methods=methods) for path, h in (
            ("/", page), ("/index.html", page), ("/v1/models", models), ("/v1/models/{name:path}", model),
            ("/health", health), ("/metrics", metrics))),
        Route("/v1/chat/completions", generate, methods=methods), Route("/v1/completions", generate, methods=methods),
        Route("/{rest:path}", not_found, methods=methods),
    ]
    return Starlette(routes=routes, exception_handlers={Exception: on_error})
