"""tiaoyu on an open model folder against transformers (+ PEFT) on the same folder, same machine, same run:
SFT and LoRA training tokens/s and peak memory, batch-1 greedy decode tokens/s.

    python benchmarks/bench_open.py                       # CPU: 3 timed steps, seq 128, batch 2, fp32, 1 thread
    python benchmarks/bench_open.py --device cuda --dtype bf16 --steps 10 --seq-len 512 --batch-size 8

The folder is SmolLM2-135M's shape (Llama: hidden 576, 30 layers, 9 heads, 3 KV heads, FFN 1536, vocab
49,152, tied embeddings, rope_theta 100,000) with random weights, written here with transformers by
recipes/open-model/tiny_model.py (a byte-level BPE tokenizer trained on the synthetic corpus, ChatML
template; the embedding padded to 49,152 rows). The chat JSONL is made here too: one question and a long
answer per record, so that every row is cut at --seq-len and both sides train on exactly batch × seq-len
tokens per step (ours counts the attention mask, the reference the same rows).

Each side runs in its own fresh process (so peak RSS is that run's alone) with the same torch thread
count (--threads, also OMP_NUM_THREADS):
  sft   ours: `tiaoyu sft FOLDER chat.jsonl --max-len T --batch-size B --lr … --schedule constant
        --warmup-steps 0 --weight-decay 0 --log-every 1`, run through the CLI's entry point in the worker
        process; its step times are read from metrics.jsonl (time_s). Reference: a plain loop over
        AutoModelForCausalLM with torch AdamW (same lr, betas 0.9/0.95, no weight decay, clip 1.0), the
        rows rendered with the tokenizer's `apply_chat_template`, labels on the answer only.
  lora  ours: `tiaoyu lora … --rank r --alpha a --targets … --lora-dropout p`; reference: the same loop on
        `peft.get_peft_model` with LoraConfig(r, lora_alpha, target_modules, lora_dropout).
  decode  `tiaoyu chat`'s path (load_chat_model, the folder's template, infer.generate.stream) against
        transformers `generate` (greedy, KV cache), batch 1, a fixed number of new tokens (stop tokens
        ignored on both sides); rounds alternate and the best round of each counts; the tokens must agree.
        With llama_cpp importable, llama.cpp also decodes an f32 GGUF exported by `tiaoyu export`.
Training runs go in ABBA order (ref, ours, ours, ref; --repeats) and the best run of each side counts.
Warmup steps are not timed; tokens/s is per the median timed step (the mean beside it). Peak memory: the process's peak RSS on CPU (ours includes the checkpoint it
saves at the end), torch.cuda.max_memory_allocated on CUDA. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
           "down": "down_proj"}


def options(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per training run")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--targets", default="q,k,v,o,gate,up,down")
    ap.add_argument("--repeats", type=int, default=2, help="training runs per side, in ABBA order (best counts)")
    ap.add_argument("--new-tokens", type=int, default=32, help="decode: new tokens per round")
    ap.add_argument("--rounds", type=int, default=3, help="decode: rounds per side (best counts)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="training on both sides: fp32, or bf16 autocast over fp32 weights (decode: fp32 weights)")
    # one thread by default: on a shared 2-core machine two threads of one process wait at every operator's
    # barrier for a core another process holds (docs/performance.md); a quiet machine or a GPU host can give more
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads of both sides (0 = the core count)")
    ap.add_argument("--layers", type=int, default=30, help="hidden layers (30 = SmolLM2-135M's)")
    ap.add_argument("--only", default="sft,lora,decode", help="comma list of: sft, lora, decode")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--work", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.threads = a.threads or os.cpu_count() or 1
    return a


# ---- the parent: folder, data, workers, one JSON line ----------------------------------------------

def make_folder(work: Path, layers: int) -> Path:
    spec = importlib.util.spec_from_file_location("tiny_model", ROOT / "recipes" / "open-model" / "tiny_model.py")
    tm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tm)
    return tm.write_folder(work / "model", family="llama", shape="smollm2-135m", vocab=49152, bpe_vocab=2048,
                           sizes={"num_hidden_layers": layers})


def make_chat(path: Path, n: int, chars: int) -> None:
    """`n` records: a question and an answer of at least `chars` characters (synthetic documents)."""
    from tiaoyu_cli.data.synth import Generator, SynthConfig

    docs = iter(Generator(SynthConfig(seed=0, text_mb=max(0.2, n * chars * 2 / 1e6))).text_docs("train"))
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            answer = ""
            while len(answer) < chars:
                answer += next(docs) + "\n"
            msgs = [{"role": "user", "content": f"Tell me about document {i}."}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")


def run_worker(a: argparse.Namespace, kind: str, work: Path) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--work", str(work)]
    for k in ("steps", "warmup", "seq_len", "batch_size", "lr", "rank", "alpha", "lora_dropout", "targets",
              "new_tokens", "rounds", "device", "dtype", "threads"):
        argv += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run(argv, capture_output=True, text=True, env=env)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"bench_open: worker {kind} failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(lines[-1])


def best(runs: list[dict]) -> dict:
    top = dict(max(runs, key=lambda r: r["tokens_per_s"]))
    top["runs_tokens_per_s"] = [r["tokens_per_s"] for r in runs]
    top["peak_mb"] = max(r["peak_mb"] for r in runs)
    return top


def pair(ours: dict, ref: dict) -> dict:
    out = {"ours": ours, "ref": ref, "ratio_tokens_per_s": round(ours["tokens_per_s"] / ref["tokens_per_s"], 3)}
    if ours.get("peak_mb") and ref.get("peak_mb"):
        out["ratio_peak_mb"] = round(ours["peak_mb"] / ref["peak_mb"], 3)
    return out


def main() -> None:
    a = options()
    if a.worker:
        return WORKERS[a.worker](a, Path(a.work))
    import torch
    import transformers

    only = a.only.split(",")
    if set(only) - {"sft", "lora", "decode"}:
        raise SystemExit(f"bench_open: --only {a.only!r}: choose from sft, lora, decode")
    res: dict = {"bench": "open"}
    with tempfile.TemporaryDirectory(prefix="bench_open_") as tmp:
        work = Path(tmp)
        folder = make_folder(work, a.layers)
        make_chat(work / "chat.jsonl", max(16, a.batch_size * (a.steps + a.warmup)), a.seq_len * 8)
        cfg = json.loads((folder / "config.json").read_text())
        # ABBA order (ref, ours, ours, ref, …) so that a drift in the machine's load favours neither side;
        # the best run of each side counts, as in the decode rounds
        for stage in ("sft", "lora"):
            if stage in only:
                runs: dict[str, list[dict]] = {"ours": [], "ref": []}
                for i in range(a.repeats):
                    for side in (("ref", "ours") if i % 2 == 0 else ("ours", "ref")):
                        runs[side].append(run_worker(a, f"{side}-{stage}", work))
                res[stage] = pair(*(best(runs[side]) for side in ("ours", "ref")))
        if "decode" in only:
            res["decode"] = run_worker(a, "decode", work)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if a.device.startswith("cuda") and torch.cuda.is_available():
        machine = torch.cuda.get_device_name(0)
    res["settings"] = {
        "model": (f"SmolLM2-135M shape, random weights: llama d{cfg['hidden_size']} L{cfg['num_hidden_layers']} "
                  f"H{cfg['num_attention_heads']} KV{cfg['num_key_value_heads']} ffn{cfg['intermediate_size']} "
                  f"V{cfg['vocab_size']} tied"),
        "device": a.device, "dtype": a.dtype, "threads": a.threads, "seq_len": a.seq_len, "batch_size": a.batch_size,
        "timed_steps": a.steps, "warmup_steps": a.warmup, "train_runs_per_side": a.repeats, "lr": a.lr, "optimizer": "AdamW betas 0.9/0.95 wd 0 clip 1.0",
        "peak_memory": "torch.cuda.max_memory_allocated" if a.device.startswith("cuda") else "process peak RSS",
        "lora": {"rank": a.rank, "alpha": a.alpha, "dropout": a.lora_dropout, "targets": a.targets},
        "decode": {"batch": 1, "new_tokens": a.new_tokens, "rounds": a.rounds, "dtype": "fp32"},
        "torch": torch.__version__, "transformers": transformers.__version__, "machine": machine,
        "load_avg_1m": round(os.getloadavg()[0], 2)}
    print(json.dumps(res))


# ---- workers: one measurement each, in a fresh process -----------------------------------------------

def peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def ours_train(a: argparse.Namespace, work: Path, stage: str) -> None:
    """`tiaoyu sft|lora` through the CLI's entry point; step times from its metrics.jsonl."""
    import torch

    from tiaoyu_cli.cli.main import main as cli

    out = work / f"ours-{stage}"
    shutil.rmtree(out, ignore_errors=True)  # the previous repeat's run
    argv = [stage, str(work / "model"), str(work / "chat.jsonl"), "-o", str(out), "--max-steps", str(a.warmup + a.steps),
            "--batch-size", str(a.batch_size), "--max-len", str(a.seq_len), "--lr", str(a.lr), "--schedule", "constant",
            "--warmup-steps", "0", "--weight-decay", "0", "--log-every", "1", "--device", a.device, "--dtype", a.dtype,
            "--seed", "0", "--keep", "1"]
    if stage == "lora":
        argv += ["--rank", str(a.rank), "--alpha", str(a.alpha), "--targets", a.targets, "--lora-dropout", str(a.lora_dropout)]
    try:
        cli(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    rows = {r["step"]: r for r in rows if "time_s" in r and not r.get("eval")}
    w, n = a.warmup, a.warmup + a.steps
    times = [rows[s]["time_s"] - rows[s - 1]["time_s"] if s > 1 else rows[s]["time_s"] for s in range(w + 1, n + 1)]
    tokens = rows[n]["tokens"] - (rows[w]["tokens"] if w else 0)
    report(a, tokens, times, torch.get_num_threads())


def ref_train(a: argparse.Namespace, work: Path, stage: str) -> None:
    """A plain transformers training loop (PEFT for lora) on the same folder and records."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    device = torch.device(a.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(work / "model")
        model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32).to(device)
    if stage == "lora":
        from peft import LoraConfig, get_peft_model

        targets = [TARGETS[t] for t in a.targets.split(",")]
        model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=a.lora_dropout,
                                                 target_modules=targets, bias="none", task_type="CAUSAL_LM"))
    rows = []
    for line in (work / "chat.jsonl").read_text(encoding="utf-8").splitlines():
        msgs = json.loads(line)["messages"]
        full = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
        prompt = tok.apply_chat_template(msgs[:-1], tokenize=True, add_generation_prompt=True, return_dict=False)
        labels = [-100] * len(prompt) + list(full[len(prompt):])
        rows.append((list(full[:a.seq_len]), labels[:a.seq_len]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16")
    model.train()
    times, tokens = [], 0
    B = a.batch_size
    for step in range(a.warmup + a.steps):
        batch = [rows[(step * B + i) % len(rows)] for i in range(B)]
        t0 = time.perf_counter()
        x = torch.tensor([r[0] for r in batch], device=device)
        y = torch.tensor([r[1] for r in batch], device=device)
        with amp:
            loss = model(input_ids=x, attention_mask=torch.ones_like(x), labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)  # one read of the device per step, as ours logs every step here
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
            tokens += x.numel()
    report(a, tokens, times, torch.get_num_threads())


def report(a: argparse.Namespace, tokens: int, times: list[float], threads: int) -> None:
    import torch

    # the median step: on a shared machine one step slowed by another process does not move it
    per_step = tokens / len(times)
    print(json.dumps({"tokens_per_s": round(per_step / statistics.median(times), 1),
                      "mean_tokens_per_s": round(tokens / sum(times), 1), "tokens": tokens,
                      "step_s": [round(t, 3) for t in times], "peak_mb": peak_mb(torch.device(a.device)),
                      "threads": threads}))


def decode(a: argparse.Namespace, work: Path) -> None:
    """`tiaoyu chat`'s generation path against transformers' generate (and llama.cpp when importable)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from tiaoyu_cli.infer.generate import stream
    from tiaoyu_cli.infer.sampling import SamplingParams
    from tiaoyu_cli.infer.session import chat_prompt_ids, load_chat_model

    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    folder, n = work / "model", a.new_tokens
    cm = load_chat_model(folder, device=a.device)
    prompt = chat_prompt_ids(cm.tokenizer, [{"role": "user", "content": "What is 12 + 7? Answer in one sentence."}])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().to(device)
    pad = json.loads((folder / "generation_config.json").read_text())["pad_token_id"]
    gc = GenerationConfig(max_new_tokens=n, do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=pad)

    def run_ours() -> list[int]:
        toks: list[int] = []
        for _ in stream(cm.model, cm.tokenizer, prompt, n, SamplingParams(temperature=0), stop_ids=[], tokens_out=toks):
            pass
        return toks

    def run_hf() -> list[int]:
        x = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=torch.ones_like(x), generation_config=gc)
        return out[0, len(prompt):].tolist()

    runs = {"ours": run_ours, "hf": run_hf}
    llama_note = llama_cpp_runs(folder, prompt, n, a.threads, runs)
    best = {k: float("inf") for k in runs}
    toks = {k: fn() for k, fn in runs.items()}  # warm-up
    for _ in range(a.rounds):
        for k, fn in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            toks[k] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[k] = min(best[k], time.perf_counter() - t)
    res = {"ours_tok_s": round(n / best["ours"], 1), "hf_tok_s": round(n / best["hf"], 1),
           "ratio": round(best["hf"] / best["ours"], 3), "same_tokens": toks["ours"] == toks["hf"],
           "prompt_len": len(prompt), "threads": torch.get_num_threads()}
    if "llama_cpp" in runs:
        res.update(llama_cpp_tok_s=round(n / best["llama_cpp"], 1), ratio_vs_llama_cpp=round(best["llama_cpp"] / best["ours"], 3),
                   same_tokens_llama_cpp=toks["llama_cpp"] == toks["ours"])
    res["llama_cpp"] = llama_note
    print(json.dumps(res))


def llama_cpp_runs(folder: Path, prompt: list[int], n: int, threads: int, runs: dict) -> str:
    """Add llama.cpp's greedy decode of an f32 GGUF of the folder to `runs` when llama_cpp imports;
    returns what was done, or why it was skipped."""
    try:
        import llama_cpp
    except ImportError:
        return "skipped: llama_cpp (llama-cpp-python) is not installed"
    from tiaoyu_cli.export.gguf import export_gguf

    path = folder.parent / "model-f32.gguf"
    export_gguf(folder, path, "f32", force=True)
    llm = llama_cpp.Llama(str(path), n_ctx=len(prompt) + n + 8, verbose=False, n_threads=threads,
                          n_threads_batch=threads, n_batch=64)

    def run() -> list[int]:
        out = []
        for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            out.append(int(t))
            if len(out) >= n:
                break
        return out

    runs["llama_cpp"] = run
    return f"llama-cpp-python {llama_cpp.__version__}, f32 GGUF from tiaoyu export"


WORKERS = {"ours-sft": lambda a, w: ours_train(a, w, "sft"), "ours-lora": lambda a, w: ours_train(a, w, "lora"),
           "ref-sft": lambda a, w: ref_train(a, w, "sft"), "ref-lora": lambda a, w: ref_train(a, w, "lora"),
           "decode": decode}

if __name__ == "__main__":
    main()
