"""`tiaoyu tokenize train|encode|show` end to end: real processes and pipes, stdout holds data
only, and user errors end with one clear line and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tiaoyu_cli.data.shards import open_tokens
from tiaoyu_cli.tokenizer import Tokenizer
from tokenizer_corpus import make_records, write_jsonl

TIAOYU = [sys.executable, "-m", "tiaoyu_cli"]


def run(args: list[str], stdin: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run(TIAOYU + args, input=stdin, capture_output=True, cwd=cwd, env=env, timeout=120)


def run_shell(cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "120", "TIAOYU": " ".join(TIAOYU)}
    return subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, cwd=cwd, env=env, timeout=120)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    write_jsonl(d / "data.jsonl", make_records(900))
    return d


def test_train_from_a_pipe_then_encode_then_show(work, capsys):
    r = run_shell("cat data.jsonl | $TIAOYU tokenize train - -o tok --vocab-size 600", work)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == b""  # stdout is for data only
    err = r.stderr.decode()
    assert "training time" in err and "chars/token" in err and "600" in err
    tok = Tokenizer.load(work / "tok")
    assert tok.vocab_size == 600

    # the other two commands in-process (each `tiaoyu` start-up costs seconds on a busy machine)
    from tiaoyu_cli.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["tokenize", "encode", str(work / "data.jsonl"), "--tokenizer", str(work / "tok"),
              "-o", str(work / "tokens"), "--workers", "2", "--shard-tokens", "4000"])
    assert e.value.code == 0
    out = capsys.readouterr()
    assert out.out == "" and "MB/s" in out.err
    train, val = open_tokens(work / "tokens")
    assert train.num_documents + val.num_documents == 900 and val.num_documents == 9
    assert len(train.arrays()) > 1 and train.fingerprint == tok.fingerprint
    stream = np.concatenate(train.arrays())
    assert stream[0] == tok.bos_id and stream[-1] == tok.eos_id

    text = "文本 text 12345 😀 <|im_end|>\n"
    with pytest.raises(SystemExit) as e:
        main(["tokenize", "show", str(work / "tok"), text])
    assert e.value.code == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    ids = tok.encode(text)
    assert [int(line.split("\t")[0]) for line in lines] == ids
    assert lines[0].split("\t")[1] == tok.id_to_piece(ids[0])
    assert lines[-1] == f"{ids[-1]}\t\\n"  # the newline piece, escaped so that one token stays one line
    assert "tokens" in out.err


def test_prep_pipe_into_tokenize_train(work):
    from tiaoyu_cli.cli.main import COMMANDS

    if "prep" not in COMMANDS:
        pytest.skip("`tiaoyu prep` is not registered yet")
    raw = work / "raw"
    raw.mkdir(exist_ok=True)
    for k, rec in enumerate(make_records(600, seed=5)):
        if "text" in rec:
            (raw / f"doc{k}.txt").write_text(rec["text"] + "\n", encoding="utf-8")
    r = run_shell("$TIAOYU prep raw/ | $TIAOYU tokenize train - -o tok_prep --vocab-size 500", work)
    assert r.returncode == 0, r.stderr.decode()
    assert Tokenizer.load(work / "tok_prep").vocab_size == 500


def test_errors_exit_2_with_one_clear_line(work, tmp_path):
    r = run(["tokenize", "encode", "data.jsonl", "--tokenizer", str(tmp_path / "missing"), "-o", str(tmp_path / "t")], cwd=work)
    err = r.stderr.decode()
    assert r.returncode == 2 and "Traceback" not in err
    assert err.strip().startswith("error:") and "does not exist" in err
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("args,needle", [
    (["tokenize", "train", "{data}", "-o", "{tmp}/t", "--vocab-size", "100000"], "too large for this corpus"),
    (["tokenize", "train", "{data}", "-o", "{tmp}/t", "--vocab-size", "100"], "too small"),
    (["tokenize", "train", "{tmp}/empty.jsonl", "-o", "{tmp}/t"], "empty input"),
    (["tokenize", "train", "{tmp}/nope.jsonl", "-o", "{tmp}/t"], "no such file"),
    (["tokenize", "train", "{data}", "-o", "{tmp}/t", "--algo", "bytes"], "unknown --algo"),
    (["tokenize", "encode", "{data}", "-t", "{tmp}", "-o", "{tmp}/t"], "missing tokenizer.model"),
    (["tokenize", "encode", "{data}", "-t", "{tok}", "-o", "{tmp}/t", "--val", "{data}", "--val-ratio", "0.1"],
     "not both"),
    (["tokenize", "encode", "{tmp}/empty.jsonl", "-t", "{tok}", "-o", "{tmp}/t"], "empty input"),
    (["tokenize", "show", "{tmp}", "hello"], "missing tokenizer.model"),
])
def test_error_paths_in_process(work, tmp_path, capsys, args, needle):
    from tiaoyu_cli.cli.main import main

    if not (work / "tok").exists():  # the pipe test made it; build it here when run alone
        from tiaoyu_cli.tokenizer import train_tokenizer

        train_tokenizer([str(work / "data.jsonl")], work / "tok", vocab_size=600)
    (tmp_path / "empty.jsonl").write_text("")
    argv = [a.format(data=work / "data.jsonl", tmp=tmp_path, tok=work / "tok") for a in args]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and needle in " ".join(err.split()), err
    assert not (tmp_path / "t").exists()
