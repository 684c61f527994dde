"""`tiaoyu report`: one headline row per stage (the metric it exists for, before → after ± SE from the counts,
the gain and whether it is beyond 2 SE), that metric's curve as inline SVG, benchmark scores per checkpoint with a
flag when a later stage lowers its parent's score beyond the standard error, and every metric folded below."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from tiaoyu_cli.cli.main import main


def make_run(root: Path, name: str, stage: str, lines: list[dict], parent: Path | None = None) -> Path:
    run = root / name
    step = run / "step-000010"
    step.mkdir(parents=True)
    (step / "config.json").write_text("{}")
    (step / "model.safetensors").write_bytes(b"")
    (step / "trainer.json").write_text(json.dumps({"stage": stage, "parent": str(parent) if parent else None}))
    (run / "latest").symlink_to("step-000010")
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    return run


def bench(path: Path, ckpt: Path, task: str, acc: float, se: float, n: int = 400) -> Path:
    path.write_text(json.dumps({"task": task, "style": "cloze", "shots": 0, "n": n, "acc": acc,
                                "stderr": {"acc": se}, "checkpoint": str(ckpt)}))
    return path


def test_report_card(tmp_path, capsys):
    base = make_run(tmp_path, "base", "pretrain", [
        {"step": 1, "loss": 6.9}, {"step": 5, "loss": 3.0}, {"step": 10, "loss": 2.0},
        {"step": 10, "eval": True, "val_loss": 2.2}])
    sft = make_run(tmp_path, "sft", "sft", [
        {"step": 0, "eval": True, "val_loss": 3.0, "answer_acc": 0.01},
        {"step": 5, "loss": 1.5}, {"step": 10, "loss": 1.0},
        {"step": 10, "eval": True, "val_loss": 1.2, "answer_acc": 0.40}], parent=base / "step-000010")
    files = [bench(tmp_path / "b1.json", base / "step-000010", "ceval", 0.50, 0.02),
             bench(tmp_path / "b2.json", sft / "step-000010", "ceval", 0.40, 0.02),  # drop 0.10 > 0.028: flagged
             bench(tmp_path / "b3.json", base / "step-000010", "arc", 0.30, 0.02),
             bench(tmp_path / "b4.json", sft / "step-000010", "arc", 0.28, 0.02)]  # drop 0.02 < 0.028: not
    out = tmp_path / "report"
    args = ["report", str(base), str(sft), "-o", str(out)] + [a for f in files for a in ("--bench", str(f))]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code in (0, None)
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    # the full table, folded below the headline rows
    assert "| base | pretrain | val_loss | 6.9 | 2.2 |" in md  # pretrain: before = first training loss
    assert "| sft | sft | answer_acc | 0.01 | 0.4 |" in md  # step-0 eval line = before
    assert md.index("## What each stage did") < md.index("## Curves") < md.index("<details>") < md.index(
        "| sft | sft | answer_acc | 0.01 | 0.4 |")
    # the headline rows: pretraining's held-out loss, sft's answer accuracy (no answer_n logged: no SE)
    assert ("| base | pretrain | held-out loss (nats/token) | 6.9 (training loss at step 1) | 2.2 | -4.7 | "
            "n/a: a mean over the held-out set, no SE |  |") in md
    assert "| sft | sft | held-out answer accuracy | 1.0% | 40.0% | +39.0 pp | n/a: no count logged, no SE | loss 3 → 1.2 |" in md
    assert "| base | 0.500 ± 0.020 (n=400) | 0.300 ± 0.020 (n=400) |" in md
    flags = [line for line in md.splitlines() if line.startswith("- ⚠")]
    assert len(flags) == 1 and "sft lowers ceval cloze 0-shot from 0.500 (base) to 0.400" in flags[0]
    # headline curves (2) up front, the loss curves (2) inside <details>; all inline
    head, folded = page.split("<details>")
    assert head.count("<svg") == 2 and folded.count("<svg") == 2 and "<polyline" in head and "src=" not in page
    assert (out / "curves-sft.svg").read_text().startswith("<svg")
    assert "answer_acc (held out)" in (out / "curves-sft.svg").read_text()
    assert "flag:" in capsys.readouterr().err


def test_report_refuses_what_is_not_a_bench_result(tmp_path):
    run = make_run(tmp_path, "base", "pretrain", [{"step": 1, "loss": 2.0}])
    (tmp_path / "x.json").write_text(json.dumps({"loss": 1}))
    with pytest.raises(SystemExit) as e:
        main(["report", str(run), "--bench", str(tmp_path / "x.json"), "-o", str(tmp_path / "r")])
    assert e.value.code == 2


def se(p: float, n: int) -> float:
    """The report's standard error of a proportion: √(p̃(1−p̃)/n), p̃ = (pn + 1)/(n + 2)."""
    q = (p * n + 1) / (n + 2)
    return math.sqrt(q * (1 - q) / n)


def test_each_stage_leads_with_what_it_exists_for(tmp_path, capsys):
    """RL leads with held-out accuracy (its loss says nothing), ± SE from val_n/answer_n, the gain flagged only
    beyond 2 SE; the reward model, DPO, distillation and classification lead with their own figure."""
    grpo_lines = [{"step": 0, "eval": True, "val_accuracy": 0.10, "val_n": 200, "val_reward": 0.2, "val_kl": 0.0}]
    grpo_lines += [{"step": s, "loss": 0.01 * (-1) ** s, "reward": 0.2 + s / 100, "accuracy": 0.1 + s / 200}
                   for s in range(5, 41, 5)]
    grpo_lines += [{"step": 20, "eval": True, "val_accuracy": 0.16, "val_n": 200, "val_reward": 0.3, "val_kl": 0.1},
                   {"step": 40, "eval": True, "val_accuracy": 0.25, "val_n": 200, "val_reward": 0.4, "val_kl": 0.3}]
    runs = [
        make_run(tmp_path, "grpo", "grpo", grpo_lines),
        make_run(tmp_path, "reason-rl", "reason-rl", [  # +3 points on 200: within noise
            {"step": 0, "eval": True, "val_accuracy": 0.40, "val_n": 200, "val_format_rate": 0.9},
            {"step": 10, "loss": 0.0, "accuracy": 0.4},
            {"step": 10, "eval": True, "val_accuracy": 0.43, "val_n": 200, "val_format_rate": 0.95}]),
        make_run(tmp_path, "rm", "reward", [
            {"step": 0, "eval": True, "val_accuracy": 0.5, "val_loss": 0.693, "val_margin": 0.0, "val_n": 48},
            {"step": 30, "loss": 0.6}, {"step": 30, "eval": True, "val_accuracy": 0.75, "val_loss": 0.5,
                                        "val_margin": 0.6, "val_n": 48}]),
        make_run(tmp_path, "dpo", "dpo", [
            {"step": 0, "eval": True, "val_reward_accuracy": 0.5, "val_reward_margin": 0.0, "val_logps_rejected": -40,
             "val_n": 48},
            {"step": 30, "loss": 0.4}, {"step": 30, "eval": True, "val_reward_accuracy": 0.3, "val_reward_margin": -0.2,
                                        "val_logps_rejected": -41, "val_n": 48}]),
        make_run(tmp_path, "student", "distill", [
            {"step": 0, "eval": True, "val_loss": 6.9, "teacher_val_loss": 1.2},
            {"step": 50, "loss": 2.0}, {"step": 50, "eval": True, "val_loss": 1.8, "teacher_val_loss": 1.2}]),
        make_run(tmp_path, "cls", "classify", [
            {"step": 0, "eval": True, "val_acc": 0.3, "val_loss": 1.1, "majority_acc": 0.4},
            {"step": 20, "loss": 0.5}, {"step": 20, "eval": True, "val_acc": 0.8, "val_loss": 0.5, "majority_acc": 0.4}]),
    ]
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as e:
        main(["report", *map(str, runs), "-o", str(out)])
    assert e.value.code in (0, None)
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    lead = [line for line in md.split("## Curves")[0].splitlines() if line.startswith("| ") and "---" not in line]
    assert lead[0].startswith("| run | stage | metric | before | after | gain | beyond 2 SE? |")
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in lead[1:]}
    assert list(rows) == ["grpo", "reason-rl", "rm", "dpo", "student", "cls"]  # one row per stage, in order

    def z(b, nb, a, na):
        return (a - b) / math.hypot(se(b, nb), se(a, na))

    g = rows["grpo"]  # run, stage, metric, before, after, gain, flag, notes
    assert g[2] == "held-out accuracy (greedy answers)"
    assert g[3] == f"10.0% ± {100 * se(0.10, 200):.1f}" and g[4] == f"25.0% ± {100 * se(0.25, 200):.1f}"
    assert g[5] == "+15.0 pp" and g[6] == f"▲ better, beyond 2 SE (z = {z(0.10, 200, 0.25, 200):+.1f})"
    assert g[7].startswith("reward 0.2 → 0.4; KL to ref 0 → 0.3")
    r = rows["reason-rl"]
    assert r[6] == f"~ within 2 SE (z = {z(0.40, 200, 0.43, 200):+.1f})" and "think format 90.0% → 95.0%" in r[7]
    assert rows["rm"][2] == "held-out pairwise accuracy" and rows["rm"][6].startswith("▲ better")
    d = rows["dpo"]  # lower than it started, beyond 2 SE on 48 pairs
    assert d[2] == "held-out implicit-reward accuracy" and d[5] == "-20.0 pp" and d[6].startswith("▼ worse, beyond 2 SE")
    assert "reward margin 0 → -0.2" in d[7]
    s = rows["student"]
    assert s[2] == "student held-out loss" and (s[3], s[4], s[5]) == ("6.9", "1.8", "-5.1") and s[7] == "teacher 1.2 |"
    c = rows["cls"]
    assert c[2] == "held-out accuracy" and c[6] == "n/a: no count logged, no SE" and "majority-class baseline 40.0%" in c[7]
    # the html leads with the same rows, coloured by the verdict; the long table is folded
    head, folded = page.split("<details>")
    assert head.index("<table class='lead'>") < head.index("<h2>Curves</h2>")
    assert "<tr class='better'><td>grpo</td>" in head and "<tr class='noise'><td>reason-rl</td>" in head
    assert "<tr class='worse'><td>dpo</td>" in head
    assert "val_logps_rejected" not in head and "val_logps_rejected" in folded
    # the curve of grpo is its held-out accuracy with ± SE bars over the rollouts' accuracy — not its loss
    svg = (out / "curves-grpo.svg").read_text()
    assert "held-out accuracy (greedy answers)" in svg and "val_accuracy (held out, ± SE)" in svg
    assert "accuracy (sampled rollouts)" in svg and ">loss<" not in svg
    assert len(re.findall(r'<path d="M[^"]*h8', svg)) == 3  # an error bar per evaluation
    assert re.search(r'width="(\d+)"', svg).group(1) == "640"  # readable, not a thumbnail
    assert ">25.0%<" in svg and ">10.0%<" in svg  # the end values written on the curve
    for name in ("grpo", "reason-rl", "rm", "dpo", "student", "cls"):
        assert (out / f"curves-{name}.svg").is_file() and f"![{name}](curves-{name}.svg)" in md
    err = capsys.readouterr().err
    assert f"grpo (grpo): held-out accuracy (greedy answers) {g[3]} → {g[4]}  ▲ better, beyond 2 SE" in err
