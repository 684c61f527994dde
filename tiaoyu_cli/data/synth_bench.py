"""A multiple-choice benchmark from the synthetic world's held-out facts, in the C-Eval CSV layout.

`tiaoyu synth OUT/` also writes

    OUT/bench/val/{subject}_val.csv    one item per held-out (val) fact: the evaluated split
    OUT/bench/dev/{subject}_dev.csv    5 items per subject from train facts: few-shot examples

with the C-Eval header `id,question,A,B,C,D,answer`, subjects `entity_en`, `entity_zh`,
`arith_en`, `arith_zh` (those of `--lang`). An item is the start of a statement the pretraining
text makes, cut before the value, and four candidate values (one right, three wrong values of
the same attribute or nearby numbers), the right one at a random letter — chance is 25 %:

    question: "Kamiro lives in"   A: Brightvale  B: Lunford  C: Osport  D: Tamfield   answer: B
    question: "王丽住在"            A: 青石城 …

Held-out facts are stated in the pretraining text but asked by no train chat/preference record,
so the score after pretraining measures what the base model took from the text. Score it with
the answer texts as continuations (a base model does not know the A–D answer format yet):

    tiaoyu eval bench ckpt/base OUT/bench --task ceval --style cloze --shots 3
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from tiaoyu_cli.data.synth import Generator, SynthConfig
from tiaoyu_cli.data.synth_world import ARITH_STATEMENTS, STATEMENTS, Fact, arith, cap
from tiaoyu_cli.io import atomic_write_text

HEADER = ["id", "question", "A", "B", "C", "D", "answer"]
DEV_ITEMS = 5
MARK = "\x00"


def _stem_templates(templates: list[str], var: str) -> list[str]:
    """Templates that end with the value (then only a full stop), so the value can be the continuation."""
    return [t for t in templates if t.endswith(("{" + var + "}.", "{" + var + "}。"))]


def _numbers_near(n: int, rng) -> list[str]:
    out: list[str] = []
    for d in rng.sample([-10, -3, -2, -1, 1, 2, 3, 10], 8):
        if n + d >= 0 and str(n + d) not in out:
            out.append(str(n + d))
    return out[:3]


def make_item(g: Generator, f: Fact, lang: str, rng) -> list[str] | None:
    """[question, A, B, C, D, answer] for one fact, or None when no template ends with its value."""
    w = g.w
    if f.entity is None:
        temps = _stem_templates(ARITH_STATEMENTS[(f.attr, lang)], "c")
        c = arith(f.attr, f.a, f.b)
        stem = rng.choice(temps).format(a=f.a, b=f.b, c=MARK)
        right, wrong = str(c), _numbers_near(c, rng)
    else:
        e = w.entities[f.entity]
        temps = _stem_templates(STATEMENTS[(e.kind, f.attr, lang)], "v")
        if not temps:
            return None
        stem = cap(rng.choice(temps).format(n=e.name(lang), v=MARK, m=e.measure))
        right = w.value(f, lang)
        if right.isdigit():
            wrong = _numbers_near(int(right), rng)
        else:
            pool = sorted({o.attrs[f.attr][0 if lang == "en" else 1] for o in w.entities
                           if o.kind == e.kind and f.attr in o.attrs} - {right})
            wrong = rng.sample(pool, 3) if len(pool) >= 3 else []
    if len(wrong) < 3:
        return None
    choices = wrong[:3]
    gold = rng.randrange(4)
    choices.insert(gold, right)
    return [stem.split(MARK)[0].rstrip(), *choices, "ABCD"[gold]]


def _csv(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(HEADER)
    for i, r in enumerate(rows):
        wr.writerow([i, *r])
    return buf.getvalue()


def write_fact_bench(out_dir: str | Path, cfg: SynthConfig) -> dict[str, int]:
    """Write OUT/bench/{val,dev}/{subject}_{split}.csv; return items per subject of the val split."""
    g = Generator(cfg)
    out = Path(out_dir) / "bench"
    counts: dict[str, int] = {}
    for lang in cfg.langs():
        for group, val, train in (("entity", g.val_entity, g.train_entity), ("arith", g.val_arith, g.train_arith)):
            subject = f"{group}_{lang}"
            rng = g.rng(f"bench.{subject}")
            items = [it for f in val if (it := make_item(g, f, lang, rng)) is not None]
            dev_facts = rng.sample(train, min(len(train), 4 * DEV_ITEMS))
            dev = [it for f in dev_facts if (it := make_item(g, f, lang, rng)) is not None][:DEV_ITEMS]
            atomic_write_text(out / "val" / f"{subject}_val.csv", _csv(items))
            atomic_write_text(out / "dev" / f"{subject}_dev.csv", _csv(dev))
            counts[subject] = len(items)
    return counts
