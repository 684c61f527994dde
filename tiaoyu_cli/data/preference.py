"""Preference pairs and verifiable prompts, rendered with the chat template (DESIGN §1).

    preference   {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
    verifiable   {"prompt": str | messages, "answer": str}

A prompt string is one user message. A chosen/rejected string is one assistant message; as
messages it is a continuation of the prompt that starts with an assistant turn (a message list
that repeats the prompt first — the "whole conversation" form some datasets use — is accepted
and the repeated prompt is dropped).

Rendering uses `Tokenizer.encode_chat`, so the tokens are exactly those the chat template (and
SFT) produce:

    <|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n {response} <|im_end|>
    └────────────── prompt tokens (incl. the generation prompt) ───────────┘ └─ response ─┘

The *response tokens* are the assistant content and its closing <|im_end|> (encode_chat's loss
mask, after the prompt); the sequence ends there, so a reward model reads its score on that
<|im_end|>, as on a generated answer that stopped. log π(response | prompt) sums the
log-probs of the response tokens only.

Bad records are errors naming file and line: a missing or empty side, chosen identical to
rejected, a pair or prompt that does not fit the model's context. `skip_bad=True` skips and
counts them instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from tiaoyu_cli.data.jsonl import RecordCounts, load_records
from tiaoyu_cli.errors import DataError, TiaoyuError

ROLES = ("system", "user", "assistant")


@dataclass
class PairExample:
    """One preference pair as token ids (each side: the full sequence prompt + response)."""

    chosen_ids: list[int]
    chosen_mask: list[int]  # 1 on the response tokens of chosen_ids
    rejected_ids: list[int]
    rejected_mask: list[int]
    prompt_len: int
    line: int = 0


@dataclass
class PromptExample:
    """A prompt for generation (ids end with the generation prompt) and, for verifiable data, its answer."""

    prompt_ids: list[int]
    answer: str | None
    record: dict = field(default_factory=dict)
    line: int = 0


# ---- records → messages --------------------------------------------------------------------------

def _messages(value: Any, what: str, path: str, line: int) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError("must be a non-empty string or a non-empty list of messages", path, line, what)
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"message {k} must be an object with role and content", path, line, what)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"message {k}: unknown role {role!r} (expected {', '.join(ROLES)})", path, line, what)
        if not isinstance(content, str):
            raise DataError(f"message {k} ({role}): content must be a string", path, line, what)
        msg = {"role": role, "content": content}
        if m.get("reasoning") is not None:
            if not isinstance(m["reasoning"], str):
                raise DataError(f"message {k} ({role}): reasoning must be a string", path, line, what)
            msg["reasoning"] = m["reasoning"]
        out.append(msg)
    return out


def _one_message(value: str | None, role: str, what: str, path: str, line: int) -> list[dict]:
    """A field given as a string: one `role` message (a missing or blank string is an error)."""
    if value is None:
        raise DataError("missing", path, line, what)
    if not value.strip():
        raise DataError("is empty", path, line, what)
    return [{"role": role, "content": value}]


def prompt_messages(value: Any, path: str = "", line: int = 0, what: str = "prompt") -> list[dict]:
    """A prompt field as chat messages: a string is one user message; a list must not end with the assistant."""
    if isinstance(value, str) or value is None:
        return _one_message(value, "user", what, path, line)
    msgs = _messages(value, what, path, line)
    if msgs[-1]["role"] == "assistant":
        raise DataError("must end with a user (or system) message; the answer goes in chosen/rejected/response",
                        path, line, what)
    return msgs


def response_messages(value: Any, prompt: list[dict], path: str = "", line: int = 0,
                      what: str = "response") -> list[dict]:
    """A response field as the messages that follow the prompt: a string is one assistant message."""
    if isinstance(value, str) or value is None:
        return _one_message(value, "assistant", what, path, line)
    if isinstance(value, dict):
        value = [value]
    msgs = _messages(value, what, path, line)
    if len(msgs) > len(prompt) and msgs[:len(prompt)] == prompt:  # the whole conversation: drop the prompt
        msgs = msgs[len(prompt):]
    if msgs[0]["role"] != "assistant" or msgs[-1]["role"] != "assistant":
        raise DataError("must start and end with an assistant message", path, line, what)
    if not any(m["content"].strip() or m.get("reasoning") for m in msgs if m["role"] == "assistant"):
        raise DataError("is empty", path, line, what)
    return msgs


# ---- messages → ids --------------------------------------------------------------------------------

def encode_prompt(tokenizer, prompt: list[dict]) -> list[int]:
    """Prompt ids ending with the generation prompt `<|im_start|>assistant\\n`."""
    ids, _ = tokenizer.encode_chat(prompt, add_generation_prompt=True)
    return ids


def encode_response(tokenizer, prompt: list[dict], response: list[dict]) -> tuple[list[int], list[int], int]:
    """(ids, response_mask, prompt_len): the prompt followed by the response, cut after the last
    response token (the final <|im_end|>); mask = 1 on the assistant tokens after the prompt."""
    p_ids = encode_prompt(tokenizer, prompt)
    ids, mask = tokenizer.encode_chat(prompt + response)
    if ids[:len(p_ids)] != p_ids:  # cannot happen with ChatML; guards a changed template
        raise TiaoyuError("chat template: the prompt is not a prefix of prompt + response")
    mask = [0] * len(p_ids) + list(mask[len(p_ids):])
    last = max(i for i, m in enumerate(mask) if m)
    return ids[:last + 1], mask[:last + 1], len(p_ids)


def encode_pair(tokenizer, rec: dict, max_len: int, path: str = "", line: int = 0) -> PairExample:
    """A preference record → PairExample, or DataError (missing/identical sides, too long)."""
    for side in ("prompt", "chosen", "rejected"):
        if side not in rec or rec[side] is None:
            raise DataError("missing (a preference record needs prompt, chosen and rejected)", path, line, side)
    prompt = prompt_messages(rec["prompt"], path, line)
    chosen = response_messages(rec["chosen"], prompt, path, line, "chosen")
    rejected = response_messages(rec["rejected"], prompt, path, line, "rejected")
    c_ids, c_mask, p_len = encode_response(tokenizer, prompt, chosen)
    r_ids, r_mask, _ = encode_response(tokenizer, prompt, rejected)
    if c_ids == r_ids:
        raise DataError("chosen and rejected are the same response: the pair says nothing", path, line, "rejected")
    longest = max(len(c_ids), len(r_ids))
    if longest > max_len:
        raise DataError(f"prompt + response is {longest} tokens, more than the model's context of {max_len} "
                        f"(shorten the record, or pass --skip-bad to drop such records)", path, line, "prompt")
    return PairExample(c_ids, c_mask, r_ids, r_mask, p_len, line)


def _load(path: str | os.PathLike, read, skip_bad: bool, stats: dict | None, what: str) -> list:
    counts = RecordCounts()
    out = load_records(path, read, skip_bad, counts)
    if stats is not None:
        stats.update(kept=counts.kept, skipped=counts.reasons.get("invalid", 0),
                     bad=counts.reasons.get("malformed JSON", 0))
    if not out:
        raise TiaoyuError(f"{path}: no usable {what}")
    return out


def load_pairs(path: str | os.PathLike, tokenizer, max_len: int, skip_bad: bool = False,
               stats: dict | None = None) -> list[PairExample]:
    """Read a preference JSONL file. stats (if given) counts 'kept', 'skipped' (invalid records) and
    'bad' (malformed lines)."""
    return _load(path, lambda rec, name, line: encode_pair(tokenizer, rec, max_len, name, line), skip_bad, stats,
                 "preference pairs")


def chat_question(rec: dict) -> dict:
    """A chat record as a question: `prompt` = the turns before its last assistant turn, whose content is
    the `answer` — or, for a tool-use record or one with its own `answer`, the turns before the first
    assistant turn (the calls and their results are the model's to make) and that answer."""
    turns = rec["messages"]
    is_assistant = [isinstance(m, dict) and m.get("role") == "assistant" for m in turns]
    if not any(is_assistant):
        return rec  # prompt_messages names what is missing
    tools = any(isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool") for m in turns)
    if "answer" in rec or tools:
        cut = is_assistant.index(True)
    else:
        cut = len(turns) - 1 - is_assistant[::-1].index(True)
    answer = rec["answer"] if "answer" in rec else turns[-1].get("content") if is_assistant[-1] else None
    return {**rec, "prompt": turns[:cut], **({"answer": answer} if answer is not None else {})}


def load_prompts(path: str | os.PathLike, tokenizer, max_prompt_len: int, need_answer: bool = False,
                 skip_bad: bool = False, stats: dict | None = None, context_hint: str = "") -> list[PromptExample]:
    """Read prompts (`{"prompt": …}`, optionally with `"answer"`; or chat records, see `chat_question`) for
    generation. A prompt longer than
    max_prompt_len tokens is an error (generation needs room for the answer). stats: as for `load_pairs`."""

    def read(rec: dict, name: str, line: int) -> PromptExample:
        if "prompt" not in rec and isinstance(rec.get("messages"), list):
            rec = chat_question(rec)
        msgs = prompt_messages(rec.get("prompt"), name, line)
        answer = rec.get("answer")
        if need_answer:
            if answer is None:
                raise DataError("missing (verifiable rewards need the final answer)", name, line, "answer")
            if not isinstance(answer, (str, int, float)) or isinstance(answer, bool) or not str(answer).strip():
                raise DataError("must be a non-empty string", name, line, "answer")
            answer = str(answer)
        ids = encode_prompt(tokenizer, msgs)
        if len(ids) > max_prompt_len:
            raise DataError(f"prompt is {len(ids)} tokens; at most {max_prompt_len} fit{context_hint}", name, line,
                            "prompt")
        return PromptExample(ids, answer if isinstance(answer, str) else None, rec, line)

    return _load(path, read, skip_bad, stats, "prompts")


# ---- batches -------------------------------------------------------------------------------------

def pad_right(seqs: list[list[int]], pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids right-padded with pad_id, and the attention mask (1 = real token)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        att[i, :len(s)] = 1
    return ids.to(device), att.to(device)


def collate_pairs(pairs: list[PairExample], pad_id: int = 0, device=None) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows: input_ids/attention_mask [2B, T], and
    `labels_mask` [2B, T−1], 1 where label ids[:, 1:] is a response token."""
    seqs = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    masks = [p.chosen_mask for p in pairs] + [p.rejected_mask for p in pairs]
    ids, att = pad_right(seqs, pad_id)
    lm = torch.zeros_like(ids)
    for i, m in enumerate(masks):
        lm[i, :len(m)] = torch.tensor(m, dtype=torch.long)
    return {"input_ids": ids.to(device), "attention_mask": att.to(device), "labels_mask": lm[:, 1:].to(device)}
