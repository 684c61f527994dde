"""RL rollout speed: batched KV-cache generation (what PPO/GRPO use) vs one prompt at a time.

    python benchmarks/bench_rollout.py                          # tiny preset, 64 prompts × 32 new tokens
    python benchmarks/bench_rollout.py --prompts 128 --new-tokens 64 --threads 2

One random model of the chosen preset, one set of prompts of mixed lengths (as a rollout of chat
prompts has), sampling at temperature 1. Ours: `generate_rollout` — all prompts left-padded into
one batch (in chunks of --gen-batch-size), one prefill, then one decode step per token for the
whole batch — including the layout into the [B, P + R] training tensor. Reference: the same
generator called once per prompt (batch 1), the way a naive RL loop samples; and transformers'
`generate` (LlamaForCausalLM loaded from the same weights, the same left-padded batch in the same
chunks, sampling at temperature 1, KV cache). Stop tokens are ignored on every side so each
generates exactly prompts × new-tokens tokens. Rounds alternate; the best round of each counts
(the machine is shared and noisy), and tokens per CPU-second are reported beside tokens/s.
Prints one JSON line.

`--tools N`: also agentic rollouts (train/rl/tool_rollout.py) of the same batch and the same number of
model-chosen tokens, split into N + 1 rounds: each of the first N rounds ends in a (forced)
</tool_call>, the calculator runs, its tool turn is appended (masked), and generation resumes —
every round re-prefills prompt + history. Reports tokens/s with tool calls against without.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--min-prompt", type=int, default=12)
    ap.add_argument("--max-prompt", type=int, default=48)
    ap.add_argument("--gen-batch-size", type=int, default=0, help="prompts per generate call (0 = all)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers side")
    ap.add_argument("--tools", type=int, default=0, help="also agentic rollouts with this many tool calls each")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from tiaoyu_cli.infer.generate import generate_detailed
    from tiaoyu_cli.infer.sampling import SamplingParams
    from tiaoyu_cli.model import Transformer, preset
    from tiaoyu_cli.train.rl.layout import generate_rollout

    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = preset(args.preset)
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, args.max_prompt + args.new_tokens + 40 * args.tools))
    tok = _tool_tokenizer() if args.tools else None
    if tok is not None:  # the model's ids must be the tokenizer's (tool turns are decoded and encoded)
        cfg = cfg.replace(vocab_size=tok.vocab_size)
    model = Transformer(cfg).eval().to(device)
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(args.min_prompt, args.max_prompt + 1, (args.prompts,), generator=g).tolist()
    prompts = [torch.randint(8, cfg.vocab_size, (n,), generator=g).tolist() for n in lens]
    n_tokens = args.prompts * args.new_tokens
    params = SamplingParams(temperature=1.0)

    def batched() -> int:
        ro = generate_rollout(model, prompts, args.new_tokens, temperature=1.0, seed=0,
                              gen_batch_size=args.gen_batch_size, dtype=torch.float32, stop_ids=())
        return int(ro.mask.sum())

    def one_by_one() -> int:
        out = 0
        for i, p in enumerate(prompts):
            res = generate_detailed(model, [p], args.new_tokens, params, stop_ids=(), seed=i, dtype=torch.float32)
            out += len(res.tokens[0])
        return out

    hf = None
    if not args.no_hf:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from transformers import AutoModelForCausalLM

        from tiaoyu_cli.checkpoint import save_model_files

        with tempfile.TemporaryDirectory(prefix="bench_rollout_") as tmp:
            save_model_files(Path(tmp), model.cpu(), None)
            model.to(device)
            hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval().to(device)

    def hf_batched() -> int:
        chunk = args.gen_batch_size or len(prompts)
        out = 0
        torch.manual_seed(0)
        for s in range(0, len(prompts), chunk):
            part = prompts[s:s + chunk]
            L = max(len(p) for p in part)
            ids = torch.tensor([[cfg.pad_token_id] * (L - len(p)) + p for p in part], device=device)
            mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in part], device=device)
            with torch.inference_mode():
                res = hf.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, do_sample=True, temperature=1.0, top_k=0,
                                  top_p=1.0, use_cache=True, pad_token_id=cfg.pad_token_id)
            out += res[:, L:].numel()
        return out

    def timed(fn) -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        n = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert n == n_tokens, (n, n_tokens)
        return time.perf_counter() - t, time.process_time() - c

    agentic = _agentic(args, model, prompts, tok) if args.tools else None
    sides = {"batched": batched, "one_at_a_time": one_by_one, **({"hf_batched": hf_batched} if hf else {}),
             **({"with_tools": agentic} if agentic else {})}
    for fn in sides.values():  # warm-up
        fn()
    wall: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(args.rounds):
        for k, fn in sides.items():
            w, c = timed(fn)
            wall[k].append(w)
            cpu[k].append(c)
    tok_s = {k: n_tokens / min(v) for k, v in wall.items()}
    tok_cpu = {k: n_tokens / min(v) for k, v in cpu.items()}
    ours, ref = tok_s["batched"], tok_s["one_at_a_time"]
    extra = {}
    if agentic:
        extra.update({"with_tools_tok_s": round(tok_s["with_tools"], 1), "tool_calls_per_prompt": args.tools,
                      "with_tools_vs_without": round(tok_s["with_tools"] / ours, 2)})
    if hf:
        extra.update({"hf_batched_tok_s": round(tok_s["hf_batched"], 1), "speedup_vs_hf": round(ours / tok_s["hf_batched"], 2),
                 "speedup_vs_hf_cpu_time": round(tok_cpu["batched"] / tok_cpu["hf_batched"], 2)})
    print(json.dumps({"bench": "rollout", "batched_tok_s": round(ours, 1), "one_at_a_time_tok_s": round(ref, 1),
                      "speedup": round(ours / ref, 2), **extra,
                      "tok_per_cpu_s": {k: round(v, 1) for k, v in tok_cpu.items()},
                      "load_avg_1m": round(os.getloadavg()[0], 2), "preset": args.preset,
                      "params_M": round(model.num_parameters() / 1e6, 2), "prompts": args.prompts,
                      "prompt_len": [args.min_prompt, args.max_prompt], "new_tokens": args.new_tokens,
                      "gen_batch_size": args.gen_batch_size or args.prompts, "dtype": "fp32", "threads": args.threads,
                      "device": args.device, "rounds": args.rounds, "torch": torch.__version__,
                      "machine": platform.machine()}))


def _tool_tokenizer():
    """A small tokenizer with the tool tokens (the agentic loop encodes tool turns and decodes calls)."""
    import tempfile

    from tiaoyu_cli.data.synth import SynthConfig, write_corpus
    from tiaoyu_cli.tokenizer import train_tokenizer

    tmp = tempfile.mkdtemp()
    write_corpus(tmp, SynthConfig(text_mb=0.2, records=200))
    return train_tokenizer([f"{tmp}/text.train.jsonl"], f"{tmp}/tok", vocab_size=1024)


def _agentic(args, model, prompts, tok):
    """A closure timing agentic rollouts with `args.tools` calls per prompt (see the module docstring)."""
    from tiaoyu_cli.infer.generate import GenerationResult, generate_detailed
    from tiaoyu_cli.infer.tools import Toolbox
    from tiaoyu_cli.train.rl.tool_rollout import generate_agentic_rollout

    per_round = args.new_tokens // (args.tools + 1)
    last = args.new_tokens - per_round * args.tools
    box = Toolbox.from_names("calculator")
    state = {"round": 0}

    def forced(model, prompts, n, params, stops, seed=None):
        """Real sampling of this round's tokens; the first `tools` rounds end in a forced </tool_call>."""
        call = state["round"] < args.tools
        state["round"] += 1
        out = generate_detailed(model, prompts, per_round - 1 if call else last, params, stop_ids=(), seed=seed,
                                dtype=torch.float32)
        toks = [list(t) + [tok.end_tool_call_id] if call else list(t) for t in out.tokens]
        return GenerationResult(toks, ["stop" if call else "length"] * len(prompts), prompts)

    def run() -> int:
        state["round"] = 0
        ro = generate_agentic_rollout(model, tok, box, prompts, max(per_round, last), temperature=1.0, seed=0,
                                      max_tool_calls=args.tools, generate=forced)
        return int(ro.mask.sum())

    return run


if __name__ == "__main__":
    main()
