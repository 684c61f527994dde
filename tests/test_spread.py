"""recipes/spread.py and recipes/summary.py's spread column, on run folders written here by hand: the band
is [min, max] widened by 3 sd of the runs (a rate by at least three binomial SEs of one run), a run
outside it is flagged, and runs of other budgets are refused rather than compared."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
import spread  # noqa: E402
import summary  # noqa: E402

sys.path.pop(0)


def fake_run(root: Path, seed: int, acc: float, loss: float, steps: int = 400) -> Path:
    """A run folder as the recipe leaves it: sft's metrics (answer accuracy on 400 items, val loss)."""
    (root / "sft").mkdir(parents=True)
    lines = [{"step": 0, "eval": True, "answer_acc": 0.0, "answer_n": 400, "val_loss": 14.0},
             {"step": 10, "loss": 3.0},
             {"step": steps, "eval": True, "answer_acc": acc, "answer_n": 400, "val_loss": loss}]
    (root / "sft" / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    assert summary.main([str(root), "--settings", f"SEED={seed}", f"SFT_STEPS={steps}", "DTYPE=fp32"]) == 0
    return root


def test_collect_band_and_check(tmp_path, capsys):
    runs = [fake_run(tmp_path / f"s{i}", i, acc, loss) for i, (acc, loss) in
            enumerate([(0.10, 1.30), (0.14, 1.25), (0.12, 1.20)])]
    settings = json.loads((runs[0] / "settings.json").read_text())
    assert settings["SEED"] == 0 and settings["SFT_STEPS"] == 400 and settings["DTYPE"] == "fp32"
    assert "capability" in settings and "torch" in settings
    res = spread.collect(runs)
    assert [r["SEED"] for r in res["runs"]] == [0, 1, 2]
    acc, loss = res["rows"]["sft/answer_acc"], res["rows"]["sft/val_loss"]
    assert acc["after"] == [0.10, 0.14, 0.12] and acc["n"] == 400 and acc["rate"] and not loss["rate"]
    # the loss: the runs' range widened by three sample standard deviations (sd of 1.30, 1.25, 1.20 = 0.05)
    lo, hi = spread.band(loss)
    assert lo == pytest.approx(1.20 - 0.15) and hi == pytest.approx(1.30 + 0.15)
    # the rate: 3 sd of the runs (0.06) is more than three binomial SEs at 12 % of 400 (0.0487): sd wins
    lo, hi = spread.band(acc)
    assert lo == pytest.approx(0.10 - 0.06) and hi == pytest.approx(0.14 + 0.06)
    # identical runs still leave a rate three binomial standard errors either side, a loss 2 % of its mean
    same = {"after": [0.5, 0.5], "rate": True, "n": 400}
    assert spread.band(same) == pytest.approx((0.5 - 3 * math.sqrt(0.25 / 400), 0.5 + 3 * math.sqrt(0.25 / 400)))
    assert spread.band({"after": [2.0, 2.0], "rate": False}) == pytest.approx((1.96, 2.04))
    assert spread.band({"after": [0.0, 0.9], "rate": True, "n": 400}) == (0.0, 1.0)  # clipped to [0, 1]
    assert "12.0 % (10.0–14.0)" in spread.table(res) and "1.250 (1.200–1.300)" in spread.table(res)
    assert "| 3 of 3 |" in spread.table(res)  # 0 % → 10 % of 400 is beyond noise in every run

    ok = fake_run(tmp_path / "new", 7, 0.16, 1.28)
    assert all(c["ok"] for c in spread.check(ok, res))
    far = fake_run(tmp_path / "far", 8, 0.30, 1.27)
    flags = {c["key"]: c["ok"] for c in spread.check(far, res)}
    assert flags == {"sft/answer_acc": False, "sft/val_loss": True}

    # summary's column: the spread beside the run, the run outside it named
    f = tmp_path / "spread.json"
    f.write_text(json.dumps(res))
    capsys.readouterr()
    assert summary.main([str(far), "--settings", "SEED=8", "SFT_STEPS=400", "DTYPE=fp32", "--spread", str(f)]) == 0
    out = capsys.readouterr().out
    assert "12.0 % (10.0–14.0) OUTSIDE [3]" in out and "outside the measured spread: sft/answer_acc" in out
    assert spread.main(["check", str(far), "--spread", str(f)]) == 1
    assert spread.main(["check", str(ok), "--spread", str(f)]) == 0


def test_other_settings_are_refused(tmp_path, capsys):
    a = fake_run(tmp_path / "a", 0, 0.1, 1.3)
    b = fake_run(tmp_path / "b", 1, 0.1, 1.3, steps=200)
    with pytest.raises(SystemExit, match="settings differ .* in SFT_STEPS"):
        spread.collect([a, b])
    res = spread.collect([a])
    with pytest.raises(SystemExit, match="SFT_STEPS"):
        spread.check(b, res)
    f = tmp_path / "spread.json"
    f.write_text(json.dumps(res))
    capsys.readouterr()
    assert summary.main([str(b), "--settings", "SEED=1", "SFT_STEPS=200", "DTYPE=fp32", "--spread", str(f)]) == 0
    out = capsys.readouterr().out
    assert "no spread column" in out and "OUTSIDE" not in out
    with pytest.raises(SystemExit, match="settings.json: missing"):
        spread.collect([tmp_path / "nothing"])


def test_before_from_the_run_it_continues(tmp_path):
    """A run that continues another without its own step-0 evaluation (tool SFT +300 from tools-1) takes its
    "before" from that run's last evaluation, item count included; with its own step-0 line it keeps that. A
    row with a paired.json (agentic GRPO) takes before and after from it: both checkpoints scored by one
    evaluator, not the SFT evaluation's before beside GRPO's own after."""
    def write(run: str, lines: list[dict]) -> None:
        (tmp_path / run).mkdir(parents=True, exist_ok=True)
        (tmp_path / run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))

    write("tools-1", [{"step": 0, "eval": True, "answer_acc": 0.0, "answer_n": 400},
                      {"step": 1200, "eval": True, "answer_acc": 0.25, "answer_n": 400}])
    write("tools-grpo", [{"step": 1, "loss": 0.0}, {"step": 8, "eval": True, "val_accuracy": 0.30, "val_n": 400}])
    write("tools", [{"step": 300, "eval": True, "answer_acc": 0.35, "answer_n": 400}])
    assert summary.main([str(tmp_path)]) == 0

    def rows() -> dict:
        return {r["run"].rsplit("/", 1)[-1] + "/" + r["key"]: r for r in json.loads((tmp_path / "summary.json").read_text())}
    t = rows()["tools/answer_acc"]
    assert (t["before"], t["after"]) == (0.25, 0.35) and t["gain_over_se"] == pytest.approx(
        0.10 / math.hypot(summary.standard_error(0.25, 400), summary.standard_error(0.35, 400)))
    assert rows()["tools-grpo/val_accuracy"]["before"] is None  # GRPO's own scorer is not SFT's: no before
    (tmp_path / "tools-grpo" / "paired.json").write_text(json.dumps(
        {"n": 400, "before": 0.26, "after": 0.28, "wrong_to_right": 10, "right_to_wrong": 2, "paired_z": 2.31}))
    write("tools", [{"step": 0, "eval": True, "answer_acc": 0.2, "answer_n": 400},
                    {"step": 300, "eval": True, "answer_acc": 0.35, "answer_n": 400}])
    assert summary.main([str(tmp_path)]) == 0
    g = rows()["tools-grpo/val_accuracy"]
    assert (g["before"], g["after"], g["paired"]["paired_z"]) == (0.26, 0.28, 2.31) and g["gain_over_se"] == pytest.approx(
        0.02 / math.hypot(summary.standard_error(0.26, 400), summary.standard_error(0.28, 400)))
    assert rows()["tools/answer_acc"]["before"] == 0.2  # its own step-0 evaluation wins


def test_a_malformed_run_file_is_one_error(tmp_path):
    (tmp_path / "settings.json").write_text('{"SEED": 0')
    (tmp_path / "summary.json").write_text("[]")
    with pytest.raises(SystemExit, match=r"settings.json: not valid JSON"):
        spread.collect([tmp_path])
    with pytest.raises(SystemExit):
        spread.main(["collect", str(tmp_path), "-o", str(tmp_path / "out.json")])
    assert not (tmp_path / "out.json").exists()  # nothing half-written
