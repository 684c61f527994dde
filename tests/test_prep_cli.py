"""tiaoyu prep end to end through the installed command: stdout/stderr separation, stdin, pipes, errors."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import orjson

TIAOYU = str(Path(sys.executable).with_name("tiaoyu"))


def sh(cmd: str, cwd: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=cwd, input=stdin, capture_output=True, timeout=300)


def records(data: bytes) -> list[dict]:
    return [orjson.loads(x) for x in data.splitlines()]


def test_prep_folder_to_stdout_redirect(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text("Hello   world.\n\n\x1b[31mred\x1b[0m text\n\nHello   world.\n", "utf-8")
    (raw / "b.jsonl").write_bytes(orjson.dumps({"instruction": "Say hi", "output": "hi"}) + b"\n")
    r = sh(f"{shlex.quote(TIAOYU)} prep raw/ > data.jsonl", tmp_path)
    assert r.returncode == 0, r.stderr.decode()
    assert records((tmp_path / "data.jsonl").read_bytes()) == [
        {"text": "Hello world."}, {"text": "red text"},
        {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]}]
    err = r.stderr.decode()
    assert "kept" in err and "duplicate" in err and "records read" in err


def test_stdin_jsonl_text_and_split_files(tmp_path):
    r = sh(f"{shlex.quote(TIAOYU)} prep -", tmp_path, stdin=b'{"text": "from stdin"}\n{"prompt": "q", "answer": "1"}\n')
    assert r.returncode == 0, r.stderr.decode()
    assert records(r.stdout) == [{"text": "from stdin"}, {"prompt": "q", "answer": "1"}]
    docs = "".join(f"doc {i}\n\n" for i in range(400)).encode()
    r = sh(f"{shlex.quote(TIAOYU)} prep - --shuffle --split val=0.1 -o out/ -q", tmp_path, stdin=docs)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == b"" and r.stderr == b""
    train, val = records((tmp_path / "out" / "train.jsonl").read_bytes()), records((tmp_path / "out" / "val.jsonl").read_bytes())
    assert len(train) + len(val) == 400 and 10 < len(val) < 80
    assert sorted(d["text"] for d in train + val) == sorted(f"doc {i}" for i in range(400))


def test_errors_exit_2_with_one_line_and_no_partial_output(tmp_path):
    good = b"".join(orjson.dumps({"text": f"record number {i} " + "x" * 80}) + b"\n" for i in range(12000))  # > 1 MB
    (tmp_path / "a.jsonl").write_bytes(good + b'{"text": broken}\n')
    r = sh(f"{shlex.quote(TIAOYU)} prep a.jsonl > out.jsonl", tmp_path)
    err = r.stderr.decode()
    assert r.returncode == 2 and "a.jsonl:12001: malformed JSON" in err and "Traceback" not in err
    assert (tmp_path / "out.jsonl").stat().st_size == 0  # truncated back, not half-written
    r = sh(f"{shlex.quote(TIAOYU)} prep a.jsonl -o kept.jsonl", tmp_path)
    assert r.returncode == 2 and not (tmp_path / "kept.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "out.jsonl"]
    r = sh(f"{shlex.quote(TIAOYU)} prep missing.txt", tmp_path)
    assert r.returncode == 2 and "missing.txt: no such file or folder" in r.stderr.decode() and r.stdout == b""


def test_prep_pipes_into_tokenize_train(tmp_path):
    from tiaoyu_cli.data.synth import SynthConfig, write_corpus

    write_corpus(tmp_path / "syn", SynthConfig(text_mb=0.1, records=50, val_records=10))
    t = shlex.quote(TIAOYU)
    r = sh(f"{t} prep syn/text.train.jsonl -q | {t} tokenize train - -o tok/ --vocab-size 800", tmp_path)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert (tmp_path / "tok" / "tokenizer.model").exists()


def test_a_failed_run_appending_to_stdout_keeps_every_byte_that_was_there(tmp_path):
    """`prep … >> corpus.jsonl` that fails (empty input, a bad record, an interrupt) leaves the corpus as it
    was; a run that succeeds appends after it."""
    import os
    import signal
    import time

    corpus = tmp_path / "corpus.jsonl"
    before = b'{"text": "an earlier run"}\n' * 1000
    corpus.write_bytes(before)
    (tmp_path / "empty.txt").write_text("", "utf-8")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": \n')
    for cmd in ("prep empty.txt >> corpus.jsonl", "prep bad.jsonl >> corpus.jsonl",
                "prep bad.jsonl 1<> corpus.jsonl"):
        r = sh(f"{shlex.quote(TIAOYU)} {cmd}", tmp_path)
        assert r.returncode != 0, cmd
        assert corpus.read_bytes() == before, (cmd, r.stderr.decode())
    # an interrupt: a run still reading stdin (left open; the 1 MB write returns once prep has read most of
    # it) is stopped by SIGINT. The child gets SIGINT's default disposition back: a process started with
    # SIGINT ignored (as pytest-xdist's workers run) keeps ignoring it, and Python then installs no handler.
    with open(corpus, "ab") as out:
        proc = subprocess.Popen([TIAOYU, "prep", "-"], cwd=tmp_path, stdin=subprocess.PIPE, stdout=out,
                                stderr=subprocess.PIPE,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        proc.stdin.write(b'{"text": "half way"}\n' * 50_000)
        proc.stdin.flush()
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGINT)
        proc.stdin.close()
        assert proc.wait(timeout=60) != 0
    assert corpus.read_bytes() == before
    r = sh(f"{shlex.quote(TIAOYU)} prep - >> corpus.jsonl", tmp_path, stdin=b'{"text": "a new record"}\n')
    assert r.returncode == 0, r.stderr.decode()
    data = corpus.read_bytes()
    assert data.startswith(before) and records(data[len(before):]) == [{"text": "a new record"}]
