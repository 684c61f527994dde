"""RAG: the one prompt layout (prep, synth, chat --rag all use it), the synthetic documents and RAG
records (held-out design), and retrieval recall@k on the bundled questions, Chinese and English."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tiaoyu_cli.data.formats import FormatError, convert
from tiaoyu_cli.data.rag import rag_prompt, split_rag_prompt
from tiaoyu_cli.data.retrieval import build_index
from tiaoyu_cli.data.synth import SynthConfig, write_corpus
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.infer.retrieval import rag_options, rag_record, rag_rewriter


def load(path: Path) -> list[dict]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth-rag")
    write_corpus(out, SynthConfig(seed=0, text_mb=0.1, records=600, val_records=200))
    return out


# ---- the layout in prep ------------------------------------------------------------------------------

def test_prep_turns_context_question_answer_into_the_rag_layout():
    kind, recs = convert({"context": "Kamiro lives in Lunford.", "question": "Where does Kamiro live?", "answer": "Lunford"})
    assert kind == "chat"
    assert recs == [{"messages": [
        {"role": "user", "content": "Context:\nKamiro lives in Lunford.\n\nQuestion: Where does Kamiro live?"},
        {"role": "assistant", "content": "Lunford"}]}]
    _, recs = convert({"context": ["p one", "p two"], "query": "q?", "answer": 7, "system": "Be brief."})
    assert recs[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert recs[0]["messages"][1]["content"] == rag_prompt(["p one", "p two"], "q?") == "Context:\np one\n\np two\n\nQuestion: q?"
    assert recs[0]["messages"][2]["content"] == "7"
    with pytest.raises(FormatError) as e:
        convert({"context": {"a": 1}, "question": "q", "answer": "a"})
    assert e.value.field == "context"
    # without a context the record stays verifiable, and Dolly-style records keep their own layout
    assert convert({"question": "q", "answer": "a"})[0] == "verifiable"
    assert convert({"instruction": "q", "context": "c", "response": "a"})[1][0]["messages"][0]["content"] == "q\n\nc"


# ---- chat --retrieve … --rag -------------------------------------------------------------------------

def test_rag_records_and_options(tmp_path):
    docs = tmp_path / "d.jsonl"
    docs.write_bytes(b"".join(orjson.dumps({"id": i, "text": t}) + b"\n" for i, t in
                              enumerate(["Kamiro lives in Lunford.", "王丽住在青石城。", "Bado is a teacher."])))
    rw = rag_rewriter(build_index([docs]), k=2)
    assert rw("Where does Kamiro live?") == "Context:\nKamiro lives in Lunford.\n\nQuestion: Where does Kamiro live?"
    assert split_rag_prompt(rw("王丽住在哪里？")) == ("王丽住在青石城。", "王丽住在哪里？")
    assert rag_record({"prompt": "Where does Kamiro live?", "id": 1}, rw)["id"] == 1
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                        {"role": "user", "content": "Who is a teacher?"}, {"role": "assistant", "content": "Bado"}]}
    out = rag_record(rec, rw)["messages"]
    assert out[0]["content"] == "hi" and out[3] == rec["messages"][3]  # only the asked turn changes
    assert out[2]["content"] == "Context:\nBado is a teacher.\n\nQuestion: Who is a teacher?"
    assert rag_options(None, False) is None
    with pytest.raises(TiaoyuError, match="--rag needs --retrieve"):
        rag_options(None, True)
    with pytest.raises(TiaoyuError, match="--retrieve needs --rag"):
        rag_options(str(docs), False)
    with pytest.raises(TiaoyuError, match="--retrieve-k"):
        rag_options(str(docs), True, k=0)
    with pytest.raises(TiaoyuError, match="no such"):
        rag_options(str(tmp_path / "nothing"), True)
    assert rag_options(str(docs), True, k=1)("Bado") == "Context:\nBado is a teacher.\n\nQuestion: Bado"


def test_chat_session_sends_the_rag_turn_and_keeps_the_question(tok_dir, tmp_path):
    import torch

    from tiaoyu_cli.infer.session import ChatModel, ChatSession, GenerationOptions, chat_prompt_ids
    from tiaoyu_cli.infer.sampling import SamplingParams
    from tiaoyu_cli.model import Transformer, preset
    from tiaoyu_cli.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_dir)
    torch.manual_seed(0)
    cm = ChatModel(Transformer(preset("tiny", vocab_size=tok.vocab_size)).eval(), tok, tmp_path, "sft", "chat")
    docs = tmp_path / "d.jsonl"
    docs.write_bytes(orjson.dumps({"text": "Kamiro lives in Lunford."}) + b"\n")
    rw = rag_rewriter(build_index([docs]), k=3)
    s = ChatSession(cm, options=GenerationOptions(max_new_tokens=2, sampling=SamplingParams(temperature=0)), rewrite_user=rw)
    q = "Where does Kamiro live?"
    assert s.prompt_ids(q) == chat_prompt_ids(tok, [{"role": "user", "content": rw(q)}])
    "".join(p.text for p in s.send(q))
    assert s.history[0] == {"role": "user", "content": q}


# ---- the synthetic documents and RAG records ----------------------------------------------------------

def test_synth_docs_and_rag_records(corpus):
    manifest = orjson.loads((corpus / "manifest.json").read_bytes())
    docs = load(corpus / "docs.jsonl")
    world = orjson.loads((corpus / "world.json").read_bytes())
    assert len(docs) == 2 * len(world["entities"]) == manifest["files"]["docs.jsonl"]["records"]
    assert {d["lang"] for d in docs} == {"en", "zh"} and len({d["id"] for d in docs}) == len(docs)
    by_id = {d["id"]: d for d in docs}
    train, val, plain = (load(corpus / f) for f in ("rag.train.jsonl", "rag.val.jsonl", "facts.val.jsonl"))
    assert len(train) == 600 and 50 <= len(val) <= 200 and len(plain) == len(val)
    redrawn = found = 0
    for rec in train + val:
        user, answer = rec["messages"][0]["content"], rec["messages"][1]["content"]
        ctx, question = split_rag_prompt(user)
        passages = ctx.split("\n\n")
        assert len(passages) == 1 and question  # synth_docs.RAG_K
        gold = by_id[rec["gold_doc"]]
        if rec in val:  # val: the passages as retrieved; the right document holds the answer
            assert answer in gold["text"]
            found += gold["text"] in passages
        else:  # train: the asked entity's passage, with freshly drawn values, holds the answer
            mine = [p for p in passages if p.lower().startswith(gold["title"].lower())]
            assert any(answer in p for p in mine), (passages, answer)
            redrawn += gold["text"] not in passages
    assert redrawn > 0.5 * len(train)  # most train passages state other values than the world's
    assert found >= 0.95 * len(val)  # BM25 puts the right document first for almost every val question
    for r, p in zip(val, plain):
        assert p["messages"][0]["content"] == split_rag_prompt(r["messages"][0]["content"])[1]
        assert p["messages"][1] == r["messages"][1] and p["gold_doc"] == r["gold_doc"]
    # held out: no rag.train question is about a val entity, and no chat.train question asks a val question
    entity = lambda rec: rec["gold_doc"].split("-")[0]  # noqa: E731
    assert not {entity(r) for r in train} & {entity(r) for r in val}
    chat_qs = {m["content"] for r in load(corpus / "chat.train.jsonl") for m in r["messages"] if m["role"] == "user"}
    assert not chat_qs & {r["messages"][0]["content"] for r in plain}


def recall(index, recs: list[dict], k: int) -> dict[str, float]:
    hits: dict[str, list[bool]] = {"en": [], "zh": []}
    for rec in recs:
        q = rec["messages"][0]["content"]
        q = split_rag_prompt(q)[1] if split_rag_prompt(q) else q
        hits[rec["gold_doc"][-2:]].append(rec["gold_doc"] in [d for _, d, _ in index.search(q, k)])
    return {lang: sum(h) / len(h) for lang, h in hits.items()}


def test_recall_at_3_on_the_bundled_questions(corpus):
    """Measured (seed 0): on the 120 held-out questions recall@3 1.00 en / 1.00 zh, recall@1 0.983 / 1.00;
    on 600 train + 120 val questions drawn before synth kept only the train questions whose document
    BM25 ranks first, recall@3 1.00 / 1.00 and recall@1 0.988 / 0.995. Thresholds leave room for a few misses."""
    index = build_index([corpus / "docs.jsonl"])
    qs = load(corpus / "rag.train.jsonl") + load(corpus / "facts.val.jsonl")
    r3, r1 = recall(index, qs, 3), recall(index, qs, 1)
    assert r3["en"] >= 0.98 and r3["zh"] >= 0.98, r3
    assert r1["en"] >= 0.95 and r1["zh"] >= 0.95, r1
    val3 = recall(index, load(corpus / "facts.val.jsonl"), 3)
    assert val3["en"] >= 0.96 and val3["zh"] >= 0.96, val3


def test_cli_chat_rag_prompt_and_option_errors(base_ckpt, tmp_path):
    import subprocess
    import sys

    tiaoyu = str(Path(sys.executable).with_name("tiaoyu"))
    docs = tmp_path / "docs.jsonl"
    docs.write_bytes(orjson.dumps({"text": "Kamiro lives in Lunford."}) + b"\n")

    def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([tiaoyu, "chat", str(base_ckpt), "--mode", "chat", "--temperature", "0",
                               "--max-new-tokens", "2", *args], input=stdin, capture_output=True, timeout=300)

    ok = run("--retrieve", str(docs), "--rag", "--prompt", "Where does Kamiro live?")
    assert ok.returncode == 0, ok.stderr.decode()
    out = run("--retrieve", str(docs), "--rag", "--retrieve-k", "1", stdin=b'{"prompt": "Where does Kamiro live?"}\n')
    assert out.returncode == 0, out.stderr.decode()
    rec = orjson.loads(out.stdout.splitlines()[0])
    assert rec["prompt"] == "Context:\nKamiro lives in Lunford.\n\nQuestion: Where does Kamiro live?" and "response" in rec
    for args, msg in [(("--rag",), "--rag needs --retrieve"), (("--retrieve", str(docs)), "--retrieve needs --rag"),
                      (("--retrieve", str(tmp_path / "none"), "--rag"), "no such file or index folder")]:
        bad = run(*args, "--prompt", "q")
        assert bad.returncode == 2 and msg in bad.stderr.decode(), (args, bad.stderr.decode())
