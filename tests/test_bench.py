"""`tiaoyu eval bench`: readers and their errors, scoring rules, the shared-prompt engine, GSM8K
extraction, contamination. Parity with lm-evaluation-harness is in test_bench_parity.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.evals import bench_formats as bf
from tiaoyu_cli.evals.bench import BenchConfig, run_bench
from tiaoyu_cli.evals.contamination import dirty_items, units
from tiaoyu_cli.evals.gsm8k import extract_flexible, extract_strict
from tiaoyu_cli.evals.multiple_choice import (MCRequest, _full_sequence_lls, encode_request, loglikelihoods,
                                              mean_stderr, score_item)

FIX = Path(__file__).parent / "fixtures" / "bench"


def write(p: Path, text: str) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")
    return p


# ---- readers -------------------------------------------------------------------------------------

def test_readers_build_lm_eval_prompts():
    files = bf.find_files(FIX / "mmlu", "mmlu", "test")
    docs = bf.read_docs(files, "mmlu")
    assert [d.subject for d in docs] == ["anatomy"] * 3 + ["astronomy"] * 3
    d = docs[0]
    assert d.text == ("Which colour do you get by mixing blue and yellow?\nA. Red\nB. Purple\nC. Green\nD. Orange"
                      "\nAnswer:") and d.choices == list("ABCD") and d.gold == 2
    assert bf.description("mmlu", "high_school_physics", {}, "letters").startswith(
        "The following are multiple choice questions (with answers) about high school physics.")
    ce = bf.read_docs(bf.find_files(FIX / "ceval", "ceval", "val"), "ceval")
    assert ce[0].text.endswith("\n答案：") and ce[0].gold == 3
    names = bf.subject_names(bf.find_files(FIX / "ceval", "ceval", "val"))
    assert "注册会计师" in bf.description("ceval", "accountant", names, "letters")
    arc = bf.read_docs(bf.find_files(FIX / "arc", "arc", "test"), "arc")
    assert arc[1].text == "Question: What happens to ice when it is heated?\nAnswer:" and arc[1].gold == 0
    hs = bf.read_docs(bf.find_files(FIX / "hellaswag", "hellaswag", "val"), "hellaswag")
    assert hs[0].text == "Washing a dog: A man fills a tub with water. The dog" and hs[0].gold == 1
    cloze = bf.read_docs(files, "mmlu", style="cloze")
    assert cloze[0].choices == ["Red", "Purple", "Green", "Orange"] and cloze[0].delimiter == " "
    assert bf.read_docs(bf.find_files(FIX / "cmmlu", "cmmlu", "test"), "cmmlu", "cloze")[0].delimiter == ""


@pytest.mark.parametrize("task,name,text,msg,line", [
    ("mmlu", "x_test.csv", "q,a,b,c,d,A\nq2,a,b,c,d\n", "missing column 'answer'", 2),
    ("mmlu", "x_test.csv", "q,a,b,c,d,A\nq2,a,b,c,d,E\n", "answer 'E' is not one of A, B, C, D", 2),
    ("mmlu", "x_test.csv", "", "empty file", None),
    ("mmlu", "x_test.csv", '"two\nlines",a,b,c,d,A\nq2,a,b,c,d,E\n', "answer 'E'", 3),  # physical line of the row
    ("ceval", "x_test.csv", "id,question,A,B,C,D,answer\n0,q,a,b,c,d,\n", "no answer", 2),
    ("ceval", "x_val.csv", "id,question,A,B,C,answer\n0,q,a,b,c,A\n", "missing column 'D'", 1),
    ("ceval", "x_val.csv", "id,question,A,B,C,D,answer\n", "empty file", None),
    ("cmmlu", "x.csv", ",Question,A,B,C,D,Answer\n0,q,a,b,c,d,a\n", "answer 'a' is not one of", 2),
    ("arc", "a.jsonl", '{"question": "q", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "C"}\n',
     "answerKey 'C' is not one of the labels", 1),
    ("arc", "a.jsonl", '{"question": "q", "answerKey": "A"}\n', "missing column 'choices'", 1),
    ("hellaswag", "h.jsonl", '{"ctx": "c", "endings": ["a", "b"], "label": 2}\n', "out of range", 1),
    ("hellaswag", "h.jsonl", "\n", "empty file", None),
    ("gsm8k", "g.jsonl", '{"question": "q", "answer": "42"}\n{"question": "q"}\n', "#### N", 1),
])
def test_malformed_files_name_file_and_row(tmp_path, task, name, text, msg, line):
    p = write(tmp_path / name, text)
    with pytest.raises(TiaoyuError) as e:
        bf.read_docs([p], task)
    assert msg in str(e.value) and str(p) in str(e.value)
    if line is not None:
        assert f"{p}:{line}:" in str(e.value)


def test_split_folders_and_missing_fewshot(tmp_path):
    with pytest.raises(TiaoyuError, match="no .csv files of split 'val'"):
        bf.find_files(FIX / "mmlu", "mmlu", "val")
    p = write(tmp_path / "only_test.csv", "q,a,b,c,d,A\n")
    with pytest.raises(TiaoyuError, match="--shots needs the 'dev' split"):
        run_bench("unused", p, BenchConfig(task="mmlu", shots=1))


# ---- scoring rules ------------------------------------------------------------------------------

def test_score_item_acc_norm_by_characters_and_ties():
    # raw ll prefers choice 0; per character choice 1 wins (−4/8 > −3/2); per UTF-8 byte "长长" is 6 bytes
    s = score_item([-3.0, -4.0], ["ab", "abcdefgh"], gold=1)
    assert s["acc"] == 0.0 and s["acc_norm"] == 1.0
    s = score_item([-3.0, -2.5], ["长长", "a"], gold=0)  # chars: −1.5 vs −2.5 → 0; bytes: −0.5 vs −2.5 → 0
    assert s["acc_norm"] == 1.0 and s["acc_bytes"] == 1.0 and s["acc"] == 0.0
    assert score_item([-1.0, -1.0], ["A", "B"], gold=0)["pred"] == 0  # ties: the first, like numpy


def test_stderr_is_lm_eval_mean_stderr():
    m, se = mean_stderr([1.0, 0.0, 1.0, 1.0])
    assert m == 0.75 and se == pytest.approx(math.sqrt(0.75 * 0.25 / 3))


# ---- the shared-prompt engine -------------------------------------------------------------------

def test_shared_prompt_batches_equal_full_sequences(tok_dir):
    from tiaoyu_cli.model import Transformer, preset
    from tiaoyu_cli.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_dir)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size, n_layers=2)).eval()
    reqs = [MCRequest("Question: Where does Kamiro live?\nAnswer:", [" Lunford", " the big city of Brightvale", " A"]),
            MCRequest("王丽住在", ["青石城", "海港"]),
            MCRequest("Short ", ["one", "two words"])]  # trailing space moves into the continuation
    got = loglikelihoods(model, tok, reqs, batch_size=2)
    with torch.no_grad():
        for r, lls in zip(reqs, got):
            e = encode_request(tok, r)
            assert e.ctx[0] == tok.bos_id
            ref = _full_sequence_lls(model, e.ctx, e.conts, model.config.max_seq_len, "cpu")
            assert lls == pytest.approx(ref, abs=1e-4)
    e = encode_request(tok, reqs[2])
    assert tok.decode(e.ctx[1:]) == "Short" and tok.decode(e.conts[0]).startswith(" ")
    # a prompt longer than the context falls back to left-truncated full sequences
    long = [MCRequest("word " * (model.config.max_seq_len + 20) + "end", [" a", " b"])]
    assert all(math.isfinite(x) for x in loglikelihoods(model, tok, long)[0])


# ---- GSM8K and contamination --------------------------------------------------------------------

def test_gsm8k_extraction():
    assert extract_strict("2 * 5 = 10\n#### 1,000.") == "1000"
    assert extract_strict("the answer is 10") is None
    assert extract_flexible("so 3 + 4 = 7, then $12.") == "12"
    assert extract_flexible("no number") is None


def test_contamination_units_and_13grams(tmp_path):
    assert units("Hello, World! 王丽住在青石城。") == ["hello", "world", "王", "丽", "住", "在", "青", "石", "城"]
    long_en = "the quick brown fox jumps over the lazy dog near the old stone bridge today"  # 15 words
    items = [long_en, "王丽住在青石城，她最喜欢红色的花和蓝色的天空", "a b c", "completely unrelated question here"]
    train = write(tmp_path / "t.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"text": "Yesterday THE quick brown fox jumps over the lazy dog near the old stone bridge!"},
        {"messages": [{"role": "user", "content": "她说：王丽住在青石城，她最喜欢红色的花。"}]},
        {"text": "x a b c y"}]) + "\n")
    dirty, n = dirty_items(items, [train])
    assert n == 3 and dirty == [True, True, True, False]
    dirty, _ = dirty_items(["a b cd"], [train])  # short item: whole units only ("c" is not "cd")
    assert dirty == [False]


def test_gsm8k_cli_base_and_chat_prompts(base_ckpt, capsys):
    from tiaoyu_cli.cli.main import main

    for chat in ("auto", "yes"):
        with pytest.raises(SystemExit) as e:
            main(["eval", "bench", str(base_ckpt), str(FIX / "gsm8k"), "--task", "gsm8k", "--shots", "1",
                  "--max-new-tokens", "6", "--chat", chat, "--items", "--device", "cpu"])
        assert e.value.code in (0, None)
        r = json.loads(capsys.readouterr().out)
        assert r["n"] == 2 and r["chat_template"] == (chat == "yes") and set(r["stderr"]) == {"acc", "acc_flexible"}
        assert [it["gold"] for it in r["items"]] == ["10", "12"] and all("answer" in it for it in r["items"])


def test_gsm8k_with_tools_answers_through_the_tool_loop(base_ckpt, monkeypatch):
    """--tools: each question goes through chat's tool loop; the final answer is scored, the calls are kept.
    The model's turns are scripted (a tiny base does not call tools): a calculator call, then an answer."""
    from tiaoyu_cli.checkpoint import load_tokenizer
    from tiaoyu_cli.infer import tool_loop
    from tiaoyu_cli.infer.generate import GenerationResult

    tok = load_tokenizer(base_ckpt)
    turns = [[tok.tool_call_id] + tok.encode('{"name": "calculator", "arguments": {"expression": "6+4"}}')
             + [tok.end_tool_call_id], tok.encode("The answer is 10.\n#### 10") + [tok.im_end_id]]
    seen = []

    def gen(model, prompts, max_new_tokens, params=None, stop_ids=(), seed=None, **kw):
        seen.append([tok.decode(p, skip_special=False) for p in prompts])
        toks = turns[(len(seen) - 1) % 2]
        assert toks[-1] in set(stop_ids)
        return GenerationResult([toks] * len(prompts), ["stop"] * len(prompts), [list(p) for p in prompts])

    monkeypatch.setattr(tool_loop, "generate_detailed", gen)
    r = run_bench(base_ckpt, FIX / "gsm8k", BenchConfig(task="gsm8k", tools=["calculator"], chat="yes", device="cpu",
                                                         keep_items=True))
    assert r["n"] == 2 and r["acc"] == 0.5 and r["tool_call_rate"] == 1.0 and r["tools"] == ["calculator"]
    assert [it["strict"] for it in r["items"]] == ["10", "10"] and [it["gold"] for it in r["items"]] == ["10", "12"]
    assert all(it["tool_calls"][0]["result"] == "10" for it in r["items"])
    assert "<tool_response>" in seen[1][0] and "10" in seen[1][0]  # round 2 read the calculator's result
    with pytest.raises(TiaoyuError, match="needs the chat template"):
        run_bench(base_ckpt, FIX / "gsm8k", BenchConfig(task="gsm8k", tools=["calculator"], chat="no", device="cpu"))


# ---- the benchmark of held-out facts (tiaoyu synth → bench/) ------------------------------------

def test_fact_bench_layout_and_determinism(tmp_path):
    from tiaoyu_cli.data.synth import SynthConfig
    from tiaoyu_cli.data.synth_bench import write_fact_bench

    counts = write_fact_bench(tmp_path / "a", SynthConfig(seed=0))
    write_fact_bench(tmp_path / "b", SynthConfig(seed=0))
    assert set(counts) == {"entity_en", "entity_zh", "arith_en", "arith_zh"} and min(counts.values()) > 100
    for f in sorted((tmp_path / "a" / "bench").rglob("*.csv")):
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()
    docs = bf.read_docs(bf.find_files(tmp_path / "a" / "bench", "ceval", "val"), "ceval", "cloze")
    assert len(docs) == sum(counts.values())
    assert all(len(set(d.choices)) == 4 for d in docs)  # four different candidates
    golds = [d.gold for d in docs]
    assert all(abs(golds.count(k) / len(golds) - 0.25) < 0.05 for k in range(4))  # the right letter is random
    dev = bf.read_docs(bf.find_files(tmp_path / "a" / "bench", "ceval", "dev"), "ceval", "cloze")
    assert {d.subject for d in dev} == set(counts) and not {d.text for d in dev} & {d.text for d in docs}


def test_pretrained_base_scores_above_chance_on_held_out_facts(base_ckpt, synth_dir, tmp_path):
    """Measured on the session's base (400 steps): acc 0.308 ± 0.017 over 736 items, 3.4 standard errors
    above the 25 % chance; 93 % of the items share a 13-gram with text.train (the corpus states every fact)."""
    from tiaoyu_cli.data.synth import SynthConfig
    from tiaoyu_cli.data.synth_bench import write_fact_bench

    write_fact_bench(tmp_path, SynthConfig(seed=0, text_mb=1.5, records=2000, val_records=200))
    r = run_bench(base_ckpt, tmp_path / "bench", BenchConfig(task="ceval", style="cloze", device="cpu",
                                                              contamination=[str(synth_dir / "text.train.jsonl")]))
    assert r["n"] > 500 and r["chance"] == pytest.approx(0.25)
    assert r["acc"] - 0.25 > 2.5 * r["stderr"]["acc"], r
    c = r["contamination"]
    assert c["dirty_share"] > 0.5 and c["clean"]["n"] == r["n"] - c["dirty"]
