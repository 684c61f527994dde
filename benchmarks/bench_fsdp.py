"""Parameter + optimizer memory per process with FSDP2 (--fsdp) against unsharded DDP, for 1, 2 and 4
processes (gloo on CPU, or NCCL on GPUs when run under CUDA), on one model preset. One JSON line.

    python benchmarks/bench_fsdp.py [--preset small] [--procs 1,2,4]

Each process builds the model, takes one AdamW step (so the optimizer state exists) and counts the bytes
of its local parameter and optimizer-state tensors: with DDP every process holds everything, with FSDP
each holds about 1/N of it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(preset: str, fsdp: bool, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from tiaoyu_cli.model import Transformer, preset as make_preset
    from tiaoyu_cli.train.engine import distributed as D

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = Transformer(make_preset(preset))
    if fsdp:
        D.shard_model(model, torch.device("cpu"), None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, model.config.vocab_size, (1, 32))
    model(x).logits.float().mean().backward()
    opt.step()

    def nbytes(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    p = sum(nbytes(q) for q in model.parameters())
    o = sum(nbytes(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"param_mb": p / 2**20, "optim_mb": o / 2**20}))
    dist.destroy_process_group()


def measure(preset: str, n: int, fsdp: bool) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               __file__, "--worker", "--preset", preset, "--out", str(out)] + (["--fsdp"] if fsdp else [])
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--procs", default="1,2,4")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--fsdp", action="store_true")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.worker:
        return worker(a.preset, a.fsdp, a.out)
    rows = {}
    for n in [int(x) for x in a.procs.split(",")]:
        rows[n] = {"fsdp": measure(a.preset, n, True), "ddp": measure(a.preset, n, False)}
    per_rank = {n: round(r["fsdp"]["param_mb"] + r["fsdp"]["optim_mb"], 2) for n, r in rows.items()}
    ref = {n: round(r["ddp"]["param_mb"] + r["ddp"]["optim_mb"], 2) for n, r in rows.items()}
    print(json.dumps({"bench": "fsdp_memory_per_rank", "preset": a.preset, "unit": "MiB (parameters + AdamW state)",
                      "fsdp": per_rank, "ddp_reference": ref, "detail": rows}))


if __name__ == "__main__":
    main()
