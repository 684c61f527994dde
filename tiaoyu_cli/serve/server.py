"""`tiaoyu serve`: an OpenAI-compatible HTTP API and a chat page, on the standard library alone.

    tiaoyu serve ckpt/sft --port 8000
    curl localhost:8000/v1/chat/completions -d '{"model": "sft", "messages": [{"role": "user", "content": "1+1=?"}]}'

Endpoints
    GET  /                      the chat page (static/index.html: no build step, no CDN)
    GET  /v1/models             the one model served
    POST /v1/chat/completions   messages → answer; `"stream": true` sends Server-Sent Events
    POST /v1/completions        plain text continuation
    GET  /health                status and batching counters

How requests become batches. Every HTTP request runs in its own thread (ThreadingHTTPServer)
that validates the body, encodes the prompt and puts a `Job` on one queue. A single generation
worker thread owns the model: it waits for a job, then takes whatever else is waiting (up to
`max_batch`), groups the jobs that share sampling settings, and generates each group as one
left-padded batch with the KV cache (tiaoyu_cli/infer/generate.py). New tokens go back to each
request's own event queue as they are chosen, so streaming clients see them at once. A request
that arrives during a batch waits for the next one (no mid-batch joining).

Limits: the body size (`max_request_bytes`, else 413), `max_tokens` (at most `max_tokens_limit`,
and the prompt plus its answer must fit the model's context, else 400), the queue length (else
503). Bad JSON, unknown fields' types, an unknown model (404) — every error is a JSON body
`{"error": {"message", "type", "param", "code"}}` and the server keeps serving.

Reasoning checkpoints think between <think> and </think>: the thinking is returned separately as
`reasoning_content` (non-streaming: in the message; streaming: in the deltas), as several
OpenAI-compatible servers do, and the page shows it apart from the answer.

Function calling (`tools`, `tool_choice`, `tool_calls`, `role: "tool"`) lives in serve/tools_api.py.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import queue
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.infer.generate import IncrementalDecoder, decode_steps
from tiaoyu_cli.infer.sampling import SamplingParams, make_generator
from tiaoyu_cli.serve import tools_api


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = ""  # served model id; default: the checkpoint folder's name
    max_tokens_limit: int = 512  # most new tokens one request may ask for
    default_max_tokens: int = 256  # when a request does not say
    max_request_bytes: int = 1 << 20  # request body limit (413 above it)
    max_batch: int = 8  # requests generated together
    max_queue: int = 64  # waiting requests before 503
    batch_wait_s: float = 0.01  # after the first job, wait this long for more to batch with it
    request_timeout_s: float = 30.0  # socket timeout for reading a request
    tool_schemas: bool = True  # render a request's `tools` in the system turn (serve/tools_api.py)


class APIError(Exception):
    """An error answered as {"error": {...}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- jobs and the generation worker ----------------------------------------------------------------

@dataclass
class Job:
    """One request's generation: prompt ids in, events out on `events`:
    ("text", str, reasoning: bool) …, then ("done", finish_reason, completion_tokens) or ("error", message)."""

    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    stop_ids: frozenset[int]
    stop: list[str] = field(default_factory=list)  # stop strings (answer text only)
    seed: int | None = None
    events: "queue.Queue[tuple]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    tools: tools_api.ToolJob | None = None  # set when the answer is parsed for tool calls

    def batch_key(self) -> tuple:
        """Jobs with the same key are generated in one batch (same sampling; a seeded job runs alone,
        so its seed alone decides its tokens)."""
        p = self.params
        return (p.temperature, p.top_k, p.top_p, p.repetition_penalty, tuple(sorted(self.stop_ids)),
                self.id if self.seed is not None else None)


class StopStrings:
    """Cut the answer at the first stop string. Text that could be the start of a stop string is held
    back until it is known not to be, so a stop string never reaches a streaming client."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text to send now, stopped)."""
        if not self.stops:
            return text, False
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[:min(hits)], ""
            return out, True
        cut = max(0, len(self.buf) - self.hold)
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class _Running:
    """A job inside a batch: its decoder, stop strings and token count."""

    def __init__(self, job: Job, tokenizer):
        self.job = job
        self.decoder = IncrementalDecoder(tokenizer)
        self.stops = StopStrings(job.stop)
        self.calls = tools_api.CallCollector(job.tools, tokenizer) if job.tools is not None else None
        self.n = 0
        self.done = False

    def _emit(self, pieces) -> bool:
        """Send pieces; True when a stop string ended the answer."""
        for p in pieces:
            if p.reasoning:
                self.job.events.put(("text", p.text, True))
                continue
            text, stopped = self.stops.feed(p.text)
            if text:
                self.job.events.put(("text", text, False))
            if stopped:
                return True
        return False

    def finish(self, reason: str) -> None:
        if self.done:
            return
        self.done = True
        if reason != "stop_string":
            if not self._emit(self.decoder.flush()):
                rest = self.stops.flush()
                if rest:
                    self.job.events.put(("text", rest, False))
        self.job.events.put(("done", "stop" if reason == "stop_string" else reason, self.n))

    def push(self, token: int) -> None:
        if self.done:
            return
        if self.job.cancelled.is_set():
            self.finish("cancelled")
            return
        self.n += 1
        if token in self.job.stop_ids:
            self.finish("stop")
            return
        if self.calls is not None and self.calls.push(token, self):
            pass  # inside a tool call: no text
        elif self._emit(self.decoder.push(token)):
            self.finish("stop_string")
            return
        if self.n >= self.job.max_tokens:
            self.finish("length")


class Engine:
    """The model, its tokenizer and the generation worker thread."""

    def __init__(self, model, tokenizer, mode: str, config: ServeConfig | None = None,
                 steps: Callable = decode_steps):
        self.model, self.tokenizer, self.mode = model, tokenizer, mode
        self.config = config or ServeConfig()
        self.context = int(model.config.max_seq_len)
        self.jobs: "queue.Queue[Job]" = queue.Queue(maxsize=self.config.max_queue)
        self._steps = steps  # the generation loop (tests may substitute a scripted one)
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0, "tokens_generated": 0}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tiaoyu-generate", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(503, f"the server is busy ({self.config.max_queue} requests waiting); retry shortly",
                           type_="server_error", code="overloaded") from None
        with self._lock:
            self.stats["requests"] += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    # the worker -------------------------------------------------------------------------------------
    def _take_batch(self) -> list[Job]:
        try:
            first = self.jobs.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.config.batch_wait_s
        while len(batch) < self.config.max_batch * 4:
            left = deadline - time.monotonic()
            try:
                batch.append(self.jobs.get(timeout=left) if left > 0 else self.jobs.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while not self._stop.is_set():
            jobs = self._take_batch()
            groups: dict[tuple, list[Job]] = {}
            for j in jobs:
                if not j.cancelled.is_set():
                    groups.setdefault(j.batch_key(), []).append(j)
            for group in groups.values():
                for i in range(0, len(group), self.config.max_batch):
                    self._generate(group[i:i + self.config.max_batch])

    def _generate(self, jobs: list[Job]) -> None:
        running = [_Running(j, self.tokenizer) for j in jobs]
        with self._lock:
            self.stats["batches"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        try:
            params = jobs[0].params
            device = next(self.model.parameters()).device
            gen = None if params.greedy else make_generator(jobs[0].seed, device)
            n_new = max(j.max_tokens for j in jobs)
            for step in self._steps(self.model, [j.prompt for j in jobs], n_new, params, jobs[0].stop_ids, gen):
                for r, t in zip(step.rows, step.tokens):
                    running[r].push(int(t))
                with self._lock:
                    self.stats["tokens_generated"] += len(step.rows)
                if all(x.done for x in running):
                    break
            for x in running:
                x.finish("length")
        except Exception as e:  # report to every waiting request; the worker keeps serving
            traceback.print_exc()
            for x in running:
                if not x.done:
                    x.done = True
                    x.job.events.put(("error", f"generation failed: {type(e).__name__}: {e}"))


# ---- request parsing -------------------------------------------------------------------------------------

def _num(body: dict, key: str, default, kind=float, lo=None, hi=None):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise APIError(400, f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {json.dumps(v)}", key)
    v = kind(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise APIError(400, f"'{key}' must be between {lo} and {hi}, got {v}", key)
    return v


def _text_content(content: Any, where: str) -> str:
    """A message content: a string, or OpenAI's list of {"type": "text", "text": …} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                raise APIError(400, f"{where}: only text content parts are supported", "messages")
            parts.append(p["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise APIError(400, f"{where}: content must be a string or a list of text parts", "messages")


def parse_messages(raw: Any) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    msgs = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise APIError(400, f"messages[{i}]: unknown role {role!r} (system, user, assistant or tool)", "messages")
        if role == "tool" or (role == "assistant" and m.get("tool_calls")):
            try:
                msgs.append(tools_api.tool_message(m, i))
            except tools_api.RequestError as e:
                raise APIError(400, str(e), e.param) from None
            continue
        msg = {"role": role, "content": _text_content(m.get("content"), f"messages[{i}]")}
        if role == "assistant" and isinstance(m.get("reasoning_content"), str):
            msg["reasoning"] = m["reasoning_content"]
        msgs.append(msg)
    if msgs[-1]["role"] == "assistant":
        raise APIError(400, "the last message must not be the assistant's: there is nothing to answer", "messages")
    try:
        tools_api.check_messages(msgs)
    except tools_api.RequestError as e:
        raise APIError(400, str(e), e.param) from None
    return msgs


class API:
    """Turns request bodies into jobs and jobs into OpenAI-shaped responses."""

    def __init__(self, engine: Engine, model_name: str):
        self.engine, self.model_name = engine, model_name
        self.created = int(time.time())

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "tiaoyu"}]}

    def health(self) -> dict:
        e = self.engine
        return {"status": "ok", "model": self.model_name, "mode": e.mode, "context": e.context,
                "queued": e.jobs.qsize(), **e.stats}

    def _check_model(self, body: dict) -> None:
        m = body.get("model")
        if m is not None and m != self.model_name:
            raise APIError(404, f"the model '{m}' does not exist; this server serves '{self.model_name}'",
                           "model", "model_not_found")

    def make_job(self, body: dict, chat: bool) -> Job:
        from tiaoyu_cli.infer.session import stop_ids_for

        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        self._check_model(body)
        if _num(body, "n", 1, int, 1) != 1:
            raise APIError(400, "only n = 1 is supported", "n")
        if body.get("logprobs") not in (None, False, 0):
            raise APIError(400, "logprobs are not supported by this server", "logprobs")
        cfg = self.engine.config
        temperature = _num(body, "temperature", 1.0, float, 0.0, 2.0)
        top_p = _num(body, "top_p", 1.0, float, 0.0, 1.0)
        if top_p == 0:
            top_p = 1e-6
        top_k = _num(body, "top_k", 0, int, 0, 10_000_000)
        penalty = _num(body, "repetition_penalty", 1.0, float, 0.01, 10.0)
        seed = _num(body, "seed", None, int)
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4):
            raise APIError(400, "'stop' must be a string or a list of up to 4 strings", "stop")
        tok = self.engine.tokenizer
        tool_job = None
        if chat:
            msgs = parse_messages(body.get("messages"))
            try:
                schemas, choice = tools_api.parse_request(body)
                prompt, tool_job = tools_api.chat_prompt(tok, self.engine.mode, msgs, schemas, choice,
                                                          cfg.tool_schemas)
            except tools_api.RequestError as e:
                raise APIError(400, str(e), e.param) from None
            except TiaoyuError as e:
                raise APIError(400, str(e), "messages") from None
            stop_ids = stop_ids_for(self.engine.mode)
        else:
            p = body.get("prompt")
            if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
                p = p[0]
            if not isinstance(p, str):
                raise APIError(400, "'prompt' must be a string (one prompt per request)", "prompt")
            prompt = tok.encode(p, bos=True)
            stop_ids = frozenset({tok.eos_id})
        ctx = self.engine.context
        if len(prompt) >= ctx:
            raise APIError(400, f"the prompt is {len(prompt)} tokens; this model's context is {ctx} tokens, "
                                "so the prompt must be shorter", "messages" if chat else "prompt",
                           "context_length_exceeded")
        asked = body.get("max_completion_tokens", body.get("max_tokens"))
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        if asked is None:
            max_tokens = min(cfg.default_max_tokens, ctx - len(prompt))
        else:
            max_tokens = _num(body, key, None, int, 1, cfg.max_tokens_limit)
            if len(prompt) + max_tokens > ctx:
                raise APIError(400, f"the prompt ({len(prompt)} tokens) plus {key} ({max_tokens}) exceeds this "
                                    f"model's context of {ctx} tokens", key, "context_length_exceeded")
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
        return Job(prompt, max_tokens, params, frozenset(stop_ids), stop=list(stop), seed=seed, tools=tool_job)

    # responses ---------------------------------------------------------------------------------------
    def collect(self, job: Job) -> tuple[str, str, str, int]:
        """Wait for the whole answer: (content, reasoning, finish_reason, completion_tokens)."""
        content, reasoning = [], []
        while True:
            ev = job.events.get()
            if ev[0] == "text":
                (reasoning if ev[2] else content).append(ev[1])
            elif ev[0] == "done":
                return "".join(content), "".join(reasoning), ev[1], ev[2]
            else:
                raise APIError(500, ev[1], type_="server_error")

    def response(self, job: Job, chat: bool) -> dict:
        if chat and job.tools is not None:
            return tools_api.response(self, job)
        content, reasoning, finish, n = self.collect(job)
        base = {"id": ("chatcmpl-" if chat else "cmpl-") + job.id, "created": int(time.time()),
                "model": self.model_name,
                "usage": {"prompt_tokens": len(job.prompt), "completion_tokens": n,
                          "total_tokens": len(job.prompt) + n}}
        if chat:
            msg = {"role": "assistant", "content": content}
            if reasoning:
                msg["reasoning_content"] = reasoning
            return {**base, "object": "chat.completion",
                    "choices": [{"index": 0, "message": msg, "finish_reason": finish, "logprobs": None}]}
        return {**base, "object": "text_completion",
                "choices": [{"index": 0, "text": content, "finish_reason": finish, "logprobs": None}]}

    def stream_events(self, job: Job, chat: bool, include_usage: bool):
        """The SSE chunks of a streamed answer (dicts), ending with the finish chunk (and usage)."""
        if chat and job.tools is not None:
            yield from tools_api.stream_events(self, job, include_usage)
            return
        cid = ("chatcmpl-" if chat else "cmpl-") + job.id
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: dict | None = None, text: str | None = None, finish: str | None = None) -> dict:
            choice: dict = {"index": 0, "finish_reason": finish, "logprobs": None}
            if chat:
                choice["delta"] = delta or {}
            else:
                choice["text"] = text or ""
            return {"id": cid, "object": obj, "created": created, "model": self.model_name, "choices": [choice]}

        if chat:
            yield chunk({"role": "assistant", "content": ""})
        while True:
            ev = job.events.get()
            if ev[0] == "text":
                if chat:
                    yield chunk({"reasoning_content": ev[1]} if ev[2] else {"content": ev[1]})
                elif not ev[2]:
                    yield chunk(text=ev[1])
            elif ev[0] == "done":
                yield chunk(finish=ev[1])
                if include_usage:
                    yield {"id": cid, "object": obj, "created": created, "model": self.model_name, "choices": [],
                           "usage": {"prompt_tokens": len(job.prompt), "completion_tokens": ev[2],
                                     "total_tokens": len(job.prompt) + ev[2]}}
                return
            else:
                yield {"error": {"message": ev[1], "type": "server_error", "param": None, "code": None}}
                return


# ---- HTTP ---------------------------------------------------------------------------------------------------

def page_html() -> bytes:
    return resources.files("tiaoyu_cli.serve").joinpath("static/index.html").read_bytes()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tiaoyu"
    api: API  # set on the subclass made by make_server
    quiet = False

    def log_message(self, fmt: str, *args) -> None:
        if not self.quiet:
            super().log_message(fmt, *args)

    def _send(self, status: int, body: bytes, ctype: str = "application/json", close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict, close: bool = False) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), close=close)

    def _error(self, e: APIError, close: bool = False) -> None:
        self._json(e.status, e.body(), close=close)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(200, page_html(), "text/html; charset=utf-8")
        elif path == "/v1/models":
            self._json(200, self.api.models())
        elif path.startswith("/v1/models/"):
            name = path[len("/v1/models/"):]
            if name == self.api.model_name:
                self._json(200, self.api.models()["data"][0])
            else:
                self._error(APIError(404, f"the model '{name}' does not exist", "model", "model_not_found"))
        elif path == "/health":
            self._json(200, self.api.health())
        elif path in ("/v1/chat/completions", "/v1/completions"):
            self._error(APIError(405, f"{path} takes POST", code="method_not_allowed"))
        else:
            self._error(APIError(404, f"no such endpoint: GET {path}", code="not_found"))

    def _read_body(self) -> dict:
        cfg = self.api.engine.config
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise APIError(411, "send the body with a Content-Length (chunked requests are not accepted)")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise APIError(400, "invalid Content-Length header") from None
        if length > cfg.max_request_bytes:
            raise APIError(413, f"the request body is {length} bytes; the limit is {cfg.max_request_bytes}",
                           code="request_too_large")
        raw = self.rfile.read(length) if length > 0 else b""
        if not raw.strip():
            raise APIError(400, "the request body is empty; send a JSON object")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    def do_POST(self) -> None:  # noqa: N802
        try:
            self._post()
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # a bug must not take the server down: answer 500 and keep serving
            traceback.print_exc()
            try:
                self._error(APIError(500, f"internal error: {type(e).__name__}: {e}", type_="server_error"),
                            close=True)
            except OSError:
                pass

    def _post(self) -> None:
        path = self.path.split("?", 1)[0]
        if path not in ("/v1/chat/completions", "/v1/completions"):
            # do not read a body we will not use: close the connection instead
            self._error(APIError(404, f"no such endpoint: POST {path}", code="not_found"), close=True)
            return
        chat = path == "/v1/chat/completions"
        try:
            body = self._read_body()
            job = self.api.make_job(body, chat)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise APIError(400, "'stream' must be true or false", "stream")
            opts = body.get("stream_options") or {}
            include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
            self.api.engine.submit(job)
        except APIError as e:
            self._error(e, close=e.status in (411, 413))
            return
        if not stream:
            try:
                self._json(200, self.api.response(job, chat))
            except APIError as e:
                self._error(e)
            except (BrokenPipeError, ConnectionResetError):
                job.cancelled.set()
            return
        self._stream(job, chat, include_usage)

    def _stream(self, job: Job, chat: bool, include_usage: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        self.close_connection = True
        try:
            for ev in self.api.stream_events(job, chat, include_usage):
                self.wfile.write(b"data: " + json.dumps(ev, ensure_ascii=False).encode("utf-8") + b"\n\n")
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client went away: stop generating for it
            job.cancelled.set()


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000, model_name: str = "tiaoyu",
                quiet: bool = False) -> Server:
    """An HTTP server (not yet serving) for `engine`; port 0 picks a free port (see server.server_address)."""
    api = API(engine, model_name)
    handler = type("TiaoyuHandler", (Handler,), {"api": api, "quiet": quiet,
                                                  "timeout": engine.config.request_timeout_s})
    try:
        return Server((host, port), handler)
    except OSError as e:
        raise TiaoyuError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


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
    cm = load_chat_model(ckpt, device=device, mode=mode)
    if quantize != "none":
        from tiaoyu_cli.model.quant import quantize_model

        quantize_model(cm.model, quantize)
    for name in ("max_tokens_limit", "default_max_tokens", "max_request_bytes", "max_batch", "max_queue"):
        if getattr(config, name) < 1:
            raise TiaoyuError(f"--{name.replace('_', '-')} must be >= 1")
    name = config.model_name or default_model_name(cm.path)
    return Engine(cm.model, cm.tokenizer, cm.mode, dataclasses.replace(config, model_name=name)), name
