"""`tiaoyu serve`: a live server on loopback, driven by the `openai` client — non-streaming and streaming
answers equal our own greedy generation, concurrent requests are batched and still correct, reasoning is
returned apart from the answer, and bad requests get clear 4xx JSON errors while the server keeps serving."""

from __future__ import annotations

import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from serve_process import serve_process

openai = pytest.importorskip("openai")


def start(engine, name: str):
    from tiaoyu_cli.serve.server import make_server

    srv = make_server(engine, "127.0.0.1", 0, name, quiet=True)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv, srv.server_address[1]


@pytest.fixture(scope="module")
def live(base_ckpt):
    """(port, engine, model name) of a server over the tiny base checkpoint (complete mode: it continues text)."""
    from tiaoyu_cli.serve.server import ServeConfig, load_engine

    cfg = ServeConfig(max_tokens_limit=64, default_max_tokens=16, max_request_bytes=20_000, max_batch=8,
                      batch_wait_s=0.05)
    engine, name = load_engine(base_ckpt, device="cpu", mode="auto", config=cfg)  # a pretrain checkpoint: complete mode
    srv, port = start(engine, name)
    yield port, engine, name
    srv.shutdown()
    srv.server_close()
    engine.close()


def client(port: int):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(engine, messages=None, prompt=None, n=16) -> str:
    """Our own greedy answer, generated directly (what the server must return)."""
    from tiaoyu_cli.infer.generate import decode_response, generate
    from tiaoyu_cli.infer.session import build_prompt, stop_ids_for

    tok = engine.tokenizer
    if messages is not None:
        ids, stops = build_prompt(tok, engine.mode, messages, None), stop_ids_for(engine.mode)
    else:
        ids, stops = tok.encode(prompt, bos=True), {tok.eos_id}
    toks = generate(engine.model, [ids], n, temperature=0, stop_ids=stops)[0]
    return decode_response(tok, toks, stops).response


QUESTIONS = ["What is 3 + 4?", "Where does Tosi live?", "王丽最喜欢什么颜色？", "What is 12 + 30?", "Hello!",
             "Who owns Vinay?"]


def test_models_and_chat_equal_our_generation(live):
    port, engine, name = live
    c = client(port)
    assert [m.id for m in c.models.list()] == [name]
    msgs = [{"role": "user", "content": QUESTIONS[0]}]
    r = c.chat.completions.create(model=name, messages=msgs, max_tokens=16, temperature=0)
    assert r.object == "chat.completion" and r.model == name
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == greedy(engine, msgs)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_sends_pieces_that_add_up(live):
    port, engine, name = live
    c = client(port)
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTIONS[1]}]
    chunks = list(c.chat.completions.create(model=name, messages=msgs, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(pieces) >= 2  # streamed, not one block
    assert "".join(pieces) == greedy(engine, msgs, n=24)
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= len(pieces)


def test_completions_streaming_and_not(live):
    port, engine, name = live
    c = client(port)
    r = c.completions.create(model=name, prompt="Tosi has a pet named", max_tokens=12, temperature=0)
    assert r.choices[0].text == greedy(engine, prompt="Tosi has a pet named", n=12)
    s = c.completions.create(model=name, prompt="Tosi has a pet named", max_tokens=12, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in s) == r.choices[0].text


def test_stop_strings_cut_the_answer(live):
    port, engine, name = live
    c = client(port)
    full = c.completions.create(model=name, prompt="3 plus 4 equals", max_tokens=16, temperature=0).choices[0].text
    cut = full.strip()[1:3]  # some text inside the answer
    r = c.completions.create(model=name, prompt="3 plus 4 equals", max_tokens=16, temperature=0, stop=[cut])
    assert r.choices[0].text == full[:full.index(cut)] and r.choices[0].finish_reason == "stop"
    s = c.completions.create(model=name, prompt="3 plus 4 equals", max_tokens=16, temperature=0, stop=cut, stream=True)
    assert "".join(ch.choices[0].text for ch in s) == r.choices[0].text


def test_concurrent_requests_are_batched_and_correct(live):
    port, engine, name = live
    c = client(port)
    expected = {q: greedy(engine, [{"role": "user", "content": q}], n=12) for q in QUESTIONS}
    before = dict(engine.stats)

    def ask(q):
        return q, c.chat.completions.create(model=name, messages=[{"role": "user", "content": q}], max_tokens=12,
                                            temperature=0).choices[0].message.content

    with ThreadPoolExecutor(len(QUESTIONS)) as ex:
        got = dict(ex.map(ask, QUESTIONS))
    assert got == expected
    assert engine.stats["requests"] - before["requests"] == len(QUESTIONS)
    assert engine.stats["batches"] - before["batches"] < len(QUESTIONS)  # several shared a batch
    assert engine.stats["largest_batch"] >= 2


def raw(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data) if data.startswith(b"{") else data


def test_bad_requests_get_clear_errors_and_the_server_stays_up(live):
    port, engine, name = live
    chat = "/v1/chat/completions"
    ok_msgs = [{"role": "user", "content": "hi"}]
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b"", 400, "empty"),
        (json.dumps({"model": "gpt-4", "messages": ok_msgs}).encode(), 404, "does not exist"),
        (json.dumps({"model": name}).encode(), 400, "'messages'"),
        (json.dumps({"model": name, "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "unknown role"),
        (json.dumps({"model": name, "messages": ok_msgs, "temperature": "hot"}).encode(), 400, "'temperature'"),
        (json.dumps({"model": name, "messages": ok_msgs, "max_tokens": 10_000}).encode(), 400, "'max_tokens'"),
        (json.dumps({"model": name, "messages": ok_msgs, "n": 3}).encode(), 400, "n = 1"),
        (json.dumps({"model": name, "messages": [{"role": "user", "content": "word " * 400}]}).encode(), 400,
         "context"),
        (json.dumps({"model": name, "messages": ok_msgs, "max_tokens": 64,
                     "stop": ["a", "b", "c", "d", "e"]}).encode(), 400, "'stop'"),
    ]
    for body, status, msg in cases:
        code, res = raw(port, "POST", chat, body)
        assert code == status and msg in res["error"]["message"], (body[:60], code, res)
        assert res["error"]["type"]
    code, res = raw(port, "POST", chat, b"{" + b" " * 30_000 + b"}")
    assert code == 413 and "limit" in res["error"]["message"]
    code, res = raw(port, "POST", "/v1/completions", json.dumps({"model": name, "prompt": "word " * 400}).encode())
    assert code == 400 and res["error"]["code"] == "context_length_exceeded"
    assert raw(port, "GET", chat)[0] == 405
    assert raw(port, "GET", "/v1/nothing")[0] == 404
    assert raw(port, "POST", "/v1/embeddings", b"{}")[0] == 404
    with pytest.raises(openai.NotFoundError):
        client(port).chat.completions.create(model="nope", messages=ok_msgs)
    # still serving
    assert raw(port, "GET", "/v1/models")[1]["data"][0]["id"] == name
    health = raw(port, "GET", "/health")[1]
    assert health["status"] == "ok" and health["context"] == engine.context


def test_reasoning_is_returned_apart_from_the_answer(base_ckpt):
    """A scripted generation loop emits <think>…</think>answer: the thinking arrives as reasoning_content."""
    from tiaoyu_cli.infer.generate import END_THINK_ID, THINK_ID, Step
    from tiaoyu_cli.serve.server import Engine, ServeConfig
    from tiaoyu_cli.checkpoint import load_model, load_tokenizer

    tok = load_tokenizer(base_ckpt)
    model, _ = load_model(base_ckpt)
    script = [THINK_ID, *tok.encode("3 + 4 = 7."), END_THINK_ID, *tok.encode("7"), 5]

    def steps(model, prompts, n, params, stops, gen):
        for t in script[:n]:
            yield Step(list(range(len(prompts))), [t] * len(prompts), None)

    engine = Engine(model, tok, "chat", ServeConfig(), steps=steps)
    srv, port = start(engine, "r")
    try:
        c = client(port)
        msgs = [{"role": "user", "content": "What is 3 + 4?"}]
        r = c.chat.completions.create(model="r", messages=msgs, max_tokens=30)
        m = r.choices[0].message
        assert m.content == "7" and m.model_extra["reasoning_content"] == "3 + 4 = 7."
        assert r.choices[0].finish_reason == "stop"
        chunks = list(c.chat.completions.create(model="r", messages=msgs, max_tokens=30, stream=True))
        think = "".join(ch.choices[0].delta.model_extra.get("reasoning_content") or "" for ch in chunks)
        answer = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        assert (think, answer) == ("3 + 4 = 7.", "7")
        # max_tokens cuts inside the thinking: all reasoning, no answer, finish "length"
        r = c.chat.completions.create(model="r", messages=msgs, max_tokens=3)
        assert r.choices[0].finish_reason == "length" and r.choices[0].message.content == ""
    finally:
        srv.shutdown()
        srv.server_close()
        engine.close()


def test_cli_binds_loopback_and_serves(base_ckpt):
    """The real `tiaoyu serve` process: it says where it listens (127.0.0.1 by default) and answers there."""
    with serve_process(base_ckpt, startup=120) as (_, port):
        c = client(port)
        name = c.models.list().data[0].id
        assert name == "base"  # the run folder's name, not step-000400
        r = c.completions.create(model=name, prompt="Tosi", max_tokens=4, temperature=0)
        assert r.usage.completion_tokens >= 1
