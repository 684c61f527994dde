"""`tiaoyu serve`: an OpenAI-compatible HTTP API and a chat page, on uvicorn (ASGI) with continuous batching.

    tiaoyu serve ckpt/sft --port 8000
    curl localhost:8000/v1/chat/completions -d '{"model": "sft", "messages": [{"role": "user", "content": "1+1=?"}]}'

The parts:

    serve/engine.py   jobs and the scheduler thread: continuous batching over a slot KV cache
                      (infer/slots.py), per-request deadlines, cancellation when a client leaves
    serve/api.py      request bodies → jobs, events → OpenAI response objects and stream chunks
    serve/app.py      the ASGI app (Starlette): routes, body limits, SSE, /health, /metrics
    serve/guard.py    Host and Origin checks (DNS rebinding, other web pages), CORS for allowed origins
    serve/server.py   this file: load a checkpoint into an Engine, run the app on uvicorn

Reasoning checkpoints think between <think> and </think>: the thinking is returned separately as
`reasoning_content` (non-streaming: in the message; streaming: in the deltas), as several
OpenAI-compatible servers do, and the page shows it apart from the answer.

`make_server` returns a `Server` with the shape of the standard library's socketserver
(`serve_forever`, `shutdown`, `server_close`, `server_address`): the socket is bound at once, so
port 0 picks a free port that `server_address` reports before serving starts.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading

import uvicorn

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.serve.api import API, Collector, StreamBuilder, parse_messages
from tiaoyu_cli.serve.app import make_app, page_html
from tiaoyu_cli.serve.engine import APIError, Engine, Job, ServeConfig, StopStrings
from tiaoyu_cli.serve.guard import Guard

__all__ = ["API", "APIError", "Collector", "Engine", "Job", "ServeConfig", "Server", "StopStrings", "StreamBuilder",
           "default_model_name", "load_engine", "make_server", "page_html", "parse_messages"]


class Server:
    """uvicorn serving the app on an already bound socket."""

    def __init__(self, api: API, sock: socket.socket, quiet: bool = False, host: str = "127.0.0.1"):
        self.api, self.socket = api, sock
        self.server_address = sock.getsockname()
        cfg = api.engine.config
        app = Guard(make_app(api), host, cfg.allowed_hosts, cfg.allow_origins)
        config = uvicorn.Config(app, lifespan="off", access_log=not quiet,
                                log_level="warning" if quiet else "info", timeout_graceful_shutdown=3,
                                timeout_keep_alive=30)
        self.uvicorn = uvicorn.Server(config)
        self._done = threading.Event()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until `shutdown()` (or, in the main thread, SIGINT/SIGTERM)."""
        self._done.clear()
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self._done.set()

    def shutdown(self) -> None:
        self.uvicorn.should_exit = True
        self._done.wait(timeout=10)

    def server_close(self) -> None:
        self.socket.close()


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000, model_name: str = "tiaoyu",
                quiet: bool = False) -> Server:
    """A server (not yet serving) for `engine`; port 0 picks a free port (see server.server_address)."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(2048)
    except OSError as e:
        raise TiaoyuError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return Server(API(engine, model_name), sock, quiet=quiet, host=host)


def default_model_name(path) -> str:
    from pathlib import Path

    p = Path(path)
    if p.name.startswith("step-") or p.name == "latest":
        p = p.parent
    return p.name or "tiaoyu"


def load_engine(ckpt: str | os.PathLike, device: str = "auto", mode: str = "auto", quantize: str = "none",
                config: ServeConfig | None = None) -> tuple[Engine, str]:
    """Load a checkpoint for serving. Returns (engine, served model name)."""
    from tiaoyu_cli.infer.session import load_chat_model

    config = config or ServeConfig()
    for name in ("max_tokens_limit", "default_max_tokens", "max_request_bytes", "max_batch", "max_queue"):
        if getattr(config, name) < 1:
            raise TiaoyuError(f"--{name.replace('_', '-')} must be >= 1")
    if not config.request_timeout_s > 0:
        raise TiaoyuError("--request-timeout must be > 0 seconds")
    cm = load_chat_model(ckpt, device=device, mode=mode)
    if quantize != "none":
        from tiaoyu_cli.model.quant import quantize_model

        quantize_model(cm.model, quantize)
    name = config.model_name or default_model_name(cm.path)
    schemas = config.tool_schemas if config.tool_schemas is not None else cm.tool_schemas is not False
    return Engine(cm.model, cm.tokenizer, cm.mode, dataclasses.replace(config, model_name=name, tool_schemas=schemas)), name
