"""`tiaoyu serve` under load: continuous batching (a request joins the running batch instead of waiting
for it), client disconnects free their row, request deadlines (504), a full queue (503), /health and
/metrics, and many concurrent requests all answered exactly as each would be alone."""

from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from test_serve import greedy, raw, start


def serve(base_ckpt, **kw):
    from tiaoyu_cli.serve.server import ServeConfig, load_engine

    cfg = ServeConfig(**{"max_tokens_limit": 120, "default_max_tokens": 16, "max_batch": 4, **kw})
    engine, name = load_engine(base_ckpt, device="cpu", mode="complete", config=cfg)
    srv, port = start(engine, name)
    return srv, port, engine, name


def stop(srv, engine):
    srv.shutdown()
    srv.server_close()
    engine.close()


def post(port, body: dict, path="/v1/completions"):
    return raw(port, "POST", path, json.dumps(body).encode())


def wait_for(cond, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture(scope="module")
def live(base_ckpt):
    srv, port, engine, name = serve(base_ckpt)
    yield port, engine, name
    stop(srv, engine)


def stream_lines(port, body: dict):
    """Open a streaming request; yields (connection, iterator over its `data:` payloads)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                  headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200

    def events():
        while True:
            line = r.fp.readline()
            if not line:
                return
            if line.startswith(b"data: "):
                yield line[6:].strip()
    return conn, events()


def test_a_request_joins_the_running_batch(live):
    port, engine, name = live
    before = dict(engine.stats)
    conn, events = stream_lines(port, {"model": name, "prompt": "Tosi", "max_tokens": 100, "temperature": 0,
                                       "stop": ["never-appears"]})
    next(events)  # the long request is running
    t0 = time.time()
    short = post(port, {"model": name, "prompt": "Tosi has a pet named", "max_tokens": 3, "temperature": 0})
    short_done = time.time()
    assert short[0] == 200 and short[1]["usage"]["completion_tokens"] <= 3
    rest = list(events)
    long_done = time.time()
    conn.close()
    assert rest[-1] == b"[DONE]"
    n_long = sum(1 for e in rest[:-1] if json.loads(e)["choices"] and json.loads(e)["choices"][0]["text"])
    # the short one was answered while the long one was still generating, inside the same busy period
    assert short_done < long_done and n_long > 5, (short_done - t0, long_done - t0)
    assert engine.stats["largest_batch"] >= 2
    assert engine.stats["batches"] - before["batches"] == 1
    assert short[1]["choices"][0]["text"] == greedy(engine, prompt="Tosi has a pet named", n=3)


def test_client_disconnect_frees_its_row(live):
    port, engine, name = live
    before = dict(engine.stats)
    conn, events = stream_lines(port, {"model": name, "prompt": "Tosi", "max_tokens": 120, "temperature": 0.8,
                                       "seed": 1})
    next(events), next(events)
    conn.sock.shutdown(2)
    conn.close()
    assert wait_for(lambda: engine.stats["cancelled"] > before["cancelled"] and engine.stats["running"] == 0)
    assert engine.stats["tokens_generated"] - before["tokens_generated"] < 120  # stopped early
    assert post(port, {"model": name, "prompt": "Tosi", "max_tokens": 2})[0] == 200  # still serving


def test_many_concurrent_requests_all_answered_as_alone(live):
    port, engine, name = live
    prompts = [f"{w} has a pet named" for w in ("Tosi", "Vinay", "Mara", "Ilse", "Odo", "Pim")] * 2
    expect = {p: greedy(engine, prompt=p, n=10) for p in set(prompts)}

    def ask(p):
        code, body = post(port, {"model": name, "prompt": p, "max_tokens": 10, "temperature": 0})
        return p, code, body

    with ThreadPoolExecutor(len(prompts)) as ex:
        got = list(ex.map(ask, prompts))
    assert all(code == 200 for _, code, _ in got)
    assert all(body["choices"][0]["text"] == expect[p] for p, _, body in got)
    assert engine.stats["largest_batch"] == 4  # --max-batch rows, the rest queued and joined as rows freed


def test_health_and_metrics(live):
    port, engine, name = live
    post(port, {"model": name, "prompt": "Tosi", "max_tokens": 2})
    code, health = raw(port, "GET", "/health")
    assert code == 200 and health["status"] == "ok" and health["max_batch"] == 4
    assert health["requests"] >= 1 and health["queued"] == 0
    assert wait_for(lambda: raw(port, "GET", "/health")[1]["running"] == 0)  # the row is freed right after
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    r = conn.getresponse()
    text = r.read().decode()
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/plain")
    values = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}
    assert values["tiaoyu_requests_total"] == engine.stats["requests"]
    assert values["tiaoyu_generated_tokens_total"] == engine.stats["tokens_generated"] > 0
    assert values["tiaoyu_batch_capacity"] == 4 and values["tiaoyu_batch_running"] == 0
    assert values["tiaoyu_time_to_first_token_seconds_count"] >= 1
    # the chat page is still served, and the JSON error shape holds for a wrong method too
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/")
    r = conn.getresponse()
    page = r.read()
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/html") and b"<html" in page.lower()
    code, body = raw(port, "POST", "/v1/models", b"{}")
    assert code == 405 and body["error"]["code"] == "method_not_allowed"


def test_deadline_gives_504_and_full_queue_gives_503(base_ckpt):
    srv, port, engine, name = serve(base_ckpt, request_timeout_s=0.001)
    try:
        code, body = post(port, {"model": name, "prompt": "Tosi", "max_tokens": 4})
        assert code == 504 and "timeout" in body["error"]["message"] and body["error"]["code"] == "timeout"
        conn, events = stream_lines(port, {"model": name, "prompt": "Tosi", "max_tokens": 4})
        chunks = [json.loads(e) for e in events if e != b"[DONE]"]
        conn.close()
        assert "timeout" in chunks[-1]["error"]["message"]
        assert wait_for(lambda: engine.stats["timeouts"] >= 2)
    finally:
        stop(srv, engine)
    srv, port, engine, name = serve(base_ckpt, max_batch=1, max_queue=1)
    try:
        body = {"model": name, "prompt": "Tosi", "max_tokens": 100, "stop": ["never-appears"]}
        with ThreadPoolExecutor(6) as ex:
            codes = [c for c, _ in ex.map(lambda _: post(port, body), range(6))]
        assert codes.count(200) >= 1 and codes.count(503) >= 1 and set(codes) <= {200, 503}, codes
    finally:
        stop(srv, engine)
