"""tiaoyu prep at scale: --workers gives the same bytes as one worker, --shard slices cover every
line exactly once, and --merge of the shard outputs equals one run over everything."""

from __future__ import annotations

import gzip
import io
import random
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tiaoyu_cli.data.dedup import U64Set
from tiaoyu_cli.data.prep import PrepConfig, run_prep
from tiaoyu_cli.data.prep_io import Source, iter_blocks, plan_shard, seek_line_start
from tiaoyu_cli.errors import DataError, TiaoyuError

TIAOYU = str(Path(sys.executable).with_name("tiaoyu"))
EN = "the quick brown fox jumps over a lazy dog near the river while small models learn every word".split()
ZH = list("我们今天学习语言模型数据清洗分词训练城市河流山川小猫晚上白天天气很好吃饭读书写字")


def dirty_corpus(root: Path, seed: int = 0, n: int = 900) -> list[Path]:
    """Mixed languages and formats, exact and near duplicates, control characters, ANSI escapes,
    odd whitespace, blank lines, invalid UTF-8, malformed lines, a .txt, a .json and a .gz file."""
    rng = random.Random(seed)

    def sentence() -> str:
        if rng.random() < 0.5:
            return " ".join(rng.choice(EN) for _ in range(rng.randint(8, 40)))
        return "".join(rng.choice(ZH) for _ in range(rng.randint(10, 60))) + "。"

    pool = [sentence() for _ in range(300)]
    lines: list[bytes] = []
    for i in range(n):
        r = rng.random()
        s = rng.choice(pool)
        if r < 0.08 and lines:
            lines.append(rng.choice(lines))  # exact duplicate of an earlier line
        elif r < 0.14:
            lines.append(orjson.dumps({"text": s + "  \x1b[31m!\x1b[0m\x07 "}))  # cleans to a duplicate sometimes
        elif r < 0.2:
            w = s.split(" ")
            lines.append(orjson.dumps({"text": " ".join(w[:-1] + ["CHANGED"])}))  # near duplicate
        elif r < 0.3:
            lines.append(orjson.dumps({"instruction": s[:20], "input": "", "output": s}))
        elif r < 0.36:
            lines.append(orjson.dumps({"conversations": [{"from": "human", "value": s[:15]}, {"from": "gpt", "value": s}]}))
        elif r < 0.40:
            lines.append(orjson.dumps({"prompt": s[:10], "chosen": s, "rejected": s[::-1]}))
        elif r < 0.42:
            lines.append(b"")  # blank line
        elif r < 0.44:
            lines.append(b'{"text": "bad \xff byte ' + str(i).encode() + b'"}')  # invalid UTF-8
        elif r < 0.46:
            lines.append(b'{"text": "unterminated')  # malformed
        elif r < 0.47:
            lines.append(orjson.dumps({"text": "   "}))  # empty after cleaning
        else:
            lines.append(orjson.dumps({"text": f"{s} #{i % 97}"}))
    root.mkdir(parents=True, exist_ok=True)
    a = root / "a.jsonl"
    a.write_bytes(b"\n".join(lines[: n // 2]) + b"\n")
    b = root / "b.jsonl"
    b.write_bytes(b"\r\n".join(lines[n // 2:]))  # CRLF, no final newline
    t = root / "c.txt"
    t.write_text("\n\n".join(rng.choice(pool) for _ in range(40)) + "\n", "utf-8")
    j = root / "d.json"
    j.write_bytes(orjson.dumps([{"text": rng.choice(pool)} for _ in range(30)]))
    g = root / "e.jsonl.gz"
    g.write_bytes(gzip.compress(b"\n".join(lines[:100]) + b"\n"))
    return [a, t, b, j, g]


def run(tmp: Path, name: str, inputs, **kw):
    out = tmp / f"{name}.jsonl"
    cfg = dict(skip_bad=True, errors="replace", block_bytes=700)
    cfg.update(kw)
    st = run_prep([str(i) for i in inputs], str(out), PrepConfig(**cfg))
    assert st.read == st.kept + sum(st.dropped.values())
    return out, st


def files(out: Path, split: bool) -> list[bytes]:
    if not split:
        return [out.read_bytes()]
    stem = str(out)[: -len(".jsonl")]
    return [Path(stem + ".train.jsonl").read_bytes(), Path(stem + ".val.jsonl").read_bytes()]


@pytest.mark.parametrize("opts", [{}, {"near_dup": True, "val_frac": 0.2}, {"shuffle": True, "seed": 3}],
                         ids=["plain", "near-dup+split", "shuffle"])
def test_workers_output_identical_to_one_worker(tmp_path, opts):
    inputs = dirty_corpus(tmp_path / "raw")
    one, st1 = run(tmp_path, "one", inputs, workers=1, **opts)
    split = bool(opts.get("val_frac"))
    ref = files(one, split)
    assert st1.kept > (200 if opts.get("near_dup") else 500) and st1.dropped["duplicate"] > 30 and st1.dropped["bad record"] > 5
    assert st1.dropped["invalid UTF-8"] == 0  # --errors replace keeps them
    if opts.get("near_dup"):
        assert st1.dropped["near-duplicate"] > 5 and st1.kept_val > 50
    for w in (2, 3):
        out, st = run(tmp_path, f"w{w}", inputs, workers=w, **opts)
        assert files(out, split) == ref, w
        assert (st.read, st.kept_train, st.kept_val, st.dropped, st.kinds) == \
               (st1.read, st1.kept_train, st1.kept_val, st1.dropped, st1.kinds)
    # a larger block size: other cut points, the same bytes
    out, _ = run(tmp_path, "big", inputs, workers=2, block_bytes=1 << 16, **opts)
    assert files(out, split) == ref


def test_workers_raise_the_first_error_in_input_order(tmp_path):
    lines = [orjson.dumps({"text": f"record {i}"}) for i in range(400)]
    lines[123] = b'{"text": 5}'
    lines[350] = b"{nope"
    f = tmp_path / "x.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    for w in (1, 2):
        with pytest.raises(DataError, match=r"x\.jsonl:124: field 'text'"):
            run_prep([str(f)], str(tmp_path / "o.jsonl"), PrepConfig(workers=w, block_bytes=300))
        assert not (tmp_path / "o.jsonl").exists()


def test_shard_slices_cover_every_line_once_with_right_line_numbers(tmp_path):
    rng = random.Random(1)
    data = b"".join(b"x" * rng.randint(0, 30) + b"\n" for _ in range(300)) + b"tail-without-newline"
    f = tmp_path / "s.jsonl"
    f.write_bytes(data)
    want = data.split(b"\n")
    for n in (1, 2, 3, 7, 50, 600):
        got: list[tuple[int, bytes]] = []
        for i in range(n):
            for src in plan_shard([Source(str(f), len(data))], i, n):
                with open(f, "rb") as fh:
                    pos, lineno = seek_line_start(fh, src.start)
                    for block, first in iter_blocks(fh, 64, b"", lineno, pos, src.end):
                        got += [(first + k, x) for k, x in enumerate(block.split(b"\n")[: block.count(b"\n") + (not block.endswith(b"\n"))])]
        assert [x for _, x in got] == want, n
        assert [k for k, _ in got] == list(range(1, len(want) + 1)), n


def test_shards_then_merge_equal_one_run(tmp_path):
    inputs = dirty_corpus(tmp_path / "raw", seed=2)
    one, st1 = run(tmp_path, "one", inputs)
    for n in (2, 3, 5):
        parts = []
        for i in range(n):
            out, st = run(tmp_path, f"part{n}-{i}", inputs, shard=(i, n), workers=2 if i % 2 else 1)
            parts.append(out)
        merged, stm = run(tmp_path, f"merged{n}", parts, merge=True, workers=2)
        assert merged.read_bytes() == one.read_bytes(), n
        assert stm.kinds == st1.kinds
    # with --split: the val decision is a function of the record, so merging re-splits identically
    one, _ = run(tmp_path, "one-split", inputs, val_frac=0.25)
    parts = [run(tmp_path, f"ps{i}", inputs, shard=(i, 3))[0] for i in range(3)]
    merged, _ = run(tmp_path, "merged-split", parts, merge=True, val_frac=0.25)
    assert files(merged, True) == files(one, True)


def test_merge_drops_near_duplicates_across_shards_and_rejects_raw_records(tmp_path):
    words = [f"w{i}" for i in range(120)]
    base = " ".join(words)
    near = " ".join(words[:60] + ["X"] + words[61:])
    a = tmp_path / "a.jsonl"
    a.write_bytes(orjson.dumps({"text": base}) + b"\n" + orjson.dumps({"text": "other"}) + b"\n")
    b = tmp_path / "b.jsonl"
    b.write_bytes(orjson.dumps({"text": near}) + b"\n" + orjson.dumps({"text": "other"}) + b"\n")
    out, st = run(tmp_path, "m", [a, b], merge=True, near_dup=True)
    assert [orjson.loads(x)["text"] for x in out.read_bytes().splitlines()] == [base, "other"]
    assert st.dropped["near-duplicate"] == 1 and st.dropped["duplicate"] == 1
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(orjson.dumps({"instruction": "q", "output": "a"}) + b"\n")
    with pytest.raises(DataError, match=r"raw\.jsonl:1: not a record that tiaoyu prep writes"):
        run_prep([str(a), str(raw)], str(tmp_path / "bad.jsonl"), PrepConfig(merge=True))
    with pytest.raises(TiaoyuError, match="--to does not apply"):
        run_prep([str(a)], str(tmp_path / "bad.jsonl"), PrepConfig(merge=True, to="chat"))


def test_bad_options(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_bytes(b'{"text": "a"}\n')
    for kw, msg in ((dict(workers=-1), "--workers"), (dict(shard=(2, 2)), "--shard"), (dict(shard=(0, 0)), "--shard")):
        with pytest.raises(TiaoyuError, match=msg):
            run_prep([str(f)], str(tmp_path / "o.jsonl"), PrepConfig(**kw))


def test_u64set_add_many_equals_one_at_a_time():
    rng = random.Random(0)
    a, b, ref = U64Set(4), U64Set(4), set()
    for _ in range(40):
        hs = [rng.randrange(1, 200) if rng.random() < 0.5 else rng.randrange(1, 1 << 64) for _ in range(rng.randrange(0, 400))]
        hs += [(k << 40) | 7 for k in range(1, 20)]  # equal low bits: long probe chains
        want = []
        for h in hs:
            want.append(h not in ref)
            ref.add(h)
        assert [a.add(h) for h in hs] == want
        assert b.add_many(hs).tolist() == want
    assert len(a) == len(b) == len(ref) and all(h in b for h in ref)


def test_cli_workers_shard_merge(tmp_path):
    inputs = dirty_corpus(tmp_path / "raw", seed=4, n=300)
    args = [str(p) for p in inputs] + ["--skip-bad", "--errors", "replace", "-q"]

    def tiaoyu(*a):
        return subprocess.run([TIAOYU, "prep", *a], capture_output=True, timeout=300, cwd=tmp_path)

    r1, r2 = tiaoyu(*args), tiaoyu(*args, "--workers", "2")
    assert r1.returncode == 0 and r2.returncode == 0, r2.stderr.decode()
    assert r1.stdout == r2.stdout and r1.stdout
    for i in range(2):
        r = tiaoyu(*args, "--shard", f"{i}/2", "-o", f"p{i}.jsonl")
        assert r.returncode == 0, r.stderr.decode()
    r = tiaoyu("--merge", "p0.jsonl", "p1.jsonl", "-q")
    assert r.returncode == 0 and r.stdout == r1.stdout
    r = tiaoyu(*args, "--shard", "2/2")
    assert r.returncode == 2 and b"--shard" in r.stderr and not r.stdout
    assert io.BytesIO(r1.stdout).read(1) == b"{"


def test_located_blocks_are_the_read_blocks(tmp_path):
    """The parent of --workers finds block edges by seeking (locate_blocks): whole lines, at least `size`
    bytes each but the last, covering exactly the lines that reading covers."""
    from tiaoyu_cli.data.prep_io import iter_blocks, locate_blocks

    rng = random.Random(3)
    for tail in (b"", b"last line without newline"):
        data = b"".join(b"y" * rng.choice((0, 1, 5, 40, 700)) + b"\n" for _ in range(400)) + tail
        f = tmp_path / "b.jsonl"
        f.write_bytes(data)
        for size in (1, 7, 64, 1000, 1 << 20):
            for start, end in ((0, len(data)), (0, 501), (data.index(b"\n", 900) + 1, 3000)):
                with open(f, "rb") as fh:
                    fh.seek(start)
                    read = [b for b, _ in iter_blocks(fh, size, b"", 1, start, end)]
                with open(f, "rb") as fh:
                    located = [data[o:o + n] for o, n in locate_blocks(fh, size, start, end)]
                assert b"".join(located) == b"".join(read), (size, start, end)
                assert all(b.endswith(b"\n") and len(b) >= size for b in located[:-1])
                assert located[-1].endswith(b"\n") or start + sum(map(len, located)) == len(data)


def test_workers_number_lines_of_a_shard(tmp_path):
    lines = [orjson.dumps({"text": f"record {i}"}) for i in range(400)]
    lines[301] = b'{"text": 5}'
    f = tmp_path / "x.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    for w in (1, 2):
        with pytest.raises(DataError, match=r"x\.jsonl:302: field 'text'"):
            run_prep([str(f)], str(tmp_path / "o.jsonl"), PrepConfig(workers=w, block_bytes=200, shard=(1, 2)))


_BIG_JOBS = r"""
import orjson, sys
from tiaoyu_cli.data.prep import PrepConfig
from tiaoyu_cli.data.prep_records import Workers
jobs = [("jsonl", orjson.dumps({"text": "word " * 400 + str(i)}, option=orjson.OPT_APPEND_NEWLINE) * 1500, "x.jsonl", 1)
        for i in range(12)]  # ~3 MB each
w = Workers(PrepConfig(), 2)
try:
    tickets = [w.submit(j) for j in jobs]  # all sent before any result is read
    res = [t.get() for t in tickets]
finally:
    w.close()
assert [r.read for r in res] == [1500] * 12
assert [bytes(r.blob[r.offsets[0]:r.offsets[1]]).rstrip().endswith(b'%d"}' % i) for i, r in enumerate(res)] == [True] * 12
print("ok")
"""


def test_workers_take_big_jobs_and_results_without_blocking(tmp_path):
    """Jobs and results larger than a socket's buffer, all jobs sent before any result is read: each
    worker keeps reading jobs while it waits to send, so nothing blocks; results come back in order."""
    r = subprocess.run([sys.executable, "-c", _BIG_JOBS], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_worker_errors_and_deaths_reach_the_parent(tmp_path):
    import os
    import signal

    from tiaoyu_cli.data.prep_records import Workers
    f = tmp_path / "a.jsonl"
    f.write_bytes(b'{"text": "hello there"}\n')
    w = Workers(PrepConfig(), 2)
    try:
        bad = w.submit(("jsonl", (0, 10), str(tmp_path / "gone.jsonl"), None, 0))
        good = w.submit(("jsonl", (0, f.stat().st_size), str(f), None, 0))
        with pytest.raises(FileNotFoundError):
            bad.get()
        assert good.get().read == 1  # the pool goes on after an exception
        for p in w.procs:
            os.kill(p.pid, signal.SIGKILL)
            p.join(5)
        with pytest.raises(RuntimeError, match=r"prep worker process died \(exit code -9\)"):
            w.submit(("jsonl", (0, f.stat().st_size), str(f), None, 0)).get()
    finally:
        w.close()
