"""Paired before/after comparison of two checkpoints on the same held-out tool questions.

    python recipes/paired.py BEFORE AFTER questions.jsonl -o AFTER_RUN/paired.json [--n 400]

Both checkpoints answer every question greedily — through the tool loop with `--tools calculator`
(`sft --eval-tools`'s scorer, `train.rl.answers.tool_answer_accuracy`), or plainly with `--tools none`
(`train.rl.answers.answer_accuracy`, the text after </think> when there is one); since the questions are the same, the noise of the difference
is that of the questions whose outcome changed (McNemar): with w = wrong → right and r = right → wrong
out of n, diff = (w − r)/n and its SE = √(w + r − (w − r)²/n)/n — far tighter than two independent
standard errors when most answers stay the same. Writes one JSON object (also printed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def paired(a: list[bool], b: list[bool]) -> dict:
    n = len(a)
    up = sum(1 for x, y in zip(a, b) if not x and y)
    down = sum(1 for x, y in zip(a, b) if x and not y)
    d = (up - down) / n if n else 0.0
    se = math.sqrt(max(up + down - (up - down) ** 2 / n, 0.0)) / n if n else 0.0
    return {"n": n, "before": sum(a) / n if n else 0.0, "after": sum(b) / n if n else 0.0, "wrong_to_right": up,
            "right_to_wrong": down, "diff": d, "paired_se": se, "paired_z": d / se if se > 0 else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("questions")
    ap.add_argument("-o", "--out")
    ap.add_argument("--n", type=int, default=400, help="first N questions")
    ap.add_argument("--tools", default="calculator", help="tools the answers may call, or none")
    ap.add_argument("--max-tool-calls", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args(argv)

    from tiaoyu_cli.errors import TiaoyuError

    try:
        res = compare(args)
    except TiaoyuError as e:  # a wrong path, a malformed line: one line on stderr, no traceback, no file
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(res)
    print(text)
    if args.out:
        from tiaoyu_cli.io import atomic_write_text

        atomic_write_text(Path(args.out), text + "\n")
    return 0


def compare(args) -> dict:
    from tiaoyu_cli.checkpoint import load_model, load_tokenizer, resolve_checkpoint
    from tiaoyu_cli.data.jsonl import read_jsonl
    from tiaoyu_cli.infer.tools import Toolbox
    from tiaoyu_cli.train.rl.answers import answer_accuracy, tool_answer_accuracy

    ckpts = [resolve_checkpoint(c) for c in (args.before, args.after)]  # both exist before the slow part
    toolbox = None if args.tools == "none" else Toolbox.from_names(args.tools)
    recs = read_jsonl(args.questions)[: args.n]
    outcomes = []
    for ck in ckpts:
        model, folder = load_model(ck)
        model.eval()
        tok = load_tokenizer(folder)
        if toolbox is None:
            rep = answer_accuracy(model, tok, recs, max_new_tokens=args.max_new_tokens, name=args.questions)
        else:
            rep = tool_answer_accuracy(model, tok, recs, toolbox, max_new_tokens=args.max_new_tokens,
                                       max_tool_calls=args.max_tool_calls, name=args.questions)
        outcomes.append([bool(s["correct"]) for s in rep.samples])
    return {"before_ckpt": str(args.before), "after_ckpt": str(args.after), **paired(*outcomes)}


if __name__ == "__main__":
    sys.exit(main())
