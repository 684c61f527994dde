"""The synthetic world as documents to retrieve from, and question-answering records that read them.

`tiaoyu synth OUT/` calls `write_retrieval_files` after the other kinds (data/synth.py). It writes:

* `docs.jsonl` — one document per entity and language, `{"id", "lang", "title", "text"}`, the
  text stating every fact of the entity ("Kamiro lives in Lunford. Kamiro is a baker. …" /
  "王丽住在青石城。王丽是一名老师。…"). 400 documents; `tiaoyu index OUT/docs.jsonl -o index/`.
* `rag.train.jsonl` — chat records whose user turn is in the RAG layout (data/rag.py): the top
  `RAG_K` passages BM25 finds in docs.jsonl for the question, then the question; the assistant
  answers with the bare value. Questions ask about *train entities* only, and the asked entity's
  passage states freshly drawn values (the answer follows the passage, not the world): the
  record teaches reading, not facts — see `rag_records`.
* `rag.val.jsonl` — the held-out questions in the same layout: each asks a held-out fact
  (one no chat/preference train record asks) of a *val entity* (an entity no rag.train question
  names), in English and in Chinese.
* `facts.val.jsonl` — the same held-out questions without passages: what a model without
  retrieval is asked, and the input of `tiaoyu chat … --retrieve OUT/docs.jsonl --rag`.
  `gold_doc` in each val record is the id of the document that holds the answer (recall@k).

Passages are found with `PlainBM25` (data/retrieval.py; the same scores as the bm25s index), so
the files do not depend on an optional package and the same seed writes the same bytes.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import orjson

from tiaoyu_cli.data import synth_world as W  # the world and its templates
from tiaoyu_cli.data.rag import rag_prompt
from tiaoyu_cli.data.retrieval import PlainBM25, analyze, query_terms
from tiaoyu_cli.io import atomic_open

# Passages per question in the RAG records. One: the tiny demo model (~1.5M parameters) learns to
# read the answer out of the best passage within the demo's budget (BM25 puts the right document
# first for 98-99 % of the bundled questions); with three it needs several times the steps. Ask such
# a model with `--retrieve-k 1`; a larger model can be trained on records with more passages.
RAG_K = 1
VAL_ENTITY_FRAC = 0.3  # share of entities held out from rag.train


def doc_id(entity: int, lang: str) -> str:
    return f"e{entity:03d}-{lang}"


def bio(e, lang: str, values: dict[str, tuple[str, str]]) -> str:
    """An entity's document: one sentence per attribute, in a fixed order and wording."""
    i = 0 if lang == "en" else 1
    return W.join_sentences([W.cap(W.STATEMENTS[(e.kind, a, lang)][0].format(n=e.name(lang), v=values[a][i], m=e.measure))
                             for a in e.attrs], lang)


def entity_docs(g) -> list[dict]:
    """One document per entity and language (g: data.synth.Generator)."""
    return [{"id": doc_id(i, lang), "lang": lang, "title": e.name(lang), "text": bio(e, lang, e.attrs)}
            for lang in g.langs for i, e in enumerate(g.w.entities)]


def value_pools(g) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(entity kind, attribute) -> the distinct values that attribute takes in the world."""
    pools: dict[tuple[str, str], dict[tuple[str, str], None]] = {}
    for e in g.w.entities:
        for a, v in e.attrs.items():
            pools.setdefault((e.kind, a), {})[v] = None
    return {k: list(v) for k, v in pools.items()}


class _Docs:
    def __init__(self, docs: list[dict]):
        self.docs = docs
        self.bm25 = PlainBM25([analyze(d["text"]) for d in docs])

    def top(self, question: str, k: int = RAG_K) -> list[dict]:
        return [self.docs[i] for _, i in self.bm25.top_k(query_terms(question), k)]


def split_entities(g) -> tuple[list[int], set[int]]:
    """(train entity indices, val entity indices): a seeded VAL_ENTITY_FRAC of every kind is held out."""
    rng = random.Random(f"{g.cfg.seed}:rag.entities")
    train, val = [], set()
    for kind in ("person", "city", "animal", "object"):
        idx = [i for i, e in enumerate(g.w.entities) if e.kind == kind]
        rng.shuffle(idx)
        n_val = max(1, round(len(idx) * VAL_ENTITY_FRAC))
        val.update(idx[:n_val])
    train = [i for i in range(len(g.w.entities)) if i not in val]
    return train, val


def _record(question: str, answer: str, passages: list[dict] | None, gold: str) -> dict:
    user = question if passages is None else rag_prompt([p["text"] for p in passages], question)
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], "gold_doc": gold}


def rag_records(g, docs: _Docs, split: str, k: int = RAG_K) -> tuple[list[dict], list[dict]]:
    """(records in the RAG layout, the same records without passages) for `split`."""
    train_ents, val_ents = split_entities(g)
    rng = random.Random(f"{g.cfg.seed}:rag.{split}")
    out, plain = [], []
    if split == "train":
        # The asked entity's passage states freshly drawn values (and the answer follows them), so
        # the answer can only come from reading: with the world's own values a tiny model learns the
        # train entities' facts by heart instead, and that does not carry over to held-out entities.
        facts = [f for f in g.train_entity if f.entity not in val_ents]
        pools = value_pools(g)
        while len(out) < g.cfg.records:
            f = rng.choice(facts)
            lang = rng.choice(g.langs)
            q = W.fact_question(g.w, f, lang, rng)
            gold = doc_id(f.entity, lang)  # type: ignore[arg-type]
            found = docs.top(q, k)
            if gold not in [d["id"] for d in found]:
                continue  # BM25 missed it (about 1 question in 100): nothing to read the answer from
            e = g.w.entities[f.entity]  # type: ignore[index]
            values = {a: rng.choice(pools[(e.kind, a)]) for a in e.attrs}
            passages = [{"text": bio(e, lang, values)} if d["id"] == gold else d for d in found]
            out.append(_record(q, values[f.attr][0 if lang == "en" else 1], passages, gold))
        return out, plain
    facts = [f for f in g.val_entity if f.entity in val_ents]
    pairs = [(f, lang) for f in facts for lang in g.langs]
    rng.shuffle(pairs)
    for f, lang in pairs[: g.cfg.n_val()]:
        q = W.fact_question(g.w, f, lang, rng)
        a, gold = g.w.value(f, lang), doc_id(f.entity, lang)
        out.append(_record(q, a, docs.top(q, k), gold))
        plain.append(_record(q, a, None, gold))
    return out, plain


def write_retrieval_files(out: Path, g, on_file: Callable[[str, int], None] | None = None) -> dict[str, dict]:
    """Write docs.jsonl, rag.{train,val}.jsonl and facts.val.jsonl into `out`; return their manifest entries."""
    docs = _Docs(entity_docs(g))
    train, _ = rag_records(g, docs, "train")
    val, plain = rag_records(g, docs, "val")
    files: dict[str, dict] = {}
    for name, kind, split, recs in [("docs.jsonl", "text", "docs", docs.docs), ("rag.train.jsonl", "chat", "train", train),
                                    ("rag.val.jsonl", "chat", "val", val), ("facts.val.jsonl", "chat", "val", plain)]:
        nbytes = 0
        with atomic_open(out / name, "wb") as f:
            for r in recs:
                line = orjson.dumps(r) + b"\n"
                f.write(line)
                nbytes += len(line)
        files[name] = {"kind": kind, "split": split, "records": len(recs), "bytes": nbytes}
        if on_file:
            on_file(name, len(recs))
    return files
