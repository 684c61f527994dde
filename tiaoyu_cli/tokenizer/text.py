"""Which text a JSONL record contributes to tokenizer training and to pretraining shards.

Record kinds (DESIGN §1): text, chat, preference, verifiable, classification — told apart by
`tiaoyu_cli.data.formats.record_kind`.

* `sample_texts(rec)`: every string a tokenizer should see (including a preference pair's rejected
  answer: the tokenizer must cut it well too).
* `document_text(rec)`: the one pretraining document a record becomes. Chat turns are rendered
  as plain "role: content" lines; a preference record keeps its prompt and the *chosen* answer;
  a verifiable record its prompt and answer.

Both raise RecordError (a ValueError with `.field`) on a record they cannot read; callers add
file and line.
"""

from __future__ import annotations

from tiaoyu_cli.data.formats import record_kind


class RecordError(ValueError):
    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def _messages_text(msgs, field: str) -> str:
    if not isinstance(msgs, list):
        raise RecordError(field, f"expected a list of messages, got {type(msgs).__name__}")
    lines = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RecordError(f"{field}[{k}]", f"expected an object with role and content, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise RecordError(f"{field}[{k}]", "role and content must be strings")
        reasoning = m.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            content = reasoning + "\n" + content
        lines.append(f"{role}: {content}")
    return "\n".join(lines)


def _str_or_messages(rec: dict, field: str) -> str:
    v = rec[field]
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        return _messages_text(v, field)
    raise RecordError(field, f"expected a string or a list of messages, got {type(v).__name__}")


def _need_str(rec: dict, field: str) -> str:
    v = rec[field]
    if not isinstance(v, str):
        raise RecordError(field, f"expected a string, got {type(v).__name__}")
    return v


def _kind(rec: dict) -> str:
    kind = record_kind(rec)
    if kind is None:
        raise RecordError(
            None,
            "no text to read: expected a record with 'text', 'messages', 'prompt'+'chosen'+'rejected' "
            "or 'prompt'+'answer' (convert other formats with `tiaoyu prep`)",
        )
    return kind


def _question(rec: dict) -> str:
    """The question of a verifiable record: its prompt, or its conversation."""
    return _str_or_messages(rec, "prompt" if "prompt" in rec else "messages")


def sample_texts(rec: dict) -> list[str]:
    """All strings of a record, for tokenizer training."""
    kind = _kind(rec)
    if kind in ("text", "classification"):
        return [_need_str(rec, "text")]
    if kind == "chat":
        return [_messages_text(rec["messages"], "messages")]
    if kind == "preference":
        out = [_str_or_messages(rec, "prompt")] if "prompt" in rec else []
        for f in ("chosen", "rejected"):
            if f not in rec:
                raise RecordError(f, "missing (a preference record has prompt, chosen and rejected)")
            out.append(_str_or_messages(rec, f))
        return out
    return [_question(rec), _need_str(rec, "answer")]


def document_text(rec: dict) -> str:
    """The pretraining document of a record."""
    kind = _kind(rec)
    if kind in ("text", "classification"):
        return _need_str(rec, "text")
    if kind == "chat":
        return _messages_text(rec["messages"], "messages")
    if kind == "preference":
        if "chosen" not in rec:
            raise RecordError("chosen", "missing (a preference record has prompt, chosen and rejected)")
        prompt = _str_or_messages(rec, "prompt") if "prompt" in rec else ""
        chosen = _str_or_messages(rec, "chosen")
        return f"{prompt}\n{chosen}" if prompt else chosen
    return f"{_question(rec)}\n{_need_str(rec, 'answer')}"
