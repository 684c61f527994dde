"""The generation side of `tiaoyu serve`: jobs, and the scheduler that owns the model.

Continuous batching. One scheduler thread owns the model and a `SlotBatch` (infer/slots.py): a KV
cache of `max_batch` rows, one running request per row. Its loop:

    admit   while a row is free and a request waits: prefill its prompt into a free row and choose
            its first token — it joins the running batch now, not when the batch is over
    step    one decode step for every running row at once ([n] tokens in, [n, V] logits out)
    choose  each row's next token with its own sampling settings (greedy rows by one argmax;
            seeded rows draw from their own generator, so a seed alone decides its tokens)
    retire  rows that hit a stop token, a stop string, max_tokens, their deadline, or whose client
            went away (`cancelled`) leave at once; their row is free for the next request

Each request has a deadline (`request_timeout_s` from its arrival, queue time included): past it the
request ends with a 504 error and frees its row. A full queue answers 503.

Events. A job's tokens become text pieces (IncrementalDecoder, stop strings held back) delivered as
events: ("text", str, reasoning: bool) …, then ("done", finish_reason, completion_tokens) or
("error", message, http_status). The HTTP side awaits them on an asyncio queue fed thread-safely
(`Job.bind`), or reads `Job.events` (a plain queue) when not bound.

`steps=`: a whole-batch generation loop with the signature of infer.generate.decode_steps
(tests script a model's tokens with it); then batches are formed the old way — the requests that
arrived together, generated together. Models the slot decoder does not know (anything but the
stock Transformer) are served that way too, with decode_steps.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch

from tiaoyu_cli.infer.generate import IncrementalDecoder, amp_context, decode_steps
from tiaoyu_cli.infer.sampling import SamplingParams, choose, make_generator, process_logits
from tiaoyu_cli.infer.slots import SlotBatch
from tiaoyu_cli.serve.tools_api import CallCollector, ToolJob


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = ""  # served model id; default: the checkpoint folder's name
    max_tokens_limit: int = 512  # most new tokens one request may ask for
    default_max_tokens: int = 256  # when a request does not say
    max_request_bytes: int = 1 << 20  # request body limit (413 above it)
    max_batch: int = 8  # requests generated together (rows of the running batch)
    max_queue: int = 64  # waiting requests before 503
    batch_wait_s: float = 0.01  # an idle batch: after the first request, wait at most this long for more to start with it
    batch_gap_s: float = 0.002  # … and only while they keep coming: start once none came for this long
    request_timeout_s: float = 120.0  # a request's deadline, from arrival to its last token (504 after)
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides the bound address (serve/guard.py)
    allow_origins: tuple[str, ...] = ()  # web origins whose pages may call the API (CORS); "*" any
    tool_schemas: bool | None = None  # render a request's `tools` in the system turn (serve/tools_api.py);
    # None: as the checkpoint was trained (load_engine), else on


class APIError(Exception):
    """An error answered as {"error": {...}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One request's generation: prompt ids in, events out (see the module docstring)."""

    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    stop_ids: frozenset[int]
    stop: list[str] = field(default_factory=list)  # stop strings (answer text only)
    seed: int | None = None
    gen: "torch.Generator | None" = None  # a seeded request's generator, built when the request is checked
    events: "queue.Queue[tuple]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    arrived: float = field(default_factory=time.monotonic)
    deadline: float = float("inf")
    first_token_s: float | None = None  # seconds from arrival to the first token
    tools: "ToolJob | None" = None  # set when the answer is parsed for tool calls (serve/tools_api.py)
    stream: bool = True  # False: text events are held and handed over with the final one
    outbox: "list[tuple[Job, tuple]] | None" = None  # set by the scheduler: events leave once per step
    held: list = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _aq: "asyncio.Queue[tuple] | None" = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver events to an asyncio queue of `loop` (call before submitting)."""
        self._loop, self._aq = loop, asyncio.Queue()

    def put(self, ev: tuple) -> None:
        if not self.stream:
            if ev[0] == "text":
                self.held.append(ev)
                return
            for h in self.held:
                self._send(h)
            self.held = []
        self._send(ev)

    def _send(self, ev: tuple) -> None:
        if self.outbox is not None:
            self.outbox.append((self, ev))
        else:
            self.deliver(ev)

    def deliver(self, ev: tuple) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, ev)  # type: ignore[union-attr]
            except RuntimeError:  # the loop is closed: nobody listens any more
                self.cancelled.set()
        else:
            self.events.put(ev)

    async def next_event(self) -> tuple:
        return await self._aq.get()  # type: ignore[union-attr]

    def batch_key(self) -> tuple:
        """Scripted mode: jobs with the same key are generated in one batch."""
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


class Running:
    """A job inside the batch: its decoder, stop strings, token count and sampling state."""

    def __init__(self, job: Job, tokenizer):
        self.job = job
        self.decoder = IncrementalDecoder(tokenizer)
        self.stops = StopStrings(job.stop)
        self.calls = CallCollector(job.tools, tokenizer) if job.tools is not None else None
        self.n = 0
        self.done = False
        self.reason: str | None = None  # stop | length | stop_string | cancelled | timeout | error
        self.next_token = 0  # the token the next decode step feeds
        self.gen: torch.Generator | None = None
        self.seen: torch.Tensor | None = None  # [1, V] tokens seen, for the repetition penalty

    def _emit(self, pieces) -> bool:
        """Send pieces; True when a stop string ended the answer."""
        for p in pieces:
            if p.reasoning:
                self.job.put(("text", p.text, True))
                continue
            text, stopped = self.stops.feed(p.text)
            if text:
                self.job.put(("text", text, False))
            if stopped:
                return True
        return False

    def finish(self, reason: str) -> None:
        if self.done:
            return
        self.done, self.reason = True, reason
        if reason != "stop_string":
            if not self._emit(self.decoder.flush()):
                rest = self.stops.flush()
                if rest:
                    self.job.put(("text", rest, False))
        self.job.put(("done", "stop" if reason == "stop_string" else reason, self.n))

    def fail(self, message: str, status: int) -> None:
        if not self.done:
            self.done, self.reason = True, "timeout" if status == 504 else "error"
            self.job.put(("error", message, status))

    def push(self, token: int) -> None:
        if self.done:
            return
        if self.job.cancelled.is_set():
            self.finish("cancelled")
            return
        if self.n == 0:
            self.job.first_token_s = time.monotonic() - self.job.arrived
        self.n += 1
        self.next_token = token
        if self.seen is not None:
            self.seen[0, token] = True
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


PREFILL_TOKENS = 8192  # padded prompt tokens per batched prefill


def _deliver_all(items: list[tuple[Job, tuple]]) -> None:
    for job, ev in items:
        job._aq.put_nowait(ev)  # type: ignore[union-attr]


def _timeout_message(job: Job, limit: float) -> str:
    return f"the request took longer than {limit:g} s (the server's request timeout); {job.max_tokens} tokens were asked"


class Engine:
    """The model, its tokenizer and the scheduler thread (continuous batching; see the module docstring)."""

    def __init__(self, model, tokenizer, mode: str, config: ServeConfig | None = None,
                 steps: Callable | None = None):
        self.model, self.tokenizer, self.mode = model, tokenizer, mode
        self.config = config or ServeConfig()
        self.context = int(model.config.max_seq_len)
        self.device = next(model.parameters()).device
        self.jobs: "queue.Queue[Job]" = queue.Queue(maxsize=self.config.max_queue)
        self._steps = steps if steps is not None or SlotBatch.supports(model) else decode_steps
        self.failed: str | None = None  # set when the scheduler itself died: every request then gets 503
        # batches: busy periods of the running batch (it went from empty to running); largest_batch: most
        # rows running at once
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0, "tokens_generated": 0, "decode_steps": 0,
                      "prefill_tokens": 0, "running": 0, "completed": 0, "cancelled": 0, "timeouts": 0, "errors": 0}
        self.latency = {"first_token_s_sum": 0.0, "first_token_count": 0}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._gen = make_generator(None, self.device)
        self._outbox: list[tuple[Job, tuple]] = []
        self._held: list[Running] = []  # the rows of the running batch, failed if the scheduler dies
        self._thread = threading.Thread(target=self._run, name="tiaoyu-generate", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        if self.failed:
            raise APIError(503, f"the generation engine stopped ({self.failed}); restart the server",
                           type_="server_error", code="engine_failed")
        job.deadline = job.arrived + self.config.request_timeout_s
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(503, f"the server is busy ({self.config.max_queue} requests waiting); retry shortly",
                           type_="server_error", code="overloaded") from None
        with self._lock:
            self.stats["requests"] += 1
        if self.failed:  # the scheduler died while this job went in: nobody would take it
            self._fail_waiting()

    def _fail_waiting(self) -> None:
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            job.outbox = None
            job.put(("error", f"generation failed: {self.failed}", 500))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def _ended(self, r: Running) -> None:
        """Bookkeeping for a row that has just finished."""
        key = {"cancelled": "cancelled", "timeout": "timeouts", "error": "errors"}.get(r.reason or "", "completed")
        with self._lock:
            self.stats[key] += 1
            if r.job.first_token_s is not None:
                self.latency["first_token_s_sum"] += r.job.first_token_s
                self.latency["first_token_count"] += 1

    def _run(self) -> None:
        try:
            if self._steps is not None:
                while not self._stop.is_set():
                    self._run_scripted()
            else:
                self._run_continuous()
        except BaseException as e:  # the scheduler itself failed: fail what it holds and what waits, 503 from now on
            traceback.print_exc()
            self.failed = f"{type(e).__name__}: {e}"
            for r in self._held:
                r.job.outbox = None
                r.fail(f"generation failed: {self.failed}", 500)
            self._fail_waiting()

    # ---- continuous batching --------------------------------------------------------------------------
    def _run_continuous(self) -> None:
        cfg = self.config
        with torch.inference_mode(), amp_context(self.device, None):
            slots = SlotBatch(self.model, cfg.max_batch, self.context)
            rows: list[Running] = self._held
            try:
                self._loop(slots, rows)
            finally:
                if self._stop.is_set():
                    for r in rows:
                        r.fail("the server is stopping", 503)
                self._flush()

    def _loop(self, slots: SlotBatch, rows: list[Running]) -> None:
        while not self._stop.is_set():
            self._admit(slots, rows)
            if not rows:
                self._flush()
                continue
            try:
                logits = slots.step([r.next_token for r in rows])
                self._choose(rows, logits)
            except Exception as e:  # report to every running request; the scheduler keeps serving
                traceback.print_exc()
                for r in rows:
                    r.fail(f"generation failed: {type(e).__name__}: {e}", 500)
            with self._lock:
                self.stats["decode_steps"] += 1
                self.stats["tokens_generated"] += len(rows)
            self._retire(slots, rows)
            self._flush()

    def _flush(self) -> None:
        """Hand this step's events over: one wake-up per event loop, not one per token."""
        if not self._outbox:
            return
        out, self._outbox[:] = list(self._outbox), []
        by_loop: dict = {}
        for job, ev in out:
            if job._loop is None:
                job.deliver(ev)
            else:
                by_loop.setdefault(job._loop, []).append((job, ev))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, items)
            except RuntimeError:  # the loop is closed: nobody listens any more
                for job, _ in items:
                    job.cancelled.set()

    def _admit(self, slots: SlotBatch, rows: list[Running]) -> None:
        """Take waiting requests into free rows: one batched prefill (at most PREFILL_TOKENS padded
        tokens at a time), then each new row's first token."""
        new: list[Running] = []
        width = 0
        idle = not rows
        gather_until = 0.0  # an idle batch waits up to batch_wait_s after its first request for others to start with
        while len(rows) + len(new) < self.config.max_batch:
            try:
                if idle and not new:
                    job = self.jobs.get(timeout=0.1)
                    gather_until = time.monotonic() + self.config.batch_wait_s
                elif idle and time.monotonic() < gather_until:  # a late one joins at the next step anyway
                    job = self.jobs.get(timeout=max(min(gather_until - time.monotonic(), self.config.batch_gap_s), 1e-4))
                else:
                    job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job.cancelled.is_set():
                self._count("cancelled")
                continue
            if time.monotonic() > job.deadline:
                job.put(("error", _timeout_message(job, self.config.request_timeout_s), 504))
                self._count("timeouts")
                continue
            job.outbox = self._outbox
            try:
                r = self._running(job)
            except Exception as e:  # this request fails alone; the engine goes on
                traceback.print_exc()
                job.put(("error", f"generation failed: {type(e).__name__}: {e}", 500))
                self._count("errors")
                continue
            width = max(width, len(job.prompt))
            new.append(r)
            if width * len(new) >= PREFILL_TOKENS:
                break
        if not new:
            return
        try:
            logits = slots.prefill_many([r.job.prompt for r in new])
        except Exception as e:  # e.g. out of memory: these requests fail, the running ones go on
            traceback.print_exc()
            for r in new:
                r.fail(f"generation failed: {type(e).__name__}: {e}", 500)
                self._ended(r)
            self._flush()
            return
        if not rows:
            self._count("batches")
        rows.extend(new)
        try:
            self._choose(new, logits)
        except Exception as e:  # the joining requests fail (their rows are retired below), the running ones go on
            traceback.print_exc()
            for r in new:
                r.fail(f"generation failed: {type(e).__name__}: {e}", 500)
        with self._lock:
            self.stats["prefill_tokens"] += sum(len(r.job.prompt) for r in new)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
            self.stats["running"] = len(rows)
        self._retire(slots, rows)
        self._flush()

    def _running(self, job: Job) -> Running:
        """A waiting job made ready to join the batch: its decoder, generator and repetition-penalty state."""
        r = Running(job, self.tokenizer)
        if not job.params.greedy:
            r.gen = job.gen if job.gen is not None else (
                make_generator(job.seed, self.device) if job.seed is not None else self._gen)
        if job.params.repetition_penalty != 1.0:
            r.seen = torch.zeros(1, self.model.config.vocab_size, dtype=torch.bool, device=self.device)
            r.seen[0, torch.tensor(job.prompt, device=self.device).clamp(min=0, max=r.seen.shape[1] - 1)] = True
        return r

    def _choose(self, rows: list[Running], logits: torch.Tensor) -> None:
        """Each row's next token with its own sampling settings; push it."""
        logits = logits.float()
        toks: list[int] = [0] * len(rows)
        plain = [i for i, r in enumerate(rows) if r.job.params.greedy and r.seen is None]
        if plain:  # greedy rows: numpy's argmax on CPU (torch's row indexing + argmax cost ~6 % of a step here)
            best = logits.numpy() if logits.device.type == "cpu" else logits
            best = best if len(plain) == len(rows) else best[plain]
            for i, t in zip(plain, best.argmax(-1).tolist()):
                toks[i] = t
        for i, r in enumerate(rows):
            if r.job.params.greedy and r.seen is None:
                continue
            p = r.job.params
            toks[i] = int(choose(process_logits(logits[i:i + 1], p, r.seen), p, r.gen)[0])
        for r, t in zip(rows, toks):
            r.push(t)

    def _retire(self, slots: SlotBatch, rows: list[Running]) -> None:
        now = time.monotonic()
        for r in rows:
            if r.done:
                continue
            if r.job.cancelled.is_set():
                r.finish("cancelled")
            elif now > r.job.deadline:
                r.fail(_timeout_message(r.job, self.config.request_timeout_s), 504)
        done = [i for i, r in enumerate(rows) if r.done]
        if not done:
            return
        for i in done:
            self._ended(rows[i])
        for src, dst in slots.release(done):
            rows[dst] = rows[src]
        del rows[slots.n:]
        with self._lock:
            self.stats["running"] = len(rows)

    # ---- scripted whole-batch loop (steps=) -----------------------------------------------------------
    def _run_scripted(self) -> None:
        try:
            first = self.jobs.get(timeout=0.2)
        except queue.Empty:
            return
        jobs = [first]
        deadline = time.monotonic() + self.config.batch_wait_s
        while len(jobs) < self.config.max_batch:
            try:
                left = deadline - time.monotonic()
                jobs.append(self.jobs.get(timeout=left) if left > 0 else self.jobs.get_nowait())
            except queue.Empty:
                break
        groups: dict[tuple, list[Job]] = {}
        for j in jobs:
            if not j.cancelled.is_set():
                groups.setdefault(j.batch_key(), []).append(j)
        for group in groups.values():
            running = [Running(j, self.tokenizer) for j in group]
            with self._lock:
                self.stats["batches"] += 1
                self.stats["largest_batch"] = max(self.stats["largest_batch"], len(group))
            params = group[0].params
            gen = None if params.greedy else (group[0].gen or make_generator(group[0].seed, self.device))
            n_new = max(j.max_tokens for j in group)
            try:
                for step in self._steps(self.model, [j.prompt for j in group], n_new, params,  # type: ignore[misc]
                                        group[0].stop_ids, gen):
                    for r, t in zip(step.rows, step.tokens):
                        running[r].push(int(t))
                    self._count("tokens_generated", len(step.rows))
                    if all(x.done for x in running):
                        break
                for x in running:
                    if not x.done:
                        x.finish("length")
                    self._ended(x)
            except Exception as e:
                traceback.print_exc()
                for x in running:
                    if not x.done:
                        x.fail(f"generation failed: {type(e).__name__}: {e}", 500)
                        self._ended(x)
