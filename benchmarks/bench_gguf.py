"""GGUF export checked by llama.cpp itself (llama-cpp-python): same tokens, same greedy answers, speed side by side.

    python benchmarks/bench_gguf.py --ckpt runs/demo/base --data runs/demo/data/text.val.jsonl
    python benchmarks/bench_gguf.py         # no --ckpt: trains a tiny base first (bench_quant.build_base)

Needs `pip install llama-cpp-python` (it compiles llama.cpp: ~80 min on a busy 2-core machine; the
result here was built with CMAKE_ARGS="-DGGML_NATIVE=OFF"). The checkpoint is exported to f32 and q8_0
GGUF files (`tiaoyu export --format gguf`), then for the val texts:

* tokenizer: llama.cpp's tokenization of each text == ours (SentencePiece),
* logits: max |llama.cpp − ours| over a prompt's positions (f32 file),
* greedy: the first `--new-tokens` greedy tokens of llama.cpp == ours, per prompt (f32 and q8_0),
* speed: batch-1 greedy decode tokens/s of llama.cpp (f32, q8_0) and ours (fp32, int8), best of rounds.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    out = []
    for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(int(t))
        if len(out) >= n:
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt")
    ap.add_argument("--data")
    ap.add_argument("--base-steps", type=int, default=300)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("needs llama-cpp-python: pip install llama-cpp-python") from None

    from tiaoyu_cli.data.jsonl import read_jsonl
    from tiaoyu_cli.export.gguf import export_gguf
    from tiaoyu_cli.infer.generate import generate
    from tiaoyu_cli.model.quant import quantize_model
    from tiaoyu_cli.checkpoint import load_model, load_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="bench_gguf_"))
    ckpt, data = (Path(args.ckpt) if args.ckpt else None), (Path(args.data) if args.data else None)
    if ckpt is None:
        from bench_quant import build_base

        print(f"training a tiny base ({args.base_steps} steps) in {tmp} …", file=sys.stderr)
        ckpt = build_base(tmp, args.base_steps)
        data = data or tmp / "synth" / "text.val.jsonl"
    if data is None:
        raise SystemExit("--data: give a text JSONL for --ckpt")
    model, path = load_model(ckpt)
    model.eval()
    tok = load_tokenizer(path)
    int8 = quantize_model(copy.deepcopy(model), "int8")
    files = {k: tmp / f"m-{k}.gguf" for k in ("f32", "q8_0")}
    for k, f in files.items():
        export_gguf(path, f, k, force=True)
    llms = {k: llama_cpp.Llama(str(f), n_ctx=model.config.max_seq_len, logits_all=True, verbose=False,
                               n_threads=args.threads, n_batch=64) for k, f in files.items()}

    texts = [r["text"] for r in read_jsonl(data)[: args.prompts]]
    tok_same = sum(llms["f32"].tokenize(t.encode(), add_bos=False, special=False) == tok.encode(t) for t in texts)

    # prompts: the first few words of each text, after <s>
    prompts = [tok.encode(" ".join(t.split()[:4]) if " " in t else t[:6], bos=True) for t in texts]
    llm = llms["f32"]
    llm.reset()
    llm.eval(prompts[0])
    theirs = np.array(llm.scores[: len(prompts[0])])
    with torch.no_grad():
        ours_logits = model(torch.tensor([prompts[0]])).logits[0].numpy()
    logit_diff = float(np.abs(theirs - ours_logits).max())

    n = args.new_tokens
    ours_fp32 = [generate(model, [p], n, temperature=0, stop_ids=[])[0] for p in prompts]
    ours_int8 = [generate(int8, [p], n, temperature=0, stop_ids=[])[0] for p in prompts]
    match = {}
    for k, l in llms.items():
        got = [llama_greedy(l, p, n) for p in prompts]
        ref = ours_fp32 if k == "f32" else ours_int8
        match[k] = {"prompts_identical": sum(g == r for g, r in zip(got, ref)),
                    "tokens_agree": round(sum(a == b for g, r in zip(got, ref) for a, b in zip(g, r)) / (n * len(got)), 4),
                    "vs_fp32_tokens_agree": round(sum(a == b for g, r in zip(got, ours_fp32) for a, b in zip(g, r))
                                                  / (n * len(got)), 4)}

    speed = {"ours_fp32": 0.0, "ours_int8": 0.0, "llama_cpp_f32": 0.0, "llama_cpp_q8_0": 0.0}
    p = prompts[0]
    for _ in range(args.rounds):
        for name, fn in (("ours_fp32", lambda: generate(model, [p], n, temperature=0, stop_ids=[])),
                         ("ours_int8", lambda: generate(int8, [p], n, temperature=0, stop_ids=[])),
                         ("llama_cpp_f32", lambda: llama_greedy(llms["f32"], p, n)),
                         ("llama_cpp_q8_0", lambda: llama_greedy(llms["q8_0"], p, n))):
            t = time.perf_counter()
            fn()
            speed[name] = max(speed[name], n / (time.perf_counter() - t))
    res = {"bench": "gguf", "checkpoint": str(path), "llama_cpp_python": llama_cpp.__version__,
           "texts": len(texts), "tokenization_identical": tok_same, "max_logit_diff_f32": round(logit_diff, 6),
           "greedy_new_tokens": n, "greedy_f32_vs_ours_fp32": match["f32"], "greedy_q8_0_vs_ours_int8": match["q8_0"],
           "decode_tok_s_b1": {k: round(v, 1) for k, v in speed.items()},
           "gguf_mb": {k: round(f.stat().st_size / 1e6, 3) for k, f in files.items()},
           "threads": args.threads, "machine": f"{os.cpu_count()}-core CPU, no GPU"}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
