"""Synthetic tool-use records for `tiaoyu synth` (tools.train.jsonl, tools.val.jsonl), in English and Chinese.

Two kinds of problem, each solved with the `calculator` tool in the OpenAI chat format:

  * arithmetic of 3–4-digit numbers (+ − × ÷, division always exact): one call, then the answer
        user: What is 347 * 82?   assistant → calculator {"expression": "347*82"}   tool: 28454
        assistant: 347 * 82 = 28454
  * word problems in two or three steps: one call per step, each using the previous result

Held out: a problem goes to val when a hash of its numbers says so (one in ten), and train never
holds a problem val has, so val measures arithmetic the model has not seen solved. `plain=True`
records answer directly instead (same questions, no tool): the baseline a tool model is measured
against. `think=True` records (reasoning-tools.*.jsonl) open the first call turn with a short plan in
`reasoning` — the traces `tiaoyu reason` learns to think and then call from (and `reason --rl --tools`
questions). With `schemas=True` records carry the calculator's schema in `tools` (rendered in the system
turn: ~550 tokens with the demo's 1k vocabulary, more than the tiny preset's whole context), so
the bundled corpus leaves it out and models trained on it chat with `--no-tool-schemas`.
"""

from __future__ import annotations

import hashlib
import json
import random

# The calculator's schema as `tiaoyu tools --json` prints it (infer/tools.py reads it from the function's
# docstring; data sits below infer, so it is written out here and a test keeps the two equal).
CALCULATOR_SCHEMA = {"type": "function", "function": {
    "name": "calculator",
    "description": "Evaluate an arithmetic expression exactly: + - * / ** and parentheses, integers and decimals.",
    "parameters": {"type": "object", "properties": {"expression": {
        "type": "string", "description": "the expression, e.g. 123*456 or (2+3)/4"}}, "required": ["expression"]}}}

OPS = ("+", "-", "*", "/")
EN_ASK = ["What is {e}?", "Compute {e}.", "{e} = ?", "Please calculate {e}.", "How much is {e}?"]
ZH_ASK = ["{e} 等于多少？", "计算 {e}。", "{e} = ?", "请算一下 {e}。", "{e} 是多少？"]
ZH_SYM = {"+": "+", "-": "-", "*": "×", "/": "÷"}

# word problems: (en question, zh question, steps as (left, op, right), en answer, zh answer);
# left/right name a number ("a", "b", …) or an earlier step's result ("r1", "r2")
WORD = [
    ("A farm has {a} rows of {b} trees. {c} trees are cut down. How many trees are left?",
     "农场有 {a} 排树，每排 {b} 棵。砍掉了 {c} 棵，还剩多少棵？",
     [("a", "*", "b"), ("r1", "-", "c")], "{r} trees are left.", "还剩 {r} 棵。"),
    ("A school has {b} classes of {a} students, and {c} new students join. How many students are there now?",
     "学校有 {b} 个班，每班 {a} 人，又来了 {c} 名新同学。现在一共多少人？",
     [("a", "*", "b"), ("r1", "+", "c")], "There are {r} students now.", "现在一共 {r} 人。"),
    ("{n} buys {a} pens at {b} yuan each and {c} books at {d} yuan each. How much does {n} pay?",
     "{n}买了 {a} 支笔，每支 {b} 元，又买了 {c} 本书，每本 {d} 元。一共付多少元？",
     [("a", "*", "b"), ("c", "*", "d"), ("r1", "+", "r2")], "{n} pays {r} yuan.", "一共付 {r} 元。"),
    ("A truck carries {a} boxes of {b} kg. It unloads {c} kg. How many kg are still on the truck?",
     "一辆卡车装了 {a} 箱货，每箱 {b} 千克，卸下 {c} 千克后，车上还有多少千克？",
     [("a", "*", "b"), ("r1", "-", "c")], "{r} kg are still on the truck.", "车上还有 {r} 千克。"),
]
EN_NAMES = ["Mia", "Leo", "Ava", "Sam", "Zoe", "Max"]
ZH_NAMES = ["小明", "小红", "小刚", "小丽", "小华", "小芳"]


def calculate(expression: str) -> str:
    """`left op right` of two integers, as the calculator prints it (problems here divide exactly)."""
    for op in OPS:
        left, sep, right = expression.rpartition(op)
        if sep and left and left[-1].isdigit():
            a, b = int(left), int(right)
            v = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
            return str(v)
    raise ValueError(expression)


def calculator_schema() -> dict:
    return json.loads(json.dumps(CALCULATOR_SCHEMA))


def _held_out(key: str, seed: int) -> bool:
    return hashlib.sha256(f"{seed}:{key}".encode()).digest()[0] < 26  # about one in ten


def _operands(rng: random.Random, op: str, digits: tuple[int, int]) -> tuple[int, int]:
    def num(d: int) -> int:
        return rng.randint(10 ** (d - 1), 10 ** d - 1)

    a, b = num(rng.choice(digits)), num(rng.choice(digits))
    if op == "/":  # exact: a = b * q
        b = rng.randint(2, 99)
        a = b * rng.randint(max(2, 10 ** (digits[0] - 1) // b + 1), max(3, (10 ** digits[-1] - 1) // b))
    if op == "-" and rng.random() < 0.8:
        a, b = max(a, b), min(a, b)
    return a, b


EN_OP = {"+": "add", "-": "subtract", "*": "multiply", "/": "divide"}
ZH_OP = {"+": "加", "-": "减", "*": "乘", "/": "除"}


def plan(lang: str, steps: list[tuple[str, str, str]]) -> str:
    """The reasoning of a think-format tool record: what to compute, one expression per step, in order
    (an earlier step's result is named, not computed: the calculator does that)."""
    def name(x: str) -> str:
        if x.startswith("r"):
            return (f"result {x[1:]}" if lang == "en" else f"第{x[1:]}步的结果")
        return x

    if lang == "en":
        parts = [f"step {j + 1}: {name(left)} {op} {name(right)}" for j, (left, op, right) in enumerate(steps)]
        return "Too big to do in my head, so I use the calculator. " + "; ".join(parts) + "."
    parts = [f"第{j + 1}步：{name(left)} {ZH_SYM[op]} {name(right)}" for j, (left, op, right) in enumerate(steps)]
    return "数字太大，用计算器算。" + "；".join(parts) + "。"


class _Calls:
    def __init__(self, reasoning: str | None = None):
        self.messages: list[dict] = []
        self.n = 0
        self.reasoning = reasoning  # the first call turn's <think> block (think-format records)

    def call(self, expression: str) -> str:
        self.n += 1
        cid = f"call_{self.n}"
        result = calculate(expression)
        self.messages += [
            {"role": "assistant", "content": "", "tool_calls": [{"id": cid, "type": "function", "function": {
                "name": "calculator", "arguments": json.dumps({"expression": expression}, ensure_ascii=False)}}]},
            {"role": "tool", "tool_call_id": cid, "content": result}]
        if self.n == 1 and self.reasoning is not None:
            self.messages[-2]["reasoning"] = self.reasoning
        return result


def arithmetic_record(rng: random.Random, lang: str, op: str, a: int, b: int, plain: bool, think: bool = False) -> dict:
    shown = f"{a} {op if lang == 'en' else ZH_SYM[op]} {b}"
    question = rng.choice(EN_ASK if lang == "en" else ZH_ASK).format(e=shown)
    calls = _Calls(plan(lang, [(str(a), op, str(b))]) if think else None)
    result = calculate(f"{a}{op}{b}") if plain else calls.call(f"{a}{op}{b}")
    answer = f"{shown} = {result}" + ("。" if lang == "zh" else "")
    return {"messages": [{"role": "user", "content": question}] + calls.messages
            + [{"role": "assistant", "content": answer}], "answer": result}


def word_record(rng: random.Random, lang: str, k: int, nums: dict[str, int], plain: bool, think: bool = False) -> dict:
    en_q, zh_q, steps, en_a, zh_a = WORD[k]
    name = rng.choice(EN_NAMES if lang == "en" else ZH_NAMES)
    shown = [(str(nums.get(x, x)), op, str(nums.get(y, y))) for x, op, y in steps]
    calls = _Calls(plan(lang, shown) if think else None)
    vals: dict[str, str] = {key: str(v) for key, v in nums.items()}
    for j, (left, op, right) in enumerate(steps):
        expr = f"{vals[left]}{op}{vals[right]}"
        vals[f"r{j + 1}"] = calculate(expr) if plain else calls.call(expr)
    result = vals[f"r{len(steps)}"]
    q = (en_q if lang == "en" else zh_q).format(n=name, **nums)
    a = (en_a if lang == "en" else zh_a).format(n=name, r=result)
    return {"messages": [{"role": "user", "content": q}] + calls.messages + [{"role": "assistant", "content": a}],
            "answer": result}


def tool_records(seed: int, n: int, langs: tuple[str, ...], split: str, plain: bool = False,
                 schemas: bool = False, word_frac: float = 0.3, digits: tuple[int, ...] = (3, 4),
                 think: bool = False) -> list[dict]:
    """`n` records of `split` ("train" or "val"); see the module docstring. Each record also keeps the
    final `answer` (a string) for grading; chat training ignores fields it does not know."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be train or val, not {split!r}")
    rng = random.Random(f"tools:{seed}:{split}:{plain}:{digits}")
    want_val = split == "val"
    out: list[dict] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise RuntimeError("could not draw enough distinct problems")
        lang = rng.choice(langs)
        if rng.random() < word_frac:
            k = rng.randrange(len(WORD))
            nums = {"a": rng.randint(12, 99), "b": rng.randint(12, 99), "c": rng.randint(100, 999),
                    "d": rng.randint(2, 60)}
            key = f"w{k}:" + ",".join(str(nums[x]) for x in "abcd")
            if _held_out(key, seed) != want_val:
                continue
            rec = word_record(rng, lang, k, nums, plain, think)
        else:
            op = rng.choice(OPS)
            a, b = _operands(rng, op, tuple(digits))
            if _held_out(f"{a}{op}{b}", seed) != want_val:
                continue
            rec = arithmetic_record(rng, lang, op, a, b, plain, think)
        if schemas and not plain:
            rec["tools"] = [calculator_schema()]
        out.append(rec)
    return out
