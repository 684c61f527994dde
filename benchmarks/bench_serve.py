"""`tiaoyu serve` under load: tokens/s and p50/p99 latency for 1, 8 and 32 concurrent clients, the
continuous-batching ASGI server against the previous server (stdlib http.server, whole-batch
generation), both in the same run on the same checkpoint.

    .venv/bin/python benchmarks/bench_serve.py                        # tiny preset, random weights
    .venv/bin/python benchmarks/bench_serve.py --clients 1,8,32 --requests 64 --max-tokens 32
    .venv/bin/python benchmarks/bench_serve.py --ckpt ckpt/sft         # a real checkpoint

The previous server is the `tiaoyu_cli/serve/server.py` of git revision --old-rev (default: the
last revision that still used http.server), loaded from git into a temp folder. Each server runs
in its own process (one torch thread, CPU) with --max-batch 32. Per concurrency level, the two
servers take turns (order alternating between levels, so load from other processes on a shared
machine hits both alike; --rounds of each, tokens/s the median round); each level sends the same requests: N clients in closed loop, each
sending requests one after another until the level's total is reached. Prompts differ in length
(4-40 tokens); greedy, an impossible stop string so every answer runs its length (EOS may still end
one early: tokens are counted from each response's usage). `--lengths mixed` (default) asks each
request for a different max_tokens, uniform in [8, 2·--max-tokens − 8] — answers of different
lengths, as chat traffic has; `--lengths fixed` asks all for --max-tokens, the case where a whole
batch finishes together (the best case for whole-batch generation). A request counts from sending
to the last byte; one that gets no answer (connection refused or reset, non-200) is listed under
"errors" and not counted in tokens/s. Also checks that a bad request still gets a 4xx.
Prints one JSON line (and one line per level on stderr).

    .venv/bin/python benchmarks/bench_serve.py --soak 600            # 10 minutes of mixed hostile traffic

`--soak SECONDS`: only the current server, for that long, under --clients (default 8) clients that each
pick at random: a good request (chat or completion, streamed or not), a bad one (NaN, a huge seed, a
body nested thousands deep, broken JSON, an unknown model, a prompt past the context, a cross-origin
page, a rebound Host), or one that goes away mid-answer. Reports the requests served, the answers by
kind and status, anything unexpected (a 5xx, a good request not answered, a bad one not refused), p50/p99
latency of the good ones, and the server's RSS at the start (after a warm-up) and the end, with its
samples every 30 s.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OLD_LAUNCHER = """
import sys, importlib.util
spec = importlib.util.spec_from_file_location("old_server", sys.argv[1])
m = importlib.util.module_from_spec(spec); sys.modules["old_server"] = m; spec.loader.exec_module(m)
cfg = m.ServeConfig(max_tokens_limit=512, max_batch=int(sys.argv[3]), max_queue=256)
engine, name = m.load_engine(sys.argv[2], device="cpu", mode="complete", config=cfg)
srv = m.make_server(engine, "127.0.0.1", 0, name, quiet=True)
print(f"PORT {srv.server_address[1]}", file=sys.stderr, flush=True)
srv.serve_forever(poll_interval=0.05)
"""


def make_checkpoint(folder: Path, preset_name: str) -> Path:
    """A tokenizer trained on the synthetic corpus and a randomly initialised model of the preset."""
    import torch

    from tiaoyu_cli.checkpoint import save_model_files
    from tiaoyu_cli.data.synth import SynthConfig, write_corpus
    from tiaoyu_cli.model import Transformer, preset
    from tiaoyu_cli.tokenizer import train_tokenizer

    write_corpus(folder / "synth", SynthConfig(seed=0, text_mb=0.5, records=100, val_records=10))
    tok = train_tokenizer([str(folder / "synth" / "text.train.jsonl")], folder / "tok", vocab_size=1024)
    torch.manual_seed(0)
    model = Transformer(preset(preset_name, vocab_size=tok.vocab_size)).eval()
    ckpt = folder / "ckpt"
    ckpt.mkdir()
    save_model_files(ckpt, model, tok)
    return ckpt


def start_server(cmd: list[str], env: dict) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    deadline = time.time() + 180
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        m = re.search(r"PORT (\d+)|http://127\.0\.0\.1:(\d+)/v1", line)
        if m:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining
            return proc, int(m.group(1) or m.group(2))
    proc.kill()
    raise SystemExit("server did not start:\n" + "".join(seen))


def request(port: int, body: dict, timeout: float = 600) -> tuple[int, dict | None, float]:
    t = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        status = r.status
    finally:
        conn.close()
    return status, (json.loads(data) if data.startswith(b"{") else None), time.perf_counter() - t


def load_level(port: int, clients: int, total: int, bodies: list[dict]) -> dict:
    lock = threading.Lock()
    next_i = [0]
    lat: list[float] = []
    tokens = [0]
    errors: list = []  # HTTP status, or the connection error's name

    def client() -> None:
        while True:
            with lock:
                i = next_i[0]
                if i >= total:
                    return
                next_i[0] += 1
            try:
                status, body, dt = request(port, bodies[i % len(bodies)])
            except OSError as e:  # refused / reset: the server did not take the connection
                status, body, dt = type(e).__name__, None, 0.0
            with lock:
                if status == 200 and body is not None:
                    lat.append(dt)
                    tokens[0] += body["usage"]["completion_tokens"]
                else:
                    errors.append(status)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    return {"tokens_per_s": round(tokens[0] / wall, 1), "latencies": lat, "answered": len(lat), "errors": errors,
            "tokens": tokens[0], "wall_s": round(wall, 2)}


BAD_BODIES = [
    b'{"prompt": "x", "max_tokens": 4, "temperature": NaN}',
    b'{"prompt": "x", "max_tokens": 4, "seed": 18446744073709551616, "temperature": 1}',
    b'{"prompt": "x", "max_tokens": 4, "seed": 1e300, "temperature": 1}',
    b'{"prompt": "x", "max_tokens": 4, "repetition_penalty": NaN}',
    b'{"prompt": "x", "max_tokens": 4, "top_p": NaN, "temperature": 1}',
    b'{"prompt": "x", "deep": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"prompt": "x", "max_tokens": ',
    b'{"model": "not-this-one", "prompt": "x"}',
    b'{"prompt": "' + b"word " * 3000 + b'", "max_tokens": 4}',
    b'{"prompt": "x", "max_tokens": 1e400}',
]


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def soak(proc: subprocess.Popen, port: int, seconds: float, clients: int, bodies: list[dict]) -> dict:
    """Mixed good, bad and disconnecting clients against one server for `seconds` (see the module docstring)."""
    import socket

    lock = threading.Lock()
    counts: dict[str, int] = {}
    unexpected: list[str] = []
    lat: list[float] = []
    stop_at = time.monotonic() + seconds

    def note(key: str, problem: str | None = None) -> None:
        with lock:
            counts[key] = counts.get(key, 0) + 1
            if problem and len(unexpected) < 50:
                unexpected.append(problem)

    def raw(body: bytes, path: str = "/v1/completions", headers: dict | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def good(rng: random.Random) -> None:
        b = dict(rng.choice(bodies), max_tokens=rng.randint(2, 24))
        chat = rng.random() < 0.5
        if chat:
            b = {"messages": [{"role": "user", "content": b["prompt"]}], "max_tokens": b["max_tokens"],
                 "temperature": rng.choice([0, 0.8]), "seed": rng.randint(0, 2**64 - 1)}
        stream = rng.random() < 0.3
        if stream:
            b["stream"] = True
        t = time.perf_counter()
        status, data = raw(json.dumps(b).encode(), "/v1/chat/completions" if chat else "/v1/completions")
        ok = status == 200 and (data.rstrip().endswith(b"[DONE]") if stream else b'"usage"' in data)
        if ok:
            with lock:
                lat.append(time.perf_counter() - t)
        note(f"good {status}", None if ok else f"good request answered {status}: {data[:200]!r}")

    def bad(rng: random.Random) -> None:
        kind = rng.random()
        headers = None
        body = rng.choice(BAD_BODIES)
        if kind < 0.15:
            body, headers = json.dumps(bodies[0]).encode(), {"Origin": "http://evil.example", "Content-Type": "text/plain"}
        elif kind < 0.25:
            body, headers = json.dumps(bodies[0]).encode(), {"Host": "evil.example"}
        status, data = raw(body, headers=headers)
        note(f"bad {status}", None if 400 <= status < 500 else f"bad request answered {status}: {data[:200]!r}")

    def leave(rng: random.Random) -> None:
        """A streamed answer read for a moment, or a request sent and the socket closed at once."""
        b = dict(rng.choice(bodies), max_tokens=64, stream=rng.random() < 0.7)
        data = json.dumps(b).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
            if b["stream"]:
                sock.recv(256)
        note("left")

    def client(i: int) -> None:
        rng = random.Random(i)
        while time.monotonic() < stop_at:
            r = rng.random()
            try:
                (good if r < 0.6 else bad if r < 0.9 else leave)(rng)
            except OSError as e:
                note(f"connection {type(e).__name__}", f"connection failed: {type(e).__name__}: {e}")

    raw(json.dumps(bodies[0]).encode())  # warm up
    samples = [rss_kb(proc.pid)]
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    t0 = time.monotonic()
    for th in threads:
        th.start()
    while any(th.is_alive() for th in threads):
        time.sleep(1.0)
        if time.monotonic() - t0 >= 30 * len(samples):
            samples.append(rss_kb(proc.pid))
    status, data = raw(json.dumps(bodies[0]).encode())  # still serving after it all
    health = _get(port, "/health")
    samples.append(rss_kb(proc.pid))
    lat.sort()
    return {"seconds": round(time.monotonic() - t0, 1), "clients": clients, "requests": sum(counts.values()),
            "served_good": len(lat), "by_kind": dict(sorted(counts.items())), "unexpected": unexpected,
            "p50_s": percentile(lat, 0.5), "p99_s": percentile(lat, 0.99),
            "rss_mb_start": round(samples[0] / 1024, 1), "rss_mb_end": round(samples[-1] / 1024, 1),
            "rss_mb_samples": [round(x / 1024, 1) for x in samples], "final_request_status": status,
            "engine": {k: health.get(k) for k in ("status", "requests", "completed", "cancelled", "errors", "timeouts")}}


def _get(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    return round(sorted_values[min(len(sorted_values) - 1, int(round(p * (len(sorted_values) - 1))))], 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="", help="checkpoint to serve (default: a random model of --preset)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=64, help="requests per level (at least 4 per client at 1-8 clients)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--lengths", choices=("mixed", "fixed"), default="mixed")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per level; tokens/s = the median round, "
                    "latency percentiles over all rounds' requests")
    ap.add_argument("--old-rev", default="", help="git revision of the previous server (default: the last with http.server)")
    ap.add_argument("--soak", type=float, default=0, help="SECONDS of mixed good, bad and disconnecting clients "
                    "against the current server only (see above)")
    args = ap.parse_args()
    if args.soak:
        return soak_main(args)

    rev = args.old_rev
    if not rev:
        removed = subprocess.run(["git", "log", "-1", "--format=%H", "-S", "ThreadingHTTPServer", "--",
                                  "tiaoyu_cli/serve/server.py"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        rev = f"{removed}^" if removed else "HEAD"
    old_src = subprocess.run(["git", "show", f"{rev}:tiaoyu_cli/serve/server.py"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
    if "ThreadingHTTPServer" not in old_src:
        raise SystemExit(f"{rev}:tiaoyu_cli/serve/server.py is not the http.server version")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmp = Path(tmp)
        ckpt = Path(args.ckpt) if args.ckpt else make_checkpoint(tmp, args.preset)
        (tmp / "old_server.py").write_text(old_src)
        servers = {
            "old": [sys.executable, "-c", OLD_LAUNCHER, str(tmp / "old_server.py"), str(ckpt), str(args.max_batch)],
            "new": [sys.executable, "-m", "tiaoyu_cli", "serve", str(ckpt), "--port", "0", "--quiet", "--device", "cpu",
                    "--mode", "complete", "--max-batch", str(args.max_batch), "--max-queue", "256"],
        }
        procs = {k: start_server(cmd, env) for k, cmd in servers.items()}
        try:
            rng = random.Random(0)
            words = "Tosi has a pet named Vinay who lives in the city of Mara and likes the colour".split()
            bodies = [{"prompt": " ".join(rng.choice(words) for _ in range(rng.randint(3, 30))),
                       "max_tokens": args.max_tokens if args.lengths == "fixed" else rng.randint(8, 2 * args.max_tokens - 8),
                       "temperature": 0, "stop": ["\u2603never\u2603"]}
                      for _ in range(64)]
            checks = {}
            for k, (_, port) in procs.items():
                request(port, bodies[0])  # warm up
                status, body, _ = request(port, {"prompt": "x", "max_tokens": 10**6})
                checks[k] = status
            results = []
            for c in (int(x) for x in args.clients.split(",")):
                total = max(args.requests, 4 * c) if c <= 8 else max(args.requests, c)
                runs: dict[str, list[dict]] = {"old": [], "new": []}
                for rnd in range(args.rounds):  # old/new alternate, and which goes first alternates too
                    for k in (("old", "new") if rnd % 2 == 0 else ("new", "old")):
                        runs[k].append(load_level(procs[k][1], c, total, bodies))
                row = {"clients": c, "requests": total, "rounds": args.rounds}
                for k, rs in runs.items():
                    lat = sorted(x for r in rs for x in r.pop("latencies"))
                    row[k] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                              "p50_s": percentile(lat, 0.5), "p99_s": percentile(lat, 0.99),
                              "answered": sum(r["answered"] for r in rs), "errors": [e for r in rs for e in r["errors"]],
                              "tokens_per_s_runs": [r["tokens_per_s"] for r in rs]}
                row["tokens_per_s_ratio"] = round(row["new"]["tokens_per_s"] / row["old"]["tokens_per_s"], 2)
                row["ratio_per_round"] = [round(n["tokens_per_s"] / o["tokens_per_s"], 2)
                                          for n, o in zip(runs["new"], runs["old"])]
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            for p, _ in procs.values():
                p.terminate()
                p.wait(timeout=30)
    print(json.dumps({"bench": "serve", "preset": args.preset if not args.ckpt else str(args.ckpt),
                      "max_tokens": args.max_tokens, "lengths": args.lengths, "max_batch": args.max_batch, "old_rev": rev,
                      "bad_request_status": checks, "load_avg_1min": round(os.getloadavg()[0], 2),
                      "machine": f"{os.cpu_count()}-core CPU, shared, one torch thread per server", "results": results}))


def soak_main(args) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    clients = int(args.clients) if args.clients.isdigit() else 8
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        ckpt = Path(args.ckpt) if args.ckpt else make_checkpoint(Path(tmp), args.preset)
        proc, port = start_server([sys.executable, "-m", "tiaoyu_cli", "serve", str(ckpt), "--port", "0", "--quiet",
                                   "--device", "cpu", "--mode", "complete", "--max-batch", str(args.max_batch),
                                   "--max-queue", "256"], env)
        try:
            rng = random.Random(0)
            words = "Tosi has a pet named Vinay who lives in the city of Mara and likes the colour".split()
            bodies = [{"prompt": " ".join(rng.choice(words) for _ in range(rng.randint(3, 30))), "max_tokens": 8,
                       "temperature": 0} for _ in range(64)]
            out = soak(proc, port, args.soak, clients, bodies)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(json.dumps({"bench": "serve-soak", "preset": args.preset if not args.ckpt else str(args.ckpt),
                      "load_avg_1min": round(os.getloadavg()[0], 2),
                      "machine": f"{os.cpu_count()}-core CPU, shared, one torch thread", **out}))


if __name__ == "__main__":
    main()
