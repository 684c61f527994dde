"""tiaoyu synth: determinism, every kind and split with the right fields, and the held-out design."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tiaoyu_cli.data.synth import KINDS, SynthConfig, write_corpus

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(text_mb=0.3, records=300, val_records=60)


def load(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_corpus(out, SynthConfig(seed=0, **SMALL))
    return out


def test_same_seed_byte_identical_other_seed_differs(corpus, tmp_path):
    write_corpus(tmp_path / "again", SynthConfig(seed=0, **SMALL))
    write_corpus(tmp_path / "other", SynthConfig(seed=1, **SMALL))
    names = sorted(p.name for p in corpus.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "again").iterdir())
    for name in names:
        assert (corpus / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    assert (corpus / "text.train.jsonl").read_bytes() != (tmp_path / "other" / "text.train.jsonl").read_bytes()
    assert (corpus / "chat.val.jsonl").read_bytes() != (tmp_path / "other" / "chat.val.jsonl").read_bytes()


def _check_messages(msgs):
    assert isinstance(msgs, list) and msgs
    for m in msgs:
        assert m["role"] in ("system", "user", "assistant")
        assert isinstance(m["content"], str) and m["content"]
    assert msgs[-1]["role"] == "assistant"


def test_every_kind_and_split_has_the_right_fields(corpus):
    manifest = orjson.loads((corpus / "manifest.json").read_bytes())
    assert manifest["seed"] == 0 and manifest["description"]
    for kind in KINDS:
        for split in ("train", "val"):
            recs = load(corpus / f"{kind}.{split}.jsonl")
            assert recs, (kind, split)
            assert manifest["files"][f"{kind}.{split}.jsonl"]["records"] == len(recs)
            want = 300 if split == "train" else 60
            if kind != "text":
                assert len(recs) == want, (kind, split)
            for r in recs:
                if kind == "text":
                    assert set(r) == {"text"} and len(r["text"]) > 10
                elif kind in ("chat", "reasoning"):
                    assert set(r) == {"messages"}
                    _check_messages(r["messages"])
                elif kind == "preference":
                    assert set(r) == {"prompt", "chosen", "rejected"}
                    assert r["chosen"] != r["rejected"] and r["prompt"]
                elif kind == "verifiable":
                    assert set(r) == {"prompt", "answer"} and r["answer"].isdigit()
                else:
                    assert set(r) == {"text", "label"} and r["label"] in ("positive", "negative")
    assert (corpus / "text.train.jsonl").stat().st_size >= 0.3e6


def test_both_languages_and_lang_option(corpus, tmp_path):
    cjk = re.compile(r"[\u4e00-\u9fff]")
    for kind in KINDS:
        text = (corpus / f"{kind}.train.jsonl").read_text("utf-8")
        assert cjk.search(text) and re.search(r"[A-Za-z]{4}", text.replace('"messages"', "")), kind
    write_corpus(tmp_path / "en", SynthConfig(seed=0, text_mb=0.05, records=50, lang="en"))
    for p in (tmp_path / "en").glob("*.jsonl"):
        assert not cjk.search(p.read_text("utf-8")), p.name


def test_chat_val_asks_held_out_facts_that_the_text_states(corpus):
    train_q = {m["content"] for r in load(corpus / "chat.train.jsonl") for m in r["messages"] if m["role"] == "user"}
    val = load(corpus / "chat.val.jsonl")
    assert all(len([m for m in r["messages"] if m["role"] == "user"]) == 1 for r in val)
    assert not [r for r in val if r["messages"][-2]["content"] in train_q]
    # a good share of answers are numbers (exact-match arithmetic)
    assert sum(r["messages"][-1]["content"].isdigit() for r in val) >= len(val) // 4
    # every held-out entity fact is stated in the pretraining text: name and value in one document
    world = orjson.loads((corpus / "world.json").read_bytes())
    by_en = {e["en"]: e for e in world["entities"]}
    docs = [r["text"].lower() for r in load(corpus / "text.train.jsonl")]  # "The Stone Key is ..."
    for f in world["val_entity_facts"]:
        e = by_en[f["entity"]]
        for lang in ("en", "zh"):
            name, value = e[lang].lower(), e["attrs"][f["attr"]][lang].lower()
            assert any(name in d and value in d for d in docs), (name, f["attr"], value)
    # held-out arithmetic facts are never asked in chat.train or preference.train
    for a, op, b in (s.split() for s in world["val_arith_facts"]):
        assert f"What is {a} {op} {b}?" not in train_q
    pref_prompts = {r["prompt"] for r in load(corpus / "preference.train.jsonl")}
    assert not pref_prompts & {r["messages"][-2]["content"] for r in val}


def test_problems_are_correct_and_val_problems_are_held_out(corpus):
    def check_steps(reasoning: str, answer: str):
        steps = re.findall(r"(\d+) ([-+×]) (\d+) = (\d+)", reasoning)
        assert steps, reasoning
        for a, op, b, c in steps:
            a, b, c = int(a), int(b), int(c)
            assert c == (a + b if op == "+" else a - b if op == "-" else a * b), reasoning
        assert steps[-1][3] == answer

    for split in ("train", "val"):
        for r in load(corpus / f"reasoning.{split}.jsonl"):
            asst = r["messages"][-1]
            assert set(asst) == {"role", "reasoning", "content"} and asst["content"].isdigit()
            assert "<think>" not in asst["reasoning"]
            check_steps(asst["reasoning"], asst["content"])
    ver_val = load(corpus / "verifiable.val.jsonl")
    rea_val = load(corpus / "reasoning.val.jsonl")
    assert [r["prompt"] for r in ver_val] == [r["messages"][-2]["content"] for r in rea_val]
    assert [r["answer"] for r in ver_val] == [r["messages"][-1]["content"] for r in rea_val]
    val_prompts = {r["prompt"] for r in ver_val}
    assert not val_prompts & {r["prompt"] for r in load(corpus / "verifiable.train.jsonl")}
    assert not val_prompts & {r["messages"][-2]["content"] for r in load(corpus / "reasoning.train.jsonl")}
    # expression prompts evaluate to their answer
    for r in load(corpus / "verifiable.train.jsonl"):
        m = re.fullmatch(r"(?:What is |Calculate |Compute |计算：)?([\d +×-]+?)(?:\?|\.|等于多少？)?", r["prompt"])
        if m:
            assert eval(m.group(1).replace("×", "*")) == int(r["answer"]), r


def test_classification_is_balanced_and_val_is_disjoint(corpus):
    train = load(corpus / "classification.train.jsonl")
    val = load(corpus / "classification.val.jsonl")
    for recs in (train, val):
        pos = sum(r["label"] == "positive" for r in recs)
        assert pos == len(recs) // 2
    assert not {r["text"] for r in val} & {r["text"] for r in train}
    assert len({r["text"] for r in train}) == len(train)


def test_cli_writes_files_and_nothing_on_stdout(tmp_path):
    exe = Path(sys.executable).with_name("tiaoyu")
    r = subprocess.run([str(exe), "synth", str(tmp_path / "d"), "--text-mb", "0.05", "--records", "40", "--seed", "3"],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == b""
    for kind in KINDS:
        assert (tmp_path / "d" / f"{kind}.train.jsonl").exists() and (tmp_path / "d" / f"{kind}.val.jsonl").exists()
    assert orjson.loads((tmp_path / "d" / "manifest.json").read_bytes())["seed"] == 3
    bad = subprocess.run([str(exe), "synth", str(tmp_path / "e"), "--lang", "fr"], capture_output=True, timeout=120)
    assert bad.returncode == 2 and b"--lang" in bad.stderr
