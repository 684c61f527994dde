"""Answer accuracy: generate answers to held-out questions and compare them with the reference.

Shared by sft/lora (eval on chat.val), rlhf GRPO/PPO (verifiable rewards), reason and eval:

    extract_answer("<think>3 + 4 = 7.</think>7")  → "7"      the text after </think>, if there is one
    normalize(" Red. ")                           → "red"
    is_correct("The answer is 68.", "68")         → True     numbers: the last number in the answer
    is_correct("red", "红色")                      → False    text: equal after normalisation
    format_ok("<think>…</think>7", require_think=True) → True
    answer_accuracy(model, tok, records)          → AnswerReport(accuracy, correct, total, …)

Rules (documented once, used everywhere):
* The answer of a response is the text after the last `</think>` (the whole response when it has
  none). An opened `<think>` never closed has no answer.
* normalize: Unicode NFKC, lower case, whitespace collapsed, surrounding quotes and trailing
  punctuation (. 。 ! ！ ? ？ , ， ; ；) removed.
* A numeric reference ("68", "-3", "2.5") is matched against the *last number* in the answer
  (GSM8K convention), compared as numbers; any other reference must equal the normalised answer.

Records are chat records (the reference is the last assistant message; the prompt is every message
before it) or verifiable records ({"prompt": str | messages, "answer": str}).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

from tiaoyu_cli.data.preference import chat_question
from tiaoyu_cli.errors import DataError
from tiaoyu_cli.infer.generate import DEFAULT_STOP_IDS, decode_response, generate_detailed
from tiaoyu_cli.infer.sampling import SamplingParams

_NUM = re.compile(r"[-−]?\d+(?:[.,]\d+)*")
_TRAIL = ".。!！?？,，;；:：、 "
_QUOTES = "\"'“”‘’「」`"


def extract_answer(response: str) -> str | None:
    """The final answer of a response: the text after the last </think> (None if <think> was never closed)."""
    if "</think>" in response:
        return response.rsplit("</think>", 1)[1]
    if "<think>" in response:
        return None
    return response


def normalize(text: str) -> str:
    t = unicodedata.normalize("NFKC", text).lower()
    t = " ".join(t.split())
    t = t.strip(_QUOTES + " ").rstrip(_TRAIL).strip(_QUOTES + " ")
    return t


def _number(s: str) -> float | None:
    s = s.replace("−", "-").replace(",", "")
    try:
        return float(s)
    except ValueError:
        return None


def is_numeric(gold: str) -> bool:
    g = normalize(gold)
    return bool(g) and _NUM.fullmatch(g) is not None and _number(g) is not None


def is_correct(pred: str | None, gold: str) -> bool:
    """Does the response (or extracted answer) `pred` give the reference answer `gold`?"""
    if pred is None:
        return False
    ans = extract_answer(pred)
    if ans is None:
        return False
    if is_numeric(gold):
        nums = _NUM.findall(unicodedata.normalize("NFKC", ans))
        if not nums:
            return False
        a, b = _number(nums[-1]), _number(normalize(gold))
        return a is not None and b is not None and abs(a - b) < 1e-9
    return normalize(ans) == normalize(gold)


def format_ok(response: str, require_think: bool = False) -> bool:
    """Well-formed: a non-empty answer; think tags balanced (at most one <think>…</think>, first);
    with `require_think`, the reasoning block must be there."""
    n_open, n_close = response.count("<think>"), response.count("</think>")
    if n_open > 1 or n_close > 1 or n_open != n_close:
        return False
    if n_open:
        if not response.lstrip().startswith("<think>") or response.index("<think>") > response.index("</think>"):
            return False
    elif require_think:
        return False
    ans = extract_answer(response)
    return ans is not None and bool(ans.strip())


# ---- records ---------------------------------------------------------------------------------------

def split_record(rec: dict, name: str = "<records>", line: int = 0) -> tuple[list[dict], str]:
    """(prompt messages, reference answer) of a chat or verifiable record."""
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict):
            raise DataError("expected a non-empty list of messages", name, line, "messages")
        if any(isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool") for m in msgs):
            # a tool-use record: the question is everything before the first assistant turn (the calls and
            # their results are the model's to make), the reference is the record's `answer` (else the
            # final assistant content) — data.preference.chat_question, which RL prompts use too
            q = chat_question(rec)
            if "prompt" not in q:
                raise DataError("a tool-use record needs an assistant turn", name, line, "messages")
            a = q.get("answer")
            if not isinstance(a, (str, int, float)) or isinstance(a, bool):
                raise DataError(f"expected a string, got {type(a).__name__}", name, line, "answer")
            return list(q["prompt"]), str(a)
        if msgs[-1].get("role") != "assistant" or not isinstance(msgs[-1].get("content"), str):
            raise DataError("the last message must be the assistant's reference answer", name, line, "messages")
        return list(msgs[:-1]), msgs[-1]["content"]
    if "prompt" in rec and "answer" in rec:
        p, a = rec["prompt"], rec["answer"]
        if not isinstance(a, (str, int, float)) or isinstance(a, bool):
            raise DataError(f"expected a string, got {type(a).__name__}", name, line, "answer")
        if isinstance(p, str):
            return [{"role": "user", "content": p}], str(a)
        if isinstance(p, list):
            return list(p), str(a)
        raise DataError("expected a string or a list of messages", name, line, "prompt")
    raise DataError("expected a chat record (messages) or a verifiable record (prompt, answer)", name, line)


@dataclass
class AnswerReport:
    accuracy: float
    correct: int
    total: int
    format_rate: float  # share of responses that pass format_ok
    samples: list[dict] = field(default_factory=list)  # {"prompt", "response", "gold", "correct"} per record

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}answer_acc": self.accuracy, f"{prefix}format_rate": self.format_rate}

    def __float__(self) -> float:
        return self.accuracy


def tool_answer_accuracy(model, tokenizer, records: list[dict], toolbox, batch_size: int = 64,
                         max_new_tokens: int = 64, max_tool_calls: int = 5, schemas_in_prompt: bool = False,
                         name: str = "<records>") -> AnswerReport:
    """Greedy answers with tools: each question runs in a ToolRunner (a call pauses generation, the tool's
    result is appended, generation resumes); the final answer is scored with `is_correct`. `format_rate`
    is the share of answers that made at least one well-formed call."""
    from tiaoyu_cli.infer.tool_loop import ToolRunner

    convs, golds = [], []
    for i, rec in enumerate(records):
        msgs, gold = split_record(rec, name, i + 1)
        convs.append(msgs)
        golds.append(gold)
    if not convs:
        return AnswerReport(0.0, 0, 0, 0.0)
    runner = ToolRunner(model, tokenizer, toolbox, max_tool_calls, schemas_in_prompt)
    greedy = SamplingParams(temperature=0.0)
    answers = []
    for b in range(0, len(convs), batch_size):
        answers += runner.answer_batch([list(c) for c in convs[b:b + batch_size]], max_new_tokens, greedy)
    samples, correct, called = [], 0, 0
    for msgs, gold, a in zip(convs, golds, answers):
        text = a.response.answer if a.response.answer is not None else a.response.response
        ok = is_correct(text, gold)
        correct += ok
        called += any(not c.error for c in a.calls)
        samples.append({"prompt": msgs, "response": text, "gold": gold, "correct": ok,
                        "tool_calls": [{"name": c.name, "arguments": c.arguments, "result": c.result} for c in a.calls]})
    n = len(golds)
    return AnswerReport(correct / n, correct, n, called / n, samples)


def answer_accuracy(model, tokenizer, records: list[dict], batch_size: int = 64, max_new_tokens: int = 32,
                    system: str | None = None, require_think: bool = False, name: str = "<records>",
                    prompt_suffix_ids: list[int] | None = None) -> AnswerReport:
    """Greedy answers (chat template, generation prompt) for every record, scored with `is_correct`.

    `prompt_suffix_ids` are appended after the generation prompt (e.g. [<think>] to start reasoning).
    Prompts are batched by length; results keep the input order."""

    prompts, golds, convs = [], [], []
    for i, rec in enumerate(records):
        msgs, gold = split_record(rec, name, i + 1)
        if system and not (msgs and msgs[0].get("role") == "system"):
            msgs = [{"role": "system", "content": system}] + msgs
        ids = tokenizer.encode_chat(msgs, add_generation_prompt=True)[0] + list(prompt_suffix_ids or [])
        prompts.append(ids)
        golds.append(gold)
        convs.append(msgs)
    if not prompts:
        return AnswerReport(0.0, 0, 0, 0.0)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    responses: dict[int, str] = {}
    greedy = SamplingParams(temperature=0.0)
    stops = getattr(tokenizer, "stop_ids", DEFAULT_STOP_IDS)  # an open model's end-of-turn ids
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        res = generate_detailed(model, [prompts[i] for i in idx], max_new_tokens, greedy, stops)
        for i, toks in zip(idx, res.tokens):
            if prompt_suffix_ids:
                toks = list(prompt_suffix_ids) + list(toks)
            responses[i] = decode_response(tokenizer, toks, stops).response
    samples, correct, fmt = [], 0, 0
    for i, gold in enumerate(golds):
        ok = is_correct(responses[i], gold)
        correct += ok
        fmt += format_ok(responses[i], require_think)
        samples.append({"prompt": convs[i], "response": responses[i], "gold": gold, "correct": ok})
    n = len(golds)
    return AnswerReport(correct / n, correct, n, fmt / n, samples)
