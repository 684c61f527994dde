"""The OpenAI-compatible API of `tiaoyu serve`, apart from HTTP: request bodies → jobs, job events →
response bodies and stream chunks. Every function here is plain data in, plain data out, so the
tool-calling hook (serve/tools_api.py) can extend a request or a response without touching the
transport (serve/app.py).

    api.make_job(body, chat)              validate a /v1/chat/completions or /v1/completions body → Job
    Collector / api.response(job, …)      a finished answer → the chat.completion / text_completion object
    StreamBuilder                          events → chat.completion.chunk / text_completion chunks (SSE)

Errors are `APIError`s: an HTTP status and OpenAI's {"error": {message, type, param, code}} body.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.infer.sampling import SamplingParams, make_generator
from tiaoyu_cli.infer.session import stop_ids_for
from tiaoyu_cli.serve import tools_api
from tiaoyu_cli.serve.engine import APIError, Engine, Job


# ---- request parsing -------------------------------------------------------------------------------------

SEED_MAX = 2**64 - 1  # torch generators take seeds in 0 … 2**64 - 1


def _num(body: dict, key: str, default, kind=float, lo=None, hi=None):
    """`body[key]` checked: a finite number (an integer where `kind` is int) within [lo, hi]. JSON bodies are
    read by orjson, which refuses NaN and Infinity; a body built another way is checked here all the same."""
    v = body.get(key, default)
    if v is None:
        return default
    what = "an integer" if kind is int else "a number"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise APIError(400, f"'{key}' must be {what}, got {_short(v)}", key)
    if isinstance(v, float) and not math.isfinite(v):
        raise APIError(400, f"'{key}' must be a finite number, got {v}", key)
    if kind is int and isinstance(v, float) and not v.is_integer():
        raise APIError(400, f"'{key}' must be an integer, got {v}", key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise APIError(400, f"'{key}' must be between {lo} and {hi}, got {_short(v)}", key)
    return kind(v)


MAX_NESTING = 32  # a chat request needs about 8 levels (tools' schemas a few more)


def _short(v: Any, limit: int = 60) -> str:
    """A value as JSON for an error message, cut to `limit` characters."""
    try:
        text = json.dumps(v)
    except (TypeError, ValueError, RecursionError):
        text = type(v).__name__
    return text if len(text) <= limit else text[:limit] + "…"


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
        self.http_errors: dict[int, int] = {}  # status → count, for /metrics

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "tiaoyu"}]}

    def health(self) -> dict:
        e = self.engine
        with e._lock:
            stats = dict(e.stats)
        return {"status": "ok", "model": self.model_name, "mode": e.mode, "context": e.context,
                "max_batch": e.config.max_batch, "queued": e.jobs.qsize(), **stats}

    def metrics(self) -> str:
        """Prometheus text format: counters of the engine and the HTTP side, gauges of the batch."""
        e = self.engine
        with e._lock:
            stats, lat = dict(e.stats), dict(e.latency)
        lines = []

        def metric(name: str, kind: str, help_: str, value, labels: str = "") -> None:
            lines.extend([f"# HELP tiaoyu_{name} {help_}", f"# TYPE tiaoyu_{name} {kind}",
                          f"tiaoyu_{name}{labels} {value}"])

        metric("requests_total", "counter", "generation requests accepted", stats["requests"])
        metric("requests_completed_total", "counter", "requests answered to the end", stats["completed"])
        metric("requests_cancelled_total", "counter", "requests whose client went away", stats["cancelled"])
        metric("requests_timed_out_total", "counter", "requests past the request timeout (504)", stats["timeouts"])
        metric("requests_failed_total", "counter", "requests that failed in generation (500)", stats["errors"])
        metric("http_errors_total", "counter", "requests answered with a 4xx/5xx before generation",
               sum(self.http_errors.values()))
        metric("generated_tokens_total", "counter", "tokens generated", stats["tokens_generated"])
        metric("prefill_tokens_total", "counter", "prompt tokens prefilled", stats["prefill_tokens"])
        metric("decode_steps_total", "counter", "decode steps of the running batch", stats["decode_steps"])
        metric("batch_running", "gauge", "requests in the running batch", stats["running"])
        metric("batch_capacity", "gauge", "rows of the running batch (--max-batch)", e.config.max_batch)
        metric("queue_waiting", "gauge", "requests waiting for a row", e.jobs.qsize())
        metric("time_to_first_token_seconds_sum", "counter", "sum of arrival-to-first-token times",
               round(lat["first_token_s_sum"], 6))
        metric("time_to_first_token_seconds_count", "counter", "requests with a first token", lat["first_token_count"])
        return "\n".join(lines) + "\n"

    def _check_model(self, body: dict) -> None:
        m = body.get("model")
        if m is not None and m != self.model_name:
            raise APIError(404, f"the model '{m}' does not exist; this server serves '{self.model_name}'",
                           "model", "model_not_found")

    def make_job(self, body: dict, chat: bool) -> Job:
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
        seed = _num(body, "seed", None, int, 0, SEED_MAX)
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
                                                          cfg.tool_schemas is not False)
            except tools_api.RequestError as e:
                raise APIError(400, str(e), e.param) from None
            except TiaoyuError as e:
                raise APIError(400, str(e), "messages") from None
            stop_ids = stop_ids_for(self.engine.mode, tok)
        else:
            p = body.get("prompt")
            if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
                p = p[0]
            if not isinstance(p, str):
                raise APIError(400, "'prompt' must be a string (one prompt per request)", "prompt")
            prompt = tok.encode(p, bos=True)
            stop_ids = stop_ids_for("complete", tok)
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
        job = Job(prompt, max_tokens, params, frozenset(stop_ids), stop=list(stop), seed=seed, tools=tool_job)
        if not params.greedy and seed is not None:  # built here, so a seed the generator refuses is this request's 400
            try:
                job.gen = make_generator(seed, self.engine.device)
            except (RuntimeError, ValueError, OverflowError) as e:
                raise APIError(400, f"'seed' {seed} cannot seed a generator ({e})", "seed") from None
        return job

    # responses ---------------------------------------------------------------------------------------
    def response(self, job: Job, chat: bool, result: tuple[str, str, str, int]) -> dict:
        """The whole answer as a chat.completion / text_completion object. `result` is
        `Collector.result()`: (content, reasoning, finish_reason, completion_tokens)."""
        content, reasoning, finish, n = result[:4]
        calls = [c for c in (tools_api.call_object(t) for t in (result[4] if len(result) > 4 else [])) if c]
        base = {"id": ("chatcmpl-" if chat else "cmpl-") + job.id, "created": int(time.time()),
                "model": self.model_name,
                "usage": {"prompt_tokens": len(job.prompt), "completion_tokens": n,
                          "total_tokens": len(job.prompt) + n}}
        if chat:
            msg = {"role": "assistant", "content": content}
            if reasoning:
                msg["reasoning_content"] = reasoning
            if calls:  # the model called tools: finish_reason "tool_calls", content may be empty
                msg["content"] = content or None
                msg["tool_calls"] = calls
                finish = "tool_calls" if finish == "stop" else finish
            return {**base, "object": "chat.completion",
                    "choices": [{"index": 0, "message": msg, "finish_reason": finish, "logprobs": None}]}
        return {**base, "object": "text_completion",
                "choices": [{"index": 0, "text": content, "finish_reason": finish, "logprobs": None}]}


class Collector:
    """Gathers a job's events into the whole answer (non-streaming requests)."""

    def __init__(self):
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[str] = []  # the JSON text of each <tool_call>
        self.finish: tuple[str, int] | None = None

    def feed(self, ev: tuple) -> bool:
        """Take one event; True when the answer is complete. An error event raises its APIError."""
        if ev[0] == "text":
            (self.reasoning if ev[2] else self.content).append(ev[1])
            return False
        if ev[0] == "tool_call":
            if tools_api.call_object(ev[1]) is None:  # not a well-formed call: the text stays in the answer
                self.content.append(ev[1])
            else:
                self.calls.append(ev[1])
            return False
        if ev[0] == "done":
            self.finish = (ev[1], ev[2])
            return True
        raise APIError(ev[2] if len(ev) > 2 else 500, ev[1], type_="server_error",
                       code="timeout" if len(ev) > 2 and ev[2] == 504 else None)

    def result(self) -> tuple:
        """(content, reasoning, finish_reason, completion_tokens, tool-call texts)."""
        assert self.finish is not None
        return "".join(self.content), "".join(self.reasoning), self.finish[0], self.finish[1], list(self.calls)


class StreamBuilder:
    """The SSE chunks (dicts) of a streamed answer: `start()` once, then `feed(ev)` per event until
    `done`; the last chunk carries finish_reason (then usage, when asked)."""

    def __init__(self, api: API, job: Job, chat: bool, include_usage: bool):
        self.api, self.job, self.chat, self.include_usage = api, job, chat, include_usage
        self.cid = ("chatcmpl-" if chat else "cmpl-") + job.id
        self.created = int(time.time())
        self.obj = "chat.completion.chunk" if chat else "text_completion"
        self.done = False
        self.n_calls = 0

    def chunk(self, delta: dict | None = None, text: str | None = None, finish: str | None = None) -> dict:
        choice: dict = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.chat:
            choice["delta"] = delta or {}
        else:
            choice["text"] = text or ""
        return {"id": self.cid, "object": self.obj, "created": self.created, "model": self.api.model_name,
                "choices": [choice]}

    def start(self) -> list[dict]:
        return [self.chunk({"role": "assistant", "content": ""})] if self.chat else []

    def feed(self, ev: tuple) -> list[dict]:
        if ev[0] == "tool_call":  # OpenAI's deltas: id, type and name first, then the arguments
            obj = tools_api.call_object(ev[1])
            if obj is None:
                return [self.chunk({"content": ev[1]})]
            f, i = obj["function"], self.n_calls
            self.n_calls += 1
            return [self.chunk({"tool_calls": [{"index": i, "id": obj["id"], "type": "function",
                                                "function": {"name": f["name"], "arguments": ""}}]}),
                    self.chunk({"tool_calls": [{"index": i, "function": {"arguments": f["arguments"]}}]})]
        if ev[0] == "text":
            if self.chat:
                return [self.chunk({"reasoning_content": ev[1]} if ev[2] else {"content": ev[1]})]
            return [] if ev[2] else [self.chunk(text=ev[1])]
        self.done = True
        if ev[0] == "done":
            out = [self.chunk(finish="tool_calls" if self.n_calls and ev[1] == "stop" else ev[1])]
            if self.include_usage:
                n, p = ev[2], len(self.job.prompt)
                out.append({"id": self.cid, "object": self.obj, "created": self.created,
                            "model": self.api.model_name, "choices": [],
                            "usage": {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}})
            return out
        return [{"error": {"message": ev[1], "type": "server_error", "param": None,
                           "code": "timeout" if len(ev) > 2 and ev[2] == 504 else None}}]
