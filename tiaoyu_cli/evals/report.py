"""The report card: `tiaoyu report RUN_DIR… --bench RESULT.json… -o report/`.

Writes report/report.md and report/report.html (self-contained: curves are inline SVG; the
Markdown links the same curves as report/curves-<run>.svg). Three parts:

1. **Stages**: for each run folder, its stage (trainer.json) and every evaluated metric
   before → after from metrics.jsonl. "Before" is the step-0 evaluation of the starting model
   (stages log one); pretraining has none, so its "before" loss is the first logged training loss.
2. **Curves**: training loss and held-out loss against the step, one small chart per run.
3. **Benchmarks**: the JSON results of `tiaoyu eval bench`, one row per checkpoint (matched to the
   run folder holding it), one column per benchmark (task, style, shots), score ± standard error.
   A stage is **flagged** when it lowers its parent's score (trainer.json's parent checkpoint; else
   the previous run given) by more than the standard error of the difference,
   sqrt(se_parent² + se_child²) — e.g. factual QA dropping after RL, as minimind reports.
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from tiaoyu_cli.checkpoint import STEP_RE, load_trainer_info, read_json
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.io import atomic_files
from tiaoyu_cli.train.plots import read_metrics

SKIP_KEYS = {"step", "eval", "lr", "grad_norm", "tokens", "tokens_per_s", "time_s", "epoch"}


@dataclass
class Run:
    path: Path
    name: str
    stage: str
    parent: str | None
    lines: list[dict]
    rows: list[tuple[str, float | None, float | None]] = field(default_factory=list)  # metric, before, after


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


def svg_curves(run: Run, width: int = 420, height: int = 180) -> str | None:
    """Training loss (solid) and held-out loss (dashed) against the step, as an inline SVG."""
    series = {"loss": [(m["step"], m["loss"]) for m in run.lines if not m.get("eval") and _num(m.get("loss"))],
              "val_loss": [(m["step"], m["val_loss"]) for m in run.lines if _num(m.get("val_loss"))]}
    pts = [p for s in series.values() for p in s]
    if len(pts) < 2:
        return None
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9)
    L, R, T, B = 44, 10, 18, 24

    def xy(s, v):
        return (L + (s - x0) / (x1 - x0) * (width - L - R), T + (y1 - v) / (y1 - y0) * (height - T - B))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="10"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="{L}" y="12">{html.escape(run.name)}: loss (solid), val_loss (dashed)</text>',
           f'<line x1="{L}" y1="{height - B}" x2="{width - R}" y2="{height - B}" stroke="#888"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{height - B}" stroke="#888"/>',
           f'<text x="2" y="{T + 8}">{y1:.3g}</text><text x="2" y="{height - B}">{y0:.3g}</text>',
           f'<text x="{L}" y="{height - 8}">{x0}</text><text x="{width - R - 30}" y="{height - 8}">{x1}</text>']
    for key, dash, colour in (("loss", "", "#1f77b4"), ("val_loss", ' stroke-dasharray="4 3"', "#d62728")):
        s = series[key]
        if len(s) == 1:
            cx, cy = xy(*s[0])
            out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3" fill="{colour}"/>')
        elif s:
            path = " ".join(f"{a:.1f},{b:.1f}" for a, b in (xy(*p) for p in s))
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"{dash}/>')
    out.append("</svg>")
    return "".join(out)


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.4g}"


def _cell(r: dict | None) -> str:
    return "" if r is None else f"{r['acc']:.3f} ± {r['stderr']['acc']:.3f} (n={r['n']})"


def render(runs: list[Run], results: list[dict], curves: dict[str, str]) -> tuple[str, str]:
    """(Markdown, HTML) of the report card."""
    cols, table, flags = bench_table(runs, results)
    md = ["# tiaoyu report card", "", "## Stages: before → after", "",
          "| run | stage | metric | before | after |", "|---|---|---|---|---|"]
    for run in runs:
        for k, b, a in run.rows:
            md.append(f"| {run.name} | {run.stage} | {k} | {_fmt(b)} | {_fmt(a)} |")
    md += ["", "## Curves", ""]
    md += [f"![{name}](curves-{name}.svg)" for name in curves]
    if results:
        md += ["", "## Benchmarks (accuracy ± standard error)", "",
               "| checkpoint | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        md += [f"| {label} | " + " | ".join(_cell(row.get(c)) for c in cols) + " |" for label, row in table.items()]
        md += ["", "### Flags", ""] + ([f"- ⚠ {f}" for f in flags] or ["none: no stage lowered a score beyond "
                                                                           "its standard error"])
    markdown = "\n".join(md) + "\n"

    e = html.escape
    h = ["<!doctype html><html><head><meta charset='utf-8'><title>tiaoyu report card</title><style>"
         "body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
         ".flag{color:#b00}</style></head><body><h1>tiaoyu report card</h1><h2>Stages: before → after</h2>",
         "<table><tr><th>run</th><th>stage</th><th>metric</th><th>before</th><th>after</th></tr>"]
    h += [f"<tr><td>{e(run.name)}</td><td>{e(run.stage)}</td><td>{e(k)}</td><td>{_fmt(b)}</td><td>{_fmt(a)}</td></tr>"
          for run in runs for k, b, a in run.rows]
    h.append("</table><h2>Curves</h2>")
    h += [svg for svg in curves.values()]
    if results:
        h.append("<h2>Benchmarks (accuracy ± standard error)</h2><table><tr><th>checkpoint</th>"
                 + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>")
        h += [f"<tr><td>{e(label)}</td>" + "".join(f"<td>{e(_cell(row.get(c)))}</td>" for c in cols) + "</tr>"
              for label, row in table.items()]
        h.append("</table><h3>Flags</h3><ul>")
        h += [f"<li class='flag'>⚠ {e(f)}</li>" for f in flags] or ["<li>none</li>"]
        h.append("</ul>")
    h.append("</body></html>")
    return markdown, "\n".join(h) + "\n"


def write_report(run_dirs: list[str | os.PathLike], bench_files: list[str | os.PathLike], out: str | os.PathLike) -> dict:
    """Write out/report.md, out/report.html and out/curves-<run>.svg; return a summary."""
    if not run_dirs:
        raise TiaoyuError("give at least one run folder")
    runs = [load_run(p) for p in run_dirs]
    results = [load_bench(p) for p in bench_files]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    curves = {r.name: svg for r in runs if (svg := svg_curves(r)) is not None}
    md, page = render(runs, results, curves)
    texts = {**{f"curves-{name}.svg": svg for name, svg in curves.items()}, "report.md": md, "report.html": page}
    with atomic_files([out / name for name in texts]) as files:  # the report's files are replaced as one set
        for f, text in zip(files, texts.values()):
            f.write(text.encode("utf-8"))
    _, _, flags = bench_table(runs, results)
    return {"markdown": str(out / "report.md"), "html": str(out / "report.html"), "runs": len(runs),
            "benchmarks": len(results), "flags": flags}
