"""The tiny-cpu recipe end to end (what `make demo` runs), on a reduced budget: every stage leaves its
files, every metric of the summary table moves the right way, and make skips what is done.

Runs `make -f recipes/tiny-cpu/Makefile all` in real processes with SCALE set so the whole chain
(synth → prep → tokenize → pretrain → sft → lora → reward → dpo → grpo → distill → reason →
reason --rl → chat → summary) takes a couple of minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny-cpu" / "Makefile"
TIAOYU = Path(sys.executable).with_name("tiaoyu")
SCALE = "0.25"
EVALN = 200  # held-out questions per evaluation (the demo asks 400)

pytestmark = [pytest.mark.integration,  # the end-to-end recipe: `make test-all` runs it, `make test` does not
              pytest.mark.skipif(shutil.which("make") is None or not TIAOYU.exists(),
                                 reason="needs make and the tiaoyu console script of this venv")]


def make(out: Path, *targets: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = ["make", "-f", str(RECIPE), *targets, f"OUT={out}", f"SCALE={SCALE}", f"TIAOYU={TIAOYU}",
           f"PYTHON={sys.executable}", f"EVALN={EVALN}", "TOOLS_GRPO_PROMPTS=8"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "run"
    p = make(out, "all")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = json.loads((out / "summary.json").read_text())
    return out, {(r["stage"], r["key"]): r for r in rows}


@pytest.mark.slow
def test_every_stage_leaves_its_files(demo):
    out, _ = demo
    for f in ("data/manifest.json", "data/text.train.jsonl", "prep/text.jsonl", "tok/tokenizer.model",
              "tokens/meta.json", "chat.jsonl", "summary.json", "lora-merged/model.safetensors",
              "lora-merged/config.json", "data/bench/val/entity_en_val.csv", "bench/base.json",
              "bench/reason-rl.json", "report/report.md", "report/report.html"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    for run in ("base", "sft", "lora", "rm", "dpo", "grpo", "student", "reason", "reason-rl", "tools-1", "tools",
                "tools-direct", "tools-grpo"):
        ck = out / run / "latest"
        weights = ("adapter_model.safetensors", "adapter_config.json") if run == "lora" else ("model.safetensors", "config.json")
        assert all((ck / w).is_file() for w in weights), (run, sorted(p.name for p in ck.iterdir()))
        assert (out / run / "metrics.jsonl").stat().st_size > 0, run
        assert not list((out / run).rglob("*.tmp*")), run  # no half-written files left behind
    rm_cfg = json.loads((out / "rm" / "latest" / "config.json").read_text())
    assert rm_cfg["num_labels"] == 1  # a reward model: scalar head
    # the reasoning model answered the first five held-out problems, one JSON line each, think block apart
    answers = [json.loads(line) for line in (out / "chat.jsonl").read_text().splitlines()]
    assert len(answers) == 5 and all(isinstance(a["response"], str) and "input_answer" in a for a in answers), answers[0]


@pytest.mark.slow
def test_every_metric_moves_the_right_way(demo):
    out, rows = demo

    def last_eval(run: str) -> dict:
        lines = [json.loads(l) for l in (out / run / "metrics.jsonl").read_text().splitlines() if l.strip()]
        return [l for l in lines if l.get("eval")][-1]

    def ba(stage: str, key: str) -> tuple[float, float]:
        r = rows[(stage, key)]
        assert r["before"] is not None and r["after"] is not None, r
        return r["before"], r["after"]

    b, a = ba("pretrain", "val_loss")
    assert a < b - 3.0, (b, a)  # from ≈ ln(vocab) to far below it
    b, a = ba("sft", "val_loss")
    assert a < b - 2.0, (b, a)  # held-out answer loss: the base has never seen the chat format
    b, a = ba("rlhf reward", "val_accuracy")
    # the untrained head ties every pair (0.5, loss ln 2); at this budget it learns the refusal pairs (~1/6 of
    # them) and the knowledge pairs stay near chance, so accuracy alone is too noisy a claim here (measured
    # 0.5625 on 48 pairs). What must move: the held-out pairwise loss below ln 2 = 0.693 (measured 0.590) and
    # the chosen-over-rejected margin above 0 (measured 0.554)
    assert b == 0.5, b
    rm = last_eval("rm")
    assert rm["val_loss"] < 0.66 and rm["val_margin"] > 0.1, rm
    b, a = ba("rlhf dpo", "val_reward_margin")
    assert b == 0 and a > 0, (b, a)
    b, a = ba("rlhf grpo", "val_kl")
    assert 0.05 < a < 3.0, (b, a)  # the policy moved (measured 0.53), and stayed near the SFT start
    b, a = ba("distill", "val_loss")
    assert a < b - 2.0, (b, a)  # the student starts untrained
    b, a = ba("reason", "format_rate")
    assert a > b and a >= 0.8, (b, a)  # learned to think in <think> … </think> before answering
    b, a = ba("reason --rl", "val_format_rate")
    assert a >= 0.8, (b, a)  # GRPO kept the think format it started with
    # ... and it trained: the policy left its start (an unchanged policy has KL exactly 0; measured 0.008)
    assert last_eval("reason-rl")["val_kl"] > 1e-3
    # tool use: at this budget (300 Muon tool-SFT steps) the model learns the protocol — every held-out
    # question starts with a well-formed calculator call (measured 200 of 200; the base makes none) — and
    # whether it also copies the operands depends on the draw (answers 0, 4.5 and 36.5 % in three runs; the
    # demo's 800 steps reach 65–94 %); the same questions answered directly stay near 0 (measured 0 of 200)
    b, a = ba("tools (sft)", "tool_call_rate")
    assert b == 0 and a >= 0.9, (b, a)
    assert rows[("tools direct", "answer_acc")]["after"] <= 0.10
    # agentic GRPO moved the policy (KL exactly 0 when unchanged; measured 0.0027, 0.075 and 0.12 at lr 2e-5)
    assert last_eval("tools-grpo")["val_kl"] > 1e-3
    for run, stage, key in (("tools-grpo", "tools grpo", "val_accuracy"), ("grpo", "rlhf grpo", "val_accuracy"),
                            ("reason-rl", "reason --rl", "val_accuracy")):
        paired = json.loads((out / run / "paired.json").read_text())
        assert paired["n"] == EVALN and paired["wrong_to_right"] + paired["right_to_wrong"] <= EVALN, run
        assert rows[(stage, key)]["paired"]["n"] == EVALN, run


@pytest.mark.slow
def test_make_skips_what_is_done(demo):
    out, _ = demo
    stamp = (out / "sft" / "latest" / "model.safetensors").stat().st_mtime_ns
    p = make(out, "sft")
    assert p.returncode == 0, p.stderr
    assert not [line for line in p.stdout.splitlines() if line.startswith(str(TIAOYU))], p.stdout  # no command ran
    assert (out / "sft" / "latest" / "model.safetensors").stat().st_mtime_ns == stamp


def test_paired_comparison_by_hand(tmp_path, capsys):
    """recipes/paired.py: McNemar's difference and SE, computed by hand; a wrong path is one error line."""
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        from paired import main, paired
    finally:
        sys.path.pop(0)
    out = tmp_path / "p.json"
    assert main([str(tmp_path / "nope"), str(tmp_path / "nope"), str(tmp_path / "q.jsonl"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "no such checkpoint" in err and "Traceback" not in err and not out.exists()
    r = paired([True, True, False, False, True], [True, False, True, True, True])
    assert (r["wrong_to_right"], r["right_to_wrong"], r["n"]) == (2, 1, 5)
    assert r["diff"] == pytest.approx(0.2) and r["paired_se"] == pytest.approx((3 - 1 / 5) ** 0.5 / 5)
    assert r["paired_z"] == pytest.approx(0.2 / ((3 - 1 / 5) ** 0.5 / 5))
    assert r["before"] == pytest.approx(0.6) and r["after"] == pytest.approx(0.8)
    assert paired([True, False], [True, False])["paired_z"] is None  # nothing changed: no z


SPREAD = ROOT / "recipes" / "tiny-cpu" / "spread-test.json"


@pytest.mark.slow
def test_rows_within_the_measured_spread(demo):
    """Every row of this reduced run falls in the band measured over seeds and CPU capabilities at the same
    settings (recipes/tiny-cpu/spread-test.json, made by recipes/spread.py collect from runs of this test's
    make command with SEED=0,1,2, native and ATEN_CPU_CAPABILITY=avx2). A row outside it is a figure that moved."""
    out, _ = demo
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import spread
    finally:
        sys.path.pop(0)
    ref = json.loads(SPREAD.read_text(encoding="utf-8"))
    checked = spread.check(out, ref)  # other settings than the spread's: SystemExit, the test fails
    assert len(checked) >= 15, checked  # every row of the table has a band
    assert [c for c in checked if not c["ok"]] == [], checked
