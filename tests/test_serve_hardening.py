"""`tiaoyu serve` against hostile requests: a bad number, a deep body or a broken job costs its own request
a 4xx (or, for a job that breaks inside the engine, its own 500) and nothing else; a dying scheduler fails
the requests it holds instead of leaving them hanging; other web pages and rebound host names are refused
while curl-like clients and the chat page work as before; and a seeded fuzz of request bodies never gets a
500, a hang or a dead engine."""

from __future__ import annotations

import http.client
import json
import random
import threading
import time

import pytest

pytest.importorskip("starlette")


def start(engine, name: str, host: str = "127.0.0.1"):
    from tiaoyu_cli.serve.server import make_server

    srv = make_server(engine, host, 0, name, quiet=True)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv, srv.server_address[1]


def engine_for(base_ckpt, **cfg):
    from tiaoyu_cli.serve.server import ServeConfig, load_engine

    config = ServeConfig(max_tokens_limit=16, default_max_tokens=4, max_request_bytes=200_000, max_batch=4,
                         batch_wait_s=0.005, **cfg)
    return load_engine(base_ckpt, device="cpu", mode="chat", config=config)


@pytest.fixture(scope="module")
def live(base_ckpt):
    engine, name = engine_for(base_ckpt)
    srv, port = start(engine, name)
    yield port, engine, name
    srv.shutdown()
    srv.server_close()
    engine.close()


def post(port: int, body: bytes, path: str = "/v1/chat/completions", headers: dict | None = None,
         method: str = "POST") -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, (json.loads(data) if data.startswith(b"{") else {}), {k.lower(): v for k, v in r.getheaders()}


def good(port: int, name: str) -> None:
    body = json.dumps({"model": name, "messages": [{"role": "user", "content": "What is 3 + 4?"}],
                       "max_tokens": 3, "temperature": 0.8, "seed": 7}).encode()
    code, res, _ = post(port, body)
    assert code == 200, res
    assert res["choices"][0]["message"]["role"] == "assistant"


MSGS = '"messages": [{"role": "user", "content": "hi"}]'


@pytest.mark.parametrize("field", [
    '"seed": 18446744073709551616', '"seed": 1e300', '"seed": -1', '"seed": 2.5', '"temperature": NaN',
    '"temperature": Infinity', '"repetition_penalty": NaN', '"top_p": NaN', '"top_k": -Infinity',
    '"max_tokens": 1e400', '"deep": ' + "[" * 5000 + "]" * 5000, '"deep": ' + "[" * 40 + "]" * 40,
    '"tools": ' + '{"a": ' * 60 + "1" + "}" * 60,
])
def test_a_bad_number_or_a_deep_body_is_a_400_and_the_engine_goes_on(live, field):
    port, engine, name = live
    code, res, _ = post(port, ("{" + MSGS + ", " + field + "}").encode())
    assert code == 400, (field[:40], code, res)
    assert res["error"]["type"] == "invalid_request_error" and res["error"]["message"]
    assert engine.failed is None
    good(port, name)


def test_the_largest_seed_is_taken(live):
    port, engine, name = live
    body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 1.0}
    for seed in (0, 2**64 - 1):
        code, res, _ = post(port, json.dumps({**body, "seed": seed}).encode())
        assert code == 200, res


def job(engine, **kw):
    from tiaoyu_cli.infer.sampling import SamplingParams
    from tiaoyu_cli.serve.engine import Job

    params = kw.pop("params", SamplingParams(temperature=0.0))
    return Job(engine.tokenizer.encode("Tosi lives", bos=True), 3, params, frozenset({engine.tokenizer.eos_id}), **kw)


def events(j, timeout: float = 30.0) -> list[tuple]:
    out = []
    deadline = time.monotonic() + timeout
    while not out or out[-1][0] not in ("done", "error"):
        out.append(j.events.get(timeout=max(0.01, deadline - time.monotonic())))
    return out


def test_a_job_that_breaks_at_admission_fails_alone(base_ckpt):
    """A job the engine cannot set up (here a seed no generator takes, past the API's checks) gets its own
    500; the jobs beside it are answered and the engine keeps serving."""
    from tiaoyu_cli.infer.sampling import SamplingParams

    engine, _ = engine_for(base_ckpt)
    try:
        bad = job(engine, params=SamplingParams(temperature=1.0), seed=2**70)
        ok = job(engine)
        engine.submit(bad)
        engine.submit(ok)
        got_bad = events(bad)
        assert got_bad[-1][0] == "error" and got_bad[-1][2] == 500, got_bad
        assert events(ok)[-1][0] == "done"
        assert engine.failed is None
        later = job(engine)
        engine.submit(later)
        assert events(later)[-1][0] == "done"
    finally:
        engine.close()


def test_a_dying_scheduler_fails_what_it_holds(base_ckpt, monkeypatch):
    """A bug that kills the scheduler thread ends the requests it held (500), and later ones get 503."""
    from tiaoyu_cli.serve.engine import APIError, Engine

    def broken(self, slots, rows):
        if rows:
            raise RuntimeError("a bug in retire")

    monkeypatch.setattr(Engine, "_retire", broken)
    engine, _ = engine_for(base_ckpt)
    try:
        held = job(engine)
        engine.submit(held)
        got = events(held)
        assert got[-1][0] == "error" and got[-1][2] == 500 and "a bug in retire" in got[-1][1], got
        deadline = time.monotonic() + 10
        while engine.failed is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.failed and "a bug in retire" in engine.failed
        with pytest.raises(APIError) as e:
            engine.submit(job(engine))
        assert e.value.status == 503
    finally:
        engine.close()


def test_other_web_pages_and_rebound_hosts_are_refused(live):
    port, engine, name = live
    body = json.dumps({"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    # a page on another origin posting text/plain (no preflight in a browser)
    code, res, _ = post(port, body, headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert code == 403 and res["error"]["code"] == "origin_not_allowed"
    # DNS rebinding: the browser sends the attacker's host name
    code, res, _ = post(port, body, headers={"Host": f"evil.example:{port}"})
    assert code == 403 and res["error"]["code"] == "host_not_allowed"
    assert post(port, b"", path="/v1/models", method="GET", headers={"Host": "evil.example"})[0] == 403
    # the chat page's own requests (same origin) and plain clients (no Origin) work
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        code, _, hdrs = post(port, body, headers={"Host": host, "Origin": f"http://{host}"})
        assert code == 200
        assert "access-control-allow-origin" in hdrs  # same origin: harmless
    assert post(port, body)[0] == 200
    assert engine.failed is None


def test_allowed_origins_and_hosts(base_ckpt):
    engine, name = engine_for(base_ckpt, allow_origins=("http://app.example:3000",), allowed_hosts=("box.lan",))
    srv, port = start(engine, name)
    try:
        body = json.dumps({"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
        code, _, hdrs = post(port, b"", method="OPTIONS", headers={
            "Origin": "http://app.example:3000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization"})
        assert code == 204 and hdrs["access-control-allow-origin"] == "http://app.example:3000"
        assert "POST" in hdrs["access-control-allow-methods"]
        assert "authorization" in hdrs["access-control-allow-headers"]
        code, _, hdrs = post(port, body, headers={"Origin": "http://app.example:3000"})
        assert code == 200 and hdrs["access-control-allow-origin"] == "http://app.example:3000"
        assert post(port, body, headers={"Origin": "http://other.example"})[0] == 403
        assert post(port, b"", method="OPTIONS", headers={"Origin": "http://other.example",
                                                          "Access-Control-Request-Method": "POST"})[0] == 403
        assert post(port, body, headers={"Host": f"box.lan:{port}"})[0] == 200
        assert post(port, body, headers={"Host": f"else.lan:{port}"})[0] == 403
    finally:
        srv.shutdown()
        srv.server_close()
        engine.close()


def test_host_names_per_bind_address():
    from tiaoyu_cli.serve.guard import allowed_host_names, host_name

    assert host_name("[::1]:8000") == "::1" and host_name("Example.COM:80") == "example.com"
    assert host_name("::1") == "::1"
    assert allowed_host_names("127.0.0.1") == {"127.0.0.1", "localhost", "::1"}
    assert allowed_host_names("0.0.0.0") is None  # any name reaches a server bound to every address
    assert allowed_host_names("0.0.0.0", ["box.lan"]) == {"box.lan"}
    assert allowed_host_names("10.0.0.5") == {"10.0.0.5"}
    assert allowed_host_names("127.0.0.1", ["*"]) is None


# ---- fuzz: random request bodies --------------------------------------------------------------------------

KEYS = ["model", "messages", "prompt", "temperature", "top_p", "top_k", "seed", "max_tokens", "max_completion_tokens",
        "stop", "tools", "tool_choice", "stream", "stream_options", "n", "logprobs", "repetition_penalty"]
WEIRD_NUMS = ["NaN", "Infinity", "-Infinity", "1e400", "-0", "18446744073709551616", "1e300", "-1", "0", "2.5",
              "99999999999999999999999", "1e-320", "3", "0.5"]
WEIRD_TEXT = ["", "hi", "<|im_end|>", "<tool_call>{", "\x00\x1b[31m", "😀" * 30, "a" * 3000, "\ud800".encode(
    "utf-8", "surrogatepass").decode("utf-8", "replace"), "{\"name\": \"calculator\"", "</think>"]


def rand_value(rng: random.Random, depth: int = 0) -> str:
    """JSON text (possibly with NaN/Infinity, huge numbers or deep nesting) of a random shape."""
    r = rng.random()
    if r < 0.25:
        return rng.choice(WEIRD_NUMS)
    if r < 0.45:
        return json.dumps(rng.choice(WEIRD_TEXT))
    if r < 0.5:
        return rng.choice(["true", "false", "null"])
    if r < 0.55:
        n = rng.choice([30, 200, 2000])
        return "[" * n + "]" * n
    if depth > 3:
        return "1"
    if r < 0.75:
        return "[" + ", ".join(rand_value(rng, depth + 1) for _ in range(rng.randint(0, 3))) + "]"
    keys = rng.sample(["role", "content", "type", "function", "name", "arguments", "tool_calls", "text",
                       "tool_call_id", "parameters", "include_usage"], rng.randint(0, 4))
    return "{" + ", ".join(f'"{k}": {rand_value(rng, depth + 1)}' for k in keys) + "}"


def rand_message(rng: random.Random) -> str:
    role = rng.choice(["user", "user", "system", "assistant", "tool", "developer", "wizard"])
    content = rand_value(rng, 2) if rng.random() < 0.3 else json.dumps(rng.choice(WEIRD_TEXT) or "hello")
    extra = ""
    if role == "assistant" and rng.random() < 0.5:
        extra = ', "tool_calls": ' + rand_value(rng, 2)
    if role == "tool":
        extra = ', "tool_call_id": ' + rand_value(rng, 3)
    return f'{{"role": "{role}", "content": {content}{extra}}}'


def rand_body(rng: random.Random, name: str) -> tuple[str, bytes]:
    parts = {}
    if rng.random() < 0.9:
        parts["messages"] = "[" + ", ".join(rand_message(rng) for _ in range(rng.randint(0, 3))) + \
                            (", " if rng.random() < 0.5 else "") + '{"role": "user", "content": "hi"}' + "]" \
            if rng.random() < 0.7 else rand_value(rng, 1)
    for k in rng.sample(KEYS, rng.randint(0, 6)):
        parts[k] = rand_value(rng, 1)
    parts.setdefault("max_tokens", rng.choice(["1", "2", "3", "NaN", "0", "1e9"]))
    if rng.random() < 0.8:
        parts["model"] = json.dumps(name)
    path = "/v1/completions" if rng.random() < 0.2 else "/v1/chat/completions"
    if path == "/v1/completions":
        parts["prompt"] = rand_value(rng, 1) if rng.random() < 0.5 else '"Tosi lives"'
    return path, ("{" + ", ".join(f'"{k}": {v}' for k, v in parts.items()) + "}").encode()


def test_fuzz_request_bodies_never_500_hang_or_stop_the_engine(live):
    port, engine, name = live
    rng = random.Random(1234)
    seen: dict[int, int] = {}
    deadline = time.monotonic() + 20
    n = 0
    while time.monotonic() < deadline and n < 400:
        path, body = rand_body(rng, name)
        code, res, _ = post(port, body, path=path)
        seen[code] = seen.get(code, 0) + 1
        assert code == 200 or 400 <= code < 500, (code, body[:300], res)
        if code != 200:
            assert res["error"]["message"], body[:200]
        n += 1
    assert engine.failed is None
    assert seen.get(200, 0) >= 5 and sum(v for k, v in seen.items() if k >= 400) >= 50, seen
    good(port, name)
