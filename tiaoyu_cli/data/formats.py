"""Recognise the record formats people have and turn them into the five kinds of DESIGN §1.

Detection looks at a record's fields, first match wins:

| fields of the input record                                     | format        | becomes        |
|----------------------------------------------------------------|---------------|----------------|
| `messages: [{role, content[, reasoning]}]` (+ `tools`)         | chat          | chat           |
| `conversations: [{from, value}]` or `[{role, content}]` (+ `tools`) | ShareGPT | chat           |
| `chosen`, `rejected` (+ `prompt`/`question`)                   | preference    | preference     |
| `context` (a string or a list of passages), `question`/`prompt`/`query`, `answer` | RAG | chat, user turn in the RAG layout (data/rag.py) |
| a question (`prompt`/`question`/`instruction`/`query`/`problem`), reasoning (`reasoning`/`think`/`thinking`/`steps`/`rationale`/`cot`/`reasoning_content`) and an answer (`answer`/`response`/`output`/`completion`/`final_answer`) | reasoning | chat, assistant `reasoning` field |
| `instruction`, `output` (+ `input`, `system`, `history`)       | Alpaca        | chat           |
| `prompt`, `completion`                                         | completion    | chat           |
| `prompt`/`question`/`instruction`/`query`, `response` (+ `context`) | response  | chat           |
| `prompt`/`question`/`problem`, `answer`                        | verifiable    | verifiable     |
| `text`, `label`                                                | classification| classification |
| `text` (with `<s>…</s>` markers: one record per marked document) | text        | text           |

Output records carry only the fields of their kind, in the order of DESIGN §1; other fields
(ids, metadata) are dropped. Roles are normalised (`human` → user, `gpt`/`bot`/`model`/`chatgpt`
→ assistant). Tool calls (data/tool_records.py) come out in the OpenAI format: assistant
`tool_calls` with JSON-string arguments, `tool` messages with `tool_call_id`, from OpenAI records,
ShareGPT `function_call` / `observation` turns, and Hermes/Qwen text with `<tool_call>{…}</tool_call>`
(results in `<tool_response>…</tool_response>`); a record's `tools` schemas are kept. An assistant message whose content starts with `<think>…</think>` gets that part
moved into its `reasoning` field: special tokens belong to the chat template, never to text.

`--to KIND` forces the output kind. Conversions that keep meaning are allowed:
chat/preference/verifiable/classification → text (the strings joined by newlines);
verifiable (prompt → user, answer → assistant), preference (prompt + chosen) and
classification (text → user, label → assistant) → chat; chat ending in an assistant answer,
and preference (prompt + chosen) → verifiable. Anything else is an error for that record.
"""

from __future__ import annotations

import re
from typing import Any

from tiaoyu_cli.data.rag import rag_prompt
from tiaoyu_cli.data import tool_records as tr

KINDS = ("text", "chat", "preference", "verifiable", "classification")

QUESTION_KEYS = ("prompt", "question", "instruction", "query", "problem")
REASONING_KEYS = ("reasoning", "think", "thinking", "steps", "rationale", "cot", "reasoning_content")
ANSWER_KEYS = ("answer", "response", "output", "completion", "final_answer")
ROLE_ALIASES = {
    "system": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
    "chatgpt": "assistant", "ai": "assistant",
}
_SEED_DOC = re.compile(r"<s>(.*?)</s>", re.S)
_THINK = re.compile(r"\s*<think>(.*?)</think>\s*", re.S)


class FormatError(Exception):
    """A record that cannot be read as any format (or as the forced kind). `field` names the field."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def _type_name(v: Any) -> str:
    return {str: "a string", int: "a number", float: "a number", bool: "a boolean", list: "a list",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def _str(obj: dict, key: str, where: str | None = None) -> str:
    v = obj.get(key)
    if not isinstance(v, str):
        raise FormatError(f"expected a string, got {_type_name(v)}", where or key)
    return v


def _first_key(obj: dict, keys: tuple[str, ...]) -> str | None:
    for k in keys:
        if k in obj and obj[k] is not None:
            return k
    return None


def _answer_str(obj: dict, key: str) -> str:
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise FormatError(f"expected a string or a number, got {_type_name(v)}", key)
    return v if isinstance(v, str) else str(v)


def _messages(v: Any, field: str, need_assistant: bool = True) -> list[dict]:
    """Validate and normalise a list of chat messages (tool calls to the OpenAI format)."""
    if not isinstance(v, list):
        raise FormatError(f"expected a list of messages, got {_type_name(v)}", field)
    if not v:
        raise FormatError("empty list of messages", field)
    try:
        out = _tool_aware_messages(v, field)
        tr.link_tool_messages(out, field)
    except tr.RecordError as e:
        raise FormatError(str(e), e.field) from None
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise FormatError("no assistant message", field)
    return out


def _tool_aware_messages(v: list, field: str) -> list[dict]:
    out: list[dict] = []
    counter = [0]  # ids for calls that come without one
    for i, m in enumerate(v):
        f = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise FormatError(f"expected a message object, got {_type_name(m)}", f)
        if "role" in m or "content" in m:
            rk, ck = "role", "content"
        elif "from" in m or "value" in m:
            rk, ck = "from", "value"
        else:
            raise FormatError("message has neither role/content nor from/value", f)
        role = m.get(rk)
        if not isinstance(role, str):
            raise FormatError(f"expected a string, got {_type_name(role)}", f"{f}.{rk}")
        low = role.lower()
        norm = ROLE_ALIASES.get(low) or tr.TOOL_ROLES.get(low) or ("call" if low in tr.CALL_ROLES else None)
        if norm is None:
            raise FormatError(f"unknown role {role!r} (expected system, user, assistant or tool)", f"{f}.{rk}")
        content = m.get(ck)
        calls = None
        if norm == "assistant" and m.get("tool_calls") is not None:
            calls = tr.normalise_calls(m["tool_calls"], f"{f}.tool_calls", counter)
            content = "" if content is None else content
        if not isinstance(content, str):
            raise FormatError(f"expected a string, got {_type_name(content)}", f"{f}.{ck}")
        if norm == "call":  # a ShareGPT function_call turn: the value is the call's JSON
            out.append({"role": "assistant", "content": "",
                        "tool_calls": tr.calls_from_json_text(content, f"{f}.{ck}", counter)})
            continue
        if norm == "tool":
            parts = tr.split_hermes_responses(content)
            cid = m.get("tool_call_id")
            if cid is not None and not isinstance(cid, str):
                raise FormatError(f"expected a string, got {_type_name(cid)}", f"{f}.tool_call_id")
            for p in parts:
                out.append({"role": "tool", "content": p, **({"tool_call_id": cid} if cid and len(parts) == 1 else {})})
            continue
        msg = {"role": norm, "content": content}
        rkey = _first_key(m, ("reasoning", "reasoning_content", "thinking", "think"))
        if rkey is not None:
            if norm != "assistant":
                raise FormatError("only assistant messages carry reasoning", f"{f}.{rkey}")
            msg = {"role": norm, "reasoning": _reasoning_value(m[rkey], f"{f}.{rkey}"), "content": content}
        elif norm == "assistant" and "<think>" in content:
            t = _THINK.match(content)
            if t:
                msg = {"role": norm, "reasoning": t.group(1), "content": content[t.end():]}
        if norm == "assistant" and calls is None and "<tool_call>" in msg["content"]:
            msg["content"], calls = tr.split_hermes_calls(msg["content"], f"{f}.{ck}", counter)
        if calls:
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def _chat_record(obj: dict, messages: list[dict]) -> dict:
    rec: dict = {"messages": messages}
    if obj.get("tools") is not None:
        try:
            tools = tr.check_tools(obj["tools"])
        except tr.RecordError as e:
            raise FormatError(str(e), e.field) from None
        if tools:
            rec["tools"] = tools
    return rec


def _reasoning_value(v: Any, field: str) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        for i, s in enumerate(v):
            if not isinstance(s, str):
                raise FormatError(f"expected a string, got {_type_name(s)}", f"{field}[{i}]")
        return "\n".join(v)
    raise FormatError(f"expected a string or a list of strings, got {_type_name(v)}", field)


def _str_or_messages(obj: dict, key: str) -> str | list[dict]:
    v = obj.get(key)
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        return _messages(v, key, need_assistant=False)
    raise FormatError(f"expected a string or a list of messages, got {_type_name(v)}", key)


def _user(content: str) -> dict:
    return {"role": "user", "content": content}


def _assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def _system_prefix(obj: dict) -> list[dict]:
    if obj.get("system") is None:
        return []
    s = _str(obj, "system")
    return [{"role": "system", "content": s}] if s else []


# ----- detection and conversion to the canonical kinds ----------------------------------------


def detect(obj: dict) -> str:
    """Name of the input format of one JSON record (see the module table); FormatError if none."""
    if "messages" in obj:
        return "chat"
    if "conversations" in obj:
        return "sharegpt"
    if "chosen" in obj and "rejected" in obj:
        return "preference"
    if "context" in obj and "answer" in obj and _first_key(obj, ("question", "prompt", "query")):
        return "rag"
    if _first_key(obj, REASONING_KEYS) and _first_key(obj, QUESTION_KEYS) and _first_key(obj, ANSWER_KEYS):
        return "reasoning"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    if "prompt" in obj and "completion" in obj:
        return "completion"
    if "response" in obj and _first_key(obj, ("prompt", "question", "instruction", "query")):
        return "response"
    if "answer" in obj and _first_key(obj, ("prompt", "question", "problem")):
        return "verifiable"
    if "text" in obj and "label" in obj:
        return "classification"
    if "text" in obj:
        return "text"
    keys = ", ".join(sorted(obj)) or "none"
    raise FormatError(f"cannot tell the record kind from its fields ({keys}); expected e.g. text, messages, "
                      "conversations, instruction/output, prompt/completion, prompt/chosen/rejected, prompt/answer, text/label")


def record_kind(rec: dict) -> str | None:
    """Which of the five kinds (KINDS) a record already in canonical form is, by its fields; None when it
    has the shape of none. Unlike `detect` (input formats), this reads the records the stages take:

    | fields                                          | kind           |
    |-------------------------------------------------|----------------|
    | `chosen` and/or `rejected` (+ `prompt`)         | preference     |
    | `answer` with `prompt`, or with `messages` (a conversation as the question) | verifiable |
    | `messages`                                      | chat           |
    | `text`, `label`                                 | classification |
    | `text`                                          | text           |

    A record with only one of chosen/rejected is still a preference record (its reader names the missing side).
    """
    if "chosen" in rec or "rejected" in rec:
        return "preference"
    if "answer" in rec and ("prompt" in rec or "messages" in rec):
        return "verifiable"
    if "messages" in rec:
        return "chat"
    if "text" in rec:
        return "classification" if "label" in rec else "text"
    return None


def canonical(obj: dict) -> tuple[str, list[dict]]:
    """(kind, records) for one input record, in the canonical form of its kind."""
    fmt = detect(obj)
    if fmt == "chat":
        return "chat", [_chat_record(obj, _messages(obj["messages"], "messages"))]
    if fmt == "sharegpt":
        return "chat", [_chat_record(obj, _system_prefix(obj) + _messages(obj["conversations"], "conversations"))]
    if fmt == "preference":
        chosen, rejected = _str_or_messages(obj, "chosen"), _str_or_messages(obj, "rejected")
        pk = _first_key(obj, ("prompt", "question"))
        if pk is not None:
            prompt: str | list[dict] = _str_or_messages(obj, pk)
        elif isinstance(chosen, list) and isinstance(rejected, list):
            n = 0  # implicit prompt: the messages chosen and rejected share
            while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                n += 1
            if n == 0:
                raise FormatError("no prompt field and no shared first messages", "prompt")
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        else:
            raise FormatError("missing (a preference record needs prompt, chosen and rejected)", "prompt")
        return "preference", [{"prompt": prompt, "chosen": chosen, "rejected": rejected}]
    if fmt == "rag":
        ctx = obj["context"]
        if isinstance(ctx, list) and all(isinstance(c, str) for c in ctx):
            passages: list[str] | str = ctx
        elif isinstance(ctx, str):
            passages = ctx
        else:
            raise FormatError(f"expected a string or a list of passage strings, got {_type_name(ctx)}", "context")
        q = _str(obj, _first_key(obj, ("question", "prompt", "query")))  # type: ignore[arg-type]
        return "chat", [{"messages": _system_prefix(obj) + [_user(rag_prompt(passages, q)),
                                                            _assistant(_answer_str(obj, "answer"))]}]
    if fmt == "reasoning":
        qk, rk, ak = _first_key(obj, QUESTION_KEYS), _first_key(obj, REASONING_KEYS), _first_key(obj, ANSWER_KEYS)
        q = _str(obj, qk)  # type: ignore[arg-type]
        if "input" in obj and isinstance(obj["input"], str) and obj["input"].strip():
            q = f"{q}\n\n{obj['input']}"
        msg = {"role": "assistant", "reasoning": _reasoning_value(obj[rk], rk), "content": _answer_str(obj, ak)}  # type: ignore[index]
        return "chat", [{"messages": _system_prefix(obj) + [_user(q), msg]}]
    if fmt == "alpaca":
        q = _str(obj, "instruction")
        inp = obj.get("input")
        if inp is not None and not isinstance(inp, str):
            raise FormatError(f"expected a string, got {_type_name(inp)}", "input")
        if inp and inp.strip():
            q = f"{q}\n\n{inp}"
        history = []
        for i, turn in enumerate(obj.get("history") or []):
            if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise FormatError("expected a [question, answer] pair of strings", f"history[{i}]")
            history += [_user(turn[0]), _assistant(turn[1])]
        return "chat", [{"messages": _system_prefix(obj) + history + [_user(q), _assistant(_str(obj, "output"))]}]
    if fmt == "completion":
        p, c = obj["prompt"], obj["completion"]
        if isinstance(p, list) or isinstance(c, list):
            msgs = _messages(p, "prompt", need_assistant=False) if isinstance(p, list) else [_user(_str(obj, "prompt"))]
            msgs += _messages(c, "completion") if isinstance(c, list) else [_assistant(_str(obj, "completion"))]
            return "chat", [{"messages": msgs}]
        return "chat", [{"messages": _system_prefix(obj) + [_user(_str(obj, "prompt")), _assistant(_str(obj, "completion"))]}]
    if fmt == "response":
        qk = _first_key(obj, ("prompt", "question", "instruction", "query"))
        q = _str(obj, qk)  # type: ignore[arg-type]
        ctx = obj.get("context") if obj.get("context") is not None else obj.get("input")
        if ctx is not None and not isinstance(ctx, str):
            raise FormatError(f"expected a string, got {_type_name(ctx)}", "context" if "context" in obj else "input")
        if ctx and ctx.strip():
            q = f"{q}\n\n{ctx}"
        return "chat", [{"messages": _system_prefix(obj) + [_user(q), _assistant(_str(obj, "response"))]}]
    if fmt == "verifiable":
        pk = _first_key(obj, ("prompt", "question", "problem"))
        return "verifiable", [{"prompt": _str_or_messages(obj, pk), "answer": _answer_str(obj, "answer")}]  # type: ignore[arg-type]
    if fmt == "classification":
        lab = obj["label"]
        if isinstance(lab, bool) or not isinstance(lab, (str, int)):
            raise FormatError(f"expected a string or an integer, got {_type_name(lab)}", "label")
        return "classification", [{"text": _str(obj, "text"), "label": str(lab)}]
    text = _str(obj, "text")
    if "<s>" in text and "</s>" in text:
        return "text", [{"text": d} for d in split_seed_text(text)]
    return "text", [{"text": text}]


def split_seed_text(text: str) -> list[str]:
    """The seed form "<s>doc one</s> <s>doc two</s>" → ["doc one", "doc two"]. Text outside the
    markers (other than whitespace) is kept as a document of its own."""
    docs: list[str] = []
    pos = 0
    for m in _SEED_DOC.finditer(text):
        outside = text[pos:m.start()].replace("<s>", "").replace("</s>", "")
        if outside.strip():
            docs.append(outside)
        docs.append(m.group(1))
        pos = m.end()
    tail = text[pos:].replace("<s>", "").replace("</s>", "")
    if tail.strip():
        docs.append(tail)
    return docs


# ----- forcing a kind (--to) ----------------------------------------------------------------


def _as_text(v: str | list[dict]) -> str:
    return v if isinstance(v, str) else "\n".join(m["content"] for m in v)


def _as_messages(v: str | list[dict], role: str) -> list[dict]:
    return [{"role": role, "content": v}] if isinstance(v, str) else list(v)


def coerce(kind: str, rec: dict, to: str) -> dict:
    """Convert one canonical record of `kind` to kind `to` (see the module docstring)."""
    if kind == to:
        return rec
    if to == "text":
        if kind == "chat":
            return {"text": "\n".join(m["content"] for m in rec["messages"])}
        if kind == "preference":
            return {"text": _as_text(rec["prompt"]) + "\n" + _as_text(rec["chosen"])}
        if kind == "verifiable":
            return {"text": _as_text(rec["prompt"]) + "\n" + rec["answer"]}
        if kind == "classification":
            return {"text": rec["text"]}
    if to == "chat":
        if kind == "verifiable":
            return {"messages": _as_messages(rec["prompt"], "user") + [_assistant(rec["answer"])]}
        if kind == "preference":
            return {"messages": _as_messages(rec["prompt"], "user") + _as_messages(rec["chosen"], "assistant")}
        if kind == "classification":
            return {"messages": [_user(rec["text"]), _assistant(rec["label"])]}
    if to == "verifiable":
        if kind == "chat":
            msgs = rec["messages"]
            if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
                raise FormatError("a chat record becomes verifiable only when it ends with an assistant answer", "messages")
            prompt = msgs[:-1]
            return {"prompt": prompt[0]["content"] if len(prompt) == 1 and prompt[0]["role"] == "user" else prompt,
                    "answer": msgs[-1]["content"]}
        if kind == "preference" and isinstance(rec["chosen"], str):
            return {"prompt": rec["prompt"], "answer": rec["chosen"]}
    raise FormatError(f"cannot convert a {kind} record to {to}")


def convert(obj: dict, to: str | None = None) -> tuple[str, list[dict]]:
    """Detect, canonicalise and (with `to`) force the kind of one JSON record."""
    if not isinstance(obj, dict):
        raise FormatError(f"expected a JSON object, got {_type_name(obj)}")
    kind, recs = canonical(obj)
    if to is None or to == kind:
        return kind, recs
    return to, [coerce(kind, r, to) for r in recs]


# ----- strings of a record (cleaning, length, near-dup) ------------------------------------------


def map_strings(kind: str, rec: dict, fn) -> dict:
    """A copy of `rec` with `fn` applied to every text string (not roles, not labels)."""
    def msgs(ms: list[dict]) -> list[dict]:
        out = []
        for m in ms:
            n = {"role": m["role"]}
            if "reasoning" in m:
                n["reasoning"] = fn(m["reasoning"])
            n["content"] = fn(m["content"])
            for k in ("tool_calls", "tool_call_id"):  # JSON and ids: never cleaned
                if k in m:
                    n[k] = m[k]
            out.append(n)
        return out

    def sm(v):
        return fn(v) if isinstance(v, str) else msgs(v)

    if kind == "text":
        return {"text": fn(rec["text"])}
    if kind == "chat":
        return {"messages": msgs(rec["messages"]), **({"tools": rec["tools"]} if rec.get("tools") else {})}
    if kind == "preference":
        return {"prompt": sm(rec["prompt"]), "chosen": sm(rec["chosen"]), "rejected": sm(rec["rejected"])}
    if kind == "verifiable":
        return {"prompt": sm(rec["prompt"]), "answer": fn(rec["answer"])}
    return {"text": fn(rec["text"]), "label": rec["label"].strip()}


def record_text(kind: str, rec: dict) -> str:
    """All text of a record joined by newlines (for the length filter and near-dup detection)."""
    parts: list[str] = []
    map_strings(kind, rec, lambda s: parts.append(s) or s)
    return "\n".join(parts)


def empty_part(kind: str, rec: dict) -> str | None:
    """Name of a required part that is empty after cleaning, or None."""
    if kind == "text":
        return "text" if not rec["text"] else None
    if kind == "chat":
        ms = rec["messages"]
        if not any(m["role"] == "assistant" and (m["content"] or m.get("reasoning") or m.get("tool_calls")) for m in ms):
            return "assistant message"
        if not any(m["role"] == "user" and m["content"] for m in ms):
            return "user message"
        return None
    if kind == "preference":
        for k in ("prompt", "chosen", "rejected"):
            if not _as_text(rec[k]).strip():
                return k
        return None
    if kind == "verifiable":
        for k in ("prompt", "answer"):
            if not _as_text(rec[k]).strip():
                return k
        return None
    for k in ("text", "label"):
        if not rec[k]:
            return k
    return None
