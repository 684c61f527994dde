"""A real `tiaoyu serve` process for tests (test_serve, test_distill_api): started on a free loopback port,
found from the address it prints on stderr, stopped on exit."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def serve_process(ckpt, *args: str, startup: float = 180.0):
    """Yields (process, port) of `tiaoyu serve CKPT --port 0 --quiet --device cpu ARGS…`."""
    proc = subprocess.Popen([sys.executable, "-m", "tiaoyu_cli", "serve", str(ckpt), "--port", "0", "--quiet",
                             "--device", "cpu", *args], cwd=ROOT, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    try:
        port, seen = None, []
        deadline = time.time() + startup
        while port is None and time.time() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
            port = int(m.group(1)) if m else None
        assert port, "".join(seen)
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep its pipe drained
        yield proc, port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def chat_questions(synth_dir: Path, n: int) -> list[dict]:
    """The first n single-turn questions of the synthetic chat.train as {"prompt"} records."""
    import json

    recs = []
    with open(synth_dir / "chat.train.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if len(r["messages"]) == 2 and r["messages"][0]["role"] == "user":
                recs.append({"prompt": r["messages"][0]["content"]})
            if len(recs) == n:
                break
    return recs
