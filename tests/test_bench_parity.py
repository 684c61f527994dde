"""`tiaoyu eval bench` against lm-evaluation-harness (test-only dependency: pip install lm-eval).

The tiny pretrained base is exported with `tiaoyu export --format hf`; lm-eval's `hf` model runs
in-process on the task YAMLs kept in tests/fixtures/bench/lm_eval_tasks/ (lm-eval's own prompts
for mmlu/ceval/cmmlu/arc_easy/hellaswag, reading the local fixture files; nothing is
downloaded). Reproduce by hand from the repo root:

    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm_eval --model hf \\
        --model_args pretrained=HF_EXPORT,dtype=float32,add_bos_token=True \\
        --include_path tests/fixtures/bench/lm_eval_tasks --tasks tiaoyu_mmlu_anatomy --num_fewshot 1

Our accuracy and acc_norm must equal lm-eval's within 1e-6 and each choice's log-likelihood
must be close.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tiaoyu_cli.checkpoint import load_model, load_tokenizer
from tiaoyu_cli.cli.main import main
from tiaoyu_cli.evals.bench import BenchConfig, run_bench
from tiaoyu_cli.evals.gsm8k import extract_strict, normalise

pytestmark = pytest.mark.integration  # a long integration test: `make test-all` runs it, `make test` does not

FIX = Path(__file__).parent / "fixtures" / "bench"
ROOT = Path(__file__).resolve().parents[1]

# (our task, fixture folder, lm-eval task names, shots)
CASES = [
    ("mmlu", "mmlu", ["tiaoyu_mmlu_anatomy", "tiaoyu_mmlu_astronomy"], 2),
    ("mmlu", "mmlu", ["tiaoyu_mmlu_anatomy", "tiaoyu_mmlu_astronomy"], 0),
    ("ceval", "ceval", ["tiaoyu_ceval_accountant"], 2),
    ("cmmlu", "cmmlu", ["tiaoyu_cmmlu_agronomy"], 1),
    ("arc", "arc", ["tiaoyu_arc"], 1),
    ("hellaswag", "hellaswag", ["tiaoyu_hellaswag"], 1),
]


@pytest.fixture(scope="module")
def hf_export(base_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "model"
    with pytest.raises(SystemExit) as e:
        main(["export", str(base_ckpt), "--format", "hf", "-o", str(out)])
    assert e.value.code in (0, None)
    return out


def lm_eval_run(hf_dir: Path, tasks: list[str], shots: int, monkeypatch) -> dict:
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ROOT)  # the YAMLs name the fixture files relative to the repo root
    tm = TaskManager(include_path=str(FIX / "lm_eval_tasks"))
    return lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32", "add_bos_token": True,
                                "device": "cpu"},
        tasks=tasks, task_manager=tm, num_fewshot=shots, batch_size=4, log_samples=True)


@pytest.mark.parametrize("task,folder,lm_tasks,shots", CASES, ids=[f"{c[0]}-{c[3]}shot" for c in CASES])
def test_bench_matches_lm_eval(base_ckpt, hf_export, task, folder, lm_tasks, shots, monkeypatch):
    ours = run_bench(hf_export, FIX / folder, BenchConfig(task=task, shots=shots, device="cpu", keep_items=True,
                                                          batch_size=3))
    ref = lm_eval_run(hf_export, lm_tasks, shots, monkeypatch)
    # per item: lm-eval's samples are per task (= subject), in file order, like ours
    ref_items = []
    for name in lm_tasks:
        for s in sorted(ref["samples"][name], key=lambda s: s["doc_id"]):
            ref_items.append(s)
    assert len(ref_items) == ours["n"] == len(ours["items"])
    for mine, theirs in zip(ours["items"], ref_items):
        their_lls = [r[0] for r in theirs["filtered_resps"]]
        assert mine["lls"] == pytest.approx(their_lls, abs=1e-4), mine["where"]  # measured: ≤ 1.4e-5; without BOS 0.04–0.34
        assert mine["acc"] == theirs["acc"] and mine["acc_norm"] == theirs["acc_norm"], mine["where"]
    n = ours["n"]
    ref_acc = sum(s["acc"] for s in ref_items) / n
    ref_norm = sum(s["acc_norm"] for s in ref_items) / n
    assert abs(ours["acc"] - ref_acc) <= 1e-6 and abs(ours["acc_norm"] - ref_norm) <= 1e-6
    for name in lm_tasks:  # per task (subject) means as lm-eval aggregates them
        r = ref["results"][name]
        subj = name.removeprefix("tiaoyu_").removeprefix(f"{task}_")
        mine = ours["per_subject"].get(subj) or next(iter(ours["per_subject"].values()))
        assert abs(mine["acc"] - r["acc,none"]) <= 1e-6
        assert abs(mine["acc_norm"] - r["acc_norm,none"]) <= 1e-6
        assert abs(mine["stderr"]["acc"] - r["acc_stderr,none"]) <= 1e-6 or mine["n"] < 2


def test_bench_cli_json_and_table(hf_export, tmp_path, capsys):
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:
        main(["eval", "bench", str(hf_export), str(FIX / "mmlu"), "--task", "mmlu", "--shots", "1", "-o", str(out),
              "--device", "cpu"])
    assert e.value.code in (0, None)
    r = json.loads(out.read_text())
    assert r["task"] == "mmlu" and r["n"] == 6 and set(r["per_subject"]) == {"anatomy", "astronomy"}
    assert 0 <= r["acc"] <= 1 and r["stderr"]["acc"] > 0
    err = capsys.readouterr().err
    assert "anatomy" in err and "astronomy" in err and "all" in err



@pytest.mark.parametrize("shots", [0, 1])
def test_gsm8k_prompts_and_answers_match_lm_eval(hf_export, shots, monkeypatch):
    """Same prompt text (few-shot solutions included), same greedy answer, same extracted numbers.
    (The tiny base answers these with a bare "." — the check is on the pipeline, not on skill.)"""
    ours = run_bench(hf_export, FIX / "gsm8k", BenchConfig(task="gsm8k", shots=shots, device="cpu", keep_items=True,
                                                           max_new_tokens=16))
    ref = lm_eval_run(hf_export, ["tiaoyu_gsm8k"], shots, monkeypatch)
    theirs = sorted((s for s in ref["samples"]["tiaoyu_gsm8k"] if s.get("filter") == "strict-match"),
                    key=lambda s: s["doc_id"])  # one sample per item and filter
    assert len(theirs) == ours["n"] == 2
    model, folder = load_model(hf_export)
    tok = load_tokenizer(folder)
    for mine, s in zip(ours["items"], theirs):
        assert mine["prompt"] == s["arguments"][0][0]
        # the same greedy answer as far as it is determined: up to the first step whose top two logits are
        # within float noise of each other (two fp32 implementations may break such a tie either way)
        stable = stable_greedy_prefix(model, tok, mine["prompt"], 16)
        assert mine["answer"].startswith(stable) and s["resps"][0][0].startswith(stable), (stable, mine, s["resps"])
        # and our extraction of lm-eval's own answer is lm-eval's
        assert normalise_none(extract_strict(s["resps"][0][0])) == normalise_none(
            [f for f in ref["samples"]["tiaoyu_gsm8k"] if f["doc_id"] == s["doc_id"]
             and f.get("filter") == "strict-match"][0]["filtered_resps"][0])
    r = ref["results"]["tiaoyu_gsm8k"]
    assert ours["acc"] == r["exact_match,strict-match"] and ours["acc_flexible"] == r["exact_match,flexible-extract"]


def normalise_none(x):
    """lm-eval writes "[invalid]" where the strict regex finds no answer; we write None."""
    return None if x in (None, "[invalid]") else normalise(x)


@torch.no_grad()
def stable_greedy_prefix(model, tok, prompt: str, n: int, tie: float = 1e-3) -> str:
    """Text of the greedy continuation of `prompt` (BOS first) up to the first near-tie of the top two logits,
    or up to EOS / n tokens."""
    model.eval()
    seq, out = tok.encode(prompt, bos=True), []
    for _ in range(n):
        top = torch.topk(model(torch.tensor([seq])).logits[0, -1].float(), 2)
        if float(top.values[0] - top.values[1]) < tie or int(top.indices[0]) == tok.eos_id:
            break
        seq.append(int(top.indices[0]))
        out.append(seq[-1])
    return tok.decode(out)
