"""Retrieval: the analyzer, passages, the bm25s index against a plain-Python BM25, the index folder,
`tiaoyu index`, and one clear error per bad input (no partial index left behind)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tiaoyu_cli.data.rag import rag_prompt, split_rag_prompt
from tiaoyu_cli.data.retrieval import (PlainBM25, Retriever, analyze, build_index, chunk_text, format_passages,
                                       open_retriever, query_terms, read_passages)
from tiaoyu_cli.errors import DataError, TiaoyuError
from tiaoyu_cli.infer.retrieval import NO_RESULTS, SEARCH_SCHEMA, make_search, rag_messages

TIAOYU = str(Path(sys.executable).with_name("tiaoyu"))

ZH = [
    {"id": "wang", "text": "王丽住在青石城。王丽最喜欢红色。王丽是一名老师。"},
    {"id": "zhang", "text": "张明住在云枫城。张明最爱的食物是饺子。张明是一名医生。"},
    {"id": "li", "text": "李华来自海月城。李华今年三十岁。李华最喜欢蓝色。"},
    {"id": "city", "text": "青石城位于北方。青石城以面条闻名。"},
    {"id": "pet", "text": "豆豆是一只猫。豆豆的主人是张明。"},
]
EN = [
    {"id": "kamiro", "text": "Kamiro lives in Lunford. Kamiro's favourite colour is red. Kamiro is a baker."},
    {"id": "bado", "text": "Bado is a teacher. Bado lives in Tonvale. The favourite food of Bado is rice."},
    {"id": "lunford", "text": "Lunford is in the north. Lunford is famous for its noodles."},
    {"id": "bell", "text": "The Silver Bell is kept in Tonvale. The Silver Bell belongs to Kamiro."},
    {"id": "mimi", "text": "Mimi is a cat. Mimi belongs to Bado. Mimi is 3 years old."},
]


def write(path: Path, recs: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    return path


def run(args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(f"{shlex.quote(TIAOYU)} {args}", shell=True, cwd=cwd, capture_output=True, timeout=120)


# ---- analyzer and passages -----------------------------------------------------------------------

def test_analyzer_cjk_unigrams_bigrams_and_lowercased_words():
    assert analyze("王丽住") == ["王", "丽", "住", "王丽", "丽住"]
    assert analyze("Kamiro's RED Ｃａｔ 12") == ["kamiro", "s", "red", "cat", "12"]  # NFKC: full-width → ascii
    assert analyze("Mimi是猫。") == ["mimi", "是", "猫", "是猫"]
    assert analyze("...！？") == []
    assert query_terms("王王王") == ["王", "王王"]  # repeated terms count once
    # a whitespace split finds nothing shared between a Chinese question and its document
    assert not set("王丽住在哪里？".split()) & set(ZH[0]["text"].split())
    assert {"王丽", "住在"} <= set(analyze("王丽住在哪里？")) & set(analyze(ZH[0]["text"]))


def test_chunk_text_cuts_at_sentence_ends():
    assert chunk_text("short", 10) == ["short"]
    assert chunk_text("One two three. Four five six! Seven? Ten.", 20) == ["One two three.", "Four five six!", "Seven? Ten."]
    assert chunk_text("一二三四五。六七八九十。甲乙。", 9) == ["一二三四五。", "六七八九十。甲乙。"]
    long = "x" * 25
    assert chunk_text(long, 10) == ["x" * 10, "x" * 10, "x" * 5]  # a sentence longer than a passage: hard cut
    assert all(len(p) <= 30 for p in chunk_text(" ".join(["word"] * 100), 30))


def test_read_passages_ids_and_chunks(tmp_path):
    f = write(tmp_path / "d.jsonl", [{"text": "A one. B two. C three."}, {"id": 7, "text": "x"}, {"text": "  "}])
    ps = read_passages([f], chunk_chars=8)
    assert [(p.doc_id, p.text) for p in ps] == [("d.jsonl:1", "A one."), ("d.jsonl:1", "B two."),
                                                ("d.jsonl:1", "C three."), ("7", "x")]
    g = write(tmp_path / "g.jsonl", [{"body": "hello"}])
    assert [p.text for p in read_passages([g], field="body")] == ["hello"]


# ---- retrieval quality and the reference -------------------------------------------------------------

@pytest.mark.parametrize("docs,queries", [
    (ZH, {"王丽住在哪里？": "wang", "张明是做什么的？": "zhang", "李华今年几岁？": "li", "青石城以什么闻名？": "city",
          "豆豆是什么动物？": "pet", "谁养了豆豆？": "pet"}),
    (EN, {"Where does Kamiro live?": "kamiro", "What is Bado's job?": "bado", "What is Lunford famous for?": "lunford",
          "Who owns the Silver Bell?": "bell", "How old is Mimi?": "mimi"}),
])
def test_top1_is_the_right_document(tmp_path, docs, queries):
    r = build_index([write(tmp_path / "d.jsonl", docs)])
    for q, want in queries.items():
        res = r.search(q, 3)
        assert res[0][1] == want, (q, res)
        assert [s for s, _, _ in res] == sorted((s for s, _, _ in res), reverse=True)


def test_bm25s_scores_equal_plain_python_bm25(tmp_path):
    r = build_index([write(tmp_path / "d.jsonl", ZH + EN)])
    ref = PlainBM25([analyze(p.text) for p in r.passages])
    for q in ["王丽住在哪里？", "张明", "Kamiro red baker", "Who owns the Silver Bell?", "Tonvale", "nothing here"]:
        got = r.scores(q)
        want = ref.scores(query_terms(q))
        assert len(got) == len(r.passages)
        for i, s in enumerate(got):
            assert s == pytest.approx(want.get(i, 0.0), rel=1e-5, abs=1e-6), (q, i)
        assert [d for _, d, _ in r.search(q, 4)] == [r.passages[i].doc_id for _, i in ref.top_k(query_terms(q), 4)]


def test_no_match_returns_nothing_and_k_is_respected(tmp_path):
    r = build_index([write(tmp_path / "d.jsonl", EN)])
    assert r.search("zzz qqq", 3) == []
    assert len(r.search("the", 2)) == 2
    assert len(r.search("Kamiro", 10)) == 2  # only passages that share a term


def test_save_load_roundtrip_without_pickle(tmp_path):
    r = build_index([write(tmp_path / "d.jsonl", ZH + EN)])
    out = r.save(tmp_path / "idx")
    names = sorted(p.name for p in out.iterdir())
    assert "index.json" in names and "passages.jsonl" in names
    assert not [n for n in names if n.endswith((".pkl", ".pickle"))]
    import numpy as np

    for n in names:  # every array loads with pickle disabled
        if n.endswith(".npy"):
            np.load(out / n, allow_pickle=False)
    r2 = Retriever.load(out)
    for q in ["王丽住在哪里？", "Who owns the Silver Bell?"]:
        assert r2.search(q, 3) == r.search(q, 3)
    assert open_retriever(out).search("Mimi", 1)[0][1] == "mimi"
    assert open_retriever([tmp_path / "d.jsonl"]).search("Mimi", 1)[0][1] == "mimi"  # JSONL: in memory


def test_search_tool_and_rag_layout(tmp_path):
    r = build_index([write(tmp_path / "d.jsonl", EN)])
    search = make_search(r, k=2)
    text = search("Who owns the Silver Bell?")
    assert text == format_passages(r.search("Who owns the Silver Bell?", 2))
    assert text.split("\n\n")[0] == EN[3]["text"] and len(text.split("\n\n")) == 2
    assert search("zzz") == NO_RESULTS
    assert SEARCH_SCHEMA["name"] == "search" and SEARCH_SCHEMA["parameters"]["required"] == ["query"]
    msgs = rag_messages([{"role": "system", "content": "s"}, {"role": "user", "content": "Where does Kamiro live?"}], r, 1)
    assert msgs[0] == {"role": "system", "content": "s"}
    assert msgs[1]["content"] == f"Context:\n{EN[0]['text']}\n\nQuestion: Where does Kamiro live?"
    assert split_rag_prompt(msgs[1]["content"]) == (EN[0]["text"], "Where does Kamiro live?")
    assert rag_prompt(["a", " b "], "q?") == "Context:\na\n\nb\n\nQuestion: q?"
    assert split_rag_prompt("plain question") is None


# ---- errors: one clear message each, nothing half-written ---------------------------------------------

def test_errors_name_the_problem(tmp_path):
    with pytest.raises(TiaoyuError, match="empty corpus"):
        build_index([write(tmp_path / "e.jsonl", [])])
    with pytest.raises(TiaoyuError, match="empty corpus"):
        build_index([write(tmp_path / "e2.jsonl", [{"text": " "}])])
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid UTF-8"):
        build_index([bad])
    nofield = write(tmp_path / "nofield.jsonl", [{"text": "a"}, {"body": "b"}])
    with pytest.raises(DataError, match=r"nofield.jsonl:2: field 'text': missing"):
        build_index([nofield])
    with pytest.raises(DataError, match=r"field 'text': expected a string"):
        build_index([write(tmp_path / "num.jsonl", [{"text": 3}])])
    with pytest.raises(TiaoyuError, match="no such index folder"):
        Retriever.load(tmp_path / "missing")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "index.json").write_text('{"format": "something-else"}')
    with pytest.raises(TiaoyuError, match="not a tiaoyu index"):
        Retriever.load(tmp_path / "foreign")
    with pytest.raises(TiaoyuError, match="not a tiaoyu index"):
        open_retriever(tmp_path)  # any other folder


def test_cli_build_query_and_errors_leave_no_partial_index(tmp_path):
    docs = write(tmp_path / "docs.jsonl", ZH + EN)
    r = run("index docs.jsonl -o idx", tmp_path)
    assert r.returncode == 0, r.stderr.decode()
    assert "10 passages" in r.stderr.decode() and r.stdout == b""
    before = {p.name: p.read_bytes() for p in (tmp_path / "idx").iterdir()}
    q = run("index --query '王丽住在哪里？' idx -k 2 --json", tmp_path)
    assert q.returncode == 0, q.stderr.decode()
    hits = [orjson.loads(x) for x in q.stdout.splitlines()]
    assert [h["id"] for h in hits][0] == "wang" and len(hits) == 2 and hits[0]["score"] >= hits[1]["score"]
    q = run("index -q 'Where does Kamiro live?' idx", tmp_path)
    assert q.returncode == 0 and q.stdout.decode().startswith("1. [") and "kamiro" in q.stdout.decode()
    # a failed rebuild keeps the old index as it was and leaves no temp folder
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(orjson.dumps({"text": "fine"}) + b"\n" + b'{"text": "\xff"}\n')
    for args, msg in [("index bad.jsonl -o idx", "bad.jsonl:2: invalid UTF-8"),
                      ("index docs.jsonl --field body -o idx", "docs.jsonl:1: field 'body': missing"),
                      ("index empty.jsonl -o new", "empty corpus"),
                      ("index -q x nothere/", "no such file or index folder"),
                      ("index docs.jsonl -o sub", "not a tiaoyu index")]:
        (tmp_path / "empty.jsonl").write_bytes(b"")
        (tmp_path / "sub").mkdir(exist_ok=True)
        (tmp_path / "sub" / "keep.txt").write_text("mine")
        e = run(args, tmp_path)
        assert e.returncode == 2, args
        err = e.stderr.decode()
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2, (args, err)
    assert {p.name: p.read_bytes() for p in (tmp_path / "idx").iterdir()} == before
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "sub" / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
