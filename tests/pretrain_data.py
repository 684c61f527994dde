"""Shared helpers for the pretraining / trainer / DDP / checkpoint tests.

A small *structured* corpus whose sentences continue deterministically (each name has one colour,
one pet and one city; fixed sentences), a tokenizer trained on it, and token shards made by the
real `tiaoyu tokenize encode`. Built once per test process (memoised), in a temp folder.
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

NAMES = ["Alice", "Bob", "Carol", "David"]
COLOURS = ["red", "blue", "green", "yellow"]
PETS = ["cat", "dog", "fish", "bird"]
CITIES = ["Paris", "Tokyo", "Cairo", "Lima"]
FIXED = [
    "The quick brown fox jumps over the lazy dog.",
    "one two three four five six seven eight nine ten.",
    "Red sky at night, shepherds delight.",
]


def facts() -> list[str]:
    out = []
    for i, n in enumerate(NAMES):
        out += [f"{n} likes the colour {COLOURS[i]}.", f"{n} has a {PETS[(i + 1) % 4]}.",
                f"{n} lives in {CITIES[(i + 2) % 4]}."]
    return out + FIXED


def make_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    sentences = facts()
    return [{"text": " ".join(rng.choice(sentences) for _ in range(rng.randint(2, 4)))} for _ in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def env(**extra: str) -> dict:
    """Subprocess environment: one torch thread per process (the test machine has 2 shared cores),
    a wide non-TTY console."""
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", COLUMNS="200", PYTHONUNBUFFERED="1")
    e.pop("WORLD_SIZE", None)
    e.update(extra)
    return e


def tiaoyu_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tiaoyu_cli", *map(str, args)]


def run_cli(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(tiaoyu_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env(), cwd=ROOT, **kw)


@functools.lru_cache(maxsize=None)
def assets() -> Path:
    """root/{train.jsonl, val.jsonl, tok/, tokens/} — built once per process."""
    from tiaoyu_cli.tokenizer import train_tokenizer

    root = Path(tempfile.mkdtemp(prefix="tiaoyu-pretrain-test-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    write_jsonl(root / "train.jsonl", make_records(3000, seed=1))
    write_jsonl(root / "val.jsonl", make_records(200, seed=2))
    train_tokenizer([str(root / "train.jsonl")], root / "tok", algo="bpe", vocab_size=400)
    r = run_cli("tokenize", "encode", root / "train.jsonl", "--val", root / "val.jsonl", "-t", root / "tok",
                "-o", root / "tokens", "--workers", "1")
    assert r.returncode == 0, r.stderr
    return root


@functools.lru_cache(maxsize=None)
def other_tokenizer() -> Path:
    """A second tokenizer (different vocabulary) for fingerprint-mismatch tests."""
    from tiaoyu_cli.tokenizer import train_tokenizer

    root = assets()
    train_tokenizer([str(root / "train.jsonl")], root / "tok-other", algo="bpe", vocab_size=330)
    return root / "tok-other"


def unigram_entropy(tokens_dir: Path) -> float:
    """Entropy (nats) of the unigram distribution of the train tokens: the loss of the best model
    that ignores context."""
    from tiaoyu_cli.data.shards import open_tokens

    train, _ = open_tokens(tokens_dir)
    counts = np.zeros(max(train.vocab_size, 1), dtype=np.int64)
    for arr in train.arrays():
        counts += np.bincount(np.asarray(arr), minlength=len(counts))[:len(counts)]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run) if not m.get("eval")}


def greedy(model, ids: list[int], n: int) -> list[int]:
    """The plainest greedy decoder: re-run the whole sequence, take the argmax, n times."""
    import torch

    model.eval()
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(ids):]


def finite(x: float) -> bool:
    return math.isfinite(x)
