"""How much the demo's figures move between runs: collect several runs into a spread file, check a run against it.

    python recipes/spread.py collect runs/s0 runs/s1 runs/s2 … -o recipes/tiny-cpu/spread.json
    python recipes/spread.py check runs/demo [--spread recipes/tiny-cpu/spread.json]
    python recipes/spread.py table recipes/tiny-cpu/spread.json          # the Markdown table docs quote

A run folder is what `make demo` leaves: `summary.json` (recipes/summary.py's rows) and `settings.json`
(the recipe's budgets, its SEED, a fingerprint of its commands, torch's CPU capability). Runs collected together must share every
setting but the seed and the CPU capability: those two are what the spread is over (another seed draws
another initialisation and another order of batches; another capability — ATEN_CPU_CAPABILITY=avx2 on an
AVX-512 CPU — another rounding of the same sums, which over thousands of steps moves a run as far).

The band a new run of the same settings should fall in, per row: the runs' [min, max] widened by three
standard deviations of the runs, for a rate by at least three binomial standard errors of one run (400
held-out items answer differently by that much on their own), for a loss by at least 2 % of its mean. Printed as `mean (min–max)`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from summary import is_rate, read_json, key_of as row_key  # the summary's own (recipes/ is on sys.path)

# settings that may differ between the runs of one spread (what it measures the spread over)
VARYING = ("SEED", "capability", "torch")


def load_run(folder: Path) -> tuple[dict, list[dict]]:
    s, rows = folder / "settings.json", folder / "summary.json"
    for p in (s, rows):
        if not p.is_file():
            raise SystemExit(f"error: {p}: missing (run `make demo` or recipes/summary.py on the run first)")
    return read_json(s), read_json(rows)


def fixed(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in VARYING}


def collect(folders: list[Path]) -> dict:
    runs, values = [], {}
    base = None
    for f in folders:
        settings, rows = load_run(f)
        if base is None:
            base = fixed(settings)
        elif fixed(settings) != base:
            diff = sorted(k for k in set(base) | set(fixed(settings)) if base.get(k) != settings.get(k))
            raise SystemExit(f"error: {f}: settings differ from {folders[0]} in {', '.join(diff)}")
        runs.append({"folder": str(f), **{k: settings.get(k) for k in VARYING}})
        for r in rows:
            v = values.setdefault(row_key(r), {"stage": r["stage"], "metric": r["metric"], "rate": is_rate(r["key"]),
                                               "n": None, "before": [], "after": [], "gain_over_se": [],
                                               "paired_z": []})
            v["before"].append(r["before"])
            v["after"].append(r["after"])
            v["gain_over_se"].append(r.get("gain_over_se"))
            v["paired_z"].append((r.get("paired") or {}).get("paired_z"))
            if r.get("n_after"):
                v["n"] = r["n_after"]
    return {"settings": base, "runs": runs, "rows": values}


def stats(xs: list) -> dict | None:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs),
            "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def band(row: dict, which: str = "after") -> tuple[float, float] | None:
    """Where a new run's value should fall: [min, max] widened by 3 sd of the runs — for a rate by at least
    three binomial standard errors of one run, for anything else by at least 2 % of its mean. Three, not
    two: at two each row of a sound run falls outside now and then, and a table of ~20 rows often has one."""
    s = stats(row[which])
    if s is None:
        return None
    width = 3 * s["sd"]
    if row.get("rate") and row.get("n"):
        p = min(max(s["mean"], 1 / row["n"]), 1 - 1 / row["n"])
        width = max(width, 3 * math.sqrt(p * (1 - p) / row["n"]))
        return max(0.0, s["min"] - width), min(1.0, s["max"] + width)  # a rate stays a rate
    width = max(width, 0.02 * abs(s["mean"]))
    return s["min"] - width, s["max"] + width


def check(folder: Path, spread: dict) -> list[dict]:
    """Each row of a run against the spread's band: [{key, value, lo, hi, ok}] (rows the spread lacks are skipped).
    A run of other settings is an error: its figures are not comparable."""
    settings, rows = load_run(folder)
    if fixed(settings) != spread["settings"]:
        diff = sorted(k for k in set(spread["settings"]) | set(fixed(settings))
                      if spread["settings"].get(k) != settings.get(k))
        raise SystemExit(f"error: {folder}: settings differ from the spread's in {', '.join(diff)}")
    out = []
    for r in rows:
        ref = spread["rows"].get(row_key(r))
        b = band(ref) if ref else None
        if b is None or r["after"] is None:
            continue
        out.append({"key": row_key(r), "value": r["after"], "lo": b[0], "hi": b[1], "ok": b[0] <= r["after"] <= b[1]})
    return out


def fmt(v: float, rate: bool) -> str:
    return f"{100 * v:.1f}" if rate else f"{v:.3f}"


def fmt_spread(row: dict, which: str) -> str:
    s = stats(row[which])
    if s is None:
        return "—"
    unit = " %" if row["rate"] else ""
    if s["max"] - s["min"] < 1e-12:
        return fmt(s["mean"], row["rate"]) + unit
    return f"{fmt(s['mean'], row['rate'])}{unit} ({fmt(s['min'], row['rate'])}–{fmt(s['max'], row['rate'])})"


def beyond_noise(row: dict) -> str:
    """In how many runs the gain was beyond noise (gain / SE ≥ 2, or the paired z ≥ 2 where there is one)."""
    zs = [p if p is not None else g for g, p in zip(row.get("gain_over_se") or [], row.get("paired_z") or [])]
    zs = [z for z in zs if z is not None]
    return f"{sum(1 for z in zs if z >= 2)} of {len(zs)}" if zs else ""


def table(spread: dict) -> str:
    """Markdown: stage, metric, before and after as mean (min–max) over the runs, the paired z where the
    stage has one, and in how many runs the gain was beyond noise."""
    n = len(spread["runs"])
    lines = [f"| stage | metric | before | after: mean (min–max) of {n} runs | paired z | beyond noise |",
             "|---|---|---|---|---|---|"]
    for row in spread["rows"].values():
        z = stats(row["paired_z"])
        zs = "" if z is None else f"{z['mean']:+.1f} ({z['min']:+.1f} … {z['max']:+.1f})"
        lines.append(f"| {row['stage']} | {row['metric']} | {fmt_spread(row, 'before')} | {fmt_spread(row, 'after')} "
                     f"| {zs} | {beyond_noise(row)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("runs", nargs="+", type=Path)
    c.add_argument("-o", "--out", type=Path, required=True)
    k = sub.add_parser("check")
    k.add_argument("run", type=Path)
    k.add_argument("--spread", type=Path, default=Path(__file__).parent / "tiny-cpu" / "spread.json")
    t = sub.add_parser("table")
    t.add_argument("spread", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "collect":
        res = collect(args.runs)
        from tiaoyu_cli.io import atomic_write_text

        atomic_write_text(args.out, json.dumps(res, indent=1) + "\n")
        print(table(res))
        return 0
    if args.cmd == "table":
        print(table(read_json(args.spread)))
        return 0
    res = check(args.run, read_json(args.spread))
    for r in res:
        print(f"{'ok ' if r['ok'] else 'OUT'} {r['key']:<34} {r['value']:.4f}  band [{r['lo']:.4f}, {r['hi']:.4f}]")
    bad = [r for r in res if not r["ok"]]
    print(f"{len(res) - len(bad)} of {len(res)} rows within the measured spread")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
