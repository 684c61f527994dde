"""Batch-1 greedy decode speed: tiaoyu's generate (KV cache) vs transformers' `generate` on the same weights.

    python benchmarks/bench_decode.py                       # tiny preset, 1 thread, 128 new tokens
    python benchmarks/bench_decode.py --preset small --threads 2

A random model of the chosen preset is saved with `save_model_files` and loaded by
transformers' LlamaForCausalLM (or MixtralForCausalLM for moe-* presets) from that folder, so
both sides run the very same weights in fp32. Both decode greedily with a KV cache
(`use_cache=True`), batch 1, a fixed number of new tokens (stop tokens are ignored on both
sides), and must produce the same tokens. Rounds alternate ours/theirs and the best round of
each counts (the machine is shared and noisy); tokens per CPU-second of the process are reported
beside wall-clock tokens/s. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="model preset (tiny, small, moe-tiny, …)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    from tiaoyu_cli.infer.generate import generate
    from tiaoyu_cli.model import Transformer, preset
    from tiaoyu_cli.checkpoint import save_model_files

    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = preset(args.preset)
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, args.prompt_len + args.new_tokens))
    ours = Transformer(cfg).eval().to(device)
    with tempfile.TemporaryDirectory(prefix="bench_decode_") as tmp:
        save_model_files(Path(tmp), ours.cpu(), None)
        ours.to(device)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval().to(device)

    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(8, cfg.vocab_size, (args.prompt_len,), generator=g).tolist()
    n = args.new_tokens

    def run_ours() -> list[int]:
        return generate(ours, [prompt], n, temperature=0, stop_ids=[])[0]

    def run_hf() -> list[int]:
        x = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, use_cache=True, pad_token_id=cfg.pad_token_id)
        return out[0, len(prompt):].tolist()

    def timed(fn) -> tuple[float, float, list[int]]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        toks = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, time.process_time() - c, toks

    run_ours(), run_hf()  # warm up both
    best_ours = best_hf = cpu_ours = cpu_hf = float("inf")
    same = True
    for _ in range(args.rounds):
        t1, c1, a = timed(run_ours)
        t2, c2, b = timed(run_hf)
        best_ours, best_hf = min(best_ours, t1), min(best_hf, t2)
        cpu_ours, cpu_hf = min(cpu_ours, c1), min(cpu_hf, c2)
        same = same and a == b
    import transformers

    res = {
        "bench": "decode",
        "ours_tok_s": round(n / best_ours, 1),
        "hf_tok_s": round(n / best_hf, 1),
        "ratio": round(best_hf / best_ours, 2),
        # tokens per CPU-second of this process: what other jobs on a shared machine disturb least
        "ours_tok_cpu_s": round(n / cpu_ours, 1),
        "hf_tok_cpu_s": round(n / cpu_hf, 1),
        "ratio_cpu_time": round(cpu_hf / cpu_ours, 2),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "same_tokens": same,
        "preset": args.preset,
        "params_M": round(ours.num_parameters() / 1e6, 2),
        "batch": 1,
        "prompt_len": args.prompt_len,
        "new_tokens": n,
        "dtype": "fp32",
        "threads": torch.get_num_threads(),
        "device": str(device),
        "rounds": args.rounds,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(res))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
