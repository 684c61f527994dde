"""`tiaoyu distill --teacher http://HOST:PORT/v1 --mode black`: the teacher is an OpenAI-compatible endpoint.

A real `tiaoyu serve` process over the tiny base is the teacher: the answers kept are the server's greedy answers
and the student's loss on them falls. Small fake servers written here (http.server) make the failures happen on
cue: a process killed mid-run and rerun asks only for the missing prompts; 503 twice then 200 succeeds; a 400
names the prompt's file and line; a torn last line of the answer file is dropped; the API key is sent and
never written anywhere."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from serve_process import chat_questions, serve_process
from tiaoyu_cli.errors import DataError, TiaoyuError
from tiaoyu_cli.infer.endpoint import Endpoint, EndpointError, EndpointUnavailable
from tiaoyu_cli.train.engine.trainer import TrainConfig
from tiaoyu_cli.train.objectives.distill import DistillConfig
from tiaoyu_cli.train.stages.distill.run import Config as DistillRun, run as run_distill
from tiaoyu_cli.train.stages.distill.teacher_data import AnswerFile

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["dim=64", "n_layers=2", "n_heads=2", "n_kv_heads=1", "ffn_dim=192"]
STUDENT_CLI = ["--student-preset", "tiny", *[a for m in SMALL for a in ("--model", m)]]


def _train(out, **kw) -> TrainConfig:
    base = dict(out=str(out), max_steps=1, batch_size=4, lr=2e-3, warmup_steps=0, log_every=1, device="cpu",
                dtype="fp32", keep=1)
    base.update(kw)
    return TrainConfig(**base)


def _prompts(synth_dir: Path, path: Path, n: int) -> Path:
    """The first n single-turn chat.train questions as {"prompt"} records, the last as a {"messages"} record."""
    recs = chat_questions(synth_dir, n)
    recs[-1] = {"messages": [{"role": "user", "content": recs[-1]["prompt"]}]}
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return path


def _question(rec: dict) -> str:
    return rec["prompt"] if "prompt" in rec else rec["messages"][-1]["content"]


def _answers(keep: Path) -> dict[int, str]:
    """{prompt line: answer} of an answer file; fails on a prompt answered twice."""
    out: dict[int, str] = {}
    for raw in keep.read_text(encoding="utf-8").splitlines():
        rec = json.loads(raw)
        line = rec["teacher"]["line"]
        assert line not in out, f"prompt line {line} answered twice"
        assert rec["messages"][-1]["role"] == "assistant"
        out[line] = rec["messages"][-1]["content"]
    return out


# ---- a fake OpenAI-compatible server ------------------------------------------------------------------

class FakeAPI:
    """/v1/models and /v1/chat/completions on loopback. `behave(n, body)` decides each chat answer: n counts
    chat requests from 1; it returns (status, json body[, headers]). Every request is recorded."""

    def __init__(self, behave=None, model="fake-teacher"):
        self.behave = behave or (lambda n, body: (200, self.ok(body)))
        self.model, self.requests, self.n, self.lock = model, [], 0, threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def reply(self, status, obj, headers=None):
                data = json.dumps(obj).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client was killed while it waited
                    pass

            def do_GET(self):
                api.requests.append(("GET", self.path, None, dict(self.headers)))
                self.reply(200, {"object": "list", "data": [{"id": api.model, "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with api.lock:
                    api.n += 1
                    n = api.n
                    api.requests.append(("POST", self.path, body, dict(self.headers)))
                got = api.behave(n, body)
                self.reply(*got)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @staticmethod
    def answer_to(question: str) -> str:
        return f"The answer to «{question[:30]}» is 42."

    def ok(self, body: dict) -> dict:
        q = body["messages"][-1]["content"]
        return {"id": "x", "object": "chat.completion", "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self.answer_to(q)},
                             "finish_reason": "stop"}]}

    def asked(self) -> list[str]:
        return [b["messages"][-1]["content"] for m, p, b, h in self.requests if m == "POST"]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    servers = []

    def make(*a, **kw):
        servers.append(FakeAPI(*a, **kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _opts(url, prompts, tok_dir, keep, **kw):
    base = dict(teacher=url, data=prompts, student_preset="tiny", model=SMALL, tokenizer=tok_dir,
                mode="black", keep_teacher_data=keep, max_new_tokens=16, teacher_concurrency=3)
    base.update(kw)
    return DistillRun(**base)


# ---- a real `tiaoyu serve` as the teacher -------------------------------------------------------------

@pytest.fixture(scope="module")
def served(base_ckpt):
    """(url, model name) of a `tiaoyu serve` process over the tiny base, answering in chat mode."""
    with serve_process(base_ckpt, "--mode", "chat") as (_, port):
        yield f"http://127.0.0.1:{port}/v1", "base"


def test_distil_from_a_served_teacher(served, base_ckpt, tok_dir, synth_dir, tmp_path):
    url, name = served
    prompts = _prompts(synth_dir, tmp_path / "prompts.jsonl", 12)
    recs = [json.loads(x) for x in prompts.read_text(encoding="utf-8").splitlines()]
    # what the server answers to each prompt, asked one at a time with the openai client, greedy
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
    ref = {i + 1: (client.chat.completions.create(model=name, messages=[{"role": "user", "content": _question(r)}],
                                                  max_tokens=16, temperature=0).choices[0].message.content or "").strip()
           for i, r in enumerate(recs)}
    assert sum(1 for a in ref.values() if a) >= 8
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"messages": [{"role": "user", "content": _question(recs[i - 1])},
                                                    {"role": "assistant", "content": a}]}) + "\n"
                           for i, a in ref.items() if a), encoding="utf-8")
    keep = tmp_path / "teacher.jsonl"
    logs: list[str] = []
    # no --teacher-model: the server's one model is found through /v1/models
    opts = _opts(url, prompts, tok_dir, keep, val=val, eval_samples=0, teacher_concurrency=4)
    res = run_distill(opts, _train(tmp_path / "student", max_steps=25, batch_size=4, lr=3e-3), log=logs.append)
    got = _answers(keep)
    assert got == {line: a for line, a in ref.items() if a}  # every non-empty answer once, equal to the server's
    assert res["val_loss"] < res["before"]["val_loss"] - 0.5, (res["before"], res["val_loss"])
    text = "\n".join(logs)
    assert f"serves {name}" in text and f"{len(got)}/12 answers" in text and "requests/s" in text
    info = json.loads((tmp_path / "student" / "latest" / "trainer.json").read_text())
    assert info["stage"] == "distill" and url in info["parent"]
    # the student's tokenizer is --tokenizer's
    from tiaoyu_cli.checkpoint import load_tokenizer
    from tiaoyu_cli.tokenizer import open_tokenizer

    assert load_tokenizer(tmp_path / "student").fingerprint == open_tokenizer(tok_dir).fingerprint


# ---- interrupted runs go on where they stopped --------------------------------------------------------

def test_killed_run_goes_on_where_it_stopped(fake, synth_dir, tok_dir, tmp_path):
    """The distill process is killed after 4 answers (the server then hangs); a torn line is left at the end of
    the file as a kill mid-write leaves it. The rerun drops the torn line, asks only the 6 missing prompts,
    and the file ends with every prompt answered once."""
    release = threading.Event()

    def behave(n, body):
        if n > 4:
            release.wait(120)
        return 200, api.ok(body)

    api = fake(behave)
    prompts = _prompts(synth_dir, tmp_path / "prompts.jsonl", 10)
    questions = [_question(json.loads(x)) for x in prompts.read_text(encoding="utf-8").splitlines()]
    keep = tmp_path / "teacher.jsonl"
    cmd = [sys.executable, "-m", "tiaoyu_cli", "distill", "--teacher", api.url, "--teacher-model", api.model,
           *STUDENT_CLI, "--tokenizer", str(tok_dir), str(prompts), "-o", str(tmp_path / "student"),
           "--mode", "black", "--keep-teacher-data", str(keep), "--teacher-concurrency", "2", "--max-new-tokens", "16", "--max-steps", "1",
           "--device", "cpu", "--dtype", "fp32"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if keep.exists() and keep.read_bytes().count(b"\n") >= 4:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()
        proc.kill()
        proc.wait(timeout=30)
    finally:
        release.set()
    assert len(_answers(keep)) == 4
    with open(keep, "ab") as f:  # a line the kill cut short
        f.write(b'{"messages": [{"role": "user", "content": "Wh')
    first = api.asked()
    api.requests.clear()
    api.behave = lambda n, body: (200, api.ok(body))
    logs: list[str] = []
    run_distill(_opts(api.url, prompts, tok_dir, keep, teacher_model=api.model),
                _train(tmp_path / "student"), log=logs.append)
    answered_first = {q for q in first[:4]}
    asked_again = api.asked()
    assert len(asked_again) == 6 and not set(asked_again) & answered_first
    got = _answers(keep)
    assert got == {i + 1: FakeAPI.answer_to(q) for i, q in enumerate(questions)}
    text = "\n".join(logs)
    assert "torn last line" in text and "4 of 10 prompts already answered" in text


def test_server_failing_for_good_keeps_the_answers(fake, synth_dir, tok_dir, tmp_path):
    """After 3 answers the server fails with 500 on every request: the run stops with a clear error once the
    retries are spent, the 3 answers stay, and the rerun (server well again) asks only for the other 5."""
    api = fake(lambda n, body: (200, api.ok(body)) if n <= 3 else (500, {"error": {"message": "GPU fell off"}}))
    prompts = _prompts(synth_dir, tmp_path / "prompts.jsonl", 8)
    keep = tmp_path / "teacher.jsonl"
    opts = _opts(api.url, prompts, tok_dir, keep, teacher_model=api.model, teacher_retries=1, teacher_concurrency=1)
    with pytest.raises(TiaoyuError) as e:
        run_distill(opts, _train(tmp_path / "s"), log=lambda m: None)
    msg = str(e.value)
    assert f"{prompts}:4" in msg and "HTTP 500: GPU fell off" in msg and "after 1 retries" in msg
    assert "3 of 8 answers are kept" in msg
    assert sorted(_answers(keep)) == [1, 2, 3] and not (tmp_path / "s").exists()
    api.requests.clear()
    api.behave = lambda n, body: (200, api.ok(body))
    run_distill(opts, _train(tmp_path / "s"), log=lambda m: None)
    assert len(api.asked()) == 5 and sorted(_answers(keep)) == list(range(1, 9))


# ---- retries and refusals ------------------------------------------------------------------------------

def test_503_twice_then_200_succeeds(fake):
    api = fake(lambda n, body: (503, {"error": {"message": "busy"}}, {"Retry-After": "0"}) if n <= 2
               else (200, api.ok(body)))
    ep = Endpoint(api.url, api.model, retries=5, backoff=0.01)
    ans = ep.chat([{"role": "user", "content": "What is 2 + 2?"}], 8, 0.0)
    assert ans.content == FakeAPI.answer_to("What is 2 + 2?")
    assert ep.requests == 3 and ep.retried == 2 and "HTTP 503: busy" in ep.last_retry_reason
    # the same server with one retry allowed: no answer
    api.n = 0
    ep = Endpoint(api.url, api.model, retries=1, backoff=0.01)
    with pytest.raises(EndpointUnavailable, match=r"after 1 retries \(last: HTTP 503: busy\)"):
        ep.chat([{"role": "user", "content": "hi"}], 8, 0.0)


def test_connection_refused_is_retried_then_a_clear_error():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    ep = Endpoint(f"http://127.0.0.1:{port}/v1", "m", retries=2, backoff=0.01)
    with pytest.raises(EndpointUnavailable, match="after 2 retries .*cannot connect"):
        ep.chat([{"role": "user", "content": "hi"}], 8, 0.0)
    assert ep.requests == 3 and ep.retried == 2


def test_backoff_doubles_with_jitter_and_honours_retry_after():
    ep = Endpoint("http://127.0.0.1:1/v1", "m", backoff=1.0, max_backoff=10.0)
    for attempt, cap in enumerate([1, 2, 4, 8, 10, 10]):
        waits = [ep.delay(attempt) for _ in range(50)]
        assert all(cap / 2 <= w <= cap for w in waits), (attempt, min(waits), max(waits))
        assert len(set(waits)) > 40  # jittered, not one value
    assert ep.delay(0, retry_after=7.0) == 7.0  # the server's Retry-After, when longer
    assert ep.delay(0, retry_after=500.0) == 10.0  # … up to the cap


def test_400_names_the_record_and_the_servers_message(fake, synth_dir, tok_dir, tmp_path):
    prompts = _prompts(synth_dir, tmp_path / "prompts.jsonl", 5)
    bad = _question(json.loads(prompts.read_text(encoding="utf-8").splitlines()[2]))
    api = fake(lambda n, body: (400, {"error": {"message": "prompt is 9999 tokens, the limit is 4096",
                                                "type": "invalid_request_error"}})
               if body["messages"][-1]["content"] == bad else (200, api.ok(body)))
    keep = tmp_path / "teacher.jsonl"
    opts = _opts(api.url, prompts, tok_dir, keep, teacher_model=api.model, teacher_concurrency=1)
    with pytest.raises(TiaoyuError) as e:
        run_distill(opts, _train(tmp_path / "s"), log=lambda m: None)
    msg = str(e.value)
    assert msg.startswith(f"{prompts}:3: ") and "HTTP 400: prompt is 9999 tokens, the limit is 4096" in msg
    assert "--skip-bad" in msg and "2 of 5 answers are kept" in msg
    assert len(api.asked()) == 3  # not retried, and nothing asked after it
    # with --skip-bad the refused prompt is skipped and counted, the others answered
    logs: list[str] = []
    opts.skip_bad = True
    run_distill(opts, _train(tmp_path / "s"), log=logs.append)
    assert sorted(_answers(keep)) == [1, 2, 4, 5]
    assert any("1 refused by the teacher (HTTP 400)" in m for m in logs)


def test_api_key_is_sent_and_never_written(fake, synth_dir, tok_dir, tmp_path, monkeypatch):
    secret = "sk-test-7f3a9c-do-not-leak"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    api = fake()
    prompts = _prompts(synth_dir, tmp_path / "prompts.jsonl", 3)
    logs: list[str] = []
    run_distill(_opts(api.url, prompts, tok_dir, tmp_path / "student" / "teacher.jsonl"),
                _train(tmp_path / "student"), log=logs.append)
    assert {h.get("Authorization") for m, p, b, h in api.requests} == {f"Bearer {secret}"}
    assert api.requests[0][:2] == ("GET", "/v1/models")  # the model name came from the server
    for f in (tmp_path / "student").rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
    assert secret not in "\n".join(logs) and secret not in repr(Endpoint(api.url, "m"))
    # a 401 says what to check
    bad = fake(lambda n, body: (401, {"error": {"message": "Incorrect API key provided"}}))
    with pytest.raises(TiaoyuError, match=r"prompts.jsonl:1: .*HTTP 401: Incorrect API key provided .*OPENAI_API_KEY"):
        run_distill(_opts(bad.url, prompts, tok_dir, tmp_path / "t2.jsonl", teacher_model="m", teacher_concurrency=1),
                    _train(tmp_path / "s2"), log=lambda m: None)


def test_endpoint_teacher_option_errors(tok_dir, synth_dir, tmp_path):
    prompts = _prompts(synth_dir, tmp_path / "prompts.jsonl", 3)
    url = "http://127.0.0.1:9/v1"
    cases = [
        (dict(mode="white"), "gives answers, not logits, so distil from it with --mode black"),
        (dict(tokenizer=None), "--student-preset behind an HTTP teacher needs --tokenizer"),
        (dict(teacher="http://user:pw@127.0.0.1:9/v1"), "OPENAI_API_KEY environment variable, not in the URL"),
        (dict(teacher_concurrency=0), "--teacher-concurrency must be at least 1"),
    ]
    for kw, want in cases:
        with pytest.raises(TiaoyuError, match=re.escape(want)):
            run_distill(_opts(url, prompts, tok_dir, tmp_path / "k.jsonl", teacher_model="m", **kw),
                        _train(tmp_path / "s"), log=lambda m: None)
    with pytest.raises(TiaoyuError, match="--teacher-model names the model of an HTTP teacher"):
        run_distill(DistillRun(teacher=tmp_path, data=prompts, student_preset="tiny", mode="black",
                                   teacher_model="m"), _train(tmp_path / "s"), log=lambda m: None)
    assert not (tmp_path / "s").exists()


# ---- the answer file -----------------------------------------------------------------------------------

def test_answer_file_drops_a_torn_last_line_and_refuses_corruption(tmp_path):
    p = tmp_path / "a.jsonl"
    whole = b'{"messages": [], "teacher": {"line": 1}}\n{"messages": [], "teacher": {"line": 2}}\n'
    p.write_bytes(whole + b'{"messages": [{"role": "assis')
    logs: list[str] = []
    recs = AnswerFile(p).read(repair=False, log=logs.append)
    assert [r["teacher"]["line"] for _, r in recs] == [1, 2] and "torn last line" in logs[0]
    assert p.read_bytes().endswith(b'"assis')  # read-only: the file is left as it is
    AnswerFile(p).read(repair=True)
    assert p.read_bytes() == whole  # cut back to its whole lines
    f = AnswerFile(p)
    f.append({"messages": [], "teacher": {"line": 3}})
    f.close()
    assert [r["teacher"]["line"] for _, r in AnswerFile(p).read()] == [1, 2, 3]
    p.write_bytes(whole.replace(b"}}\n{", b"}}\n{oops", 1))
    with pytest.raises(DataError, match=rf"{re.escape(str(p))}:2: corrupt line"):
        AnswerFile(p).read()


def test_answers_of_another_teacher_or_prompt_are_refused(fake, synth_dir, tok_dir, tmp_path):
    api = fake()
    prompts = _prompts(synth_dir, tmp_path / "prompts.jsonl", 3)
    keep = tmp_path / "teacher.jsonl"
    run_distill(_opts(api.url, prompts, tok_dir, keep, teacher_model=api.model), _train(tmp_path / "a"),
                log=lambda m: None)
    with pytest.raises(TiaoyuError, match=r"teacher.jsonl:1 was answered by fake-teacher \(max_new_tokens 16, "
                                          r"temperature 0.0\), this run asks fake-teacher \(max_new_tokens 32"):
        run_distill(_opts(api.url, prompts, tok_dir, keep, teacher_model=api.model, max_new_tokens=32),
                    _train(tmp_path / "b"), log=lambda m: None)
    other = _prompts(synth_dir, tmp_path / "other.jsonl", 4)
    lines = other.read_text(encoding="utf-8").splitlines()
    other.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n", encoding="utf-8")
    with pytest.raises(TiaoyuError, match=r"answers another prompt than .*other.jsonl:\d \(the prompts changed\?\)"):
        run_distill(_opts(api.url, other, tok_dir, keep, teacher_model=api.model), _train(tmp_path / "c"),
                    log=lambda m: None)


def test_endpoint_refusal_is_not_retried(fake):
    api = fake(lambda n, body: (404, {"error": {"message": "The model 'x' does not exist"}}))
    ep = Endpoint(api.url, "x", retries=5, backoff=0.01)
    with pytest.raises(EndpointError) as e:
        ep.chat([{"role": "user", "content": "hi"}], 8, 0.0)
    assert e.value.status == 404 and ep.requests == 1 and "does not exist" in e.value.message
