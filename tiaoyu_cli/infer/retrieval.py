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


__all__ = ["SEARCH_SCHEMA", "NO_RESULTS", "Passage", "Retriever", "make_search", "open_retriever",
           "format_passages", "rag_messages"]
