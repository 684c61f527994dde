"""A small deterministic corpus for the tokenizer and shard tests (Chinese, English, digits, every
record kind), and a helper that trains a tokenizer on it once per test module."""

from __future__ import annotations

import random
from pathlib import Path

import orjson

ZH = list("我你他她们是的了在有不这个人大小上下天地山水日月花草好学生老师今明年中国家里吃饭喝茶看书写字说话走路")
EN = ("the a cat dog sees runs big small red blue tree house water river book school teacher student "
      "morning evening today tomorrow happy quickly slowly and but with from").split()


def _zh(rng: random.Random) -> str:
    return "".join(rng.choice(ZH) for _ in range(rng.randint(4, 14))) + rng.choice("。！？，")


def _en(rng: random.Random) -> str:
    words = [rng.choice(EN) for _ in range(rng.randint(3, 9))]
    return " ".join(words).capitalize() + rng.choice(".!?")


def _num(rng: random.Random) -> str:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return f"{a} + {b} = {a + b}"


def make_records(n: int = 1200, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out: list[dict] = []
    for i in range(n):
        k = i % 6
        if k in (0, 1):
            parts = [rng.choice([_zh, _en, _num])(rng) for _ in range(rng.randint(1, 4))]
            out.append({"text": ("\n" if rng.random() < 0.3 else " ").join(parts)})
        elif k == 2:
            out.append({"messages": [
                {"role": "system", "content": "你是助手。"},
                {"role": "user", "content": _zh(rng) + " " + _num(rng).split("=")[0] + "= ?"},
                {"role": "assistant", "content": _en(rng), "reasoning": _zh(rng)},
            ]})
        elif k == 3:
            out.append({"prompt": _zh(rng), "chosen": _en(rng), "rejected": _zh(rng) + "坏坏坏"})
        elif k == 4:
            out.append({"prompt": [{"role": "user", "content": _num(rng).split("=")[0] + "= ?"}], "answer": str(rng.randint(0, 2000))})
        else:
            out.append({"text": _en(rng), "label": rng.choice(["pos", "neg"])})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for r in records:
            f.write(orjson.dumps(r) + b"\n")
    return path


def text_records(n: int = 300, seed: int = 1) -> list[dict]:
    """Only text records: the documents of a shard stream are then exactly these texts."""
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice([_zh, _en, _num])(rng) for _ in range(rng.randint(1, 5)))} for _ in range(n)]
