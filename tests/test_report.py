"""`tiaoyu report`: before → after per stage from metrics.jsonl, inline SVG curves, benchmark scores per
checkpoint, and a flag when a later stage lowers its parent's score beyond the standard error."""

from __future__ import annotations

import json
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
    assert "| base | pretrain | val_loss | 6.9 | 2.2 |" in md  # pretrain: before = first training loss
    assert "| sft | sft | answer_acc | 0.01 | 0.4 |" in md  # step-0 eval line = before
    assert "| base | 0.500 ± 0.020 (n=400) | 0.300 ± 0.020 (n=400) |" in md
    flags = [line for line in md.splitlines() if line.startswith("- ⚠")]
    assert len(flags) == 1 and "sft lowers ceval cloze 0-shot from 0.500 (base) to 0.400" in flags[0]
    assert page.count("<svg") == 2 and "<polyline" in page and "src=" not in page  # self-contained
    assert (out / "curves-sft.svg").read_text().startswith("<svg")
    assert "flag:" in capsys.readouterr().err


def test_report_refuses_what_is_not_a_bench_result(tmp_path):
    run = make_run(tmp_path, "base", "pretrain", [{"step": 1, "loss": 2.0}])
    (tmp_path / "x.json").write_text(json.dumps({"loss": 1}))
    with pytest.raises(SystemExit) as e:
        main(["report", str(run), "--bench", str(tmp_path / "x.json"), "-o", str(tmp_path / "r")])
    assert e.value.code == 2
