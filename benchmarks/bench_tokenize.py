"""Encode throughput: `tiaoyu tokenize encode --workers N` against one plain SentencePiece process.

Both read the same generated JSONL (Chinese and English text records), encode every document as
<s> ids </s> with the same tokenizer and write one safetensors file of uint16 tokens. The
reference is the straightforward single-process loop a user would write:

    for line in f: ids = sp.encode(orjson.loads(line)["text"]); out += [bos] + ids + [eos]

Prints one JSON line: MB/s of ours (engine time, best of --rounds alternating rounds; and the whole
CLI command once, Python start-up included) and of the reference, the speed-ups, the 1-minute load
average (other work on the machine skews the wall-clock figures), the CPU seconds each side spent
(main process + workers for ours) with the speed-up they project for idle cores, and whether both
made identical tokens.

    python benchmarks/bench_tokenize.py            # ~20 MB input, --workers 2, 3 rounds
    python benchmarks/bench_tokenize.py --mb 100 --workers 4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

ZH = ("我你他她们是的了在有不这个人大小上下天地山水日月花草好学生老师今明年中国家里吃饭喝茶看书写字说话走路"
      "春夏秋冬风雨雪云电光明暗高低长短多少早晚东西南北前后左右")
EN = ("the a cat dog sees runs big small red blue tree house water river book school teacher student morning "
      "evening today tomorrow happy quickly slowly and but with from model token train data learn").split()


def make_corpus(path: Path, mb: float, seed: int = 0) -> int:
    rng = random.Random(seed)
    target = int(mb * 1e6)
    size = 0
    with open(path, "wb") as f:
        while size < target:
            parts = []
            for _ in range(rng.randint(2, 12)):
                if rng.random() < 0.5:
                    parts.append("".join(rng.choice(ZH) for _ in range(rng.randint(6, 30))) + "。")
                else:
                    parts.append(" ".join(rng.choice(EN) for _ in range(rng.randint(4, 16))).capitalize() + ".")
                if rng.random() < 0.2:
                    parts.append(f"{rng.randint(0, 9999)} + {rng.randint(0, 9999)}")
            line = orjson.dumps({"text": " ".join(parts)}) + b"\n"
            f.write(line)
            size += len(line)
    return size


def reference(data: Path, model: Path, out: Path) -> tuple[float, np.ndarray]:
    import sentencepiece as spm
    from safetensors.numpy import save_file

    t0 = time.perf_counter()
    sp = spm.SentencePieceProcessor(model_file=str(model))
    toks: list[int] = []
    with open(data, "rb") as f:
        for line in f:
            ids = sp.encode(orjson.loads(line)["text"])
            toks.append(2)
            toks.extend(ids)
            toks.append(3)
    arr = np.array(toks, dtype=np.uint16)
    save_file({"tokens": arr}, str(out))
    return time.perf_counter() - t0, arr


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # worker processes, once they have exited
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=20.0, help="input size in MB")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of reference and ours; best is reported")
    args = ap.parse_args()

    from tiaoyu_cli.data.shards import open_tokens
    from tiaoyu_cli.tokenizer import train_tokenizer
    from tiaoyu_cli.tokenizer.encode import encode_corpus

    with tempfile.TemporaryDirectory(prefix="bench_tokenize_") as tmp:
        tmp = Path(tmp)
        data = tmp / "data.jsonl"
        nbytes = make_corpus(data, args.mb)
        small = tmp / "sample.jsonl"
        with open(data, "rb") as f, open(small, "wb") as g:
            for _, line in zip(range(20000), f):
                g.write(line)
        tok = train_tokenizer([str(small)], tmp / "tok", vocab_size=args.vocab_size)

        # alternate the two a few times: on a shared machine the best round is the fairest figure
        # CPU seconds are counted too: they do not depend on what else runs on the machine
        ref_times, ours_times, ref_cpu, ours_cpu = [], [], [], []
        for r in range(args.rounds):
            c0 = time.process_time()
            t, ref_arr = reference(data, tmp / "tok" / "tokenizer.model", tmp / "ref.safetensors")
            ref_times.append(t)
            ref_cpu.append(time.process_time() - c0)
            c0, k0 = time.process_time(), _children_cpu()
            t0 = time.perf_counter()
            encode_corpus([str(data)], tmp / "tok", tmp / "tokens", workers=args.workers, val_ratio=0)
            ours_times.append(time.perf_counter() - t0)
            ours_cpu.append(time.process_time() - c0 + _children_cpu() - k0)
        train, _ = open_tokens(tmp / "tokens")
        same = bool(np.array_equal(np.concatenate(train.arrays()), ref_arr))

        cmd = [sys.executable, "-m", "tiaoyu_cli", "tokenize", "encode", str(data), "--tokenizer", str(tmp / "tok"),
               "-o", str(tmp / "tokens_cli"), "--workers", str(args.workers), "--val-ratio", "0"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        cli_s = time.perf_counter() - t0

    mb = nbytes / 1e6
    print(json.dumps({
        "bench": "tokenize_encode",
        "input_mb": round(mb, 1),
        "tokens": int(len(ref_arr)),
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "ours_mb_s": round(mb / min(ours_times), 2),
        "reference_single_spm_mb_s": round(mb / min(ref_times), 2),
        "speedup": round(min(ref_times) / min(ours_times), 2),
        "speedup_median": round(float(np.median(ref_times) / np.median(ours_times)), 2),
        "ours_cpu_s": round(min(ours_cpu), 3),
        "reference_cpu_s": round(min(ref_cpu), 3),
        # what --workers N would give on N idle cores: the work splits evenly, so it is N x the CPU ratio
        "projected_speedup_idle": round(args.workers * min(ref_cpu) / min(ours_cpu), 2),
        "ours_cli_mb_s": round(mb / cli_s, 2),
        "speedup_cli_incl_startup": round(min(ref_times) / cli_s, 2),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "identical_tokens": same,
    }))


if __name__ == "__main__":
    main()
