"""`tiaoyu pretrain`: train a decoder-only transformer from scratch (or continue one) on token shards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import typer

from tiaoyu_cli.cli.common import parse_overrides, train_options
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.train.config import TrainConfig

EXAMPLES = """
Examples:

  tiaoyu pretrain tokens/ -o ckpt/base --preset tiny --max-steps 1500

  tiaoyu pretrain tokens/ -o ckpt/base --preset small --device cuda --max-tokens 2000000000 --batch-size 32

  tiaoyu pretrain tokens/ -o ckpt/base --preset tiny --model n_layers=6 --model position=learned

  tiaoyu pretrain more-tokens/ -o ckpt/cpt --init ckpt/base --max-steps 500 --lr 3e-4   # continued pretraining

  tiaoyu pretrain tokens/ -o ckpt/base --resume --max-steps 3000                        # continue an interrupted run

  tiaoyu pretrain tokens/ -o ckpt/base --preset tiny --max-steps 500 --nproc 2          # 2 processes (DDP)

  torchrun --nproc_per_node 8 -m tiaoyu_cli pretrain tokens/ -o ckpt/base --preset small --max-steps 20000
"""


def find_tokenizer(tokens: Path, given: Optional[Path]):
    from tiaoyu_cli.tokenizer import Tokenizer

    if given is not None:
        return Tokenizer.load(given)
    import json

    for meta_path in (tokens / "meta.json", tokens.parent / "meta.json"):
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            for key in ("tokenizer_path", "tokenizer", "tokenizer_dir"):
                cand = meta.get(key)
                if isinstance(cand, str) and Path(cand).exists():
                    return Tokenizer.load(cand)
    if (tokens / "tokenizer.model").exists():
        return Tokenizer.load(tokens)
    raise TiaoyuError(f"cannot tell which tokenizer made {tokens}: pass --tokenizer tok/")


def build(tokens: Path, preset: str, model: Optional[List[str]], init: Optional[Path], tokenizer: Optional[Path],
          seq_len: int, train: TrainConfig):
    """Open the shards and build (or load) the model and tokenizer; every check of the inputs happens
    here, so `--nproc` can run it once before launching processes. Returns (net, tok, train, val, seq_len)."""
    import torch

    from tiaoyu_cli.data.shards import check_fingerprint, open_tokens
    from tiaoyu_cli.model import Transformer, preset as make_preset
    from tiaoyu_cli.checkpoint import load_config, load_model, load_tokenizer, load_trainer_info, resolve_checkpoint
    from tiaoyu_cli.device import resolve_device, resolve_dtype
    from tiaoyu_cli.train.trainer import check_output

    train.validate()
    check_output(train.out, train.resume)
    device = resolve_device(train.device, int(os.environ.get("LOCAL_RANK", "0")))
    resolve_dtype(train.dtype, device)
    torch.manual_seed(train.seed)  # before the model is built: the init weights depend on it
    train_sh, val_sh = open_tokens(tokens)
    for shards in (train_sh, val_sh):  # map every shard now: a truncated file fails here, not mid-run
        if shards is not None:
            shards.arrays()
    overrides = parse_overrides(model)
    sl = seq_len
    if train.resume:  # the run's own architecture and tokenizer, whatever --preset says
        ckpt = resolve_checkpoint(train.out)
        net = Transformer(load_config(ckpt))
        tok = load_tokenizer(ckpt)
        if not sl:
            sl = int((load_trainer_info(ckpt).get("stage_config") or {}).get("seq_len") or 0)
    elif init is not None:
        net, init_dir = load_model(init, config_overrides=overrides or None)
        tok = load_tokenizer(init_dir)
    else:
        tok = find_tokenizer(tokens, tokenizer)
        cfg = make_preset(preset, **{"vocab_size": tok.vocab_size, "bos_token_id": tok.bos_id,
                                     "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, **overrides})
        net = Transformer(cfg)
    check_fingerprint(train_sh, tok)
    sl = sl or net.config.max_seq_len
    if sl > net.config.max_seq_len:
        raise TiaoyuError(f"--seq-len {sl} exceeds the model's max_seq_len {net.config.max_seq_len} "
                          f"(positions it was built for); use --seq-len ≤ {net.config.max_seq_len}"
                          + ("" if init or train.resume else f" or --model max_seq_len={sl}"))
    if train_sh.vocab_size > net.config.vocab_size:
        raise TiaoyuError(f"the shards use a vocabulary of {train_sh.vocab_size}, the model only {net.config.vocab_size}")
    if train_sh.num_tokens < sl + 2:
        raise TiaoyuError(f"{tokens} holds {train_sh.num_tokens} training tokens, fewer than one window of "
                          f"--seq-len {sl} + 1; use a smaller --seq-len or more data")
    return net, tok, train_sh, val_sh, sl


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_processes(nproc: int) -> None:
    """`--nproc N`: run this same command as N local processes, set up exactly as torchrun would
    (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT; env:// rendezvous), then exit with their status.

    Ctrl-C / SIGTERM reach every process once (they save a checkpoint together and exit); if one
    process fails, the others get SIGTERM and, should they hang in a collective, SIGKILL.
    """
    import time

    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            argv.append(a)
    port = _free_port()
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc)}
        env.setdefault("OMP_NUM_THREADS", threads)
        # own session: a terminal's Ctrl-C reaches only this launcher, which passes it on once
        procs.append(subprocess.Popen([sys.executable, "-m", "tiaoyu_cli", *argv], env=env, start_new_session=True))

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        failed_at = None
        while any(p.poll() is None for p in procs):
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = time.monotonic()
            if failed_at is not None:
                waited = time.monotonic() - failed_at
                for p in procs:
                    if p.poll() is None and waited > 20:
                        p.kill()
                    elif p.poll() is None and waited > 10:
                        p.terminate()
            time.sleep(0.05)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    codes = [p.returncode if p.returncode >= 0 else 128 - p.returncode for p in procs]
    raise SystemExit(codes[0] or next((c for c in codes if c), 0))


relaunch_with_torchrun = launch_processes  # the name of the first version


def register(app: typer.Typer) -> None:
    @app.command("pretrain", epilog=EXAMPLES, help="Pretrain a transformer on token shards (next-token prediction).")
    # Muon: fewer steps to the same val loss on both corpora of benchmarks/bench_muon.py (RESULTS.md)
    @train_options(out="ckpt/base", max_steps=0, lr=1e-3, batch_size=16, warmup_steps=50, eval_every=200,
                   save_every=500, log_every=10, optim="muon")
    def pretrain(
        tokens: Path = typer.Argument(..., help="token folder from `tiaoyu tokenize encode` (train/ and val/ inside)"),
        preset: str = typer.Option("tiny", help="model preset: tiny | small | base | moe-small | moe-tiny"),
        model: Optional[List[str]] = typer.Option(None, "--model", help="override a model field, KEY=VALUE (repeatable), "
                                                  "e.g. dim=256, n_layers=6, position=learned, tie_embeddings=false"),
        init: Optional[Path] = typer.Option(None, help="start from this checkpoint (continued pretraining)"),
        tokenizer: Optional[Path] = typer.Option(None, help="tokenizer folder (default: the one recorded with the shards)"),
        seq_len: int = typer.Option(0, help="tokens per training window (0 = the model's max_seq_len)"),
        sampling: str = typer.Option("random", help="random windows, or sequential passes over the stream"),
        eval_batches: int = typer.Option(16, help="batches of the val split per evaluation"),
        threads: int = typer.Option(0, help="CPU threads per process for torch (0 = chosen for the model size and the machine's load)"),
        nproc: int = typer.Option(0, help="run N processes on this machine (DDP), as torchrun --nproc_per_node N would"),
        *,
        train: TrainConfig,
    ) -> None:
        from tiaoyu_cli.cli.console import console

        def say(msg: str) -> None:
            console.print(msg, markup=False, highlight=False, soft_wrap=True)

        if nproc < 0 or seq_len < 0 or threads < 0 or eval_batches <= 0:
            raise TiaoyuError("--nproc, --seq-len and --threads must not be negative, --eval-batches must be positive")
        if threads:
            from tiaoyu_cli.device import pin_threads

            pin_threads(threads)
        if nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            build(tokens, preset, model, init, tokenizer, seq_len, train)  # fail here, once, on bad input
            from tiaoyu_cli.train.trainer import check_writable

            check_writable(train.out)
            launch_processes(nproc)
        from tiaoyu_cli.train import distributed as D
        from tiaoyu_cli.train.lm import PretrainConfig, PretrainStage
        from tiaoyu_cli.train.trainer import Trainer, TrainingInterrupted

        trainer = None
        try:
            net, tok, train_sh, val_sh, sl = build(tokens, preset, model, init, tokenizer, seq_len, train)
            stage = PretrainStage(train_sh, val_sh, PretrainConfig(seq_len=sl, sampling=sampling, eval_batches=eval_batches),
                                  batch_size=train.batch_size, seed=train.seed)
            trainer = Trainer(net, stage, train, tokenizer=tok, parent=str(init) if init else None, log=say)
            if trainer.dist.is_main:
                n = net.num_parameters()
                say(f"pretrain: {n / 1e6:.2f}M parameters, {train_sh.num_tokens:,} training tokens, seq_len {sl}, "
                    f"device {trainer.device}, autocast {str(trainer.amp_dtype).replace('torch.', '')}, "
                    f"{trainer.dist.world_size} process(es), {train.batch_size * train.grad_accum * trainer.dist.world_size * sl:,} "
                    f"tokens per step")
            res = trainer.fit()
            if trainer.dist.is_main:
                msg = f"done: step {res['step']}, {res['tokens']:,} tokens"
                if "val_loss" in res:
                    msg += f", val loss {res['val_loss']:.4f}"
                    if "val_bpb" in res:
                        msg += f", {res['val_bpb']:.3f} bits/byte"
                say(msg + f" → {train.out}/latest")
        except KeyboardInterrupt:
            raise TrainingInterrupted("interrupted before training started; nothing was saved") from None
        finally:
            if trainer is not None:
                D.cleanup(trainer.dist)
