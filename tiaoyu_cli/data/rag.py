"""The one RAG layout: how retrieved passages and a question share the user turn.

    Context:
    <passage 1 — the best match>

    <passage 2>

    Question: <the question>

Passages are joined by a blank line, best first (the `search` tool returns the same text). The
layout is the same for Chinese and English, and it is what every part uses: `tiaoyu prep` turns
`{"context", "question", "answer"}` records into chat records in it, `tiaoyu synth` writes its RAG
training records in it, `sft` trains on them like any chat record, and `tiaoyu chat --retrieve …
--rag` builds the prompt with it before generating.
"""

from __future__ import annotations

CONTEXT_LABEL = "Context:"
QUESTION_LABEL = "Question:"


def join_passages(passages: list[str] | tuple[str, ...]) -> str:
    """Passage texts joined by a blank line (each stripped), in the order given: best first."""
    return "\n\n".join(p.strip() for p in passages if p and p.strip())


def rag_prompt(passages: list[str] | tuple[str, ...] | str, question: str) -> str:
    """The user turn that carries `passages` (a list, or text already joined) before `question`."""
    ctx = passages.strip() if isinstance(passages, str) else join_passages(passages)
    return f"{CONTEXT_LABEL}\n{ctx}\n\n{QUESTION_LABEL} {question.strip()}"


def split_rag_prompt(text: str) -> tuple[str, str] | None:
    """(context, question) of a user turn in the layout, or None when `text` is not in it."""
    if not text.startswith(CONTEXT_LABEL + "\n"):
        return None
    head, sep, question = text.rpartition(f"\n\n{QUESTION_LABEL} ")
    if not sep:
        return None
    return head[len(CONTEXT_LABEL) + 1:], question
