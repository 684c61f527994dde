"""Chat records → training examples for SFT (and everything else that learns from conversations).

    ds = ChatDataset("chat.train.jsonl", tokenizer, max_len=256, overflow="truncate", skip_bad=False)
    rows = pack_examples(ds.examples, max_len=256) if packing else ds.examples
    batch = collate(rows[:16])        # {"input_ids", "labels", "attention_mask", "position_ids", "seq_ids"}

A record is `{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str, ["reasoning": str]}, …],
["tools": [schema, …]]}` (DESIGN §1); assistant messages may carry OpenAI `tool_calls`, answered by `tool`
messages (data/tool_records.py checks them). It is rendered with the ChatML template (`Tokenizer.encode_chat`), which also says which
tokens the model learns: the assistant's content (and reasoning) and its closing `<|im_end|>` — in
every assistant turn of a multi-turn record, its tool calls included — and nothing of the system prompt
and tool schemas, the user turns, the tool results or the role headers.

An `Example` is (ids, loss_mask) with loss_mask[t] = 1 when token t is learned. `collate` shifts
for next-token prediction: labels[t] = ids[t+1] where loss_mask[t+1] = 1, else -100 (ignored by the
loss), so a model's logits at position t are scored against labels[t] directly.

Too long: a record with more than `max_len` tokens is cut to its first `max_len` tokens
(`overflow="truncate"`; if no learned token survives the cut it is dropped) or dropped whole
(`overflow="skip"`). Both are counted in `stats`.

Packing (`pack_examples`) puts several short records into one row of at most `max_len` tokens so a
batch holds less padding. Each token keeps its record's identity (`seq_ids`) and its position
*inside its record* (`position_ids`, restarting at 0), and the forward pass that reads them
(`tiaoyu_cli.train.objectives.sft.lm_forward`) lets a token attend only to earlier tokens of its own record
(a block-diagonal causal mask). A packed row therefore computes exactly what the records compute
one by one — no attention leaks from one record into the next — and the loss mask is unchanged:
the last token of each record predicts nothing (label -100), never the first token of the next.

Bad records (no `messages`, unknown role, empty or non-string content, no assistant turn) are an
error naming file:line and the field, or with `skip_bad` are counted in `stats["bad"]` and left out.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from tiaoyu_cli.data.tool_records import RecordError, check_openai_messages, check_tools
from tiaoyu_cli.errors import DataError, TiaoyuError

ROLES = ("system", "user", "assistant", "tool")
IGNORE = -100
OVERFLOW_MODES = ("truncate", "skip")


@dataclass
class Example:
    ids: list[int]
    loss_mask: list[int]  # 1 = the model learns to produce this token
    source: str = ""  # "file:line" of the record (for messages)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class PackedRow:
    """Several examples side by side in one row (see the module docstring)."""

    ids: list[int]
    loss_mask: list[int]
    position_ids: list[int]  # position inside the token's own record
    seq_ids: list[int]  # which record of the row the token belongs to (0, 1, …)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class ChatStats:
    records: int = 0  # records read (valid ones)
    kept: int = 0  # examples produced
    truncated: int = 0  # cut to max_len and kept
    skipped_overflow: int = 0  # too long and dropped (overflow=skip, or nothing learnable left)
    bad: int = 0  # invalid records left out (skip_bad)
    tokens: int = 0  # tokens in the kept examples
    loss_tokens: int = 0  # learned tokens in the kept examples

    def summary(self) -> str:
        parts = [f"{self.kept:,} examples from {self.records:,} records", f"{self.tokens:,} tokens "
                 f"({self.loss_tokens:,} learned)"]
        if self.truncated:
            parts.append(f"{self.truncated:,} truncated")
        if self.skipped_overflow:
            parts.append(f"{self.skipped_overflow:,} skipped as too long")
        if self.bad:
            parts.append(f"{self.bad:,} bad records skipped")
        return ", ".join(parts)


def check_messages(obj: dict, path: str, line: int) -> list[dict]:
    """The validated `messages` of a chat record, or DataError naming path:line and the field."""
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}", path, line)
    if "messages" not in obj:
        hint = ""
        if "label" in obj:
            hint = " (this looks like a classification record: use --task classify)"
        elif "chosen" in obj:
            hint = " (this looks like a preference record: use `tiaoyu rlhf`)"
        elif "prompt" in obj or "instruction" in obj or "conversations" in obj:
            hint = " (convert it to chat records with `tiaoyu prep`)"
        raise DataError(f"missing; a chat record is {{\"messages\": [{{\"role\", \"content\"}}, …]}}{hint}",
                        path, line, "messages")
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"expected a non-empty list of messages, got {_kind(msgs)}", path, line, "messages")
    for k, m in enumerate(msgs):
        where = f"messages[{k}]"
        if not isinstance(m, dict):
            raise DataError(f"expected an object with role and content, got {_kind(m)}", path, line, where)
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"unknown role {role!r} (expected system, user, assistant or tool)", path, line,
                            f"{where}.role")
        content = m.get("content")
        calls = role == "assistant" and m.get("tool_calls")
        if not isinstance(content, str) and not (calls and content is None):
            raise DataError(f"expected a string, got {_kind(content)}", path, line, f"{where}.content")
        if not (content or "").strip() and not calls and role != "tool":
            raise DataError("empty content", path, line, f"{where}.content")
        r = m.get("reasoning")
        if r is not None and not isinstance(r, str):
            raise DataError(f"expected a string, got {_kind(r)}", path, line, f"{where}.reasoning")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError("no assistant turn: nothing to learn", path, line, "messages")
    if any(m.get("tool_calls") is not None or m["role"] == "tool" for m in msgs):
        try:
            check_openai_messages(msgs)
        except RecordError as e:
            raise DataError(str(e), path, line, e.field) from None
    return msgs


def record_tools(obj: dict, path: str, line: int) -> list[dict] | None:
    """The record's `tools` (OpenAI function schemas, normalised) or None."""
    if obj.get("tools") is None:
        return None
    try:
        return check_tools(obj["tools"]) or None
    except RecordError as e:
        raise DataError(str(e), path, line, e.field) from None


def _kind(v) -> str:
    return "null" if v is None else type(v).__name__


def encode_example(tokenizer, messages: list[dict], max_len: int, overflow: str = "truncate",
                   source: str = "", tools: list[dict] | None = None) -> tuple[Example | None, str]:
    """Encode one conversation. Returns (example or None, what happened: "ok" | "truncated" | "skipped")."""
    try:
        ids, mask = tokenizer.encode_chat(messages, tools=tools)
    except TiaoyuError as e:  # e.g. tool records with a tokenizer made before tool calls
        raise TiaoyuError(f"{source}: {e}") from None
    if len(ids) <= max_len:
        return Example(ids, mask, source), "ok"
    if overflow == "skip":
        return None, "skipped"
    ids, mask = ids[:max_len], mask[:max_len]
    if not any(mask[1:]):  # nothing left to learn (position 0 is never predicted)
        return None, "skipped"
    return Example(ids, mask, source), "truncated"


class ChatDataset:
    """Chat records (a JSONL path or a list of dicts) encoded into `Example`s, in file order.

    ChatDataset(source, tokenizer, max_len, overflow="truncate", skip_bad=False)
      .examples   list[Example]
      .messages   the validated conversations, aligned with .examples
      .tools      each record's tool schemas (None when it has none), aligned with .examples
      .stats      ChatStats (counts for the summary line)
    """

    def __init__(self, source: str | os.PathLike | Sequence[dict], tokenizer, max_len: int,
                 overflow: str = "truncate", skip_bad: bool = False, name: str | None = None):
        if overflow not in OVERFLOW_MODES:
            raise TiaoyuError(f"--overflow {overflow!r}: choose truncate or skip")
        if max_len < 2:
            raise TiaoyuError(f"max_len must be at least 2 tokens, got {max_len}")
        self.tokenizer, self.max_len, self.overflow = tokenizer, max_len, overflow
        self.examples: list[Example] = []
        self.messages: list[list[dict]] = []
        self.tools: list[list[dict] | None] = []
        self.answers: list[str | None] = []  # a record's final `answer` field (tool-use data carries one), if any
        self.stats = ChatStats()
        if isinstance(source, (str, os.PathLike)):
            from tiaoyu_cli.data.jsonl import iter_jsonl

            self.name = name or str(source)
            jstats: dict = {}
            items: Iterable[tuple[int, dict]] = iter_jsonl(source, skip_bad=skip_bad, stats=jstats)
        else:
            self.name = name or "<records>"
            jstats = {}
            items = ((i + 1, r) for i, r in enumerate(source))
        for line, obj in items:
            try:
                msgs = check_messages(obj, self.name, line)
                tools = record_tools(obj, self.name, line)
            except DataError:
                if not skip_bad:
                    raise
                self.stats.bad += 1
                continue
            self.stats.records += 1
            ex, what = encode_example(tokenizer, msgs, max_len, overflow, f"{self.name}:{line}", tools)
            if ex is None:
                self.stats.skipped_overflow += 1
                continue
            if what == "truncated":
                self.stats.truncated += 1
            self.examples.append(ex)
            self.messages.append(msgs)
            self.tools.append(tools)
            ans = obj.get("answer")
            self.answers.append(str(ans) if isinstance(ans, (str, int, float)) and not isinstance(ans, bool) else None)
            self.stats.kept += 1
            self.stats.tokens += len(ex.ids)
            self.stats.loss_tokens += sum(ex.loss_mask)
        self.stats.bad += int(jstats.get("bad", 0))
        if not self.examples:
            what = "valid " if self.stats.bad else ""
            raise TiaoyuError(f"{self.name}: no {what}chat records to train on ({self.stats.summary()})")

    def __len__(self) -> int:
        return len(self.examples)

    def tool_schemas(self) -> bool | None:
        """Whether the records that call tools carry the tools' schemas (rendered in the system turn): True
        when at least half of them do, None when no record calls a tool."""
        calling = [t for m, t in zip(self.messages, self.tools) if any(x.get("tool_calls") for x in m)]
        if not calling:
            return None
        return 2 * sum(t is not None for t in calling) >= len(calling)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def pack_examples(examples: Sequence[Example], max_len: int, seed: int | None = 0) -> list[PackedRow]:
    """Pack examples into rows of at most `max_len` tokens: best-fit decreasing (longest first, each into
    the fullest row it still fits) over a shuffled order, so rows mix records from all over the file.
    Each example lands whole in exactly one row."""
    import bisect

    order = list(range(len(examples)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -len(examples[i]))  # stable: ties keep the shuffled order
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in order:
        n = len(examples[i])
        if n > max_len:
            raise TiaoyuError(f"{examples[i].source}: example of {n} tokens does not fit a packed row of {max_len}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):  # the row with the least room that still fits
            room, r = free.pop(k)
            rows[r].append(i)
        else:
            room, r = max_len, len(rows)
            rows.append([i])
        bisect.insort(free, (room - n, r))
    out = []
    for members in rows:
        ids, mask, pos, seq = [], [], [], []
        for s, i in enumerate(members):
            ex = examples[i]
            ids += ex.ids
            mask += ex.loss_mask
            pos += list(range(len(ex)))
            seq += [s] * len(ex)
        out.append(PackedRow(ids, mask, pos, seq))
    return out


def shifted_labels(ids: Sequence[int], loss_mask: Sequence[int], seq_ids: Sequence[int] | None = None) -> list[int]:
    """labels[t] = ids[t+1] if token t+1 is learned (and belongs to the same record as t), else -100."""
    n = len(ids)
    labels = [IGNORE] * n
    for t in range(n - 1):
        if loss_mask[t + 1] and (seq_ids is None or seq_ids[t] == seq_ids[t + 1]):
            labels[t] = ids[t + 1]
    return labels


def collate(rows: Sequence[Example | PackedRow], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a batch. Returns int64 tensors [B, T]:

        input_ids       ids, pad_id after the end
        labels          next-token targets, -100 where nothing is learned (and on padding)
        attention_mask  1 on real tokens, 0 on padding
        position_ids    position of each token inside its own record (0 on padding)
        seq_ids         record index inside the row (always 0 unpacked), -1 on padding
    """
    if not rows:
        raise ValueError("collate() needs at least one row")
    T = max(len(r) for r in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    seq = torch.full((B, T), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r)
        packed = isinstance(r, PackedRow)
        seq_ids = r.seq_ids if packed else [0] * n
        input_ids[b, :n] = torch.tensor(r.ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(shifted_labels(r.ids, r.loss_mask, seq_ids), dtype=torch.long)
        attn[b, :n] = 1
        pos[b, :n] = torch.tensor(r.position_ids if packed else list(range(n)), dtype=torch.long)
        seq[b, :n] = torch.tensor(seq_ids, dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attn, "position_ids": pos, "seq_ids": seq}


def is_packed(batch: dict[str, torch.Tensor]) -> bool:
    """True when some row of the batch holds more than one record."""
    return bool((batch["seq_ids"] > 0).any())


@dataclass
class ClassificationStats:
    records: int = 0
    truncated: int = 0
    bad: int = 0
    counts: dict[str, int] = field(default_factory=dict)


def read_classification(source: str | os.PathLike | Sequence[dict], skip_bad: bool = False,
                        name: str | None = None) -> tuple[list[tuple[str, str]], ClassificationStats]:
    """(text, label) pairs of `{"text": str, "label": str}` records; errors name file:line:field."""
    st = ClassificationStats()
    if isinstance(source, (str, os.PathLike)):
        from tiaoyu_cli.data.jsonl import iter_jsonl

        name = name or str(source)
        jstats: dict = {}
        items: Iterable[tuple[int, dict]] = iter_jsonl(source, skip_bad=skip_bad, stats=jstats)
    else:
        name = name or "<records>"
        jstats = {}
        items = ((i + 1, r) for i, r in enumerate(source))
    out = []
    for line, obj in items:
        try:
            text, label = obj.get("text"), obj.get("label")
            if "text" not in obj:
                raise DataError("missing; a classification record is {\"text\": str, \"label\": str}"
                                + (" (this looks like a chat record: drop --task classify)" if "messages" in obj else ""),
                                name, line, "text")
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"expected a non-empty string, got {text!r}"[:120], name, line, "text")
            if "label" not in obj or label is None:
                raise DataError("missing label", name, line, "label")
            if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
                raise DataError(f"expected a non-empty string, got {label!r}"[:120], name, line, "label")
        except DataError:
            if not skip_bad:
                raise
            st.bad += 1
            continue
        label = str(label).strip()
        out.append((text, label))
        st.records += 1
        st.counts[label] = st.counts.get(label, 0) + 1
    st.bad += int(jstats.get("bad", 0))
    if not out:
        raise TiaoyuError(f"{name}: no valid classification records")
    return out, st


def encode_classification(tokenizer, text: str, max_len: int) -> tuple[list[int], bool]:
    """<s> text </s>, cut to max_len keeping the closing </s> (the token the classifier reads).
    An open model's tokenizer without a BOS (Qwen) gives text </s>. Returns (ids, truncated)."""
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    end = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    ids = tokenizer.encode(text)
    cut = len(ids) + len(bos) + len(end) > max_len
    if cut:
        ids = ids[:max_len - len(bos) - len(end)]
    return bos + ids + end, cut


def collate_classification(items: Sequence[tuple[list[int], int]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad (ids, label index) pairs: input_ids, attention_mask [B, T], labels [B], last_index [B]
    (the position of each row's last real token, whose score classifies the row)."""
    T = max(len(ids) for ids, _ in items)
    B = len(items)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    for b, (ids, _) in enumerate(items):
        input_ids[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attn[b, :len(ids)] = 1
    labels = torch.tensor([lab for _, lab in items], dtype=torch.long)
    last = attn.sum(-1) - 1
    return {"input_ids": input_ids, "attention_mask": attn, "labels": labels, "last_index": last}
