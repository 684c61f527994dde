"""Benchmark the BM25 index: build time and query latency on a generated 100k-passage corpus
(goals: build < 60 s, query < 50 ms on a 2-core CPU), bm25s against a plain-Python BM25 loop.

    .venv/bin/python benchmarks/bench_retrieval.py [--passages 100000] [--queries 200]

Corpus: passages of 25–60 terms, half English (words drawn Zipf-like from 30,000 generated
words) and half Chinese (characters drawn Zipf-like from 3,000 CJK characters), ~70 characters
to ~120 characters each, plus one planted "needle" passage per query so every query has a right answer.
Queries: 4 words (English) or 6 characters (Chinese) taken from their needle passage.

  * ours: `tiaoyu_cli.data.retrieval` — analyze (CJK uni/bigrams, words) + bm25s index, then
    `Retriever.search(q, k=3)`; save + load of the index folder timed too.
  * reference: `PlainBM25` — the same scores from a dict of postings and a Python loop over each
    query term's postings (build = analyze + postings + idf).
Both answer the same queries in the same run; the needle's rank-1 rate is reported for each
(the scores are the same, so the two must agree).

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tiaoyu_cli.data.retrieval import Passage, PlainBM25, Retriever, analyze, query_terms  # noqa: E402


def zipf_pick(rng: random.Random, items: list[str], n: int) -> list[str]:
    # weights ∝ 1/rank: a few very common terms (long postings), a long tail of rare ones
    return rng.choices(items, cum_weights=CUM[len(items)], k=n)


CUM: dict[int, list[float]] = {}


def make_corpus(n: int, n_queries: int, seed: int = 0) -> tuple[list[Passage], list[tuple[str, int]]]:
    rng = random.Random(seed)
    syll = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"]
    words = list(dict.fromkeys(rng.choice(syll) + rng.choice(syll) + rng.choice(["", rng.choice(syll)])
                               for _ in range(60000)))[:30000]
    chars = [chr(0x4E00 + i) for i in rng.sample(range(20000), 3000)]
    for items in (words, chars):
        acc, c = [], 0.0
        for r in range(1, len(items) + 1):
            c += 1.0 / r
            acc.append(c)
        CUM[len(items)] = acc
    passages = []
    for i in range(n):
        if i % 2 == 0:
            passages.append(Passage(f"p{i}", " ".join(zipf_pick(rng, words, rng.randint(25, 60))).capitalize() + "."))
        else:
            passages.append(Passage(f"p{i}", "".join(zipf_pick(rng, chars, rng.randint(25, 60))) + "。"))
    queries = []
    for j in range(n_queries):  # a needle: rare terms, planted among the passages
        i = rng.randrange(n)
        if j % 2 == 0:
            rare = rng.sample(words[5000:], 4)
            text = " ".join(zipf_pick(rng, words, 20) + rare)
            q = " ".join(rare)
        else:
            rare = rng.sample(chars[1000:], 6)
            text = "".join(zipf_pick(rng, chars, 20)) + "".join(rare)
            q = "".join(rare)
        passages[i] = Passage(f"needle{j}", text)
        queries.append((q, i))
    return passages, queries


def ms(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"mean": round(1000 * statistics.fmean(xs), 2), "p50": round(1000 * xs[len(xs) // 2], 2),
            "p95": round(1000 * xs[int(len(xs) * 0.95)], 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--passages", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()

    t = time.perf_counter()
    passages, queries = make_corpus(args.passages, args.queries)
    gen_s = time.perf_counter() - t

    t = time.perf_counter()
    r = Retriever.build(passages)
    build_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        r.save(Path(tmp) / "idx")
        save_s = time.perf_counter() - t
        t = time.perf_counter()
        r = Retriever.load(Path(tmp) / "idx")
        load_s = time.perf_counter() - t
    r.search(queries[0][0], 3)  # warm-up
    lat, hit = [], 0
    for q, i in queries:
        t = time.perf_counter()
        res = r.search(q, 3)
        lat.append(time.perf_counter() - t)
        hit += bool(res) and res[0][1] == passages[i].doc_id

    t = time.perf_counter()
    ref = PlainBM25([analyze(p.text) for p in passages])
    ref_build_s = time.perf_counter() - t
    ref_lat, ref_hit = [], 0
    for q, i in queries:
        t = time.perf_counter()
        top = ref.top_k(query_terms(q), 3)
        ref_lat.append(time.perf_counter() - t)
        ref_hit += bool(top) and top[0][1] == i

    q_ms, ref_ms = ms(lat), ms(ref_lat)
    print(json.dumps({
        "bench": "retrieval", "passages": len(passages), "queries": len(queries),
        "chars_per_passage": round(sum(len(p.text) for p in passages) / len(passages), 1),
        "generate_s": round(gen_s, 1),
        "bm25s_build_s": round(build_s, 2), "bm25s_save_s": round(save_s, 2), "bm25s_load_s": round(load_s, 2),
        "bm25s_query_ms": q_ms, "bm25s_needle_top1": round(hit / len(queries), 3),
        "plain_build_s": round(ref_build_s, 2), "plain_query_ms": ref_ms,
        "plain_needle_top1": round(ref_hit / len(queries), 3),
        "query_speedup": round(ref_ms["mean"] / max(q_ms["mean"], 1e-9), 1),
        "goal_build_s": 60, "goal_query_ms": 50, "machine": f"{os.cpu_count()}-core CPU, no GPU",
        "load_average": round(os.getloadavg()[0], 1),
    }))


if __name__ == "__main__":
    main()
