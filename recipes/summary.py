"""Print the demo's result table — stage, metric, before → after — and write OUT/summary.json.

    python recipes/summary.py runs/demo

"Before" is the first evaluation a run logged (stages evaluate their starting model at step 0),
"after" the last; for pretraining, "before" is the loss at step 1 (≈ ln(vocab) for a fresh model).
Reads only metrics.jsonl files, so it works on any run folder a recipe produced.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# stage, run folder (under OUT), metric key, what it means
ROWS = [
    ("pretrain", "base", "val_loss", "val loss (nats/token)"),
    ("pretrain", "base", "val_bpb", "val bits per byte"),
    ("sft", "sft", "answer_acc", "held-out answer accuracy"),
    ("sft", "sft", "val_loss", "held-out answer loss"),
    ("lora", "lora", "answer_acc", "held-out answer accuracy (LoRA)"),
    ("rlhf reward", "rm", "val_accuracy", "held-out pairwise accuracy"),
    ("rlhf dpo", "dpo", "val_reward_accuracy", "held-out implicit-reward accuracy"),
    ("rlhf dpo", "dpo", "val_reward_margin", "held-out DPO reward margin"),
    ("rlhf grpo", "grpo", "val_accuracy", "held-out verifiable accuracy"),
    ("rlhf grpo", "grpo", "val_kl", "KL to the reference"),
    ("distill", "student", "val_loss", "student held-out loss"),
    ("distill", "student", "teacher_val_loss", "teacher held-out loss"),
    ("reason", "reason", "answer_acc", "held-out multi-step accuracy"),
    ("reason", "reason", "format_rate", "think-format compliance"),
    ("reason --rl", "reason-rl", "val_accuracy", "held-out multi-step accuracy"),
    ("reason --rl", "reason-rl", "val_format_rate", "think-format compliance"),
]


def read_metrics(run: Path) -> list[dict]:
    p = run / "metrics.jsonl"
    if not p.exists():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def before_after(lines: list[dict], key: str, stage: str) -> tuple[float | None, float | None]:
    evals = sorted((m for m in lines if m.get("eval") and key in m), key=lambda m: m.get("step", 0))
    after = evals[-1][key] if evals else None
    # "before" only from an evaluation of the starting model (step 0), never from a mid-run one
    before = evals[0][key] if len(evals) > 1 and evals[0].get("step", 0) == 0 else None
    if stage == "pretrain" and key == "val_loss":
        train = [m for m in lines if not m.get("eval") and "loss" in m]
        before = train[0]["loss"] if train else None
    return before, after


def fmt(v: float | None, key: str) -> str:
    if v is None:
        return "—"
    if any(s in key for s in ("acc", "rate")):
        return f"{100 * v:.1f}%"
    return f"{v:.3f}"


def main(out: str) -> int:
    root = Path(out)
    rows = []
    for stage, run, key, what in ROWS:
        lines = read_metrics(root / run)
        if not lines:
            continue
        b, a = before_after(lines, key, stage)
        if a is None:
            continue
        rows.append({"stage": stage, "run": str(root / run), "metric": what, "key": key, "before": b, "after": a})
    (root / "summary.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"tiaoyu demo — {root}")
        for col in ("stage", "metric", "before", "after"):
            t.add_column(col, justify="right" if col in ("before", "after") else "left")
        for r in rows:
            t.add_row(r["stage"], r["metric"], fmt(r["before"], r["key"]), fmt(r["after"], r["key"]))
        Console().print(t)
    except ImportError:
        for r in rows:
            print(f"{r['stage']:<12} {r['metric']:<34} {fmt(r['before'], r['key']):>8} → {fmt(r['after'], r['key'])}")
    print(f"written {root / 'summary.json'}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo"))
