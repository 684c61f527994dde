"""Print the demo's result table — stage, metric, before → after — and write OUT/summary.json.

    python recipes/summary.py runs/demo [--settings SEED=0 SCALE=1 …] [--spread recipes/tiny-cpu/spread.json]

`--settings` (the recipe passes its budgets and seed) are written to OUT/settings.json with torch's CPU
capability and version; with `--spread`, a file of the same settings measured over several seeds and CPU
capabilities (recipes/spread.py), each row also shows the measured spread and whether this run is inside it.

"Before" is the first evaluation a run logged (stages evaluate their starting model at step 0),
"after" the last; for pretraining, "before" is the loss at step 1 (≈ ln(vocab) for a fresh model); for
a run that continues another and skips its own step-0 evaluation, that run's last one (BEFORE_FROM).
Reads only metrics.jsonl files, so it works on any run folder a recipe produced.

Noise. A rate (accuracy, format compliance) measured on n held-out items has the standard error
√(p(1−p)/n) (p pulled off 0 and 1 by one pseudo-count each side); the evaluation logs n beside it
(`answer_n`, `val_n`). The gain's standard error is √(SE_before² + SE_after²), and the column
"gain / SE" says how many of them the change is: a row under 2 is within noise (marked ~). Losses and margins are averages over the same held-out set at
both ends; their rows carry no standard error.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from tiaoyu_cli.io import atomic_write_text  # write, fsync, rename: a killed run leaves the old file or the new one

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
    ("tools (sft)", "tools-1", "answer_acc", "held-out arithmetic, with the calculator"),
    ("tools (sft)", "tools-1", "tool_call_rate", "answers that called the calculator"),
    ("tools (sft, +300)", "tools", "answer_acc", "held-out arithmetic, with the calculator"),
    ("tools direct", "tools-direct", "answer_acc", "the same questions answered directly"),
    ("tools grpo", "tools-grpo", "val_accuracy", "held-out arithmetic, with the calculator"),
]
# runs that start where another ended and skip their own step-0 evaluation (--no-eval-before): their
# "before" is that run's last evaluation — the same model, the same held-out questions, the same scorer.
# (Agentic GRPO skips its step 0 too, but its own greedy evaluation is not SFT's: a row with a paired.json
# takes before and after from it, both checkpoints scored by recipes/paired.py.)
BEFORE_FROM = {("tools", "answer_acc"): ("tools-1", "answer_acc")}


def read_json(p: Path):
    """A JSON file the recipe wrote; a malformed one is one error line naming it."""
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: {p}: not valid JSON ({e})") from None


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


def before_after(lines: list[dict], key: str, stage: str) -> tuple[dict | None, dict | None]:
    """The first (step-0) and the last evaluation line that has `key`."""
    evals = sorted((m for m in lines if m.get("eval") and key in m), key=lambda m: m.get("step", 0))
    after = evals[-1] if evals else None
    # "before" only from an evaluation of the starting model (step 0), never from a mid-run one
    before = evals[0] if len(evals) > 1 and evals[0].get("step", 0) == 0 else None
    if stage == "pretrain" and key == "val_loss":
        train = [m for m in lines if not m.get("eval") and "loss" in m]
        before = {key: train[0]["loss"]} if train else None
    return before, after


def last_eval_as(lines: list[dict], key: str, as_key: str) -> dict | None:
    """The last evaluation of `key` in another run, under this row's key (and its item count's key)."""
    _, last = before_after(lines, key, "")
    if last is None:
        return None
    return {as_key: last[key], count_key(as_key): last.get(count_key(key))}


def row(stage: str, run: str, key: str, what: str, before: dict | None, after: dict) -> dict:
    b, a = (before or {}).get(key), after[key]
    r = {"stage": stage, "run": run, "metric": what, "key": key, "before": b, "after": a,
         "se_before": None, "se_after": None, "gain_over_se": None}
    if is_rate(key):
        nk = count_key(key)
        r["se_before"] = standard_error(b, (before or {}).get(nk))
        r["se_after"] = standard_error(a, after.get(nk))
        r["n_after"] = after.get(nk)
        if b is not None and r["se_before"] is not None and r["se_after"] is not None:
            se = math.hypot(r["se_before"], r["se_after"])
            r["gain_over_se"] = (a - b) / se if se > 0 else (0.0 if a == b else math.copysign(math.inf, a - b))
    return r


def fmt_rate(v: float | None, se: float | None, key: str) -> str:
    s = fmt(v, key)
    return s if se is None or v is None else f"{s} ± {100 * se:.1f}"


def fmt_z(z: float | None) -> str:
    if z is None:
        return ""
    return f"{z:+.1f}" + ("" if abs(z) >= 2 else " ~")


def fmt_paired(r: dict) -> str:
    """The paired comparison of a row that has one: z of the difference on the same questions, flips each way."""
    p = r.get("paired")
    if not p or p.get("paired_z") is None:
        return ""
    return f"paired {fmt_z(p['paired_z'])} ({p['wrong_to_right']}↑ {p['right_to_wrong']}↓ of {p['n']})"


def fmt_gain(r: dict) -> str:
    """The "gain / SE" cell: the unpaired z, then the paired comparison where the run has one."""
    return "; ".join(x for x in (fmt_z(r["gain_over_se"]), fmt_paired(r)) if x)


def count_key(key: str) -> str:
    """The key the evaluation logs the number of items under, for a rate metric."""
    return "val_n" if key.startswith("val_") else "answer_n"


def is_rate(key: str) -> bool:
    return any(s in key for s in ("acc", "rate"))


def standard_error(p: float | None, n: float | None) -> float | None:
    """√(p̃(1−p̃)/n) with p̃ = (pn + 1)/(n + 2): never 0 at 0 % or 100 % (Laplace's rule of succession)."""
    if p is None or not n:
        return None
    q = (p * n + 1) / (n + 2)
    return math.sqrt(q * (1 - q) / n)


def fmt(v: float | None, key: str) -> str:
    if v is None:
        return "—"
    if any(s in key for s in ("acc", "rate")):
        return f"{100 * v:.1f}%"
    return f"{v:.3f}"


def write_settings(root: Path, pairs: list[str]) -> dict:
    """OUT/settings.json: the recipe's settings (K=V, numbers parsed), torch's CPU capability and version."""
    settings: dict = {}
    for kv in pairs:
        k, _, v = kv.partition("=")
        try:
            settings[k] = json.loads(v)
        except json.JSONDecodeError:
            settings[k] = v
    try:
        import torch

        settings["capability"] = torch.backends.cpu.get_cpu_capability()
        settings["torch"] = torch.__version__
    except ImportError:
        pass
    atomic_write_text(root / "settings.json", json.dumps(settings, indent=1) + "\n")
    return settings


def spread_column(root: Path, spread_file: Path | None) -> dict[str, str]:
    """row key → "mean (min–max)" and a flag when this run is outside the band, where the spread's settings match."""
    if spread_file is None or not spread_file.is_file():
        return {}
    sys.path.insert(0, str(Path(__file__).parent))
    import spread

    ref = read_json(spread_file)
    try:
        checked = spread.check(root, ref)
    except SystemExit as e:  # other budgets than the spread was measured at: no column
        print(f"(no spread column: {str(e).removeprefix('error: ')})")
        return {}
    n = len(ref["runs"])
    return {c["key"]: f"{spread.fmt_spread(ref['rows'][c['key']], 'after')}{'' if c['ok'] else ' OUTSIDE'} [{n}]"
            for c in checked}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default="runs/demo")
    ap.add_argument("--settings", nargs="*", default=[], metavar="K=V")
    ap.add_argument("--spread", type=Path)
    args = ap.parse_args(argv)
    root = Path(args.out)
    rows = []
    for stage, run, key, what in ROWS:
        lines = read_metrics(root / run)
        if not lines:
            continue
        b, a = before_after(lines, key, stage)
        if a is None:
            continue
        if b is None and (run, key) in BEFORE_FROM:
            b = last_eval_as(read_metrics(root / BEFORE_FROM[run, key][0]), BEFORE_FROM[run, key][1], key)
        paired = root / run / "paired.json"  # recipes/paired.py: the same questions before and after, pair by pair
        p = read_json(paired) if paired.is_file() and "acc" in key else None
        if p is not None:  # both checkpoints scored by one evaluator: the row's before and after are its
            n = {count_key(key): p["n"]}
            b, a = {key: p["before"], **n}, {**a, key: p["after"], **n}
        r = row(stage, str(root / run), key, what, b, a)
        if p is not None:  # it compares answers: only the accuracy row
            r["paired"] = p
        rows.append(r)
    atomic_write_text(root / "summary.json", json.dumps(rows, indent=2) + "\n")
    write_settings(root, args.settings)
    spreads = spread_column(root, args.spread)
    cols = ("stage", "metric", "before", "after", "gain / SE") + (("measured spread [runs]",) if spreads else ())
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"tiaoyu demo — {root}")
        for col in cols:
            t.add_column(col, justify="left" if col in ("stage", "metric") else "right")
        for r in rows:
            t.add_row(r["stage"], r["metric"], fmt_rate(r["before"], r["se_before"], r["key"]),
                      fmt_rate(r["after"], r["se_after"], r["key"]), fmt_gain(r),
                      *([spreads.get(key_of(r), "")] if spreads else []))
        Console(width=max(Console().width, 110)).print(t)
    except ImportError:
        for r in rows:
            print(f"{r['stage']:<12} {r['metric']:<34} {fmt_rate(r['before'], r['se_before'], r['key']):>14} → "
                  f"{fmt_rate(r['after'], r['se_after'], r['key'])}  {fmt_gain(r)}  {spreads.get(key_of(r), '')}")
    outside = [k for k, v in spreads.items() if "OUTSIDE" in v]
    if outside:
        print(f"outside the measured spread: {', '.join(outside)} (a figure that moved: see docs/demo.md)")
    print(f"written {root / 'summary.json'}")
    return 0 if rows else 1


def key_of(r: dict) -> str:
    return f"{Path(r['run']).name}/{r['key']}"


if __name__ == "__main__":
    sys.exit(main())
