"""Retrieval at inference time: the `search` tool and plain RAG prompts.

    r = open_retriever("index/")                 # or JSONL documents, indexed in memory
    search = make_search(r, k=3)                 # the `search` tool: query → passages text
    search("Where does Kamiro live?")            # "Kamiro lives in Lunford. …\\n\\n…" (best first)
    rag_messages(messages, r, k=3)               # the last user turn rewritten in the RAG layout

The index, analyzer and BM25 scoring live in `tiaoyu_cli/data/retrieval.py` (below this layer,
so `tiaoyu synth` and `prep` can use them too); the prompt layout is `tiaoyu_cli/data/rag.py`.
`SEARCH_SCHEMA` is the tool's OpenAI function schema, for the tool registry of `chat --tools`.
"""

from __future__ import annotations

from typing import Callable

from tiaoyu_cli.data.rag import rag_prompt
from tiaoyu_cli.data.retrieval import Passage, Retriever, format_passages, open_retriever
from tiaoyu_cli.errors import TiaoyuError

NO_RESULTS = "(no passage matches the query)"

SEARCH_SCHEMA: dict = {
    "name": "search",
    "description": "Search the local documents; returns the best-matching passages, best first, "
                   "separated by blank lines.",
    "parameters": {
        "type": "object",
        "properties": {"query": {"type": "string", "description": "what to look for (keywords or a question)"}},
        "required": ["query"],
    },
}


def make_search(retriever: Retriever, k: int = 3) -> Callable[[str], str]:
    """The `search` tool: `fn(query)` → the top-k passages' text joined by a blank line, best first."""
    if k < 1:
        raise TiaoyuError(f"--retrieve-k must be >= 1, got {k}")

    def search(query: str) -> str:
        if not isinstance(query, str) or not query.strip():
            raise TiaoyuError("search: 'query' must be a non-empty string")
        return format_passages(retriever.search(query, k)) or NO_RESULTS

    search.__name__ = "search"
    return search


def rag_messages(messages: list[dict], retriever: Retriever, k: int = 3) -> list[dict]:
    """`messages` with the last user turn replaced by the RAG layout (passages retrieved for it).
    With no matching passage the turn still gets the layout, with an empty context."""
    idx = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if idx is None:
        raise TiaoyuError("RAG needs a user message to retrieve passages for")
    question = messages[idx]["content"]
    passages = [text for _, _, text in retriever.search(question, k)]
    out = list(messages)
    out[idx] = {**messages[idx], "content": rag_prompt(passages, question)}
    return out


def rag_rewriter(retriever: Retriever, k: int = 3) -> Callable[[str], str]:
    """`fn(question)` → the user turn in the RAG layout (for `ChatSession(rewrite_user=…)`)."""
    if k < 1:
        raise TiaoyuError(f"--retrieve-k must be >= 1, got {k}")
    return lambda question: rag_prompt([t for _, _, t in retriever.search(question, k)], question)


def rag_record(rec: dict, rewrite: Callable[[str], str]) -> dict:
    """A JSONL prompt record (`prompt` string or `messages`) with the user turn it asks rewritten by
    `rewrite` (e.g. `rag_rewriter`). Records of other shapes are returned unchanged (the reader reports them)."""
    msgs = rec.get("messages")
    if isinstance(msgs, list):
        end = len(msgs) - 1 if msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant" else len(msgs)
        idx = max((i for i in range(end) if isinstance(msgs[i], dict) and msgs[i].get("role") == "user"
                   and isinstance(msgs[i].get("content"), str)), default=None)
        if idx is None:
            return rec
        out = list(msgs)
        out[idx] = {**msgs[idx], "content": rewrite(msgs[idx]["content"])}
        return {**rec, "messages": out}
    if isinstance(rec.get("prompt"), str):
        return {**rec, "prompt": rewrite(rec["prompt"])}
    return rec


def rag_options(retrieve: str | None, rag: bool, k: int = 3, field: str = "text",
                search_tool: bool = False) -> Callable[[str], str] | None:
    """Check `--retrieve SRC --rag --retrieve-k K` and return the user-turn rewriter (None without them, and
    None when --retrieve serves the `search` tool instead: `--tools search --retrieve SRC`)."""
    if retrieve is None and not rag:
        return None
    if retrieve is None:
        raise TiaoyuError("--rag needs --retrieve DOCS.jsonl or --retrieve index/ (the passages to put in the prompt)")
    if not rag:
        if search_tool:
            return None
        raise TiaoyuError("--retrieve needs --rag (the top passages go into the prompt before the question) or "
                          "--tools search (the model searches them itself)")
    if k < 1:
        raise TiaoyuError(f"--retrieve-k must be >= 1, got {k}")
    return rag_rewriter(open_retriever(retrieve, field), k)


__all__ = ["SEARCH_SCHEMA", "NO_RESULTS", "Passage", "Retriever", "make_search", "open_retriever",
           "format_passages", "rag_messages", "rag_rewriter", "rag_record", "rag_options"]
