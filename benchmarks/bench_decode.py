"""Batch-1 greedy decode speed: tiaoyu's generate (KV cache) vs transformers' `generate` on the same weights.

    python benchmarks/bench_decode.py                       # tiny preset, 1 thread, 128 new tokens
    python benchmarks/bench_decode.py --preset small --threads 2

Ours is `tiaoyu_cli.infer.generate` as users get it: on CPU in fp32 that is the numpy step
(infer/fast/numpy_step.py) for the prompt and every new token. A random model of the chosen preset is
saved with `save_model_files` and loaded by
transformers' LlamaForCausalLM (or MixtralForCausalLM for moe-* presets) from that folder, so
both sides run the very same weights in fp32. Both decode greedily with a KV cache
(`use_cache=True`), batch 1, a fixed number of new tokens (stop tokens are ignored on both
sides), and must produce the same tokens. Rounds alternate ours/theirs and the best round of
each counts (the machine is shared and noisy); tokens per CPU-second of the process are reported
beside wall-clock tokens/s. Prints one JSON line.

With `--llama-cpp` (needs `pip install llama-cpp-python gguf`) the same weights also run in llama.cpp:
the model gets the vocabulary of a SentencePiece tokenizer trained here on the synthetic corpus
(`--vocab`, default 2048: the demo's; a GGUF file carries its tokenizer), is exported with
`tiaoyu export --format gguf` (f32, and q8_0 beside our int8), and llama.cpp decodes the same prompt
greedily with the same thread count; its tokens must equal ours (f32).
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
    ap.add_argument("--llama-cpp", action="store_true", help="also run llama.cpp on the exported GGUF (f32, q8_0)")
    ap.add_argument("--vocab", type=int, default=2048, help="--llama-cpp: vocabulary of the tokenizer trained for the GGUF")
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
    work = tempfile.TemporaryDirectory(prefix="bench_decode_")
    tok = train_bench_tokenizer(Path(work.name), args.vocab) if args.llama_cpp else None
    if tok is not None:
        cfg = cfg.replace(vocab_size=tok.vocab_size)
    ours = Transformer(cfg).eval().to(device)
    folder = Path(work.name) / "model"
    folder.mkdir()
    save_model_files(folder, ours.cpu(), tok)
    ours.to(device)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().to(device)

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

    llama = llama_cpp_figures(folder, prompt, n, args.rounds, torch.get_num_threads(), run_ours, cfg) if args.llama_cpp else {}
    work.cleanup()
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
        **llama,
    }
    print(json.dumps(res))
    sys.stdout.flush()


def train_bench_tokenizer(root: Path, vocab: int):
    """A SentencePiece tokenizer of `vocab` pieces trained on the synthetic corpus (a GGUF needs one)."""
    from tiaoyu_cli.data.synth import SynthConfig, write_corpus
    from tiaoyu_cli.tokenizer import train_tokenizer

    write_corpus(root / "synth", SynthConfig(seed=0, text_mb=3, records=200, val_records=50))
    return train_tokenizer([str(root / "synth" / "text.train.jsonl")], root / "tok", vocab_size=vocab)


def llama_cpp_figures(folder: Path, prompt: list[int], n: int, rounds: int, threads: int, run_ours, cfg) -> dict:
    """llama.cpp's batch-1 greedy decode of the same weights (GGUF f32 and q8_0) against ours (fp32 and int8),
    rounds interleaved, best round each; tokens compared with ours."""
    import copy

    import llama_cpp

    from tiaoyu_cli.export.gguf import export_gguf
    from tiaoyu_cli.infer.generate import generate
    from tiaoyu_cli.model.quant import quantize_model
    from tiaoyu_cli.checkpoint import load_model

    files = {k: folder.parent / f"m-{k}.gguf" for k in ("f32", "q8_0")}
    for k, f in files.items():
        export_gguf(folder, f, k, force=True)
    llms = {k: llama_cpp.Llama(str(f), n_ctx=cfg.max_seq_len, verbose=False, n_threads=threads,
                               n_threads_batch=threads, n_batch=64) for k, f in files.items()}
    model, _ = load_model(folder)
    int8 = quantize_model(copy.deepcopy(model.eval()), "int8")

    def llama(k):
        def run():
            out = []
            for t in llms[k].generate(prompt, temp=0.0, top_k=1, reset=True):
                out.append(int(t))
                if len(out) >= n:
                    break
            return out
        return run

    runs = {"ours_fp32": run_ours, "llama_cpp_f32": llama("f32"),
            "ours_int8": lambda: generate(int8, [prompt], n, temperature=0, stop_ids=[])[0],
            "llama_cpp_q8_0": llama("q8_0")}
    for fn in runs.values():
        fn()  # warm up
    best = {k: float("inf") for k in runs}
    toks = {}
    for _ in range(rounds):
        for k, fn in runs.items():
            t = time.perf_counter()
            toks[k] = fn()
            best[k] = min(best[k], time.perf_counter() - t)
    ts = {k: round(n / v, 1) for k, v in best.items()}
    return {"llama_cpp_python": llama_cpp.__version__, "vocab": cfg.vocab_size,
            "b1_tok_s": ts,
            "ratio_vs_llama_cpp_f32": round(best["llama_cpp_f32"] / best["ours_fp32"], 2),
            "ratio_int8_vs_llama_cpp_q8_0": round(best["llama_cpp_q8_0"] / best["ours_int8"], 2),
            "same_tokens_llama_cpp_f32": toks["llama_cpp_f32"] == toks["ours_fp32"],
            "tokens_agree_q8_0_vs_int8": round(sum(a == b for a, b in zip(toks["llama_cpp_q8_0"], toks["ours_int8"])) / n, 3)}


if __name__ == "__main__":
    main()
