"""Training throughput of `tiaoyu pretrain` against a minimal nanoGPT-style loop, same machine, same run.

    .venv/bin/python benchmarks/bench_pretrain.py                 # tiny (d128) and small (d512) on CPU
    .venv/bin/python benchmarks/bench_pretrain.py --configs tiny --rounds 5 --threads 1
    .venv/bin/python benchmarks/bench_pretrain.py --device cuda   # also reports MFU

Ours: the Trainer + PretrainStage that `tiaoyu pretrain` runs (in-process, same code path, default
--dtype auto: bf16 autocast where the hardware is fast at it). Reference: benchmarks/nanogpt_ref.py,
a GPT-2-style model with the same d, layers, heads, seq len and batch, plain fp32 AdamW.
Both read random windows of the same token stream. Runs alternate (ref, ours, ref, ours, …) so that
load from other processes hits both alike; the figure per side is the median over rounds, timed
after warmup steps. Tokens/s are wall-clock; `ratio_cpu_time` compares tokens per CPU-second of the
process, which other processes on a shared machine disturb far less (use it with --threads 1).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nanogpt_ref  # noqa: E402

from tiaoyu_cli.data.shards import ShardWriter, TokenShards  # noqa: E402
from tiaoyu_cli.model import Transformer, preset  # noqa: E402
from tiaoyu_cli.train.engine.flops import flops_per_token, peak_flops  # noqa: E402
from tiaoyu_cli.train.engine.trainer import TrainConfig, Trainer  # noqa: E402
from tiaoyu_cli.train.objectives.pretrain import PretrainConfig, PretrainStage  # noqa: E402

CONFIGS = {  # name: (preset, seq_len, batch)
    "tiny": ("tiny", 256, 8),
    "small": ("small", 256, 4),
}


def make_tokens(folder: Path, vocab: int, n: int) -> TokenShards:
    w = ShardWriter(folder, np.uint16, 1 << 22)
    w.add(np.random.default_rng(0).integers(8, vocab, n).astype(np.uint16))
    w.close({"tokenizer_fingerprint": "bench", "vocab_size": vocab, "split": "train"})
    return TokenShards(folder)


def run_ours(shards: TokenShards, preset_name: str, seq_len: int, batch: int, steps: int, warmup: int,
             device: str, dtype: str, compile_: bool, out: Path) -> tuple[float, str]:
    torch.manual_seed(0)
    model = Transformer(preset(preset_name, vocab_size=shards.vocab_size))
    stage = PretrainStage(shards, None, PretrainConfig(seq_len=seq_len), batch_size=batch, seed=0)
    cfg = TrainConfig(out=str(out), max_steps=warmup + steps + 1, batch_size=batch, lr=1e-3, warmup_steps=2,
                      log_every=10**6, eval_every=0, device=device, dtype=dtype, compile=compile_, keep=1)
    trainer = Trainer(model, stage, cfg, log=lambda m: None)
    stamps: list[tuple[float, float]] = []
    next_batch = stage.next_batch

    def timed_next_batch():
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append((time.perf_counter(), time.process_time()))  # start of each optimizer step (grad_accum = 1)
        return next_batch()

    stage.next_batch = timed_next_batch
    trainer.fit()
    # stamps[warmup] .. stamps[warmup + steps]: exactly `steps` whole steps
    wall = stamps[warmup + steps][0] - stamps[warmup][0]
    cpu = stamps[warmup + steps][1] - stamps[warmup][1]
    n = steps * batch * seq_len
    return n / wall, n / cpu, str(trainer.amp_dtype).replace("torch.", "")


def main() -> None:
    from tiaoyu_cli.console import console

    console.quiet = True  # the training loop's progress lines; this script prints one JSON line
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,small", help="comma list of: " + ", ".join(CONFIGS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=0, help="timed steps per run (0 = 20 for tiny, 5 otherwise)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="ours: auto | bf16 | fp32 (the reference is always fp32)")
    ap.add_argument("--compile", action="store_true", help="ours with --compile")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads for both sides (0 = each side's "
                    "default: torch's for the reference, the count `tiaoyu pretrain` picks for ours)")
    args = ap.parse_args()
    default_threads = torch.get_num_threads()
    if args.threads:
        from tiaoyu_cli.device import pin_threads

        pin_threads(args.threads)
    device = torch.device(args.device)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            preset_name, seq_len, batch = CONFIGS[name]
            mcfg = preset(preset_name)
            shards = make_tokens(Path(tmp) / f"tokens-{name}", mcfg.vocab_size, 400_000)
            steps = args.steps or (20 if name == "tiny" else 5)
            ours, ref, ours_cpu, ref_cpu = [], [], [], []
            dtype_used = ""
            for r in range(args.rounds):
                if not args.threads:  # the reference at torch's default; ours picks its own (tiaoyu_cli.device)
                    torch.set_num_threads(default_threads)
                wall, cpu = nanogpt_ref.train(shards.arrays()[0], mcfg.vocab_size, mcfg.dim, mcfg.n_layers,
                                              mcfg.n_heads, seq_len, batch, steps, args.warmup, device=device)
                ref.append(wall)
                ref_cpu.append(cpu)
                wall, cpu, dtype_used = run_ours(shards, preset_name, seq_len, batch, steps, args.warmup, args.device,
                                                 args.dtype, args.compile, Path(tmp) / f"run-{name}-{r}")
                ours.append(wall)
                ours_cpu.append(cpu)
                ours_threads = torch.get_num_threads()
            o, f = statistics.median(ours), statistics.median(ref)
            oc, fc = statistics.median(ours_cpu), statistics.median(ref_cpu)
            row = {"config": f"{name}: d{mcfg.dim} L{mcfg.n_layers} H{mcfg.n_heads} T{seq_len} B{batch} V{mcfg.vocab_size}",
                   "ours_tokens_per_s": round(o, 1), "ref_tokens_per_s": round(f, 1), "ratio": round(o / f, 3),
                   "ours_tokens_per_cpu_s": round(oc, 1), "ref_tokens_per_cpu_s": round(fc, 1),
                   "ratio_cpu_time": round(oc / fc, 3),
                   "ours_dtype": dtype_used, "ours_threads": ours_threads, "ref_threads": args.threads or default_threads,
                   "load_avg_1m": round(os.getloadavg()[0], 2), "ours_runs": [round(x) for x in ours], "ref_runs": [round(x) for x in ref],
                   "ours_flops_per_token": flops_per_token(mcfg, seq_len),
                   "ref_flops_per_token": nanogpt_ref.flops_per_token(mcfg.vocab_size, mcfg.dim, mcfg.n_layers, seq_len)}
            if device.type == "cuda":
                peak = peak_flops(device)
                if peak:
                    row["ours_mfu"] = round(o * row["ours_flops_per_token"] / peak, 4)
                    row["ref_mfu"] = round(f * row["ref_flops_per_token"] / peak, 4)
            results.append(row)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    print(json.dumps({"bench": "pretrain", "device": str(device), "machine": machine, "torch": torch.__version__,
                      "ratio": min(r["ratio"] for r in results), "results": results}))


if __name__ == "__main__":
    main()
