"""The bundled synthetic corpus: a small fictional world in Chinese and English.

`tiaoyu synth OUT/ --seed 0` writes, for every record kind of DESIGN §1, a train and a held-out
val file (`OUT/<kind>.train.jsonl`, `OUT/<kind>.val.jsonl`), plus `OUT/world.json` (the fact
table, for people who want to look) and `OUT/manifest.json` (counts, seed, description).
The same seed gives byte-identical files: every random choice comes from `random.Random`
streams seeded with strings like "0:text" (string seeds are hashed with SHA-512, so they do not
depend on PYTHONHASHSEED), and nothing iterates over a set.

Why it looks the way it does — the corpus has to teach a 1–5M-parameter model something in a
few CPU minutes, and every later stage needs a held-out number that moves:

* **The world.** 200 entities — 110 people, 20 cities, 40 pets, 30 named objects — each with an
  English and a Chinese name and 3–5 attributes drawn from small vocabularies (colour, food,
  job, age, home city, owner, ...). That makes about 860 entity facts, e.g. "Kamiro lives in
  Lunford." / "王丽住在青石城。".
* **Arithmetic facts.** a+b and a−b for 0 ≤ a, b ≤ 20, the 9×9 multiplication table, and 300
  two-digit sums below 100: about 1,050 facts, e.g. "3 plus 4 equals 7." / "3加4等于7。".
* **text** (pretraining, `--text-mb`, 4 MB by default): short documents of a few sentences —
  entity biographies in several phrasings and random sentence order (varied phrasings make
  facts *extractable* later, not just memorised in one wording), facts about several entities
  at once, arithmetic statements and tables, short stories consistent with the facts, solved
  word problems ("... 3 + 4 = 7. 7 - 2 = 5. So Kamiro has 5 apples.") and a few reviews.
  Entities and arithmetic facts are visited in shuffled rounds, so at the default size every
  fact is stated dozens of times. There are no question/answer pairs in the text.
* **Held-out facts.** 20% of the entity facts and 20% of the arithmetic facts are *val facts*:
  they appear in the pretraining text like all others, but no train record of chat or
  preference asks about them. Chat val therefore asks questions whose answer the model can only
  know from pretraining, in the Q→A format it can only know from SFT: exact-match accuracy on
  `chat.val` rises from ~0 only when both stages worked.
* **chat**: single questions with short exact answers ("What is 23 + 45?" → "68",
  "王丽最喜欢什么颜色？" → "红色"), half entity facts and half arithmetic, some with a system
  prompt, some multi-turn (2–3 questions), a few greetings. Val records are single-turn, one
  question about a val fact, so the target is the last assistant message.
* **preference**: prompt + chosen (the correct bare answer) + rejected (a wrong value of the same
  attribute, a wrong number, or an unhelpful "I don't know." / "我不知道。"); chosen ≠
  rejected always. Val pairs ask about val facts (pairwise accuracy of a reward model, DPO
  margins).
* **verifiable**: multi-step problems with small numbers and a bare-number answer — word
  problems ("Kamiro has 3 apples. Kamiro buys 4 more and eats 2. How many apples does Kamiro
  have now?" → "5"; "王丽有3个苹果，又买了4个，吃了2个。王丽现在有多少个苹果？" → "5"),
  "together" problems and expressions ("What is 3 + 4 - 2?"). Easy enough that a tiny model
  gets some right after SFT, so GRPO has a reward signal to raise.
* **reasoning**: the same kind of problems as chat records whose assistant message carries the
  steps in a separate `"reasoning"` field ("3 + 4 = 7. 7 - 2 = 5.") and the bare answer in
  `content`. `reasoning.val` holds exactly the problems of `verifiable.val`, and no train
  problem of either kind (nor any solved problem in the text) is a val problem.
* **classification**: sentiment reviews built from word lists (positive/negative adjectives,
  closings, neutral filler), English and Chinese, labels "positive"/"negative" exactly
  balanced; learnable from the words alone.

* **docs and RAG** (data/synth_docs.py): `docs.jsonl`, one document per entity and language
  stating all its facts (the corpus `tiaoyu index` searches); `rag.train.jsonl` / `rag.val.jsonl`,
  questions with the passages BM25 retrieves for them in the RAG layout (val: held-out facts of
  entities no rag.train question names); `facts.val.jsonl`, the same val questions without passages.

Sizes: `--records` train records per chat-like kind (default 4,000), `--val-records` (default a
tenth of that). Everything is generated in memory (a few MB) in a couple of seconds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import orjson

from tiaoyu_cli.data import synth_docs  # docs.jsonl + RAG records (calls back into this module)
from tiaoyu_cli.data.synth_world import (SMALL_TALK, STORY, SYSTEM_PROMPTS, UNHELPFUL, Cycler, Fact, Problem, arith,
                                         build_world, fact_question, fact_sentence, join_sentences, make_problem,
                                         make_review, wrong_value)
from tiaoyu_cli.data.synth_tools import tool_records
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.io import atomic_open, atomic_write_bytes

KINDS = ("text", "chat", "preference", "verifiable", "reasoning", "classification")
FORMAT_VERSION = 1


@dataclass
class SynthConfig:
    seed: int = 0
    text_mb: float = 4.0  # size of text.train.jsonl (text field bytes, UTF-8), in MB (1e6 bytes)
    records: int = 4000  # train records per chat-like kind
    val_records: int | None = None  # per kind; default records // 10
    lang: str = "both"  # both | en | zh
    val_fact_frac: float = 0.2  # share of facts held out for val questions

    def n_val(self) -> int:
        return self.val_records if self.val_records is not None else max(1, self.records // 10)

    def langs(self) -> tuple[str, ...]:
        if self.lang == "both":
            return ("en", "zh")
        if self.lang in ("en", "zh"):
            return (self.lang,)
        raise TiaoyuError(f"--lang must be both, en or zh, not {self.lang!r}")


# ---------------------------------------------------------------------------------------------
# Kind generators


class Generator:
    def __init__(self, cfg: SynthConfig):
        self.cfg = cfg
        self.w = build_world(cfg.seed, cfg.val_fact_frac)
        self.langs = cfg.langs()
        self.train_entity = [f for f in self.w.entity_facts if not self.w.is_val(f)]
        self.val_entity = [f for f in self.w.entity_facts if self.w.is_val(f)]
        self.train_arith = [f for f in self.w.arith_facts if not self.w.is_val(f)]
        self.val_arith = [f for f in self.w.arith_facts if self.w.is_val(f)]
        self._problems: tuple[list[Problem], set[str]] | None = None

    def rng(self, stream: str) -> random.Random:
        return random.Random(f"{self.cfg.seed}:{stream}")

    # ----- text ------------------------------------------------------------------------------

    def text_docs(self, split: str) -> Iterator[str]:
        """Documents until their UTF-8 size reaches --text-mb (train) or 5% of it (val)."""
        rng = self.rng(f"text.{split}")
        budget = self.cfg.text_mb * 1e6 * (1.0 if split == "train" else 0.05)
        if split == "val":
            budget = max(budget, 2000.0)
        w = self.w
        # one cycler per language and use, so every entity gets full biographies in both languages
        # evenly, and every arithmetic fact is stated in both languages evenly
        ents = {lang: Cycler(list(range(len(w.entities))), rng) for lang in self.langs}
        mixed = {lang: Cycler(list(range(len(w.entities))), rng) for lang in self.langs}
        ariths = {lang: Cycler(w.arith_facts, rng) for lang in self.langs}
        val_prompts = self.problems()[1]
        people = [i for i, e in enumerate(w.entities) if e.kind == "person"]
        kinds = ["bio", "bio", "bio", "mixed", "arith", "arith", "table", "story", "problem", "review"]
        size = 0
        while size < budget:
            lang = rng.choice(self.langs)
            kind = rng.choice(kinds)
            if kind == "bio":
                e = ents[lang].next()
                facts = [Fact(e, a) for a in w.entities[e].attrs]
                rng.shuffle(facts)
                doc = join_sentences([fact_sentence(w, f, lang, rng) for f in facts], lang)
            elif kind == "mixed":
                facts = [Fact(e, rng.choice(list(w.entities[e].attrs))) for e in (mixed[lang].next() for _ in range(rng.randint(3, 6)))]
                doc = join_sentences([fact_sentence(w, f, lang, rng) for f in facts], lang)
            elif kind == "arith":
                doc = join_sentences([fact_sentence(w, ariths[lang].next(), lang, rng) for _ in range(rng.randint(4, 8))], lang)
            elif kind == "table":
                op = rng.choice(["+", "-", "×"])
                a = rng.randint(1, 9) if op == "×" else rng.randint(5, 20)
                bs = range(1, 10) if op == "×" else range(0, a + 1) if op == "-" else range(0, 11)
                sep = ". " if lang == "en" else "。"
                doc = sep.join(f"{a} {op} {b} = {arith(op, a, b)}" for b in bs) + sep.strip()
            elif kind == "story":
                doc = self.story(rng.choice(people), lang, rng)
            elif kind == "problem":
                while True:
                    pr = make_problem(w, lang, rng)
                    if pr.prompt not in val_prompts:
                        break
                doc = pr.story
            else:
                doc = join_sentences([make_review(w, lang, rng.random() < 0.5, rng) for _ in range(rng.randint(2, 4))], lang)
            size += len(doc.encode("utf-8")) + 12
            yield doc

    def story(self, pi: int, lang: str, rng: random.Random) -> str:
        """Person `pi` visits another city, meets someone (their pet along, if they have one), gets a flower."""
        w = self.w
        p = w.entities[pi]
        q = rng.choice([e for e in w.of_kind("person") if e is not p])
        pets = [e for e in w.of_kind("animal") if e.attrs["owner"][0] == p.en]
        c2 = rng.choice([e for e in w.of_kind("city") if e.en != p.attrs["city"][0]])
        i = 0 if lang == "en" else 1  # the language's half of each (en, zh) attribute
        v = {"p": p.name(lang), "q": q.name(lang), "c2": c2.name(lang), "c2_food": c2.attrs["food"][i],
             "city": p.attrs["city"][i], "food": p.attrs["food"][i], "colour": p.attrs["colour"][i],
             "q_job": q.attrs["job"][i], "q_city": q.attrs["city"][i],
             "art": "an" if p.attrs["colour"][0][0] in "aeiou" else "a"}
        t = STORY[lang]
        s = list(t["visit"])
        if pets:
            pet = rng.choice(pets)
            v.update(pet=pet.name(lang), species=pet.attrs["species"][i])
            s.insert(1, t["pet"])
        s += [t["flower"], rng.choice(t["endings"])]
        return join_sentences([x.format(**v) for x in s], lang)

    # ----- chat --------------------------------------------------------------------------------

    def qa(self, ent: list[Fact], ari: list[Fact], lang: str, rng: random.Random) -> tuple[str, str]:
        """One question and its bare answer: half arithmetic, half entity facts."""
        f = rng.choice(ari if rng.random() < 0.5 else ent)
        return fact_question(self.w, f, lang, rng), self.w.value(f, lang)

    def chat(self, split: str) -> list[dict]:
        rng = self.rng(f"chat.{split}")
        n = self.cfg.records if split == "train" else self.cfg.n_val()
        ent, ari = (self.train_entity, self.train_arith) if split == "train" else (self.val_entity, self.val_arith)
        out: list[dict] = []
        seen: dict[bytes, None] = {}
        tries = 0
        while len(out) < n:
            tries += 1
            lang = rng.choice(self.langs)
            r = rng.random()
            if split == "train" and r < 0.05:
                u, a = rng.choice(SMALL_TALK[lang])
                msgs = [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
            else:
                msgs = []
                turns = rng.choice((2, 2, 3)) if split == "train" and r < 0.25 else 1
                for _ in range(turns):
                    q, a = self.qa(ent, ari, lang, rng)
                    msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                if rng.random() < 0.3:
                    msgs.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS[lang])})
            key = orjson.dumps(msgs)
            if key in seen and tries < 20 * n:  # prefer distinct records; give up on tiny fact pools
                continue
            seen[key] = None
            out.append({"messages": msgs})
        return out

    # ----- preference --------------------------------------------------------------------------

    def preference(self, split: str) -> list[dict]:
        rng = self.rng(f"preference.{split}")
        n = self.cfg.records if split == "train" else self.cfg.n_val()
        ent, ari = (self.train_entity, self.train_arith) if split == "train" else (self.val_entity, self.val_arith)
        out = []
        for _ in range(n):
            lang = rng.choice(self.langs)
            f = rng.choice(ari if rng.random() < 0.4 else ent)
            prompt = fact_question(self.w, f, lang, rng)
            chosen = self.w.value(f, lang)
            rejected = rng.choice(UNHELPFUL[lang]) if rng.random() < 0.2 else wrong_value(self.w, f, lang, rng)
            assert chosen != rejected
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        return out

    # ----- verifiable and reasoning ------------------------------------------------------------

    def problems(self) -> tuple[list[Problem], set[str]]:
        """The held-out problems (shared by verifiable.val and reasoning.val) and their prompts."""
        if self._problems is None:
            rng = self.rng("problems.val")
            val: dict[str, Problem] = {}
            while len(val) < self.cfg.n_val():
                p = make_problem(self.w, rng.choice(self.langs), rng)
                val.setdefault(p.prompt, p)
            self._problems = (list(val.values()), set(val))
        return self._problems

    def train_problems(self, stream: str) -> list[Problem]:
        rng = self.rng(stream)
        val_prompts = self.problems()[1]
        out: dict[str, Problem] = {}
        while len(out) < self.cfg.records:
            p = make_problem(self.w, rng.choice(self.langs), rng)
            if p.prompt not in val_prompts:
                out.setdefault(p.prompt, p)
        return list(out.values())

    def verifiable(self, split: str) -> list[dict]:
        probs = self.problems()[0] if split == "val" else self.train_problems("verifiable.train")
        return [{"prompt": p.prompt, "answer": p.answer} for p in probs]

    def reasoning(self, split: str) -> list[dict]:
        probs = self.problems()[0] if split == "val" else self.train_problems("reasoning.train")
        rng = self.rng(f"reasoning.{split}")
        out = []
        for p in probs:
            msgs = [{"role": "user", "content": p.prompt},
                    {"role": "assistant", "reasoning": p.reasoning(), "content": p.answer}]
            if rng.random() < 0.2:
                msgs.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS[p.lang])})
            out.append({"messages": msgs})
        return out

    # ----- classification ----------------------------------------------------------------------

    def classification(self, split: str) -> list[dict]:
        """Balanced sentiment reviews. Val texts never occur in train (val is drawn first)."""
        val_rng = self.rng("classification.val")
        val: dict[str, str] = {}
        i = 0
        while len(val) < self.cfg.n_val():
            pos = i % 2 == 0
            t = make_review(self.w, val_rng.choice(self.langs), pos, val_rng)
            if t not in val:
                val[t] = "positive" if pos else "negative"
                i += 1
        if split == "val":
            return [{"text": t, "label": lab} for t, lab in val.items()]
        rng = self.rng("classification.train")
        out: dict[str, str] = {}
        i = tries = 0
        while len(out) < self.cfg.records and tries < 100 * self.cfg.records:
            tries += 1
            pos = i % 2 == 0
            t = make_review(self.w, rng.choice(self.langs), pos, rng)
            if t not in val and t not in out:
                out[t] = "positive" if pos else "negative"
                i += 1
        return [{"text": t, "label": lab} for t, lab in out.items()]

    def world_json(self) -> dict:
        return {
            "entities": [{"kind": e.kind, "en": e.en, "zh": e.zh,
                          "attrs": {k: {"en": v[0], "zh": v[1]} for k, v in e.attrs.items()}} for e in self.w.entities],
            "val_entity_facts": [{"entity": self.w.entities[f.entity].en, "attr": f.attr}  # type: ignore[index]
                                 for f in self.val_entity],
            "val_arith_facts": [f"{f.a} {f.attr} {f.b}" for f in self.val_arith],
        }


DESCRIPTION = (
    "tiaoyu synthetic corpus: a fictional world of 200 entities (people, cities, pets, objects) "
    "with English and Chinese names, plus small arithmetic. text = pretraining documents stating "
    "every fact in several phrasings; chat/preference val ask only about held-out facts that appear "
    "in the text but in no train question; verifiable.val and reasoning.val share the same held-out "
    "problems; classification = balanced sentiment reviews. See tiaoyu_cli/data/synth.py."
)


def write_corpus(out_dir: str | Path, cfg: SynthConfig, on_file: Callable[[str, int], None] | None = None) -> dict:
    """Generate every kind and split into `out_dir`; return the manifest (also written as manifest.json)."""
    if cfg.text_mb <= 0 or cfg.records < 1 or cfg.n_val() < 1:
        raise TiaoyuError("--text-mb, --records and --val-records must be positive")
    cfg.langs()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TiaoyuError(f"{out}: exists and is not a folder")
    g = Generator(cfg)
    files: dict[str, dict] = {}
    for kind in KINDS:
        for split in ("train", "val"):
            name = f"{kind}.{split}.jsonl"
            n = nbytes = 0
            with atomic_open(out / name, "wb") as f:
                if kind == "text":
                    recs: Iterator[dict] | list[dict] = ({"text": d} for d in g.text_docs(split))
                else:
                    recs = getattr(g, kind)(split)
                for r in recs:
                    line = orjson.dumps(r) + b"\n"
                    f.write(line)
                    n += 1
                    nbytes += len(line)
            files[name] = {"kind": "chat" if kind == "reasoning" else kind, "split": split, "records": n, "bytes": nbytes}
            if on_file:
                on_file(name, n)
    files.update(synth_docs.write_retrieval_files(out, g, on_file))
    # tool use (data/synth_tools.py): calculator calls, own held-out problems; tools-direct: problems of the
    # same kind answered without the tool (the baseline a tool model is measured against); reasoning-tools:
    # the same problems with a <think> plan before the first call (traces for `reason`, questions for
    # `reason --rl --tools`)
    for stem, plain, think in (("tools", False, False), ("tools-direct", True, False), ("reasoning-tools", False, True)):
        for split in ("train", "val"):
            name = f"{stem}.{split}.jsonl"
            recs = tool_records(cfg.seed, cfg.records if split == "train" else cfg.n_val(), cfg.langs(), split,
                                plain=plain, think=think)
            data = b"".join(orjson.dumps(r) + b"\n" for r in recs)
            atomic_write_bytes(out / name, data)
            files[name] = {"kind": "chat", "split": split, "records": len(recs), "bytes": len(data)}
            if on_file:
                on_file(name, len(recs))
    atomic_write_bytes(out / "world.json", orjson.dumps(g.world_json(), option=orjson.OPT_INDENT_2) + b"\n")
    manifest = {
        "generator": "tiaoyu synth",
        "format_version": FORMAT_VERSION,
        "seed": cfg.seed,
        "text_mb": cfg.text_mb,
        "records": cfg.records,
        "val_records": cfg.n_val(),
        "lang": cfg.lang,
        "description": DESCRIPTION,
        "world": {
            "entities": len(g.w.entities),
            "entity_facts": len(g.w.entity_facts),
            "arith_facts": len(g.w.arith_facts),
            "val_entity_facts": len(g.val_entity),
            "val_arith_facts": len(g.val_arith),
        },
        "files": files,
    }
    atomic_write_bytes(out / "manifest.json", orjson.dumps(manifest, option=orjson.OPT_INDENT_2) + b"\n")
    return manifest
