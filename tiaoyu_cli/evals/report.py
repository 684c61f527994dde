"""The report card: `tiaoyu report RUN_DIR… --bench RESULT.json… -o report/`.

Writes report/report.md and report/report.html (self-contained: curves are inline SVG; the
Markdown links the same curves as report/curves-<run>.svg). In reading order:

1. **What each stage did**: one row per run folder, for the metric that stage exists for (its
   *headline*, chosen from what it logs in metrics.jsonl): pretraining its held-out loss, SFT / LoRA /
   reasoning SFT the accuracy of generated answers (held-out loss without answer evals), the reward
   model its held-out pairwise accuracy, DPO its held-out implicit-reward accuracy, GRPO / PPO /
   reason --rl the held-out accuracy (mean reward without a verifier), distillation the student's
   held-out loss next to the teacher's, classification its held-out accuracy. Before → after, each
   ± its standard error where the metric is a proportion of n counted items (n logged beside it as
   `val_n` / `answer_n`), the gain, and whether the gain lies beyond 2 standard errors of the
   difference. "Before" is the step-0 evaluation of the starting model (stages log one); pretraining
   has none, so its "before" loss is the first logged training loss.
2. **Curves** of each headline metric against the step (± SE bars on proportions), with its training-
   time counterpart where the stage logs one (training loss under held-out loss, the sampled rollouts'
   accuracy or reward under the held-out one for RL).
3. **Benchmarks**: the JSON results of `tiaoyu eval bench`, one row per checkpoint (matched to the
   run folder holding it), one column per benchmark (task, style, shots), score ± standard error.
   A stage is **flagged** when it lowers its parent's score (trainer.json's parent checkpoint; else
   the previous run given) by more than the standard error of the difference,
   sqrt(se_parent² + se_child²) — e.g. factual QA dropping after RL, as minimind reports.
4. **Every metric** each run evaluated, before → after, and its training-loss curve, folded away.

Standard error of a proportion p of n items: √(p̃(1−p̃)/n) with p̃ = (pn + 1)/(n + 2) (one pseudo-count
each side, so that 0 % and 100 % keep an uncertainty), as recipes/summary.py computes it. Losses,
margins and mean rewards are averages over the same held-out set at both ends: their rows have no
standard error and no flag.
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from tiaoyu_cli.checkpoint import STEP_RE, load_trainer_info, read_json
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.evals.plots import read_metrics
from tiaoyu_cli.io import atomic_files

SKIP_KEYS = {"step", "eval", "lr", "grad_norm", "tokens", "tokens_per_s", "time_s", "epoch"}


@dataclass
class Run:
    path: Path
    name: str
    stage: str
    parent: str | None
    lines: list[dict]
    rows: list[tuple[str, float | None, float | None]] = field(default_factory=list)  # metric, before, after
    lead: "Lead | None" = None  # the headline row: the metric this stage exists for


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def before_after(lines: list[dict], stage: str) -> list[tuple[str, float | None, float | None]]:
    evals = sorted((m for m in lines if m.get("eval")), key=lambda m: m.get("step", 0))
    keys: list[str] = []
    for m in evals:
        keys += [k for k, v in m.items() if k not in SKIP_KEYS and _num(v) and k not in keys]
    rows = []
    train = [m for m in lines if not m.get("eval") and _num(m.get("loss"))]
    if train:
        rows.append(("loss (train)", train[0]["loss"], train[-1]["loss"]))
    for k in keys:
        have = [m for m in evals if _num(m.get(k))]
        before = have[0][k] if have and have[0].get("step", 0) == 0 and len(have) > 1 else None
        if before is None and stage == "pretrain" and k == "val_loss" and train:
            before = train[0]["loss"]
        rows.append((k, before, have[-1][k] if have else None))
    return rows


# ---- the headline of each stage ------------------------------------------------------------------------

# stage (trainer.json) → the metrics it exists for, best first: the first one the run logged leads
_CHAT = (("answer_acc", "held-out answer accuracy"), ("val_loss", "held-out answer loss"))
_RL = (("val_accuracy", "held-out accuracy (greedy answers)"), ("val_reward", "held-out mean reward"))
HEADLINES: dict[str, tuple[tuple[str, str], ...]] = {
    "pretrain": (("val_loss", "held-out loss (nats/token)"), ("loss", "training loss")),
    "sft": _CHAT, "lora": _CHAT, "reason": _CHAT,
    "reward": (("val_accuracy", "held-out pairwise accuracy"), ("val_loss", "held-out pairwise loss")),
    "dpo": (("val_reward_accuracy", "held-out implicit-reward accuracy"),
            ("val_pref_accuracy", "held-out preference accuracy"), ("val_reward_margin", "held-out reward margin")),
    "grpo": _RL, "ppo": _RL, "reason-rl": _RL,
    "distill": (("val_loss", "student held-out loss"), ("answer_acc", "student held-out answer accuracy")),
    "classify": (("val_acc", "held-out accuracy"), ("val_loss", "held-out loss")),
}
FALLBACK = (("answer_acc", "held-out answer accuracy"), ("val_accuracy", "held-out accuracy"),
            ("val_acc", "held-out accuracy"), ("val_reward", "held-out mean reward"), ("val_loss", "held-out loss"),
            ("loss", "training loss"))
# what else the row mentions, where the run logged it: (key, how it is named)
NOTES: dict[str, tuple[tuple[str, str], ...]] = {
    "sft": (("val_loss", "loss"), ("tool_call_rate", "tool calls")),
    "lora": (("val_loss", "loss"),),
    "reason": (("format_rate", "think format"), ("val_loss", "loss")),
    "reward": (("val_margin", "margin"),),
    "dpo": (("val_reward_margin", "reward margin"),),
    "grpo": (("val_reward", "reward"), ("val_kl", "KL to ref")),
    "ppo": (("val_reward", "reward"), ("val_kl", "KL to ref")),
    "reason-rl": (("val_format_rate", "think format"), ("val_reward", "reward"), ("val_kl", "KL to ref")),
    "distill": (("teacher_val_loss", "teacher"), ("teacher_answer_acc", "teacher accuracy")),
    "classify": (("majority_acc", "majority-class baseline"),),
}
LOWER_IS_BETTER = ("loss", "ppl", "bpb", "kl")


def is_rate(key: str) -> bool:
    """A proportion of counted items (accuracy, format compliance): it has a standard error from n."""
    return ("acc" in key or "rate" in key) and not any(s in key for s in LOWER_IS_BETTER)


def count_key(key: str) -> str:
    """The key the evaluation logs the number of items under, for a rate metric."""
    return "val_n" if key.startswith("val_") else "answer_n"


def standard_error(p: float | None, n: float | None) -> float | None:
    """√(p̃(1−p̃)/n) with p̃ = (pn + 1)/(n + 2): never 0 at 0 % or 100 %."""
    if p is None or not _num(n) or n <= 0:
        return None
    q = (p * n + 1) / (n + 2)
    return math.sqrt(q * (1 - q) / n)


@dataclass
class Lead:
    """The headline row of one run: before → after ± SE, the gain, and whether it is beyond 2 SE."""

    key: str
    label: str
    before: float | None
    after: float | None
    se_before: float | None = None
    se_after: float | None = None
    before_from: str = ""  # where "before" came from when not the step-0 evaluation
    notes: list[str] = field(default_factory=list)

    @property
    def higher_is_better(self) -> bool:
        return not any(s in self.key for s in LOWER_IS_BETTER)

    @property
    def gain(self) -> float | None:
        return None if self.before is None or self.after is None else self.after - self.before

    @property
    def se_gain(self) -> float | None:
        if self.gain is None or self.se_before is None or self.se_after is None:
            return None
        return math.hypot(self.se_before, self.se_after)

    @property
    def z(self) -> float | None:
        se, g = self.se_gain, self.gain
        if se is None or g is None:
            return None
        return g / se if se > 0 else (0.0 if g == 0 else math.copysign(math.inf, g))

    @property
    def verdict(self) -> str:
        """better | worse (beyond 2 SE), noise (within), or "" (no before, or no standard error)."""
        z = self.z
        if z is None:
            return ""
        if abs(z) < 2:
            return "noise"
        return "better" if (z > 0) == self.higher_is_better else "worse"


def lead_row(lines: list[dict], stage: str) -> Lead | None:
    """The headline row of a run's metrics.jsonl (None when it evaluated nothing it exists for)."""
    evals = sorted((m for m in lines if m.get("eval")), key=lambda m: m.get("step", 0))
    train = [m for m in lines if not m.get("eval") and _num(m.get("loss"))]
    for key, label in HEADLINES.get(stage, ()) + FALLBACK:
        src = train if key == "loss" else evals
        have = [m for m in src if _num(m.get(key))]
        if not have:
            continue
        after = have[-1]
        before = have[0] if len(have) > 1 and have[0].get("step", 0) == 0 and key != "loss" else None
        lead = Lead(key, label, before[key] if before else None, after[key])
        if key == "loss" and len(have) > 1:
            lead.before, lead.before_from = have[0][key], f"training loss at step {have[0]['step']}"
        elif before is None and key == "val_loss" and stage == "pretrain" and train:
            lead.before, lead.before_from = train[0]["loss"], f"training loss at step {train[0]['step']}"
        if is_rate(key):
            nk = count_key(key)
            lead.se_after = standard_error(lead.after, after.get(nk))
            lead.se_before = standard_error(lead.before, (before or {}).get(nk)) if before else None
        for nkey, name in NOTES.get(stage, ()):
            if nkey == key:
                continue
            got = [m for m in evals if _num(m.get(nkey))]
            if not got:
                continue
            first, last = got[0][nkey], got[-1][nkey]
            moved = len(got) > 1 and got[0].get("step", 0) == 0 and first != last
            text = f"{_fmt_value(first, nkey)} → {_fmt_value(last, nkey)}" if moved else _fmt_value(last, nkey)
            lead.notes.append(f"{name} {text}")
        return lead
    return None


def _fmt_value(v: float | None, key: str) -> str:
    if v is None:
        return "—"
    return f"{100 * v:.1f}%" if is_rate(key) else f"{v:.4g}"


def _fmt_se(v: float | None, se: float | None, key: str) -> str:
    s = _fmt_value(v, key)
    if v is None or se is None:
        return s
    return f"{s} ± {100 * se:.1f}" if is_rate(key) else f"{s} ± {se:.2g}"


def lead_cells(lead: Lead) -> dict[str, str]:
    """The headline row as text: metric, before, after, gain, flag, notes."""
    g = lead.gain
    gain = "—" if g is None else (f"{100 * g:+.1f} pp" if is_rate(lead.key) else f"{g:+.4g}")
    z, v = lead.z, lead.verdict
    if lead.before is None:
        flag = "no before (the starting model was not evaluated)"
    elif z is None and lead.key == "loss":
        flag = "n/a: training loss (nothing held out was evaluated), no SE"
    elif z is None:
        flag = "n/a: a mean over the held-out set, no SE" if not is_rate(lead.key) else "n/a: no count logged, no SE"
    else:
        zs = "z = " + ("∞" if math.isinf(z) else f"{z:+.1f}")
        flag = {"better": f"▲ better, beyond 2 SE ({zs})", "worse": f"▼ worse, beyond 2 SE ({zs})",
                "noise": f"~ within 2 SE ({zs})"}[v]
    before = _fmt_se(lead.before, lead.se_before, lead.key) + (f" ({lead.before_from})" if lead.before_from else "")
    return {"metric": lead.label, "before": before, "after": _fmt_se(lead.after, lead.se_after, lead.key),
            "gain": gain, "flag": flag, "notes": "; ".join(lead.notes)}


def load_run(path: str | os.PathLike) -> Run:
    p = Path(path)
    if not p.is_dir():
        raise TiaoyuError(f"{p}: not a run folder")
    lines = read_metrics(p)
    try:
        info = load_trainer_info(p)
    except TiaoyuError:
        info = {}
    stage = info.get("stage") or p.name
    run = Run(p, p.name, stage, info.get("parent"), lines)
    run.rows = before_after(lines, stage)
    run.lead = lead_row(lines, stage)
    return run


def load_bench(path: str | os.PathLike) -> dict:
    r = read_json(Path(path))
    for k in ("task", "acc", "stderr", "checkpoint", "n"):
        if k not in r:
            raise TiaoyuError(f"{path}: not a `tiaoyu eval bench` result (no '{k}')")
    return r


def bench_key(r: dict) -> str:
    style = f" {r['style']}" if r.get("style") and r["style"] != "letters" else ""
    data = f" ({Path(r['data']).name})" if r.get("data") else ""
    return f"{r['task']}{style} {r.get('shots', 0)}-shot{data}"


def _owner(ckpt: str, runs: list[Run]) -> Run | None:
    c = Path(ckpt).resolve()
    for run in runs:
        if c == run.path.resolve() or run.path.resolve() in c.parents:
            return run
    return None


def _parent_run(run: Run, runs: list[Run]) -> Run | None:
    if run.parent:
        return _owner(run.parent, runs)
    i = runs.index(run)
    return runs[i - 1] if i > 0 else None


def bench_table(runs: list[Run], results: list[dict]) -> tuple[list[str], dict[str, dict[str, dict]], list[str]]:
    """Columns (benchmarks), {row label: {column: result}}, and the regression flags."""
    cols: list[str] = []
    table: dict[str, dict[str, dict]] = {}
    owner: dict[str, Run | None] = {}
    for r in results:
        col = bench_key(r)
        if col not in cols:
            cols.append(col)
        run = _owner(r["checkpoint"], runs)
        ck = Path(r["checkpoint"])
        label = run.name if run else (ck.parent.name if STEP_RE.match(ck.name) else ck.name)
        owner[label] = run
        table.setdefault(label, {})[col] = r
    flags = []
    for label, row in table.items():
        run = owner[label]
        parent = _parent_run(run, runs) if run else None
        if parent is None or parent.name not in table:
            continue
        for col, r in row.items():
            p = table[parent.name].get(col)
            if p is None:
                continue
            se = math.sqrt(p["stderr"]["acc"] ** 2 + r["stderr"]["acc"] ** 2)
            if p["acc"] - r["acc"] > se:
                flags.append(f"{label} lowers {col} from {p['acc']:.3f} ({parent.name}) to {r['acc']:.3f} "
                             f"(−{p['acc'] - r['acc']:.3f}, more than its standard error {se:.3f})")
    return cols, table, flags


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round values spanning [lo, hi] (steps of 1, 2, 2.5 or 5 × a power of ten)."""
    span = hi - lo
    if not span > 0:
        return [lo]
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _tick(v: float, percent: bool) -> str:
    return f"{100 * v:.4g}%" if percent else f"{v:.4g}"


def svg_chart(title: str, series: list[dict], ylabel: str, percent: bool = False, width: int = 640,
              height: int = 300) -> str | None:
    """A line chart as inline SVG. series: {"label", "points": [(step, value)], "err": {step: se} (optional),
    "colour", "dash" (bool), "thin" (bool: a faint line without dots)}; drawn in order, the last on top."""
    series = [d for d in series if d["points"]]
    pts = [(x, y) for d in series for x, y in d["points"]]
    if not pts:
        return None
    ys = [y for _, y in pts] + [y + sgn * d.get("err", {}).get(x, 0.0) for d in series for x, y in d["points"]
                               for sgn in (1, -1)]
    x0, x1 = min(x for x, _ in pts), max(x for x, _ in pts)
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.08 or abs(y1) * 0.05 or 0.05
    y0, y1 = y0 - pad, y1 + pad
    if percent:
        y0, y1 = max(0.0, y0), min(1.0, y1) if y1 - pad <= 1.0 else y1
    if x1 <= x0:
        x0, x1 = x0 - 1, x1 + 1
    L, R, T, B = 64, 18, 46, 46
    pw, ph = width - L - R, height - T - B

    def X(v: float) -> float:
        return L + (v - x0) / (x1 - x0) * pw

    def Y(v: float) -> float:
        return T + (y1 - v) / (y1 - y0) * ph

    e = html.escape
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} '
           f'{height}" font-family="sans-serif" font-size="12" role="img" aria-label="{e(title)}">'
           f'<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{L}" y="16" font-size="14" font-weight="bold">{e(title)}</text>']
    for t in nice_ticks(y0, y1):
        out.append(f'<line x1="{L}" y1="{Y(t):.1f}" x2="{width - R}" y2="{Y(t):.1f}" stroke="#e4e4e4"/>'
                   f'<text x="{L - 6}" y="{Y(t) + 4:.1f}" text-anchor="end" fill="#444">{_tick(t, percent)}</text>')
    for t in nice_ticks(x0, x1, 6):
        if t == int(t):
            out.append(f'<line x1="{X(t):.1f}" y1="{T + ph}" x2="{X(t):.1f}" y2="{T + ph + 4}" stroke="#888"/>'
                       f'<text x="{X(t):.1f}" y="{T + ph + 17}" text-anchor="middle" fill="#444">{int(t)}</text>')
    out.append(f'<line x1="{L}" y1="{T + ph}" x2="{width - R}" y2="{T + ph}" stroke="#888"/>'
               f'<line x1="{L}" y1="{T}" x2="{L}" y2="{T + ph}" stroke="#888"/>'
               f'<text x="{L + pw / 2:.1f}" y="{height - 8}" text-anchor="middle" fill="#444">step</text>'
               f'<text transform="translate(14 {T + ph / 2:.1f}) rotate(-90)" text-anchor="middle" '
               f'fill="#444">{e(ylabel)}</text>')
    lx = L + 4
    for d in series:  # legend, one line under the title
        dash = ' stroke-dasharray="5 3"' if d.get("dash") else ""
        op = ' stroke-opacity="0.55"' if d.get("thin") else ""
        out.append(f'<line x1="{lx}" y1="30" x2="{lx + 22}" y2="30" stroke="{d["colour"]}" stroke-width="2"{dash}{op}/>'
                   f'<text x="{lx + 27}" y="34" fill="#333">{e(d["label"])}</text>')
        lx += 40 + 6.5 * len(d["label"])
    for d in series:
        colour, pts_d = d["colour"], sorted(d["points"])
        dash = ' stroke-dasharray="5 3"' if d.get("dash") else ""
        if d.get("thin"):
            if len(pts_d) > 1:
                path = " ".join(f"{X(a):.1f},{Y(b):.1f}" for a, b in pts_d)
                out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.2" '
                           f'stroke-opacity="0.55"{dash}/>')
            else:
                out.append(f'<circle cx="{X(pts_d[0][0]):.1f}" cy="{Y(pts_d[0][1]):.1f}" r="2.5" fill="{colour}" '
                           f'fill-opacity="0.55"/>')
            continue
        for x, y in pts_d:
            se = d.get("err", {}).get(x)
            if se:
                xa, lo, hi = X(x), Y(max(y - se, y0)), Y(min(y + se, y1))
                out.append(f'<path d="M{xa:.1f},{lo:.1f}V{hi:.1f}M{xa - 4:.1f},{lo:.1f}h8M{xa - 4:.1f},{hi:.1f}h8" '
                           f'stroke="{colour}" stroke-width="1.2" fill="none"/>')
        if len(pts_d) > 1:
            path = " ".join(f"{X(a):.1f},{Y(b):.1f}" for a, b in pts_d)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2.2"{dash}/>')
        for x, y in pts_d:
            out.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="3.5" fill="{colour}"/>')
        for x, y in dict.fromkeys((pts_d[0], pts_d[-1])):  # the values at both ends, written out
            anchor = "start" if X(x) < L + pw / 2 else "end"
            dx = 6 if anchor == "start" else -6
            out.append(f'<text x="{X(x) + dx:.1f}" y="{Y(y) - 8:.1f}" text-anchor="{anchor}" fill="{colour}" '
                       f'font-weight="bold">{f"{100 * y:.1f}%" if percent else f"{y:.4g}"}</text>')
    out.append("</svg>")
    return "".join(out)


def _series(lines: list[dict], key: str, evals: bool) -> list[tuple[float, float]]:
    by_step = {m["step"]: float(m[key]) for m in lines if bool(m.get("eval")) == evals and _num(m.get(key))}
    return sorted(by_step.items())


def svg_headline(run: Run) -> str | None:
    """The curve of the run's headline metric (± SE bars on proportions), over its training-time counterpart
    where the stage logs one: training loss under held-out loss, rollouts' accuracy/reward under the held-out."""
    lead = run.lead
    if lead is None:
        return None
    key, rate = lead.key, is_rate(lead.key)
    series = []
    if key == "loss":
        series.append({"label": "training loss", "points": _series(run.lines, "loss", False), "colour": "#1f77b4"})
    else:
        twin = "loss" if key == "val_loss" else key.removeprefix("val_") if key.startswith("val_") else None
        if twin and twin != key:
            pts = _series(run.lines, twin, False)
            name = "training batches" if twin == "loss" else ("sampled rollouts" if run.stage in
                                                              ("grpo", "ppo", "reason-rl") else "training batches")
            series.append({"label": f"{twin} ({name})", "points": pts, "colour": "#7f7f7f", "thin": True})
        evals = [m for m in run.lines if m.get("eval") and _num(m.get(key))]
        err = {}
        if rate:
            for m in evals:
                se = standard_error(m[key], m.get(count_key(key)))
                if se is not None:
                    err[m["step"]] = se
        series.append({"label": f"{key} (held out" + (", ± SE)" if err else ")"),
                       "points": _series(run.lines, key, True), "err": err, "colour": "#d62728"})
    if sum(len(d["points"]) for d in series) < 2:
        return None
    return svg_chart(f"{run.name} ({run.stage}): {lead.label}", series, key, percent=rate)


def svg_curves(run: Run, width: int = 480, height: int = 240) -> str | None:
    """Training loss (solid) and held-out loss (dashed) against the step, as an inline SVG."""
    series = [{"label": "loss", "points": _series(run.lines, "loss", False), "colour": "#1f77b4", "thin": True},
              {"label": "val_loss", "points": _series(run.lines, "val_loss", True), "colour": "#d62728",
               "dash": True}]
    if sum(len(d["points"]) for d in series) < 2:
        return None
    return svg_chart(f"{run.name}: loss, val_loss", series, "loss", width=width, height=height)


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.4g}"


def _cell(r: dict | None) -> str:
    return "" if r is None else f"{r['acc']:.3f} ± {r['stderr']['acc']:.3f} (n={r['n']})"


LEAD_COLS = ("run", "stage", "metric", "before", "after", "gain", "beyond 2 SE?", "also")
SE_NOTE = ("Before → after: the starting model's evaluation (step 0) against the last one. ± is the standard "
           "error of a proportion of n held-out items, √(p̃(1−p̃)/n), p̃ = (pn+1)/(n+2); a gain is flagged when it "
           "lies beyond 2 standard errors of the difference, √(SE_before² + SE_after²). Losses, margins and mean "
           "rewards are means over the same held-out set at both ends: no standard error.")


def lead_table(runs: list[Run]) -> list[dict[str, str]]:
    rows = []
    for run in runs:
        cells = lead_cells(run.lead) if run.lead else {"metric": "no evaluation logged", "before": "—", "after": "—",
                                                       "gain": "—", "flag": "", "notes": ""}
        rows.append({"run": run.name, "stage": run.stage, **cells,
                     "verdict": run.lead.verdict if run.lead else ""})
    return rows


def render(runs: list[Run], results: list[dict], curves: dict[str, str],
           loss_curves: dict[str, str] | None = None) -> tuple[str, str]:
    """(Markdown, HTML) of the report card."""
    cols, table, flags = bench_table(runs, results)
    lead = lead_table(runs)
    keys = ("run", "stage", "metric", "before", "after", "gain", "flag", "notes")

    def md_cell(t: str) -> str:
        return t.replace("|", "\\|")

    md = ["# tiaoyu report card", "", "## What each stage did", "",
          "| " + " | ".join(LEAD_COLS) + " |", "|---|---|---|---:|---:|---:|---|---|"]
    md += ["| " + " | ".join(md_cell(r[k]) for k in keys) + " |" for r in lead]
    md += ["", SE_NOTE, "", "## Curves", ""]
    md += [f"![{name}](curves-{name}.svg)" for name in curves]
    if results:
        md += ["", "## Benchmarks (accuracy ± standard error)", "",
               "| checkpoint | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        md += [f"| {label} | " + " | ".join(_cell(row.get(c)) for c in cols) + " |" for label, row in table.items()]
        md += ["", "### Flags", ""] + ([f"- ⚠ {f}" for f in flags] or ["none: no stage lowered a score beyond "
                                                                           "its standard error"])
    md += ["", "<details><summary>Every metric, before → after</summary>", "",
           "| run | stage | metric | before | after |", "|---|---|---|---|---|"]
    for run in runs:
        for k, b, a in run.rows:
            md.append(f"| {run.name} | {run.stage} | {k} | {_fmt(b)} | {_fmt(a)} |")
    md += ["", "</details>"]
    markdown = "\n".join(md) + "\n"

    e = html.escape
    n_rows = sum(len(run.rows) for run in runs)
    h = ["<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
         "<title>tiaoyu report card</title><style>"
         "body{font-family:sans-serif;max-width:1340px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:.5em 0}"
         "td,th{border:1px solid #ccc;padding:4px 10px;text-align:right;vertical-align:top}"
         "td:first-child,th:first-child,td.l,th.l{text-align:left}th{background:#f4f4f4}"
         "table.lead td{font-size:15px}table.lead td.metric{font-weight:bold;text-align:left}"
         "tr.better td.flag{color:#1a7f37;font-weight:bold}tr.worse td.flag{color:#b00;font-weight:bold}"
         "tr.noise td.flag{color:#777}td.notes{color:#555;font-size:13px;text-align:left}"
         ".curves{display:flex;flex-wrap:wrap;gap:16px}.curves svg{border:1px solid #eee;max-width:100%;height:auto}"
         "p.note{color:#555;font-size:13px;max-width:60em}.flag{color:#b00}"
         "details{margin:1.5em 0}summary{cursor:pointer;font-weight:bold;font-size:1.1em}"
         "</style></head><body><h1>tiaoyu report card</h1><h2>What each stage did</h2>",
         "<table class='lead'><tr>" + "".join(f"<th{'' if c in ('before', 'after', 'gain') else ' class=l'}>{e(c)}</th>"
                                               for c in LEAD_COLS) + "</tr>"]
    for r in lead:
        h.append(f"<tr class='{e(r['verdict'])}'><td>{e(r['run'])}</td><td class='l'>{e(r['stage'])}</td>"
                 f"<td class='metric'>{e(r['metric'])}</td><td>{e(r['before'])}</td><td>{e(r['after'])}</td>"
                 f"<td>{e(r['gain'])}</td><td class='flag l'>{e(r['flag'])}</td>"
                 f"<td class='notes'>{e(r['notes'])}</td></tr>")
    h.append(f"</table><p class='note'>{e(SE_NOTE)}</p><h2>Curves</h2><div class='curves'>")
    h += [svg for svg in curves.values()]
    h.append("</div>")
    if results:
        h.append("<h2>Benchmarks (accuracy ± standard error)</h2><table><tr><th>checkpoint</th>"
                 + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>")
        h += [f"<tr><td>{e(label)}</td>" + "".join(f"<td>{e(_cell(row.get(c)))}</td>" for c in cols) + "</tr>"
              for label, row in table.items()]
        h.append("</table><h3>Flags</h3><ul>")
        h += [f"<li class='flag'>⚠ {e(f)}</li>" for f in flags] or ["<li>none</li>"]
        h.append("</ul>")
    h.append(f"<details><summary>Every metric, before → after ({n_rows} rows), and the loss curves</summary>"
             "<table><tr><th>run</th><th class=l>stage</th><th class=l>metric</th><th>before</th><th>after</th></tr>")
    h += [f"<tr><td>{e(run.name)}</td><td class=l>{e(run.stage)}</td><td class=l>{e(k)}</td><td>{_fmt(b)}</td>"
          f"<td>{_fmt(a)}</td></tr>" for run in runs for k, b, a in run.rows]
    h.append("</table>")
    if loss_curves:
        h.append("<div class='curves'>" + "".join(loss_curves.values()) + "</div>")
    h.append("</details></body></html>")
    return markdown, "\n".join(h) + "\n"


def write_report(run_dirs: list[str | os.PathLike], bench_files: list[str | os.PathLike], out: str | os.PathLike) -> dict:
    """Write out/report.md, out/report.html and out/curves-<run>.svg (the headline curves); return a summary."""
    if not run_dirs:
        raise TiaoyuError("give at least one run folder")
    runs = [load_run(p) for p in run_dirs]
    results = [load_bench(p) for p in bench_files]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    curves = {r.name: svg for r in runs if (svg := svg_headline(r)) is not None}
    loss_curves = {r.name: svg for r in runs if (svg := svg_curves(r)) is not None}
    md, page = render(runs, results, curves, loss_curves)
    texts = {**{f"curves-{name}.svg": svg for name, svg in curves.items()}, "report.md": md, "report.html": page}
    with atomic_files([out / name for name in texts]) as files:  # the report's files are replaced as one set
        for f, text in zip(files, texts.values()):
            f.write(text.encode("utf-8"))
    _, _, flags = bench_table(runs, results)
    return {"markdown": str(out / "report.md"), "html": str(out / "report.html"), "runs": len(runs),
            "benchmarks": len(results), "flags": flags, "lead": lead_table(runs)}
