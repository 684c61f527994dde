"""Quantization: quality cost and speed of `--quantize int8` (weight-only, CPU) and GGUF `q8_0`, side by side.

    python benchmarks/bench_quant.py --ckpt runs/demo/base --data runs/demo/data/text.val.jsonl
    python benchmarks/bench_quant.py          # no --ckpt: trains a tiny base on the synthetic corpus first (~minutes)

Quality (on a trained checkpoint): held-out val loss of the fp32 model, of the same model with int8
Linear layers (tiaoyu_cli/model/quant.py), and of the weights written to a q8_0 GGUF file and read
back (each tensor dequantized by the `gguf` package, q/k un-permuted) — so q8_0's cost is measured
without llama.cpp.

Speed: greedy decode tokens/s with the KV cache, fp32 vs int8, batch 1 and batch 8, on the trained
checkpoint and on a random model of a bigger preset (default `small`, ~26M parameters: at that
size the weights no longer fit in cache and reading them dominates). Rounds alternate fp32/int8
and the best round of each counts (the machine is shared and noisy). Prints one JSON line.
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

ROOT = Path(__file__).resolve().parents[1]


def build_base(root: Path, steps: int) -> Path:
    """A tiny pretrained base: synth → tokenizer → shards → `steps` of pretraining (the test fixture's recipe)."""
    from tiaoyu_cli.data.synth import SynthConfig, write_corpus
    from tiaoyu_cli.data.shards import open_tokens
    from tiaoyu_cli.model import Transformer, preset
    from tiaoyu_cli.tokenizer import train_tokenizer
    from tiaoyu_cli.tokenizer.encode import encode_corpus
    from tiaoyu_cli.train.objectives.pretrain import PretrainConfig, PretrainStage
    from tiaoyu_cli.train.engine.trainer import TrainConfig, Trainer

    data = root / "synth"
    write_corpus(data, SynthConfig(seed=0, text_mb=1.5, records=200, val_records=100))
    tok = train_tokenizer([str(data / "text.train.jsonl")], root / "tok", vocab_size=1024)
    encode_corpus([str(data / "text.train.jsonl")], root / "tok", root / "tokens",
                  val_inputs=[str(data / "text.val.jsonl")], workers=1)
    train, val = open_tokens(root / "tokens")
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size))
    stage = PretrainStage(train, val, PretrainConfig(seq_len=128), batch_size=16, seed=0)
    cfg = TrainConfig(out=str(root / "base"), max_steps=steps, batch_size=16, lr=2e-3, warmup_steps=30,
                      log_every=100, device="cpu", keep=1)
    Trainer(model, stage, cfg, tokenizer=tok, log=lambda m: None).fit()
    return root / "base"


def val_loss(model, stream: torch.Tensor, seq_len: int) -> float:
    from tiaoyu_cli.evals.evaluate import text_metrics

    with torch.inference_mode():
        return text_metrics(model, stream, 0, seq_len, 16)["loss"]


def model_from_gguf(model, path: Path):
    """A copy of `model` whose weights are the GGUF file's tensors, dequantized."""
    import gguf

    from tiaoyu_cli.export.gguf import unpermute

    cfg = model.config
    reader = gguf.GGUFReader(path)
    back = {}
    for t in reader.tensors:
        arr = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        arr = arr.reshape([int(x) for x in reversed(t.shape)])
        if t.name.endswith("attn_q.weight"):
            arr = unpermute(arr, cfg.n_heads)
        elif t.name.endswith("attn_k.weight"):
            arr = unpermute(arr, cfg.n_kv_heads)
        back[t.name] = torch.from_numpy(arr.copy())
    new = copy.deepcopy(model)
    m = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for i in range(cfg.n_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        m.update({p + "input_layernorm.weight": b + "attn_norm.weight",
                  p + "self_attn.q_proj.weight": b + "attn_q.weight", p + "self_attn.k_proj.weight": b + "attn_k.weight",
                  p + "self_attn.v_proj.weight": b + "attn_v.weight",
                  p + "self_attn.o_proj.weight": b + "attn_output.weight",
                  p + "post_attention_layernorm.weight": b + "ffn_norm.weight",
                  p + "mlp.gate_proj.weight": b + "ffn_gate.weight", p + "mlp.up_proj.weight": b + "ffn_up.weight",
                  p + "mlp.down_proj.weight": b + "ffn_down.weight"})
    missing = set(m.values()) - set(back)
    if missing:
        raise SystemExit(f"{path}: missing tensors {sorted(missing)[:3]} (dense models only)")
    new.load_state_dict({k: back[v] for k, v in m.items()}, strict=False)
    return new


def decode_speed(fp32, int8, batch: int, new_tokens: int, rounds: int) -> dict:
    from tiaoyu_cli.infer.generate import generate

    g = torch.Generator().manual_seed(1)
    V = fp32.config.vocab_size
    prompts = [torch.randint(8, V, (16,), generator=g).tolist() for _ in range(batch)]
    best = {"fp32": 0.0, "int8": 0.0}
    same = None
    for _ in range(rounds):
        for name, m in (("fp32", fp32), ("int8", int8)):
            t = time.perf_counter()
            out = generate(m, prompts, new_tokens, temperature=0, stop_ids=[])
            dt = time.perf_counter() - t
            best[name] = max(best[name], batch * new_tokens / dt)
            if name == "fp32":
                ref = out
            else:
                same = sum(a == b for a, b in zip(ref[0], out[0])) / new_tokens
    return {"fp32_tok_s": round(best["fp32"], 1), "int8_tok_s": round(best["int8"], 1),
            "speedup": round(best["int8"] / best["fp32"], 3), "greedy_agreement_row0": round(same, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="a trained checkpoint (default: train a tiny base first)")
    ap.add_argument("--data", help="held-out text JSONL for the val loss (default: the synthetic text.val)")
    ap.add_argument("--base-steps", type=int, default=300)
    ap.add_argument("--records", type=int, default=300, help="val records used")
    ap.add_argument("--big-preset", default="small", help="preset of the random model for the speed test ('' = skip)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from tiaoyu_cli.export.gguf import export_gguf
    from tiaoyu_cli.model import Transformer, preset
    from tiaoyu_cli.model.quant import fused_kernel_available, quantize_model, weight_bytes
    from tiaoyu_cli.checkpoint import load_model, load_tokenizer
    from tiaoyu_cli.evals.evaluate import _records, text_stream

    tmp = Path(tempfile.mkdtemp(prefix="bench_quant_"))
    ckpt = Path(args.ckpt) if args.ckpt else None
    data = Path(args.data) if args.data else None
    if ckpt is None:
        print(f"training a tiny base ({args.base_steps} steps) in {tmp} …", file=sys.stderr)
        ckpt = build_base(tmp, args.base_steps)
        data = data or tmp / "synth" / "text.val.jsonl"
    if data is None:
        raise SystemExit("--data: give the held-out text JSONL for --ckpt")

    model, path = load_model(ckpt)
    model.eval()
    tok = load_tokenizer(path)
    stream, _ = text_stream(_records(data, "text", args.records), tok, data)
    seq = model.config.max_seq_len
    int8 = quantize_model(copy.deepcopy(model), "int8")
    q8_file = tmp / "q8.gguf"
    export_gguf(path, q8_file, "q8_0", force=True)
    f32_file = tmp / "f32.gguf"
    export_gguf(path, f32_file, "f32", force=True)
    q8_model = model_from_gguf(model, q8_file)

    res = {"bench": "quant", "checkpoint": str(path), "val_tokens": int(stream.numel()) - 1,
           "val_loss_fp32": round(val_loss(model, stream, seq), 5),
           "val_loss_int8": round(val_loss(int8, stream, seq), 5),
           "val_loss_gguf_q8_0": round(val_loss(q8_model, stream, seq), 5),
           "weights_mb_fp32": round(weight_bytes(model) / 1e6, 3), "weights_mb_int8": round(weight_bytes(int8) / 1e6, 3),
           "gguf_mb_f32": round(f32_file.stat().st_size / 1e6, 3), "gguf_mb_q8_0": round(q8_file.stat().st_size / 1e6, 3),
           "fused_int8_kernel": fused_kernel_available()}
    res["int8_loss_cost"] = round(res["val_loss_int8"] - res["val_loss_fp32"], 5)
    res["q8_0_loss_cost"] = round(res["val_loss_gguf_q8_0"] - res["val_loss_fp32"], 5)
    for b in (1, 8):
        res[f"decode_trained_b{b}"] = decode_speed(model, int8, b, args.new_tokens, args.rounds)
    if args.big_preset:
        torch.manual_seed(0)
        big = Transformer(preset(args.big_preset)).eval()
        big8 = quantize_model(copy.deepcopy(big), "int8")
        res["big_preset"] = args.big_preset
        res["big_params_m"] = round(big.num_parameters() / 1e6, 2)
        for b in (1, 8):
            res[f"decode_{args.big_preset}_b{b}"] = decode_speed(big, big8, b, args.new_tokens, args.rounds)
    res["threads"] = torch.get_num_threads()
    res["machine"] = f"{os.cpu_count()}-core CPU, no GPU" if not torch.cuda.is_available() else "GPU present (CPU run)"
    print(json.dumps(res))


if __name__ == "__main__":
    main()
