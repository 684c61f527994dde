"""Benchmark contamination: which items share a 13-gram with the training data.

The rule of GPT-3 (Brown et al. 2020, appendix C) and lm-eval's decontamination: an item is
*dirty* when any 13-gram of it also occurs in the training data. Units:

* Latin-script text: lower-cased words, split on anything that is not a letter or digit
  (punctuation dropped), so "Paris," and "paris" are the same unit;
* CJK text (Chinese, Japanese kana, full-width forms): every character is one unit, since
  these scripts have no spaces between words; 13 characters are a short clause.

Mixed text is cut by both rules at once. An item shorter than 13 units is dirty only when all
its units occur in this order in one training record (its whole text is its only n-gram).
An item's text is its question and its right answer — what a leaked copy in the training data
would hold (the wrong choices and the template's words, "Question:", "Answer:", are left out).

Memory grows with the benchmark, not the training data: the benchmark's n-grams go in a dict
and the training files stream past it, record by record (n-grams do not cross records).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Iterator

from tiaoyu_cli.data.jsonl import iter_jsonl

N = 13
UNIT = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")


def units(text: str) -> list[str]:
    """Lower-cased Latin words and single CJK characters, punctuation dropped."""
    return UNIT.findall(text.lower())


def ngrams(us: list[str], n: int = N) -> Iterator[tuple[str, ...]]:
    if len(us) < n:
        if us:
            yield tuple(us)
        return
    for i in range(len(us) - n + 1):
        yield tuple(us[i:i + n])


def _strings(obj) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def training_texts(paths: Iterable[str | Path]) -> Iterator[str]:
    """Every string of every record of the JSONL files (text, chat contents, prompts, answers …)."""
    for p in paths:
        for _, rec in iter_jsonl(p):
            yield "\n".join(_strings(rec))


def dirty_items(item_texts: list[str], train_paths: Iterable[str | Path], n: int = N) -> tuple[list[bool], int]:
    """For each item, whether it shares an n-gram with the training data; also the records read."""
    index: dict[tuple[str, ...], list[int]] = {}
    short: dict[tuple[str, ...], list[int]] = {}  # items shorter than n: matched as a whole
    for i, t in enumerate(item_texts):
        us = units(t)
        for g in ngrams(us, n):
            (short if len(g) < n else index).setdefault(g, []).append(i)
    dirty = [False] * len(item_texts)
    records = 0
    for text in training_texts(train_paths):
        records += 1
        us = units(text)
        for i in range(len(us) - n + 1):
            hit = index.get(tuple(us[i:i + n]))
            if hit:
                for j in hit:
                    dirty[j] = True
        if short:
            joined = "\x00" + "\x00".join(us) + "\x00"
            for g, items in short.items():
                if not all(dirty[j] for j in items) and "\x00" + "\x00".join(g) + "\x00" in joined:
                    for j in items:
                        dirty[j] = True
    return dirty, records
