"""Training curves from `metrics.jsonl`: loss, val loss, learning rate and tokens/s, runs overlaid.

    tiaoyu eval plot runs/base runs/base-moe -o curves.png

A run's `metrics.jsonl` holds one line per log step (`{"step", "loss", "lr", "tokens_per_s", …}`)
and one per evaluation (`{"step", "eval": true, "val_loss", …}`). matplotlib is an optional extra
(`pip install 'tiaoyu[plot]'`); everything else here is plain Python so it can be tested without it.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from tiaoyu_cli.errors import TiaoyuError

DEFAULT_METRICS = ("loss", "val_loss", "lr", "tokens_per_s")
TITLES = {"loss": "train loss", "val_loss": "val loss", "lr": "learning rate", "tokens_per_s": "tokens / s"}


def metrics_file(run: str | os.PathLike) -> Path:
    """metrics.jsonl of a run folder, of the run a step folder belongs to, or the file itself."""
    p = Path(run)
    if p.is_file():
        return p
    for cand in (p / "metrics.jsonl", p.resolve().parent / "metrics.jsonl"):
        if cand.is_file():
            return cand
    if not p.exists():
        raise TiaoyuError(f"{p}: no such run folder")
    raise TiaoyuError(f"{p}: no metrics.jsonl (give a run folder written by a training command)")


def read_metrics(run: str | os.PathLike) -> list[dict]:
    """The lines of a run's metrics.jsonl. A resumed run may repeat steps: the later line wins."""
    path = metrics_file(run)
    rows: list[dict] = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):
            if n == len(lines):  # a torn last line (a crash mid-write): ignore it
                break
            raise TiaoyuError(f"{path}:{n}: malformed JSON") from None
        if isinstance(obj, dict) and isinstance(obj.get("step"), (int, float)):
            rows.append(obj)
    return rows


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric, sorted by step, the last value for a repeated step."""
    by_step: dict[float, float] = {}
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            by_step[r["step"]] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def run_label(run: str | os.PathLike) -> str:
    p = Path(run)
    if p.name == "metrics.jsonl":
        p = p.parent
    if p.name == "latest" or p.name.startswith("step-"):
        p = p.resolve().parent
    return p.name or str(p)


def plot_runs(runs: list[str], out: str | os.PathLike, metrics: tuple[str, ...] = DEFAULT_METRICS,
              log_loss: bool = False) -> dict:
    """Draw one panel per metric, every run overlaid, and write a PNG to `out` (atomically).
    Returns {"out", "runs": {label: {metric: points}}}."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TiaoyuError("`tiaoyu eval plot` needs matplotlib: pip install 'tiaoyu[plot]'") from None
    from tiaoyu_cli.io import atomic_write_bytes

    if not runs:
        raise TiaoyuError("give at least one run folder")
    data = [(run_label(r), read_metrics(r)) for r in runs]
    summary: dict = {"out": str(out), "runs": {}}
    n = len(metrics)
    cols = 2 if n > 1 else 1
    rows_n = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(6 * cols, 3.6 * rows_n), squeeze=False,
                             sharex=True)
    for ax, key in zip(axes.flat, metrics):
        drawn = False
        for label, rows in data:
            xs, ys = series(rows, key)
            summary["runs"].setdefault(label, {})[key] = len(xs)
            if xs:
                ax.plot(xs, ys, label=label, marker="o" if len(xs) < 12 else None, markersize=3)
                drawn = True
        ax.set_title(TITLES.get(key, key))
        ax.tick_params(labelbottom=True)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key in ("loss", "val_loss") and log_loss:
            ax.set_yscale("log")
        if drawn and len(data) > 1:
            ax.legend(fontsize=8)
        if not drawn:
            ax.text(0.5, 0.5, f"no {key} in these runs", ha="center", va="center", transform=ax.transAxes,
                    color="gray")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fmt = Path(out).suffix.lstrip(".").lower() or "png"
    fig.savefig(buf, format=fmt, dpi=110)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return summary
