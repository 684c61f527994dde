"""Output files and folders (tiaoyu_cli/io.py): a folder is replaced only when the new one is complete, under a
lock that a second writer of the same output meets with a clear error, through temporary names unique to
each process; a set of files (prep's train and val split) is replaced together or not at all."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pytest

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.io import atomic_dir, atomic_files, output_lock


def test_a_second_writer_of_the_same_output_gets_a_clear_error(tmp_path):
    out = tmp_path / "tokens"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("first")
        with pytest.raises(TiaoyuError, match="another running tiaoyu process"):
            with atomic_dir(out):
                pass
        with pytest.raises(TiaoyuError, match="another running tiaoyu process"):
            with output_lock(out):
                pass
    assert (out / "a").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens"]  # no lock, temp or old folder left behind
    with atomic_dir(out) as tmp:  # free again once the first is done
        (tmp / "b").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["b"]


def _hold(path: str, ready, release) -> None:
    with output_lock(Path(path)):
        ready.set()
        release.wait(30)


def test_the_lock_holds_across_processes(tmp_path):
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(str(tmp_path / "index"), ready, release))
    p.start()
    try:
        assert ready.wait(30)
        with pytest.raises(TiaoyuError, match="another running tiaoyu process"):
            with atomic_dir(tmp_path / "index"):
                pass
    finally:
        release.set()
        p.join(30)
    with atomic_dir(tmp_path / "index") as tmp:
        (tmp / "x").write_text("ok")
    assert (tmp_path / "index" / "x").read_text() == "ok"


def test_replacing_a_folder_uses_a_name_of_its_own(tmp_path, monkeypatch):
    """A stale `.NAME.old` of another run (the fixed name the replace used to go through) is left alone."""
    out = tmp_path / "report"
    with atomic_dir(out) as tmp:
        (tmp / "v1").write_text("1")
    stale = tmp_path / ".report.old"
    stale.mkdir()
    (stale / "theirs").write_text("keep")
    with atomic_dir(out) as tmp:
        (tmp / "v2").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["v2"]
    assert (stale / "theirs").read_text() == "keep"


def test_a_set_of_files_is_replaced_together_or_not_at_all(tmp_path):
    train, val = tmp_path / "d.train.jsonl", tmp_path / "d.val.jsonl"
    train.write_text("old train\n")
    val.write_text("old val\n")
    with pytest.raises(RuntimeError):
        with atomic_files([train, val]) as (ft, fv):
            ft.write(b"new train\n")
            fv.write(b"new val\n")
            raise RuntimeError("interrupted after writing both")
    assert (train.read_text(), val.read_text()) == ("old train\n", "old val\n")
    with atomic_files([train, val]) as (ft, fv):
        ft.write(b"new train\n")
        fv.write(b"new val\n")
    assert (train.read_text(), val.read_text()) == ("new train\n", "new val\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.train.jsonl", "d.val.jsonl"]
    assert oct(os.stat(train).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
