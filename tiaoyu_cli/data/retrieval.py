"""BM25 retrieval over a local corpus: analyzer, passages, an index folder, search.

    tiaoyu index docs.jsonl -o index/                 # build (bm25s), save without pickle
    r = open_retriever("index/")                      # or open_retriever(["docs.jsonl"]): build in memory
    r.search("王丽住在哪里？", k=3)                    # [(score, doc_id, text), …] best first
    format_passages(r.search(q, 3))                   # the texts joined by a blank line

**Analyzer** (`analyze`): Unicode NFKC, lower case; a run of CJK characters (Han, kana, Hangul)
gives every character and every pair of neighbouring characters ("王丽住" → 王 丽 住 王丽 丽住),
anything else gives its words of letters and digits ("Kamiro's" → kamiro s). A plain whitespace
split finds nothing in Chinese, which has no spaces; character bigrams are the classic answer
(they match two-character names and words without a dictionary).

**Passages** (`read_passages`): one per record of a JSONL file (`--field`, default "text"); a text
longer than `chunk_chars` is cut at sentence ends (. ! ? 。！？ or newlines) into passages of at most
that many characters. A passage keeps its document's id: the record's "id" field, else FILE:LINE.

**Scoring**: Okapi BM25, Lucene variant (k1 = 1.5, b = 0.75): for each query term t found in
passage d, idf(t) · tf / (tf + k1 · (1 − b + b · |d| / avgdl)), idf(t) = ln(1 + (N − df + 0.5) /
(df + 0.5)); a term repeated in the query counts once. The index is built by bm25s (sparse
matrices, numpy); `PlainBM25` computes the same scores in plain Python (the benchmark's baseline
and the tests' reference). Passages with score 0 (no shared term) are never returned; ties go to
the earlier passage.

**Index folder** (written atomically: a temp folder renamed into place, never a partial index):
`index.json` (format marker, analyzer, BM25 parameters, counts, sources), `passages.jsonl`
(`{"id", "text"}` per passage), and bm25s's own files — `data/indices/indptr.csc.index.npy`
saved with `allow_pickle=False`, `vocab.index.json`, `params.index.json`. Nothing is pickled.
bm25s is an optional dependency (`pip install 'tiaoyu[retrieval]'`); `PlainBM25` needs nothing.
"""

from __future__ import annotations

import collections
import itertools
import math
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import orjson

from tiaoyu_cli.data.jsonl import iter_jsonl
from tiaoyu_cli.data.rag import join_passages
from tiaoyu_cli.errors import DataError, TiaoyuError
from tiaoyu_cli.io import atomic_dir

INDEX_FORMAT = "tiaoyu-bm25-index"
INDEX_VERSION = 1
ANALYZER = "nfkc-lower; cjk char uni+bigrams; other words [^\\W_]+"
DEFAULT_CHUNK_CHARS = 500
K1, B = 1.5, 0.75

_CJK = "\u2e80-\u2fdf\u3040-\u30ff\u3100-\u312f\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002ffff"
_TERM = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")  # one CJK character, or a word of anything else
_BIGRAM = re.compile(f"(?=([{_CJK}]{{2}}))")  # every pair of neighbouring CJK characters (overlapping)
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s*|\n+")


def analyze(text: str) -> list[str]:
    """BM25 terms of `text`: CJK character unigrams + bigrams, lower-cased words elsewhere."""
    t = unicodedata.normalize("NFKC", text).lower()
    return _TERM.findall(t) + _BIGRAM.findall(t)  # a bag of terms: unigrams and words first, then bigrams


def query_terms(text: str) -> list[str]:
    """The analyzed query with repeated terms counted once (first occurrence order)."""
    return list(dict.fromkeys(analyze(text)))


def chunk_text(text: str, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> list[str]:
    """`text` as passages of at most `chunk_chars` characters, cut at sentence ends where possible."""
    text = text.strip()
    if len(text) <= chunk_chars:
        return [text] if text else []
    sentences = [s for s in _SENTENCE_END.split(text) if s and s.strip()]
    out: list[str] = []
    cur = ""
    for s in sentences:
        while len(s) > chunk_chars:  # a sentence longer than a passage: hard cut
            if cur:
                out.append(cur)
                cur = ""
            out.append(s[:chunk_chars].strip())
            s = s[chunk_chars:]
        sep = "" if not cur or _is_cjk_end(cur) else " "
        if cur and len(cur) + len(sep) + len(s) > chunk_chars:
            out.append(cur)
            cur, sep = "", ""
        cur = cur + sep + s.strip()
    if cur.strip():
        out.append(cur)
    return [p for p in out if p]


def _is_cjk_end(s: str) -> bool:
    return bool(s) and s[-1] in "。！？"


@dataclass(frozen=True)
class Passage:
    doc_id: str
    text: str


def read_passages(paths: Sequence[str | os.PathLike], field: str = "text",
                  chunk_chars: int = DEFAULT_CHUNK_CHARS) -> list[Passage]:
    """Passages of every record of the JSONL `paths`; a record without a string `field` is a DataError
    naming file, line and field. Empty texts are skipped; no passage at all is a TiaoyuError."""
    if chunk_chars < 1:
        raise TiaoyuError(f"--chunk-chars must be >= 1, got {chunk_chars}")
    if not paths:
        raise TiaoyuError("no documents given: tiaoyu index DOCS.jsonl… -o index/")
    out: list[Passage] = []
    records = 0
    for path in paths:
        p = Path(path)
        if p.is_dir():
            raise TiaoyuError(f"{p}: is a folder, expected a JSONL file of documents (an index folder? "
                              "then pass it alone)")
        for line, obj in _records(p):
            records += 1
            if field not in obj:
                raise DataError(f"missing (the text to index; --field names another field; fields here: "
                                f"{', '.join(sorted(obj)) or 'none'})", str(p), line, field)
            text = obj[field]
            if not isinstance(text, str):
                raise DataError(f"expected a string, got {type(text).__name__}", str(p), line, field)
            rid = obj.get("id")
            doc_id = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else f"{p.name}:{line}"
            out.extend(Passage(doc_id, t) for t in chunk_text(text, chunk_chars))
    if not out:
        names = ", ".join(str(p) for p in paths)
        raise TiaoyuError(f"{names}: empty corpus — {records} record(s), no text in field '{field}' to index")
    return out


def _records(path: Path) -> Iterable[tuple[int, dict]]:
    """(line, object) of a JSONL file, decoded line by line so a bad byte names its own line."""
    if not path.exists():
        raise TiaoyuError(f"{path}: no such file")
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"invalid UTF-8 ({e.reason} at byte {e.start}); documents must be UTF-8",
                                str(path), line) from None
            if not raw.strip():
                continue
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                raise DataError(f"malformed JSON ({e})", str(path), line) from None
            if not isinstance(obj, dict):
                raise DataError(f"expected a JSON object, got {type(obj).__name__}", str(path), line)
            yield line, obj


def format_passages(results: Iterable[tuple[float, str, str]]) -> str:
    """Search results → their texts joined by a blank line, best first (what the `search` tool returns)."""
    return join_passages([text for _, _, text in results])


# ---- scoring -----------------------------------------------------------------------------------

def _bm25s():
    try:
        import bm25s  # optional dependency: the `retrieval` extra
    except ImportError:
        raise TiaoyuError("the BM25 index needs bm25s: pip install 'tiaoyu[retrieval]' (or pip install bm25s)") from None
    return bm25s


def _top_k(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the k best positive scores, best first; ties to the lower index."""
    pos = np.flatnonzero(scores > 0)
    if pos.size == 0 or k < 1:
        return []
    if pos.size > k:
        part = pos[np.argpartition(-scores[pos], k - 1)[:k]]
        kth = scores[part].min()
        pos = pos[scores[pos] >= kth]  # keep every tie of the k-th score, so ties resolve by index
    order = np.lexsort((pos, -scores[pos]))
    return [int(i) for i in pos[order][:k]]


class Retriever:
    """Passages + their bm25s index. `search(query, k)` → [(score, doc_id, text)], best first."""

    def __init__(self, passages: list[Passage], bm25, meta: dict | None = None):
        self.passages = passages
        self.bm25 = bm25
        self.meta = meta or {}

    def __len__(self) -> int:
        return len(self.passages)

    @classmethod
    def build(cls, passages: list[Passage], meta: dict | None = None) -> "Retriever":
        if not passages:
            raise TiaoyuError("empty corpus: no passage to index")
        bm25s = _bm25s()
        vocab: dict[str, int] = collections.defaultdict(itertools.count().__next__)  # term -> id, new ids as met
        term_id = vocab.__getitem__
        ids = [list(map(term_id, analyze(p.text))) for p in passages]
        vocab = dict(vocab)
        bm = bm25s.BM25(k1=K1, b=B, method="lucene")
        bm.index(bm25s.tokenization.Tokenized(ids=ids, vocab=vocab), show_progress=False)
        return cls(passages, bm, meta)

    def scores(self, query: str) -> np.ndarray:
        ids = self.bm25.get_tokens_ids(query_terms(query))
        if not ids:
            return np.zeros(len(self.passages), dtype=np.float32)
        return np.asarray(self.bm25.get_scores(ids), dtype=np.float32)

    def search(self, query: str, k: int = 3) -> list[tuple[float, str, str]]:
        if k < 1:
            raise TiaoyuError(f"k must be >= 1, got {k}")
        s = self.scores(query)
        return [(float(s[i]), self.passages[i].doc_id, self.passages[i].text) for i in _top_k(s, k)]

    def save(self, out: str | os.PathLike) -> Path:
        """Write the index folder atomically; refuses to replace a folder that is not a tiaoyu index."""
        out = Path(out)
        if out.exists():
            if not out.is_dir():
                raise TiaoyuError(f"-o {out}: exists and is not a folder")
            if any(out.iterdir()) and not (out / "index.json").exists():
                raise TiaoyuError(f"-o {out}: a non-empty folder that is not a tiaoyu index; will not replace it "
                                  "(pick a new folder)")
        meta = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "analyzer": ANALYZER, "k1": K1, "b": B,
                "passages": len(self.passages), "documents": len({p.doc_id for p in self.passages}), **self.meta}
        with atomic_dir(out) as tmp:
            self.bm25.save(str(tmp), allow_pickle=False, show_progress=False)
            with open(tmp / "passages.jsonl", "wb") as f:
                for p in self.passages:
                    f.write(orjson.dumps({"id": p.doc_id, "text": p.text}) + b"\n")
            (tmp / "index.json").write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2) + b"\n")
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Retriever":
        p = Path(path)
        if not p.exists():
            raise TiaoyuError(f"{p}: no such index folder (build one: tiaoyu index DOCS.jsonl -o {p})")
        if not p.is_dir():
            raise TiaoyuError(f"{p}: not a folder (an index is a folder made by tiaoyu index)")
        mf = p / "index.json"
        try:
            meta = orjson.loads(mf.read_bytes()) if mf.exists() else None
        except orjson.JSONDecodeError:
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
            raise TiaoyuError(f"{p}: not a tiaoyu index (no valid index.json); build one with tiaoyu index DOCS.jsonl -o DIR")
        if meta.get("version") != INDEX_VERSION or meta.get("analyzer") != ANALYZER:
            raise TiaoyuError(f"{p}: index version {meta.get('version')} / analyzer {meta.get('analyzer')!r} "
                              f"differs from this tiaoyu's ({INDEX_VERSION}); rebuild it with tiaoyu index")
        passages = [Passage(str(o["id"]), o["text"]) for _, o in iter_jsonl(p / "passages.jsonl")]
        bm25s = _bm25s()
        try:
            bm = bm25s.BM25.load(str(p), mmap=False, allow_pickle=False, load_corpus=False, show_progress=False)
        except (OSError, ValueError, KeyError) as e:
            raise TiaoyuError(f"{p}: damaged index ({e}); rebuild it with tiaoyu index") from None
        if int(bm.scores["num_docs"]) != len(passages) or len(passages) != meta.get("passages"):
            raise TiaoyuError(f"{p}: damaged index (passages.jsonl and the BM25 arrays disagree); rebuild it")
        return cls(passages, bm, {k: v for k, v in meta.items() if k in ("sources", "field", "chunk_chars")})


def build_index(paths: Sequence[str | os.PathLike], field: str = "text",
                chunk_chars: int = DEFAULT_CHUNK_CHARS) -> Retriever:
    passages = read_passages(paths, field, chunk_chars)
    return Retriever.build(passages, {"sources": [str(x) for x in paths], "field": field, "chunk_chars": chunk_chars})


def open_retriever(source: str | os.PathLike | Sequence[str | os.PathLike], field: str = "text",
                   chunk_chars: int = DEFAULT_CHUNK_CHARS) -> Retriever:
    """An index folder (`tiaoyu index … -o DIR`) is loaded; JSONL files are indexed in memory."""
    srcs = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if len(srcs) == 1 and Path(srcs[0]).is_dir():
        return Retriever.load(srcs[0])
    if len(srcs) == 1 and not Path(srcs[0]).exists():
        raise TiaoyuError(f"{srcs[0]}: no such file or index folder")
    return build_index(srcs, field, chunk_chars)


# ---- the reference: the same BM25 in plain Python ---------------------------------------------------

class PlainBM25:
    """BM25 (Lucene variant, as above) with a dict of postings and a Python loop per query term.

    The baseline of benchmarks/bench_retrieval.py and the reference the tests compare bm25s with;
    `tiaoyu synth` uses it too, so the corpus it writes does not depend on an optional package."""

    def __init__(self, docs: Sequence[Sequence[str]], k1: float = K1, b: float = B):
        self.k1, self.b = k1, b
        self.n = len(docs)
        self.lens = [len(d) for d in docs]
        self.avgdl = (sum(self.lens) / self.n) if self.n else 0.0
        self.postings: dict[str, list[tuple[int, int]]] = {}
        for i, d in enumerate(docs):
            counts: dict[str, int] = {}
            for t in d:
                counts[t] = counts.get(t, 0) + 1
            for t, c in counts.items():
                self.postings.setdefault(t, []).append((i, c))
        self.idf = {t: math.log(1 + (self.n - len(ps) + 0.5) / (len(ps) + 0.5)) for t, ps in self.postings.items()}

    def scores(self, terms: Sequence[str]) -> dict[int, float]:
        out: dict[int, float] = {}
        k1, b, avgdl, lens = self.k1, self.b, self.avgdl, self.lens
        for t in dict.fromkeys(terms):
            ps = self.postings.get(t)
            if not ps:
                continue
            idf = self.idf[t]
            for d, tf in ps:
                out[d] = out.get(d, 0.0) + idf * tf / (tf + k1 * (1 - b + b * lens[d] / avgdl))
        return out

    def top_k(self, terms: Sequence[str], k: int) -> list[tuple[float, int]]:
        s = self.scores(terms)
        return sorted(((v, d) for d, v in s.items() if v > 0), key=lambda x: (-x[0], x[1]))[:k]
