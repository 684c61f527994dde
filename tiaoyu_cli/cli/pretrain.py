"""`tiaoyu pretrain`: train a decoder-only transformer from scratch (or continue one) on token shards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import typer

from tiaoyu_cli.cli.common import parse_overrides, train_options
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.train.trainer import TrainConfig

EXAMPLES = """
Examples:

  tiaoyu pretrain tokens/ -o ckpt/base --preset tiny --max-steps 1500

  tiaoyu pretrain tokens/ -o ckpt/base --preset small --device cuda --max-tokens 2000000000 --batch-size 32

  tiaoyu pretrain tokens/ -o ckpt/base --preset tiny --model n_layers=6 --model position=learned

  tiaoyu pretrain more-tokens/ -o ckpt/cpt --init ckpt/base --max-steps 500 --lr 3e-4   # continued pretraining

  tiaoyu pretrain tokens/ -o ckpt/base --resume --max-steps 3000                        # continue an interrupted run

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


def relaunch_with_torchrun(nproc: int) -> None:
    argv = sys.argv[1:]
    clean = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        clean.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tiaoyu_cli", *clean]
    raise SystemExit(subprocess.call(cmd))


def register(app: typer.Typer) -> None:
    @app.command("pretrain", epilog=EXAMPLES, help="Pretrain a transformer on token shards (next-token prediction).")
    @train_options(out="ckpt/base", max_steps=0, lr=1e-3, batch_size=16, warmup_steps=50, eval_every=200,
                   save_every=500, log_every=10)
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
        nproc: int = typer.Option(0, help="launch N processes with torchrun on this machine (DDP)"),
        *,
        train: TrainConfig,
    ) -> None:
        if nproc and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            relaunch_with_torchrun(nproc)
        from tiaoyu_cli.cli.console import console
        from tiaoyu_cli.data.shards import check_fingerprint, open_tokens
        from tiaoyu_cli.model import Transformer, preset as make_preset
        from tiaoyu_cli.train.checkpoint import load_model, load_tokenizer
        from tiaoyu_cli.train.lm import PretrainConfig, PretrainStage
        from tiaoyu_cli.train.trainer import Trainer

        import torch

        torch.manual_seed(train.seed)  # before the model is built: the init weights depend on it
        train_sh, val_sh = open_tokens(tokens)
        overrides = parse_overrides(model)
        if init is not None:
            net, init_dir = load_model(init, config_overrides=overrides or None)
            tok = load_tokenizer(init_dir)
        else:
            tok = find_tokenizer(tokens, tokenizer)
            cfg = make_preset(preset, **{"vocab_size": tok.vocab_size, "bos_token_id": tok.bos_id,
                                         "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, **overrides})
            net = Transformer(cfg)
        check_fingerprint(train_sh, tok)
        sl = seq_len or net.config.max_seq_len
        stage = PretrainStage(train_sh, val_sh, PretrainConfig(seq_len=sl, sampling=sampling, eval_batches=eval_batches),
                              batch_size=train.batch_size, seed=train.seed)
        trainer = Trainer(net, stage, train, tokenizer=tok, parent=str(init) if init else None,
                          log=lambda m: console.print(m, markup=False, highlight=False))
        if trainer.dist.is_main:
            n = net.num_parameters()
            console.print(f"pretrain: {n / 1e6:.2f}M parameters, {train_sh.num_tokens:,} training tokens, "
                          f"seq_len {sl}, device {trainer.device}, autocast {str(trainer.amp_dtype).replace('torch.', '')}"
                          f", {trainer.dist.world_size} process(es)", markup=False, highlight=False)
        res = trainer.fit()
        if trainer.dist.is_main:
            msg = f"done: step {res['step']}, {res['tokens']:,} tokens"
            if "val_loss" in res:
                msg += f", val loss {res['val_loss']:.4f}"
                if "val_bpb" in res:
                    msg += f", {res['val_bpb']:.3f} bits/byte"
            console.print(msg + f" → {train.out}/latest", markup=False, highlight=False)
        from tiaoyu_cli.train import distributed as D

        D.cleanup(trainer.dist)
