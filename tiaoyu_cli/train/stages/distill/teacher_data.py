"""Black-box distillation, first half: a teacher answers every prompt, and each answer is appended to a JSONL
file of chat records the moment it arrives. Two kinds of teacher answer the same way:

    LocalTeacher      a checkpoint, through the batched KV-cache generation of `tiaoyu chat`
    EndpointTeacher   any OpenAI-compatible server (`--teacher http://HOST:PORT/v1`), N requests in flight

The answer file (`--keep-teacher-data`) is the run's memory. Every line is one chat record, written whole
(one write, flush, fsync) and keyed by the prompt it answers:

    {"messages": [prompt …, {"role": "assistant", "content": …}],
     "teacher": {"line": 17, "prompt_sha": "…", "model": …, "max_new_tokens": 256, "temperature": 0.0}}

so answers may arrive in any order, and a rerun — after Ctrl-C, a killed process, a server that failed past
its retries — asks only for the prompts without an answer. A last line without its newline is a write the
kill cut short: it is dropped (and cut off the file), never parsed. An answer made by another teacher or
with other generation settings, or one whose prompt is no longer at that line, is a clear error rather
than a silent mix. The SFT data is the answers in prompt order, whatever order they came in.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import orjson

from tiaoyu_cli.data.jsonl import RecordCounts, dumps, load_records
from tiaoyu_cli.errors import DataError, TiaoyuError
from tiaoyu_cli.infer.endpoint import Endpoint, EndpointError, EndpointUnavailable, RetryCancelled, chat_concurrently
from tiaoyu_cli.infer.session import ChatModel, GenerationOptions, answer_records, record_messages
from tiaoyu_cli.io import fsync_dir, output_lock
from tiaoyu_cli.train.engine.trainer import TrainingInterrupted

META = "teacher"  # the record key that says which prompt an answer belongs to and how it was made
SETTINGS = ("model", "max_new_tokens", "temperature")
SKIPPABLE = (400, 413, 422)  # a refusal about this one record (too long, malformed): --skip-bad may skip it


class TeacherAnswerStats(RecordCounts):
    what = "prompts answered"  # skipped: records without a usable prompt (--skip-bad), empty answers


@dataclass
class Prompt:
    line: int  # its line in the prompts file: the answer's key, and where an error points
    messages: list[dict]
    sha: str  # of the messages: an answer file made from other prompts is caught


def prompt_sha(messages: list[dict]) -> str:
    return hashlib.sha256(orjson.dumps(messages, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def read_prompts(path: Path, tokenizer, skip_bad: bool, stats: TeacherAnswerStats) -> list[Prompt]:
    """`{"prompt": str | messages}` or `{"messages": [...]}` records (a trailing assistant turn is answered
    anew), checked with `tokenizer` (the one that renders them: the teacher's, or over HTTP the student's)."""

    def read(rec: dict, name: str, line: int) -> Prompt:
        conv = record_messages(rec, name, line, tokenizer)
        conv = [{"role": "user", "content": conv}] if isinstance(conv, str) else conv
        return Prompt(line, conv, prompt_sha(conv))

    good = load_records(path, read, skip_bad, stats, why=lambda e: "without a usable prompt")
    if not good:
        raise TiaoyuError(f"{path}: no prompts for the teacher to answer")
    return good


def assistant_message(content: str, reasoning: str | None) -> dict | None:
    """The answer as an assistant message, or None when there is nothing to learn from."""
    if not content.strip():  # nothing, or a <think> the teacher never closed
        return None
    msg = {"role": "assistant", "content": content.strip()}
    if reasoning is not None and reasoning.strip():
        msg["reasoning"] = reasoning.strip()
    return msg


# ---- the answer file -----------------------------------------------------------------------------------

class AnswerFile:
    """The --keep-teacher-data JSONL file: read back (a torn last line dropped), appended line by line."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None

    def read(self, repair: bool = False, log: Callable[[str], None] | None = None) -> list[tuple[int, dict]]:
        """(line, record) of every whole line. A last line without a newline was cut short by a kill: it
        is dropped, and with `repair` cut off the file so the next append starts on a fresh line."""
        if not self.path.exists():
            return []
        if self.path.is_dir():
            raise TiaoyuError(f"--keep-teacher-data {self.path}: is a folder, expected a JSONL file")
        data = self.path.read_bytes()
        whole = data.rfind(b"\n") + 1
        if whole < len(data):
            if log is not None:
                log(f"teacher: dropped the torn last line of {self.path} ({len(data) - whole} bytes of an "
                    f"interrupted write); its prompt is asked again")
            if repair:
                os.truncate(self.path, whole)
                with open(self.path, "rb") as f:
                    os.fsync(f.fileno())
        out = []
        for i, raw in enumerate(data[:whole].split(b"\n")[:-1], 1):
            if not raw.strip():
                continue
            try:
                rec = orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                raise DataError(f"corrupt line ({e}); delete the file or give another --keep-teacher-data",
                                str(self.path), i) from None
            if not isinstance(rec, dict):
                raise DataError("expected a JSON object (a chat record)", str(self.path), i)
            out.append((i, rec))
        return out

    def append(self, rec: dict) -> None:
        """One record as one whole line: a single write of the line with its newline, then fsync."""
        if self.fd is None:
            new = not self.path.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            if new:
                fsync_dir(self.path.parent)
        view = memoryview(dumps(rec))
        while view:
            view = view[os.write(self.fd, view):]
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def answered(file: AnswerFile, prompts: list[Prompt] | None, settings: dict | None, name: str,
             repair: bool = False, log: Callable[[str], None] | None = None) -> dict[int, dict]:
    """{prompt line: chat record} of the answers already in `file`. With `prompts` and `settings` every
    answer must belong to one of these prompts and have been made this way; without them (a resumed run
    reads back the data it trained on) records are taken as they are."""
    by_line = {p.line: p for p in prompts} if prompts is not None else None
    have: dict[int, dict] = {}
    for i, rec in file.read(repair, log):
        meta = rec.get(META)
        where = f"{file.path}:{i}"
        if not isinstance(meta, dict) or not isinstance(meta.get("line"), int):
            if prompts is None:
                have[-i] = rec  # a record written by hand or by an older tiaoyu: kept in file order
                continue
            raise TiaoyuError(f"{where}: no '{META}' field saying which prompt it answers, so it cannot be "
                              f"matched to {name}; delete the file or give another --keep-teacher-data")
        if by_line is not None:
            p = by_line.get(meta["line"])
            if p is None or meta.get("prompt_sha") != p.sha:
                raise TiaoyuError(f"{where} answers another prompt than {name}:{meta['line']} (the prompts "
                                  f"changed?); delete the file or give another --keep-teacher-data")
        if settings is not None:
            theirs = {k: meta.get(k) for k in SETTINGS}
            if theirs != settings:
                raise TiaoyuError(f"{where} was answered by {_describe(theirs)}, this run asks {_describe(settings)}; "
                                  f"delete the file or give another --keep-teacher-data")
        have.setdefault(meta["line"], rec)  # a duplicate (two runs raced): the first answer stands
    return have


def _describe(s: dict) -> str:
    return f"{s.get('model')} (max_new_tokens {s.get('max_new_tokens')}, temperature {s.get('temperature')})"


# ---- the teachers --------------------------------------------------------------------------------------

class LocalTeacher:
    """A checkpoint teacher: the batched generation of `tiaoyu chat` (answers come in prompt order)."""

    def __init__(self, cm: ChatModel, model_id: str, options: GenerationOptions, batch_size: int, name: str):
        self.cm, self.model_id, self.options, self.batch_size, self.name = cm, model_id, options, batch_size, name
        self.max_new_tokens, self.temperature = options.max_new_tokens, float(options.sampling.temperature)
        self.requests = self.retried = 0
        self.last_retry_reason = ""

    def answers(self, prompts: list[Prompt]) -> Iterator[tuple[Prompt, dict | str]]:
        recs = [(p.line, {"messages": p.messages}) for p in prompts]
        for p, ans in zip(prompts, answer_records(self.cm, recs, self.options, batch_size=self.batch_size,
                                                  name=self.name)):
            self.requests += 1
            reasoning = ans.get("reasoning")
            msg = assistant_message(ans["answer"] if reasoning is not None else ans["response"], reasoning)
            yield p, msg if msg is not None else "with an empty answer"


class EndpointTeacher:
    """An OpenAI-compatible server: `concurrency` requests in flight, each retried by the `Endpoint`. The first
    request that fails for good stops new ones; the answers still in flight are kept, then the error is raised
    naming the prompt's file and line."""

    def __init__(self, endpoint: Endpoint, max_new_tokens: int, temperature: float, concurrency: int, seed: int,
                 name: str, skip_bad: bool = False):
        if concurrency < 1:
            raise TiaoyuError("--teacher-concurrency must be at least 1")
        self.endpoint, self.max_new_tokens, self.temperature = endpoint, max_new_tokens, float(temperature)
        self.concurrency, self.seed, self.name, self.skip_bad = concurrency, seed, name, skip_bad
        self.model_id = endpoint.model

    @property
    def requests(self) -> int:
        return self.endpoint.requests

    @property
    def retried(self) -> int:
        return self.endpoint.retried

    @property
    def last_retry_reason(self) -> str:
        return self.endpoint.last_retry_reason

    def answers(self, prompts: list[Prompt]) -> Iterator[tuple[Prompt, dict | str]]:
        stop = threading.Event()

        def ask(p: Prompt):
            try:
                return self.endpoint.chat(p.messages, self.max_new_tokens, self.temperature, seed=self.seed + p.line,
                                          stop=stop)
            except BaseException as e:
                if not self.skippable(e):
                    stop.set()  # at once, from this thread: no other request starts after a failure for good
                raise

        failure: TiaoyuError | None = None
        for p, ans, err in chat_concurrently(ask, prompts, self.concurrency, stop):
            if err is None:
                msg = assistant_message(ans.content, ans.reasoning)
                yield p, msg if msg is not None else "with an empty answer"
            elif self.skippable(err):
                yield p, f"refused by the teacher (HTTP {err.status})"
            elif failure is None and not isinstance(err, RetryCancelled):
                failure = self.explain(p, err)  # the answers still in flight come back first, and are kept
        if failure is not None:
            raise failure

    def skippable(self, err: BaseException) -> bool:
        return self.skip_bad and isinstance(err, EndpointError) and err.status in SKIPPABLE

    def explain(self, p: Prompt, err: BaseException) -> TiaoyuError:
        where = f"{self.name}:{p.line}"
        at = f"the teacher {self.endpoint.model} at {self.endpoint.url}"
        if isinstance(err, EndpointError):
            hint = {401: " (is OPENAI_API_KEY set to a valid key?)", 403: " (is OPENAI_API_KEY allowed to use it?)",
                    404: " (is the URL right, with its /v1, and the model name?)"}.get(err.status, "")
            if err.status in SKIPPABLE:
                hint = " (--skip-bad skips such prompts)"
            return TiaoyuError(f"{where}: {at} refused the request: {err.message}{hint}")
        if isinstance(err, EndpointUnavailable):
            return TiaoyuError(f"{where}: {at}: {err}")
        if isinstance(err, TiaoyuError):
            return TiaoyuError(f"{where}: {err}")
        return TiaoyuError(f"{where}: asking {at} failed ({type(err).__name__}: {err})")


# ---- the driver ----------------------------------------------------------------------------------------

class Meter:
    """Progress on stderr every few seconds: answers done / total, requests per second, retries."""

    def __init__(self, teacher, total: int, done: int, log: Callable[[str], None], every: float = 2.0):
        self.teacher, self.total, self.done, self.log, self.every = teacher, total, done, log, every
        self.t0 = self.last = time.perf_counter()
        self.req0 = teacher.requests

    def line(self) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        s = f"teacher: {self.done:,}/{self.total:,} answers, {(self.teacher.requests - self.req0) / dt:.1f} requests/s"
        if self.teacher.retried:
            s += f", {self.teacher.retried:,} retries (last: {self.teacher.last_retry_reason})"
        return s

    def tick(self) -> None:
        self.done += 1
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self.log(self.line())


def collect_answers(teacher, prompts: list[Prompt], keep: Path, name: str, stats: TeacherAnswerStats,
                    log: Callable[[str], None]) -> list[dict]:
    """Ask `teacher` for every prompt not yet answered in `keep`, appending each answer as it arrives; return
    every answer in prompt order. Ctrl-C or a teacher failing for good stops with a clear error, and every
    answer received so far stays in `keep` for the next run."""
    settings = {"model": teacher.model_id, "max_new_tokens": teacher.max_new_tokens, "temperature": teacher.temperature}
    file = AnswerFile(keep)
    with output_lock(keep):
        have = answered(file, prompts, settings, name, repair=True, log=log)
        todo = [p for p in prompts if p.line not in have]
        if have:
            log(f"teacher: {len(have):,} of {len(prompts):,} prompts already answered in {keep}; asking for the "
                f"other {len(todo):,}")
        meter = Meter(teacher, len(prompts), len(have), log)
        t0 = time.perf_counter()
        try:
            for p, got in teacher.answers(todo):
                if isinstance(got, str):  # a reason to skip this prompt
                    stats.skip(got)
                    continue
                rec = {"messages": p.messages + [got], META: {"line": p.line, "prompt_sha": p.sha, **settings}}
                file.append(rec)
                have[p.line] = rec
                meter.tick()
        except KeyboardInterrupt:
            raise TrainingInterrupted(f"interrupted: {kept_note(len(have), len(prompts), keep)}") from None
        except TiaoyuError as e:
            raise TiaoyuError(f"{e} — {kept_note(len(have), len(prompts), keep)}") from None
        finally:
            file.close()
    if todo:
        log(meter.line() + f" in {time.perf_counter() - t0:.0f}s")
    stats.kept = sum(1 for p in prompts if p.line in have)
    log(f"teacher: {stats.summary()} → {keep}")
    if not stats.kept:
        raise TiaoyuError(f"{name}: the teacher gave no usable answer to any prompt (is it a chat model? try a "
                          f"larger --max-new-tokens)")
    return [have[p.line] for p in prompts if p.line in have]


def kept_note(n: int, total: int, keep: Path) -> str:
    if not n:
        return "no answer was received yet"
    return f"{n:,} of {total:,} answers are kept in {keep}; the same command again asks only for the rest"


def read_answers(keep: Path) -> list[dict]:
    """The answers a run trained on, read back for --resume (no teacher asked): in prompt order."""
    have = answered(AnswerFile(keep), None, None, str(keep))
    if not have:
        raise TiaoyuError(f"{keep}: no teacher answers to resume from")
    return [have[k] for k in sorted(have, key=lambda k: (k < 0, abs(k)))]

