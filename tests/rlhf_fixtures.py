"""Helpers of the rlhf tests (test_reward, test_dpo, test_ppo, test_grpo): a cheap SFT start built
once per test session from the shared tiny base, and small data files.

The SFT start is the base fine-tuned (with the `tiaoyu sft` command) on the synthetic chat records
plus the verifiable training questions as chat records — so it answers in the chat template and
gets some held-out verifiable questions right, which RL then has a reward signal to improve.
With TIAOYU_TEST_CACHE set it is kept between sessions (keyed by the sources that determine it).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "tiaoyu_cli"
SFT_STEPS = 200
SFT_ARGS = ["--max-steps", str(SFT_STEPS), "--batch-size", "16", "--lr", "2e-3", "--warmup-steps", "10",
            "--log-every", "100", "--no-eval-before", "--dtype", "fp32", "--device", "cpu", "--seed", "0"]

_built: dict[str, Path] = {}


@contextlib.contextmanager
def one_thread():
    """Tiny matrices: one thread is faster, and on a shared machine far steadier."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def run_cli(args: list[str]) -> None:
    """Run `tiaoyu ARGS` in this process; raise on a non-zero exit."""
    from tiaoyu_cli.cli.main import main

    try:
        main([str(a) for a in args])
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"tiaoyu {' '.join(map(str, args))} exited with {e.code}") from None


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text(encoding="utf-8").splitlines() if l.strip()]


def as_chat(rec: dict) -> dict:
    return {"messages": [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["answer"]}]}


def _key(assets: Path) -> str:
    h = hashlib.sha256((assets.name + json.dumps(SFT_ARGS)).encode())
    for sub in ("train/objectives/sft.py", "train/losses/lm.py", "data/chat.py", "cli/sft.py", "train/engine/trainer.py",
                "model/transformer.py"):
        p = PKG / sub
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def _build_sft(assets: Path, out: Path) -> None:
    synth = assets / "synth"
    mix = out.parent / f"{out.name}-mix.jsonl"
    recs = read_jsonl(synth / "chat.train.jsonl") + [as_chat(r) for r in read_jsonl(synth / "verifiable.train.jsonl")]
    write_jsonl(mix, recs)
    with one_thread():
        run_cli(["sft", assets / "base", mix, "-o", out, *SFT_ARGS])


def sft_start(assets: Path, tmp_root: Path) -> Path:
    """The SFT start checkpoint folder (built once per session; cached with TIAOYU_TEST_CACHE)."""
    from tiaoyu_cli.checkpoint import resolve_checkpoint

    key = _key(assets)
    if key in _built:
        return _built[key]
    cache = os.environ.get("TIAOYU_TEST_CACHE")
    if not cache:
        out = tmp_root / f"sft-{key}"
        _build_sft(assets, out)
    else:
        out = Path(cache) / f"rlhf-sft-{key}"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.parent / ".lock-rlhf", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (out / "DONE").exists():
                tmp = out.with_name(out.name + ".building")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                _build_sft(assets, tmp / "run")
                shutil.rmtree(out, ignore_errors=True)
                tmp.rename(out)
                (out / "DONE").write_text("ok")
            out = out / "run"
    _built[key] = resolve_checkpoint(out)
    return _built[key]


RM_STEPS = 150


def reward_model(assets: Path, tmp_root: Path) -> Path:
    """A reward model trained (`tiaoyu rlhf reward`) from the SFT start on the synthetic preference pairs,
    evaluated on the held-out val pairs (facts no training pair asks about). Returns its run folder."""
    key = "rm-" + _key(assets)
    if key in _built:
        return _built[key]
    start = sft_start(assets, tmp_root)
    synth = assets / "synth"
    out = tmp_root / key
    with one_thread():
        run_cli(["rlhf", "reward", start, synth / "preference.train.jsonl", "--val", synth / "preference.val.jsonl",
                 "-o", out, "--max-steps", str(RM_STEPS), "--batch-size", "16", "--lr", "5e-4", "--warmup-steps", "10",
                 "--log-every", "50", "--dtype", "fp32", "--device", "cpu", "--seed", "0"])
    _built[key] = out
    return out


def is_refusal(pair: dict) -> bool:
    """The rejected answer is one of the synthetic corpus' unhelpful replies ("I don't know." …)."""
    from tiaoyu_cli.data.synth import UNHELPFUL

    return pair["rejected"] in UNHELPFUL["en"] + UNHELPFUL["zh"]


def eval_lines(run: Path) -> list[dict]:
    return [r for r in read_jsonl(Path(run) / "metrics.jsonl") if r.get("eval")]


def train_lines(run: Path) -> list[dict]:
    return [r for r in read_jsonl(Path(run) / "metrics.jsonl") if not r.get("eval")]


def other_tokenizer_ckpt(ckpt: Path, dest: Path) -> Path:
    """A copy of `ckpt` whose tokenizer is another one (trained here on a little text, vocab 700)."""
    from tiaoyu_cli.tokenizer import train_tokenizer

    corpus = Path(ckpt).resolve().parents[1] / "synth" / "text.val.jsonl"
    shutil.copytree(ckpt, dest)
    tok = train_tokenizer([str(corpus)], dest.parent / f"{dest.name}-tok", vocab_size=700)
    tok.save(dest)
    return dest


def tiny_train(out, steps, **kw):
    """The TrainConfig of the RL learning tests: constant lr 1e-4, batch 8, fp32 on the CPU, seed 0."""
    from tiaoyu_cli.train.engine.trainer import TrainConfig

    base = dict(out=str(out), max_steps=steps, batch_size=8, lr=1e-4, warmup_steps=0, schedule="constant",
                log_every=1, device="cpu", dtype="fp32", seed=0)
    base.update(kw)
    return TrainConfig(**base)


def quiet(msg: str) -> None:
    pass
