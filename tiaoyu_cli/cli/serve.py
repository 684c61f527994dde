"""`tiaoyu serve CKPT`: an OpenAI-compatible API (+ a chat page at /) over one checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

EXAMPLES = """
Examples:

  tiaoyu serve ckpt/sft --port 8000                      # then open http://127.0.0.1:8000/

  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "sft", "messages": [{"role": "user", "content": "What is 3 + 4?"}]}'

  tiaoyu serve ckpt/reason --quantize int8 --max-batch 16   # int8 weights on CPU

  tiaoyu serve ckpt/sft --host 0.0.0.0 --port 8080          # reachable from other machines (no auth!)

  tiaoyu serve ckpt/sft --allow-origin http://localhost:3000   # a web app on another origin may call the API
"""


def _names(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


def register(app: typer.Typer) -> None:
    @app.command("serve", epilog=EXAMPLES,
                 help="Serve a checkpoint: OpenAI-compatible /v1/chat/completions, /v1/completions, /v1/models "
                      "(streaming SSE, continuous batching, /health, /metrics) and a chat page at /.")
    def serve(
        ckpt: Annotated[Path, typer.Argument(help="checkpoint folder (step folder, run folder, or export)")],
        host: Annotated[str, typer.Option(help="address to bind; the default is loopback only")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="TCP port (0 = any free port)")] = 8000,
        model_name: Annotated[Optional[str], typer.Option(help="model id clients send (default: the folder name)")] = None,
        mode: Annotated[str, typer.Option(help="auto | chat | complete (how /v1/chat/completions builds prompts)")] = "auto",
        max_tokens: Annotated[int, typer.Option(help="most new tokens a request may ask for")] = 512,
        default_max_tokens: Annotated[int, typer.Option(help="new tokens when a request does not say")] = 256,
        max_batch: Annotated[int, typer.Option(help="requests generated together (rows of the running batch)")] = 8,
        max_queue: Annotated[int, typer.Option(help="waiting requests before answering 503")] = 64,
        max_request_bytes: Annotated[int, typer.Option(help="largest request body (413 above it)")] = 1 << 20,
        request_timeout: Annotated[float, typer.Option(help="seconds a request may take, queue included (504 after)")] = 120.0,
        device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps")] = "auto",
        quantize: Annotated[str, typer.Option(help="none | int8 (weight-only int8 Linear layers, CPU)")] = "none",
        quiet: Annotated[bool, typer.Option("--quiet", help="do not log every request")] = False,
        allowed_hosts: Annotated[Optional[str], typer.Option(
            help="comma-separated Host names to answer besides the bound address (refused otherwise: DNS "
                 "rebinding); '*' any")] = None,
        allow_origin: Annotated[Optional[str], typer.Option(
            help="comma-separated web origins whose pages may call the API (CORS), e.g. http://localhost:3000; "
                 "'*' any. Other pages' requests are refused")] = None,
        tool_schemas: Annotated[Optional[bool], typer.Option("--tool-schemas/--no-tool-schemas",
                                                   help="render a request's tools in the system turn. Default: as "
                                                   "the checkpoint was trained (trainer.json), else on")] = None,
    ) -> None:
        from tiaoyu_cli.console import console
        from tiaoyu_cli.errors import TiaoyuError

        try:
            from tiaoyu_cli.serve.server import ServeConfig, load_engine, make_server
        except ModuleNotFoundError as e:
            if e.name not in ("starlette", "uvicorn"):
                raise
            raise TiaoyuError(f"tiaoyu serve needs {e.name}: pip install 'tiaoyu[serve]'") from None

        if not 0 <= port <= 65535:
            raise TiaoyuError(f"--port {port}: choose 0..65535")
        if quantize not in ("none", "int8"):
            raise TiaoyuError(f"--quantize {quantize!r}: choose none or int8")
        if default_max_tokens > max_tokens:
            raise TiaoyuError("--default-max-tokens must not exceed --max-tokens")
        cfg = ServeConfig(host=host, port=port, model_name=model_name or "", max_tokens_limit=max_tokens,
                          default_max_tokens=default_max_tokens, max_request_bytes=max_request_bytes,
                          max_batch=max_batch, max_queue=max_queue, request_timeout_s=request_timeout,
                          tool_schemas=tool_schemas, allowed_hosts=_names(allowed_hosts),
                          allow_origins=_names(allow_origin))
        with console.status(f"loading {ckpt} …"):
            engine, name = load_engine(ckpt, device=device, mode=mode, quantize=quantize, config=cfg)
        # the scheduler thread and uvicorn's event loop share the GIL; at the default 5 ms switch interval
        # each may wait that long for the other at every hand-over (benchmarks/bench_serve.py measures it)
        sys.setswitchinterval(0.0005)
        server = make_server(engine, host, port, name, quiet=quiet)
        h, p = server.server_address[:2]
        shown = f"[{h}]" if ":" in str(h) else h
        n = engine.model.num_parameters()
        console.print(f"serving [bold]{name}[/] ({n / 1e6:.2f}M parameters, {engine.mode} mode"
                      + (", int8" if quantize == "int8" else "") + f", context {engine.context})")
        console.print(f"  chat page   http://{shown}:{p}/")
        console.print(f"  API         http://{shown}:{p}/v1  (chat/completions, completions, models)")
        console.print(f"  health      http://{shown}:{p}/health, http://{shown}:{p}/metrics")
        if host not in ("127.0.0.1", "localhost", "::1"):
            console.print("[yellow]warning:[/] listening beyond loopback; the API has no authentication")
        console.print("[dim]Ctrl-C to stop[/]")
        try:
            server.serve_forever(poll_interval=0.5)
        except KeyboardInterrupt:
            console.print("stopping")
        finally:
            server.server_close()
            engine.close()
