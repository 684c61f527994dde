"""A client for an OpenAI-compatible chat endpoint (`tiaoyu serve`, vLLM, llama.cpp's server, a hosted API):
the teacher of black-box distillation when only its answers can be had, never its weights or logits.

    POST {base}/chat/completions   {"model", "messages", "max_tokens", "temperature"[, "seed"]}
    GET  {base}/models             which model a one-model server serves

Standard library only (urllib), so no client package is needed. A connection error, a timeout, 429 and
every 5xx are retried with exponential back-off and jitter (a server's Retry-After is honoured up to the
cap): those say "not now", not "never". Any other 4xx is the request's own fault and is not retried. The
API key (OPENAI_API_KEY) goes into the Authorization header and nowhere else: no message, log or file
shows it, and redirects are not followed (a redirect would carry the header to another host).

`chat_concurrently` keeps N requests in flight from worker threads and hands results back to the caller's
thread as they arrive, so the caller alone writes files; once it sets `stop`, no new request starts and no
retry waits any longer.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.io import loads_limited

MAX_ERROR_TEXT = 300  # characters of a server's error message shown to the user
MAX_BODY = 64 << 20  # a chat completion far larger than this is not an answer


class EndpointError(TiaoyuError):
    """The endpoint said no for good (a 4xx other than 429, a redirect) or answered something that is not a
    chat completion. `status` is the HTTP status (0 when the answer itself was unusable)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class EndpointUnavailable(TiaoyuError):
    """Connection errors, 429 or 5xx past the last retry."""


class RetryCancelled(EndpointUnavailable):
    """A retry not made because the caller set `stop` (another request had failed for good, or Ctrl-C)."""


class _Transient(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


@dataclass
class Answer:
    content: str
    reasoning: str | None = None
    finish_reason: str | None = None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # the 3xx surfaces as an HTTPError: the user gives the final URL instead


def check_url(url: str) -> str:
    """`url` without a trailing slash, or a clear error: http(s), a host, no user:password part."""
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise TiaoyuError(f"--teacher {url!r}: an endpoint URL is http(s)://HOST[:PORT]/v1")
    if u.username is not None or u.password is not None:
        raise TiaoyuError("--teacher: put the API key in the OPENAI_API_KEY environment variable, not in the URL "
                          "(the command line is recorded in the checkpoint)")
    try:
        u.port  # noqa: B018 — raises on a port that is not a number
    except ValueError:
        raise TiaoyuError(f"--teacher {url!r}: the port is not a number") from None
    return url.rstrip("/")


def is_endpoint(teacher: object) -> bool:
    return isinstance(teacher, str) and teacher.lower().startswith(("http://", "https://"))


def _server_message(body: bytes) -> str:
    """OpenAI's {"error": {"message": …}} (or {"error": "…"}, {"detail": …}) of an error body, else its text."""
    text = body.decode("utf-8", "replace")
    try:
        obj = loads_limited(text, max_len=1 << 20)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        err = obj.get("error", obj.get("detail", obj.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            text = err if isinstance(err, str) else json.dumps(err, ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_TEXT else text[:MAX_ERROR_TEXT] + "…"


def _retry_after(headers) -> float | None:
    v = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(v)) if v is not None else None
    except ValueError:  # an HTTP date: not worth parsing, the back-off covers it
        return None


class Endpoint:
    """One OpenAI-compatible server. `chat()` may be called from many threads at once."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 300.0,
                 retries: int = 5, backoff: float = 1.0, max_backoff: float = 60.0, seed: int = 0):
        if retries < 0 or timeout <= 0 or backoff < 0 or max_backoff < 0:
            raise TiaoyuError("--teacher-retries must not be negative and --teacher-timeout must be positive")
        self.url = check_url(url)
        self.model = model
        self._key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY") or None
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.requests = 0  # HTTP requests sent, retries included
        self.retried = 0  # of which retries
        self.last_retry_reason = ""
        self._opener = urllib.request.build_opener(_NoRedirect)

    def __repr__(self) -> str:  # never the key
        return f"Endpoint({self.url!r}, model={self.model!r})"

    # ---- one request, then the retry loop -------------------------------------------------------------

    def _once(self, method: str, path: str, body: dict | None) -> dict:
        headers = {"Accept": "application/json", "User-Agent": "tiaoyu"}
        data = None
        if body is not None:
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        with self._lock:
            self.requests += 1
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read(MAX_BODY + 1)
        except urllib.error.HTTPError as e:
            status = e.code
            try:
                msg = _server_message(e.read(1 << 20))
            except (OSError, http.client.HTTPException):
                msg = ""
            finally:
                e.close()
            what = f"HTTP {status}" + (f": {msg}" if msg else "")
            if status == 429 or status >= 500:
                raise _Transient(what, _retry_after(e.headers)) from None
            if 300 <= status < 400:
                where = e.headers.get("Location", "elsewhere") if e.headers is not None else "elsewhere"
                raise EndpointError(status, f"HTTP {status}: the endpoint redirects to {where}; give that URL "
                                            "as --teacher (redirects are not followed: they would carry the "
                                            "API key along)") from None
            raise EndpointError(status, what) from None
        except urllib.error.URLError as e:
            raise _Transient(f"cannot connect ({getattr(e.reason, 'strerror', None) or e.reason})") from None
        except (socket.timeout, TimeoutError):
            raise _Transient(f"no answer within {self.timeout:g}s") from None
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            raise _Transient(f"connection lost ({type(e).__name__}: {e})") from None
        if len(raw) > MAX_BODY:
            raise EndpointError(0, f"the answer is larger than {MAX_BODY >> 20} MB")
        try:
            obj = loads_limited(raw)
        except ValueError as e:
            raise EndpointError(0, f"the answer is not JSON ({e}): {_server_message(raw[:2000])}") from None
        if not isinstance(obj, dict):
            raise EndpointError(0, f"the answer is not a JSON object: {_server_message(raw[:2000])}")
        return obj

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds before retry `attempt` (0, 1, …): backoff · 2^attempt, capped, of which the upper half is
        random (requests that failed together do not come back together); at least the server's Retry-After."""
        cap = min(self.max_backoff, self.backoff * 2 ** attempt)
        with self._lock:
            d = cap / 2 + self._rng.uniform(0, cap / 2)
        if retry_after is not None:
            d = max(d, min(retry_after, self.max_backoff))
        return d

    def request(self, method: str, path: str, body: dict | None = None,
                stop: threading.Event | None = None) -> dict:
        for attempt in range(self.retries + 1):
            try:
                return self._once(method, path, body)
            except _Transient as e:
                if attempt == self.retries:
                    raise EndpointUnavailable(f"no answer after {self.retries} retries (last: {e.reason})") from None
                with self._lock:
                    self.retried += 1
                    self.last_retry_reason = e.reason
                wait = self.delay(attempt, e.retry_after)
                if stop is not None:
                    if stop.wait(wait):
                        raise RetryCancelled(f"stopped while waiting to retry ({e.reason})") from None
                else:
                    time.sleep(wait)
        raise AssertionError("unreachable")

    # ---- the API ---------------------------------------------------------------------------------------

    def models(self) -> list[str]:
        obj = self.request("GET", "/models")
        data = obj.get("data")
        if not isinstance(data, list):
            raise EndpointError(0, "GET /models did not list models ({\"data\": [{\"id\": …}, …]})")
        return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]

    def chat(self, messages: list[dict], max_tokens: int, temperature: float, seed: int | None = None,
             stop: threading.Event | None = None) -> Answer:
        """The assistant's answer to `messages`. Reasoning a server returns apart (`reasoning_content`, as
        tiaoyu serve, vLLM and DeepSeek do, or `reasoning`) comes back apart."""
        if not self.model:
            raise TiaoyuError("no model name for the endpoint (--teacher-model)")
        body: dict = {"model": self.model, "messages": [_wire_message(m) for m in messages],
                      "max_tokens": max_tokens, "temperature": temperature}
        if seed is not None and temperature > 0:  # reproducible samples where the server honours a seed
            body["seed"] = seed
        obj = self.request("POST", "/chat/completions", body, stop)
        try:
            choice = obj["choices"][0]
            msg = choice["message"]
            content = msg.get("content")
            reasoning = msg.get("reasoning_content", msg.get("reasoning"))
            if content is not None and not isinstance(content, str):
                raise TypeError("content")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise EndpointError(0, "the answer is not a chat completion ({\"choices\": [{\"message\": "
                                   f"{{\"content\": …}}}}]}}): {_server_message(json.dumps(obj)[:2000].encode())}") from None
        return Answer(content or "", reasoning if isinstance(reasoning, str) else None, choice.get("finish_reason"))


def _wire_message(m: dict) -> dict:
    """A chat record's message as the API takes it: tiaoyu's `reasoning` field is `reasoning_content` there."""
    out = {k: v for k, v in m.items() if k != "reasoning"}
    if isinstance(m.get("reasoning"), str):
        out["reasoning_content"] = m["reasoning"]
    return out


T = TypeVar("T")
R = TypeVar("R")


def chat_concurrently(fn: Callable[[T], R], items: Iterable[T], workers: int,
                      stop: threading.Event) -> Iterator[tuple[T, R | None, BaseException | None]]:
    """`fn(item)` for every item on `workers` threads; yields (item, result, None) or (item, None, error) in
    the order they finish, on the caller's thread. After `stop` is set no new item starts; the ones already
    running still come back (a finished answer is never thrown away). Leaving the loop early (an exception,
    Ctrl-C) sets `stop`: the threads are daemons and end after their current request."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    n = 0
    for it in items:
        todo.put(it)
        n += 1
    done: queue.SimpleQueue = queue.SimpleQueue()

    def work() -> None:
        while not stop.is_set():
            try:
                it = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((it, fn(it), None))
            except BaseException as e:  # noqa: BLE001 — handed to the caller, who decides
                done.put((it, None, e))

    threads = [threading.Thread(target=work, daemon=True, name=f"teacher-{i}") for i in range(min(workers, n))]
    for t in threads:
        t.start()
    try:
        got = 0
        while got < n:
            try:
                item = done.get(timeout=0.1)
            except queue.Empty:
                if not any(t.is_alive() for t in threads) and done.empty():
                    return  # stopped: the rest never started
                continue
            got += 1
            yield item
    finally:
        stop.set()
