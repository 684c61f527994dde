"""tiaoyu prep reads open data: parquet files, Arrow files and `datasets` save_to_disk folders (a Dataset
and a DatasetDict). The output must be byte-equal to prep's output for the same records as JSONL;
broken inputs (a truncated file, a row with a wrong field type, a folder without its Arrow files) stop
with one error naming file, row and field, and write nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tiaoyu_cli.data.prep import PrepConfig, run_prep
from tiaoyu_cli.errors import DataError, TiaoyuError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

REPO = Path(__file__).resolve().parents[1]

TEXTS = [{"text": f"Document {i}: the  quick brown fox\r\njumps over dog {i % 7}. "} for i in range(40)] + [
    {"text": "Document 3: the  quick brown fox\r\njumps over dog 3. "},  # an exact duplicate after cleaning
    {"text": "   "},  # empty after cleaning
]

CHATS = [{"messages": [{"role": "system", "content": "Be brief."}] * (i % 2)
          + [{"role": "user", "content": f"What is {i} + {i}?"},
             {"role": "assistant", "content": f"<think>{i} and {i} make {2 * i}</think>{2 * i}"} if i % 3 == 0
             else {"role": "assistant", "content": f"It is {2 * i}."}]}
         for i in range(25)]

# an instruction dataset as the Hub ships them: extra columns, an empty input on some rows
ALPACA = [{"instruction": f"Name a colour number {i}.", "input": "" if i % 2 else f"hint {i}",
           "output": f"Colour {i}", "id": i} for i in range(20)]

PREFERENCE = [{"prompt": f"Q{i}?", "chosen": [{"role": "assistant", "content": f"good {i}"}],
               "rejected": [{"role": "assistant", "content": f"bad {i}"}]} for i in range(12)]


def jsonl(path: Path, recs: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    return path


def columns(recs: list[dict]) -> list[dict]:
    """Every record with every field of any record, null where it has none: how a table holds a mix of
    shapes (pyarrow's and datasets' from_list take the columns from the first record alone)."""
    keys = list(dict.fromkeys(k for r in recs for k in r))
    return [{k: r.get(k) for k in keys} for r in recs]


def parquet(path: Path, recs: list[dict], **kw) -> Path:
    pq.write_table(pa.Table.from_pylist(columns(recs)), str(path), **kw)
    return path


def save_to_disk(path: Path, recs: list[dict] | dict[str, list[dict]], **kw) -> Path:
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    if isinstance(recs, dict):
        ds = datasets.DatasetDict({k: datasets.Dataset.from_list(columns(v)) for k, v in recs.items()})
    else:
        ds = datasets.Dataset.from_list(columns(recs))
    ds.save_to_disk(str(path), **kw)
    return path


def prep_bytes(tmp_path: Path, inputs, name: str = "out.jsonl", **kw) -> bytes:
    out = tmp_path / name
    run_prep([str(i) for i in inputs], str(out), PrepConfig(**kw))
    return out.read_bytes()


def fails(tmp_path: Path, inputs, exc=DataError, **kw) -> str:
    """The error of a run, after checking that the run wrote nothing."""
    out = tmp_path / "fail" / "out.jsonl"
    out.parent.mkdir(exist_ok=True)
    with pytest.raises(exc) as e:
        run_prep([str(i) for i in inputs], str(out), PrepConfig(**kw))
    assert list(out.parent.iterdir()) == []
    return str(e.value)


# ----- the same bytes as JSONL ------------------------------------------------------------------


@pytest.mark.parametrize("recs", [TEXTS, CHATS, ALPACA, PREFERENCE], ids=["text", "chat", "alpaca", "preference"])
def test_parquet_gives_the_bytes_the_same_records_as_jsonl_give(tmp_path, recs):
    want = prep_bytes(tmp_path, [jsonl(tmp_path / "d.jsonl", recs)], "want.jsonl")
    assert want.count(b"\n") >= 10
    # several row groups and batches smaller than a row group: the row numbering and order hold across them
    got = prep_bytes(tmp_path, [parquet(tmp_path / "d.parquet", recs, row_group_size=7)], "got.jsonl")
    assert got == want


def test_parquet_with_options_equals_jsonl_with_the_same_options(tmp_path):
    cfg = dict(to="text", near_dup=True, shuffle=True, seed=3, val_frac=0.2, nfkc=True)
    run_prep([str(jsonl(tmp_path / "d.jsonl", CHATS + ALPACA))], f"{tmp_path}/w/", PrepConfig(**cfg))
    run_prep([str(parquet(tmp_path / "d.parquet", CHATS + ALPACA))], f"{tmp_path}/g/", PrepConfig(**cfg))
    for split in ("train.jsonl", "val.jsonl"):
        want = (tmp_path / "w" / split).read_bytes()
        assert want and (tmp_path / "g" / split).read_bytes() == want


def test_nested_messages_come_out_as_plain_lists_and_dicts(tmp_path):
    from tiaoyu_cli.data.prep_arrow import arrow_jobs, arrow_rows

    recs = [{"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "yo", "reasoning": "greet back"}], "n": 1}]
    f = parquet(tmp_path / "c.parquet", recs)
    for pack in (False, True):
        (job, done), = list(arrow_jobs(str(f), dataset=False, pack=pack))
        rows = arrow_rows(job[1])
        # the user turn's reasoning is null in Arrow (the column is shared): read as absent, as in the JSONL
        assert rows == [{"messages": [{"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": "yo", "reasoning": "greet back"}], "n": 1}]
        assert type(rows[0]["messages"]) is list and type(rows[0]["messages"][1]) is dict
        assert job[2:] == (str(f), 0, 1) and done == 1.0
    # a map column becomes a dict (pyarrow gives a list of pairs unless asked)
    m = pa.array([[("lang", "en"), ("src", None)]], type=pa.map_(pa.string(), pa.string()))
    assert arrow_rows(pa.record_batch({"text": ["x"], "meta": m})) == [{"text": "x", "meta": {"lang": "en"}}]


def test_save_to_disk_folder_and_dataset_dict(tmp_path):
    recs = CHATS + ALPACA
    want = prep_bytes(tmp_path, [jsonl(tmp_path / "d.jsonl", recs)], "want.jsonl")
    # several Arrow files (num_shards): read in the order state.json lists them
    ds = save_to_disk(tmp_path / "hf", recs, num_shards=3)
    assert len(list(ds.glob("data-*-of-00003.arrow"))) == 3
    assert prep_bytes(tmp_path, [ds], "a.jsonl") == want
    assert prep_bytes(tmp_path, [ds], "a2.jsonl", workers=2) == want
    dd = save_to_disk(tmp_path / "hfd", {"train": recs, "test": TEXTS})
    assert prep_bytes(tmp_path, [dd], "b.jsonl") == want  # a DatasetDict: its train split
    text_want = prep_bytes(tmp_path, [jsonl(tmp_path / "t.jsonl", TEXTS)], "tw.jsonl")
    assert prep_bytes(tmp_path, [dd / "test"], "c.jsonl") == text_want  # another split: name its folder


def test_a_dataset_folder_inside_a_walked_folder_is_one_input(tmp_path):
    raw = tmp_path / "raw"
    save_to_disk(raw / "b_hf", CHATS)
    (raw / "a.txt").write_text("A plain document.\n")
    (raw / "c").mkdir()
    parquet(raw / "c" / "p.parquet", ALPACA)
    got = prep_bytes(tmp_path, [raw], "got.jsonl", to="text")
    want = prep_bytes(tmp_path, [tmp_path / "raw" / "a.txt", jsonl(tmp_path / "c.jsonl", CHATS),
                                 jsonl(tmp_path / "p.jsonl", ALPACA)], "want.jsonl", to="text")
    assert got == want  # the folder's Arrow and JSON files are not read as loose files


def test_arrow_files_stream_and_file_format(tmp_path):
    table = pa.Table.from_pylist(columns(CHATS))
    for fmt, new in (("stream", pa.ipc.new_stream), ("file", pa.ipc.new_file)):
        with pa.OSFile(str(tmp_path / f"{fmt}.arrow"), "wb") as sink, new(sink, table.schema) as w:
            w.write_table(table, max_chunksize=4)
    want = prep_bytes(tmp_path, [jsonl(tmp_path / "d.jsonl", CHATS)], "want.jsonl")
    assert prep_bytes(tmp_path, [tmp_path / "stream.arrow"], "s.jsonl") == want
    assert prep_bytes(tmp_path, [tmp_path / "file.arrow"], "f.jsonl") == want


def test_workers_give_the_same_bytes(tmp_path):
    recs = [{"text": f"row {i} " + "word " * (i % 13)} for i in range(3000)]
    f = parquet(tmp_path / "big.parquet", recs, row_group_size=500)
    one = prep_bytes(tmp_path, [f], "one.jsonl", workers=1)
    two = prep_bytes(tmp_path, [f], "two.jsonl", workers=2)
    assert one == two and one.count(b"\n") == 3000


def test_batches_are_bounded(tmp_path):
    from tiaoyu_cli.data.prep_arrow import arrow_jobs

    f = parquet(tmp_path / "t.parquet", [{"text": f"t{i}"} for i in range(2500)])
    jobs = [job for job, _ in arrow_jobs(str(f), dataset=False, pack=False, rows=1000)]
    assert [j[4] for j in jobs] == [1000, 1000, 500] and [j[3] for j in jobs] == [0, 1000, 2000]
    ds = save_to_disk(tmp_path / "hf", [{"text": f"t{i}"} for i in range(2500)])
    jobs = [job for job, _ in arrow_jobs(str(ds), dataset=True, pack=False, rows=300)]
    assert max(j[4] for j in jobs) <= 300 and sum(j[4] for j in jobs) == 2500


# ----- errors: one line naming file, row and field; nothing written ----------------------------


def test_a_row_with_a_wrong_field_type_names_file_row_and_field(tmp_path):
    recs = [dict(r) for r in CHATS]
    recs[17] = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]}
    f = parquet(tmp_path / "train-00000.parquet", recs, row_group_size=5)
    msg = fails(tmp_path, [f])
    assert msg == f"{f}: row 17: field 'messages[1].content': expected a string, got null"
    assert fails(tmp_path, [f], workers=2) == msg
    # the whole column of the wrong type (messages stored as JSON strings): the first row says so
    g = parquet(tmp_path / "s.parquet", [{"messages": orjson.dumps(r["messages"]).decode()} for r in CHATS])
    assert fails(tmp_path, [g]) == f"{g}: row 0: field 'messages': expected a list of messages, got a string"
    # --skip-bad counts the row and goes on
    out = prep_bytes(tmp_path, [f], "skip.jsonl", skip_bad=True)
    assert out.count(b"\n") == len(CHATS) - 1


def test_a_wrong_row_in_a_dataset_folder_names_its_arrow_file(tmp_path):
    recs = [{"text": f"doc {i}"} for i in range(30)]
    recs[21] = {"text": None}
    recs[0] = {"text": "doc 0", "label": None}
    recs[22] = {"text": "doc 22", "label": 7.5}
    ds = save_to_disk(tmp_path / "hf", recs, num_shards=2)
    second = sorted(ds.glob("data-*.arrow"))[1]
    msg = fails(tmp_path, [ds])
    assert msg.startswith(f"{second}: row 6: cannot tell the record kind from its fields (none)")
    recs[21] = {"text": "doc 21"}
    ds = save_to_disk(tmp_path / "hf2", recs, num_shards=2)
    assert fails(tmp_path, [ds]) == f"{sorted(ds.glob('data-*.arrow'))[1]}: row 7: field 'label': expected a string or an integer, got a number"


def test_truncated_parquet_and_arrow_files(tmp_path):
    good = parquet(tmp_path / "good.parquet", CHATS)
    data = good.read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(data[: len(data) // 2])
    msg = fails(tmp_path, [good, cut])  # the first file's records are not written either
    assert msg.startswith(f"{cut}: not a readable parquet file (") and "\n" not in msg
    (tmp_path / "empty.parquet").write_bytes(b"")
    assert fails(tmp_path, [tmp_path / "empty.parquet"]).startswith(f"{tmp_path / 'empty.parquet'}: not a readable parquet file")
    ds = save_to_disk(tmp_path / "hf", CHATS)
    arrow = next(ds.glob("data-*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-200])
    assert fails(tmp_path, [ds]).startswith(f"{arrow}: not a readable Arrow file (")
    txt = tmp_path / "text.arrow"
    txt.write_text("not arrow at all\n")
    assert fails(tmp_path, [txt]).startswith(f"{txt}: not a readable Arrow file (")


def test_folders_that_are_not_whole_datasets(tmp_path):
    ds = save_to_disk(tmp_path / "hf", CHATS)
    for f in ds.glob("data-*.arrow"):
        f.unlink()
    msg = fails(tmp_path, [ds], TiaoyuError)
    assert msg.startswith(f"{ds}: state.json lists data-00000-of-00001.arrow, which is missing")
    only_info = tmp_path / "only_info"
    only_info.mkdir()
    (only_info / "dataset_info.json").write_text("{}")
    assert fails(tmp_path, [only_info], TiaoyuError).startswith(f"{only_info}: not a datasets folder: state.json is missing")
    dd = save_to_disk(tmp_path / "hfd", {"validation": CHATS, "test": CHATS})
    assert fails(tmp_path, [dd], TiaoyuError) == (
        f"{dd}: a DatasetDict without a train split (splits: validation, test); "
        f"give the folder of the split to read (e.g. {dd / 'validation'})")
    (ds / "state.json").write_text('{"_data_files": [{"filename": "../escape.arrow"}]}')
    assert "_data_files[0]" in fails(tmp_path, [ds], DataError)


def test_merge_refuses_parquet(tmp_path):
    f = parquet(tmp_path / "d.parquet", TEXTS)
    assert "--merge reads the JSONL files prep wrote" in fails(tmp_path, [f], TiaoyuError, merge=True)


def test_without_pyarrow_the_error_names_the_extra(tmp_path):
    f = parquet(tmp_path / "d.parquet", TEXTS)
    code = ("import sys; sys.modules['pyarrow'] = None\n"
            "from tiaoyu_cli.cli.main import main\n"
            f"sys.argv = ['tiaoyu', 'prep', {str(f)!r}, '-o', {str(tmp_path / 'o.jsonl')!r}]\n"
            "main()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "COLUMNS": "400"})
    assert r.returncode == 2, r.stderr
    assert "pip install 'tiaoyu[parquet]'" in r.stderr and str(f) in r.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_parquet_to_stdout_and_an_error_leaves_the_redirect_empty(tmp_path):
    f = parquet(tmp_path / "d.parquet", CHATS)
    cli = [sys.executable, "-m", "tiaoyu_cli", "prep"]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "COLUMNS": "400"}
    r = subprocess.run([*cli, str(f), "-q"], capture_output=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout == prep_bytes(tmp_path, [jsonl(tmp_path / "d.jsonl", CHATS)])
    bad = parquet(tmp_path / "bad.parquet", [{"text": "fine", "label": None}, {"text": "odd", "label": 2.5}])
    with open(tmp_path / "redirect.jsonl", "wb") as out:
        r = subprocess.run([*cli, str(f), str(bad)], stdout=out, stderr=subprocess.PIPE, cwd=tmp_path, env=env,
                           timeout=120, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {bad}: row 1: field 'label': expected a string or an integer, got a number"
    assert (tmp_path / "redirect.jsonl").read_bytes() == b""
