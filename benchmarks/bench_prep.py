"""Benchmark `tiaoyu prep`: MB/s and peak RSS on a generated ~500 MB input (goal: peak RSS < 300 MB).

    .venv/bin/python benchmarks/bench_prep.py [--mb 500] [--shuffle] [--near-dup]
    .venv/bin/python benchmarks/bench_prep.py --mb 100 --workers 1,2 --rounds 3   # scaling with processes

The input is JSON Lines in a temp folder: 85% text records (English and Chinese sentences,
some with control characters and extra spaces, 3% exact duplicates) and 15% Alpaca records,
about 600 bytes per record. Each command runs as a child process; its peak RSS comes from
os.wait4 (that child only).

  * ours: `tiaoyu prep input.jsonl -o out.jsonl -q` (detect, convert, clean, exact dedup, write)
    and, with --shuffle / --near-dup, the same plus `--shuffle --split val=0.01` / `--near-dup`;
  * reference: a plain Python loop that only parses and re-dumps every line with orjson
    (the floor any JSONL filter in Python pays);
  * engine only: the same `run_prep` call from a bare `python -c` (no CLI imports), which
    separates prep's own memory from what importing every subcommand costs;
  * startup: `tiaoyu --help`, the RSS of merely starting the CLI (imports).

With --workers W1,W2,…: `tiaoyu prep --workers W` for each W, interleaved with the orjson
reference in every round (ref, W1, W2, … per round) so that load from other processes on a
shared machine hits them alike; the figure per side is the best round (MB/s) and the median.
Besides wall-clock MB/s each run reports CPU seconds (the child and its worker processes,
from os.wait4) — on a busy machine wall-clock speedups understate what free cores give. Each round
also times a pure-Python loop in W1, W2, … processes at once: `machine_scaling_wW` is what W
processes gain over W1 on this machine in that round (a shared VM's two vCPUs do not always give
2×), the ceiling to read prep's `speedup_wW` against.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
TIAOYU = str(Path(sys.executable).with_name("tiaoyu"))

EN = ("the a quick brown fox jumps over lazy dog river mountain city people small model learns "
      "every word from data and writes tokens into shards while cats sleep near warm windows").split()
ZH = list("我们今天学习语言模型数据清洗分词训练城市河流山川小猫晚上白天天气很好吃饭读书写字")


def generate(path: Path, target_mb: float, seed: int = 0) -> tuple[int, int]:
    rng = random.Random(seed)
    pool = []
    for i in range(4000):
        if i % 2:
            s = " ".join(rng.choice(EN) for _ in range(rng.randint(60, 140))) + "."
        else:
            s = "".join(rng.choice(ZH) for _ in range(rng.randint(80, 200))) + "。"
        if i % 7 == 0:
            s = s.replace(" ", "   ", 3) + " \x1b[0m\x07"
        pool.append(s)
    target = int(target_mb * 1e6)
    n = size = 0
    with open(path, "wb", buffering=1 << 22) as f:
        chunk = []
        while size < target:
            r = rng.random()
            base = pool[rng.randrange(len(pool))]
            if r < 0.03:  # exact duplicate of a recent record
                line = chunk[-1] if chunk else orjson.dumps({"text": base}) + b"\n"
            elif r < 0.18:
                half = len(base) // 2
                line = orjson.dumps({"instruction": f"Summarise #{n}", "input": base[:half], "output": base[half:]}) + b"\n"
            else:
                line = orjson.dumps({"text": f"{base} #{n}"}) + b"\n"
            chunk.append(line)
            size += len(line)
            n += 1
            if len(chunk) >= 10000:
                f.write(b"".join(chunk))
                chunk = []
        f.write(b"".join(chunk))
    return n, size


REFERENCE = """
import sys, orjson
src, dst = sys.argv[1], sys.argv[2]
with open(src, 'rb') as f, open(dst, 'wb', buffering=1 << 20) as out:
    for line in f:
        if line.strip():
            out.write(orjson.dumps(orjson.loads(line)) + b'\\n')
"""

ENGINE = """
import sys
from tiaoyu_cli.data.prep import PrepConfig, run_prep
run_prep([sys.argv[1]], sys.argv[2], PrepConfig())
"""


def measure(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = p.stderr.read() if p.stderr else b""
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {err.decode()[-2000:]}")
    return {"seconds": round(dt, 2), "peak_rss_mb": round(ru.ru_maxrss / 1024, 1),
            "cpu_s": round(ru.ru_utime + ru.ru_stime, 2)}


SPIN = """
d = {}
for i in range(6_000_000):
    d[i & 1023] = str(i)
"""


def spin(k: int) -> float:
    """Seconds for k processes each running the same pure-Python loop at once: k × t(1) / t(k) is
    what k processes can gain on this machine at this moment (the ceiling for prep's speedup)."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(k)]
    for p in procs:
        p.wait()
    return time.perf_counter() - t0


def scaling(src: Path, tmp: Path, mb: float, workers: list[int], rounds: int) -> dict:
    """ref, prep -j W1, prep -j W2, … in each round, and the pure-Python loop in W1, W2, … processes
    (the machine's own scaling, same round); outputs checked byte-identical."""
    runs: dict[str, list[dict]] = {"ref": [], **{f"w{w}": [] for w in workers}}
    spins: dict[int, list[float]] = {w: [] for w in workers}
    digests = set()
    for _ in range(rounds):
        runs["ref"].append(measure([sys.executable, "-c", REFERENCE, str(src), str(tmp / "ref.jsonl")]))
        for w in workers:
            out = tmp / f"w{w}.jsonl"
            runs[f"w{w}"].append(measure([TIAOYU, "prep", str(src), "-o", str(out), "-q", "--workers", str(w)]))
            digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
            out.unlink()
            spins[w].append(spin(w))
    import statistics

    res: dict = {"rounds": rounds, "identical_outputs": len(digests) == 1, "load_avg_1min": round(os.getloadavg()[0], 2)}
    for k, rs in runs.items():
        res[k] = {"best_mb_s": round(mb / min(r["seconds"] for r in rs), 1),
                  "median_mb_s": round(mb / statistics.median(r["seconds"] for r in rs), 1),
                  "mb_per_cpu_s": round(mb / statistics.median(r["cpu_s"] for r in rs), 1),
                  "runs_s": [r["seconds"] for r in rs], "cpu_s": [r["cpu_s"] for r in rs]}
    base = res[f"w{workers[0]}"]
    w0 = workers[0]
    for w in workers[1:]:
        res[f"speedup_w{w}_best"] = round(res[f"w{w}"]["best_mb_s"] / base["best_mb_s"], 2)
        res[f"speedup_w{w}_median"] = round(res[f"w{w}"]["median_mb_s"] / base["median_mb_s"], 2)
        res[f"speedup_w{w}_per_round"] = [round(a["seconds"] / b["seconds"], 2)
                                          for a, b in zip(runs[f"w{w0}"], runs[f"w{w}"])]
        machine = [round(w / w0 * a / b, 2) for a, b in zip(spins[w0], spins[w])]
        res[f"machine_scaling_w{w}_per_round"] = machine  # the same pure-Python loop in w vs w0 processes
        res[f"machine_scaling_w{w}_median"] = statistics.median(machine)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=500.0)
    ap.add_argument("--shuffle", action="store_true", help="also measure --shuffle --split val=0.01")
    ap.add_argument("--near-dup", action="store_true", help="also measure --near-dup")
    ap.add_argument("--workers", default="", help="comma list, e.g. 1,2: only the scaling runs, interleaved with the reference")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the scaling runs")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-prep-"))
    try:
        src = tmp / "input.jsonl"
        t0 = time.perf_counter()
        n, size = generate(src, args.mb)
        gen_s = time.perf_counter() - t0
        mb = size / 1e6
        if args.workers:
            res = scaling(src, tmp, mb, [int(w) for w in args.workers.split(",")], args.rounds)
            print(json.dumps({"bench": "prep_workers", "input_mb": round(mb, 1), "input_records": n, **res,
                              "machine": f"{os.cpu_count()}-core CPU, shared, no GPU"}))
            return
        startup = measure([TIAOYU, "--help"])
        ref = measure([sys.executable, "-c", REFERENCE, str(src), str(tmp / "ref.jsonl")])
        (tmp / "ref.jsonl").unlink()
        ours = measure([TIAOYU, "prep", str(src), "-o", str(tmp / "out.jsonl"), "-q"])
        engine = measure([sys.executable, "-c", ENGINE, str(src), str(tmp / "engine.jsonl")])
        (tmp / "engine.jsonl").unlink()
        kept = sum(1 for _ in open(tmp / "out.jsonl", "rb"))
        (tmp / "out.jsonl").unlink()
        result = {
            "bench": "prep",
            "input_mb": round(mb, 1),
            "input_records": n,
            "kept_records": kept,
            "generate_s": round(gen_s, 1),
            "prep_mb_s": round(mb / ours["seconds"], 1),
            "prep_peak_rss_mb": ours["peak_rss_mb"],
            "engine_only_mb_s": round(mb / engine["seconds"], 1),
            "engine_only_peak_rss_mb": engine["peak_rss_mb"],
            "ref_orjson_roundtrip_mb_s": round(mb / ref["seconds"], 1),
            "ref_peak_rss_mb": ref["peak_rss_mb"],
            "cli_startup_peak_rss_mb": startup["peak_rss_mb"],
            "goal_peak_rss_mb": 300,
        }
        if args.shuffle:
            sh = measure([TIAOYU, "prep", str(src), "-o", str(tmp / "sh.jsonl"), "--shuffle", "--split", "val=0.01", "-q"])
            result["prep_shuffle_split_mb_s"] = round(mb / sh["seconds"], 1)
            result["prep_shuffle_split_peak_rss_mb"] = sh["peak_rss_mb"]
        if args.near_dup:
            nd = measure([TIAOYU, "prep", str(src), "-o", str(tmp / "nd.jsonl"), "--near-dup", "-q"])
            result["prep_near_dup_mb_s"] = round(mb / nd["seconds"], 1)
            result["prep_near_dup_peak_rss_mb"] = nd["peak_rss_mb"]
        result["machine"] = f"{os.cpu_count()}-core CPU, no GPU"
        print(json.dumps(result))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
