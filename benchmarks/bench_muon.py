"""Muon vs AdamW: steps (and seconds) to reach AdamW's final validation loss, same budget, same run.

    .venv/bin/python benchmarks/bench_muon.py                       # both corpora, default sweep
    .venv/bin/python benchmarks/bench_muon.py --corpora code --steps 300 --threads 1

For each corpus (`synth`: the bundled synthetic corpus of `tiaoyu synth`, English and Chinese
sentences and word problems; `code`: Python-like functions from a small generator below — another
kind of text, made here, nothing downloaded) a SentencePiece tokenizer is trained and the text
encoded with the library, then the `tiny` preset is pretrained by the Trainer that `tiaoyu pretrain`
runs, `--steps` optimizer steps at each learning rate of a small sweep, with `--optim adamw` and
`--optim muon` alternating (so load from other processes hits both alike). The validation loss is
measured every `--eval-every` steps on a fixed held-out set.

Target = the best AdamW run's final val loss. Muon's figure is the first evaluated step (and its
training seconds) at which its best run reaches the target; `speedup_steps` = budget / that step.
Wall seconds on a shared machine mostly measure the other jobs, so `step_cost_cpu` also times one
forward+backward and each optimizer step in CPU milliseconds, and `speedup_cpu_time_projected` =
speedup_steps / (Muon step cost / AdamW step cost).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tiaoyu_cli.data.shards import open_tokens
from tiaoyu_cli.data.synth import SynthConfig, write_corpus
from tiaoyu_cli.model import Transformer, preset
from tiaoyu_cli.tokenizer import train_tokenizer
from tiaoyu_cli.tokenizer.encode import encode_corpus
from tiaoyu_cli.train.engine.optim import build_optimizer
from tiaoyu_cli.train.engine.trainer import TrainConfig, Trainer
from tiaoyu_cli.train.losses.lm import linear_cross_entropy
from tiaoyu_cli.train.objectives.pretrain import PretrainConfig, PretrainStage

WORDS = ["total", "count", "value", "item", "index", "result", "left", "right", "node", "size", "name",
         "key", "data", "step", "limit", "acc", "score", "width", "height", "buf", "row", "col"]
OPS = ["+", "-", "*", "//", "%"]


def code_doc(rng: random.Random) -> str:
    """One Python-like function: arguments, a loop or two, branches, arithmetic, a return."""
    fn = "_".join(rng.sample(WORDS, 2))
    args = rng.sample(WORDS, rng.randint(1, 3))
    acc = rng.choice([w for w in WORDS if w not in args])
    lines = [f"def {fn}({', '.join(args)}):", f'    """Return the {acc} of {" and ".join(args)}."""',
             f"    {acc} = {rng.randint(0, 9)}"]
    for _ in range(rng.randint(1, 3)):
        v = rng.choice("ijk")
        lines.append(f"    for {v} in range({rng.choice(args)}):")
        cond = f"{v} % {rng.randint(2, 7)} == {rng.randint(0, 1)}"
        lines.append(f"        if {cond}:")
        lines.append(f"            {acc} {rng.choice(OPS[:3])}= {v} {rng.choice(OPS)} {rng.choice(args + [str(rng.randint(1, 99))])}")
        if rng.random() < 0.5:
            lines.append("        else:")
            lines.append(f"            {acc} = {acc} {rng.choice(OPS)} {rng.randint(1, 9)}")
    if rng.random() < 0.3:
        lines.append(f"    if {acc} > {rng.randint(10, 999)}:")
        lines.append(f"        return {rng.choice(args)}")
    lines.append(f"    return {acc}")
    return "\n".join(lines) + "\n"


def write_code_corpus(folder: Path, mb: float, seed: int = 0) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for split, size in (("train", mb * 1e6), ("val", mb * 1e5)):
        p = folder / f"text.{split}.jsonl"
        n = 0
        with p.open("w", encoding="utf-8") as f:
            while n < size:
                text = "\n".join(code_doc(rng) for _ in range(rng.randint(1, 4)))
                f.write(json.dumps({"text": text}) + "\n")
                n += len(text)
        paths.append(p)
    return paths[0], paths[1]


def prepare(name: str, root: Path, vocab: int, mb: float):
    data = root / name
    if name == "synth":
        write_corpus(data, SynthConfig(seed=0, text_mb=mb, records=10, val_records=10))
        train, val = data / "text.train.jsonl", data / "text.val.jsonl"
    else:
        train, val = write_code_corpus(data, mb)
    vocab = vocab if name == "synth" else vocab // 2  # the code generator's text has fewer distinct pieces
    tok = train_tokenizer([str(train)], root / f"tok-{name}", vocab_size=vocab)
    encode_corpus([str(train)], root / f"tok-{name}", root / f"tokens-{name}", val_inputs=[str(val)], workers=1)
    tr, va = open_tokens(root / f"tokens-{name}")
    return tok.vocab_size, tr, va


def run(tr, va, vocab: int, optim: str, lr: float, args, out: Path) -> list[tuple[int, float, float]]:
    """Train once; return [(step, val_loss, training seconds)] at each evaluation."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=vocab))
    stage = PretrainStage(tr, va, PretrainConfig(seq_len=args.seq_len, eval_batches=args.eval_batches),
                          batch_size=args.batch, seed=0)
    cfg = TrainConfig(out=str(out), max_steps=args.steps, batch_size=args.batch, lr=lr, warmup_steps=args.warmup,
                      eval_every=args.eval_every, log_every=10**6, device="cpu", dtype=args.dtype, optim=optim, keep=1)
    trainer = Trainer(model, stage, cfg, log=lambda m: None)
    curve: list[tuple[int, float, float]] = []
    evaluate = stage.evaluate

    def recorded(m):
        res = evaluate(m)
        if trainer.step:
            curve.append((trainer.step, res["val_loss"], trainer.train_time))
        return res

    stage.evaluate = recorded
    trainer.fit()
    return curve


def step_cost(vocab: int, batch: int, seq_len: int, reps: int = 7) -> dict[str, float]:
    """CPU milliseconds (median, interleaved) of one forward+backward and of each optimizer's step on
    the tiny preset: what a Muon step costs on top of an AdamW step, free of the other jobs' load."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=vocab))
    opts = {k: build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"), k) for k in ("adamw", "muon")}
    x = torch.randint(0, vocab, (batch, seq_len + 1))
    ms: dict[str, list[float]] = {"fwd_bwd": [], "adamw": [], "muon": []}
    for _ in range(reps):
        c = time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = model(x[:, :-1], compute_logits=False).hidden
            linear_cross_entropy(h, model.output_weight, x[:, 1:]).backward()
        ms["fwd_bwd"].append(time.process_time() - c)
        for k, o in opts.items():
            c = time.process_time()
            o.step()
            ms[k].append(time.process_time() - c)
    out = {f"{k}_ms": round(statistics.median(v) * 1000, 1) for k, v in ms.items()}
    out["muon_step_cost_ratio"] = round((out["fwd_bwd_ms"] + out["muon_ms"]) / (out["fwd_bwd_ms"] + out["adamw_ms"]), 3)
    return out


def first_reach(curve, target: float) -> tuple[int | None, float | None]:
    for step, loss, secs in curve:
        if loss <= target:
            return step, secs
    return None, None


def main() -> None:
    from tiaoyu_cli.console import console

    console.quiet = True
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpora", default="synth,code")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--adamw-lrs", default="2e-3,4e-3,8e-3,1.6e-2")
    ap.add_argument("--muon-lrs", default="4e-3,8e-3,1.6e-2,3.2e-2")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--mb", type=float, default=0.6, help="MB of training text per corpus")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sweep = {"adamw": [float(x) for x in args.adamw_lrs.split(",")], "muon": [float(x) for x in args.muon_lrs.split(",")]}
    results = []
    cost = step_cost(args.vocab, args.batch, args.seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        for name in [c for c in args.corpora.split(",") if c]:
            vocab, tr, va = prepare(name, Path(tmp), args.vocab, args.mb)
            curves: dict[str, dict[float, list]] = {"adamw": {}, "muon": {}}
            for i in range(max(len(v) for v in sweep.values())):  # alternate adamw / muon
                for optim, lrs in sweep.items():
                    if i < len(lrs):
                        curves[optim][lrs[i]] = run(tr, va, vocab, optim, lrs[i], args, Path(tmp) / f"{name}-{optim}-{i}")
                        print(f"{name} {optim} lr={lrs[i]:g}: final val {curves[optim][lrs[i]][-1][1]:.4f} "
                              f"in {curves[optim][lrs[i]][-1][2]:.1f}s", file=sys.stderr)
            best = {o: min(c, key=lambda lr: c[lr][-1][1]) for o, c in curves.items()}
            target = curves["adamw"][best["adamw"]][-1][1]
            a_curve, m_curve = curves["adamw"][best["adamw"]], curves["muon"][best["muon"]]
            m_step, m_secs = first_reach(m_curve, target)
            a_secs = a_curve[-1][2]
            results.append({
                "corpus": name, "vocab": vocab, "train_tokens": tr.num_tokens, "val_tokens": va.num_tokens,
                "adamw_best_lr": best["adamw"], "muon_best_lr": best["muon"],
                "adamw_final_val": round(target, 4), "muon_final_val": round(m_curve[-1][1], 4),
                "target_steps_adamw": args.steps, "target_steps_muon": m_step,
                "speedup_steps": round(args.steps / m_step, 3) if m_step else None,
                "adamw_seconds": round(a_secs, 1), "muon_seconds_to_target": round(m_secs, 1) if m_secs else None,
                "speedup_wall": round(a_secs / m_secs, 3) if m_secs else None,
                "step_time_ratio_muon_over_adamw": round(m_curve[-1][2] / a_secs, 3),
                "speedup_cpu_time_projected": round(args.steps / m_step / cost["muon_step_cost_ratio"], 3) if m_step else None,
                "sweep_final_val": {o: {f"{lr:g}": round(c[lr][-1][1], 4) for lr in c} for o, c in curves.items()},
            })
    print(json.dumps({"bench": "muon", "preset": "tiny", "steps": args.steps, "batch": args.batch,
                      "seq_len": args.seq_len, "threads": args.threads, "dtype": args.dtype, "torch": torch.__version__,
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_avg_1m": round(os.getloadavg()[0], 2),
                      "step_cost_cpu": cost, "results": results}))


if __name__ == "__main__":
    main()
