"""`tiaoyu pretrain`: train a decoder-only transformer from scratch (or continue one) on token shards."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from tiaoyu_cli.cli.common import train_options
from tiaoyu_cli.console import say
from tiaoyu_cli.device import pin_threads
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.model.config import parse_overrides
from tiaoyu_cli.train.engine.config import TrainConfig
from tiaoyu_cli.train.stages.pretrain import PretrainRun, run_pretrain

EXAMPLES = """
Examples:

  tiaoyu pretrain tokens/ -o ckpt/base --preset tiny --max-steps 1500

  tiaoyu pretrain tokens/ -o ckpt/base --preset small --device cuda --max-tokens 2000000000 --batch-size 32

  tiaoyu pretrain tokens/ -o ckpt/base --preset tiny --model n_layers=6 --model position=learned

  tiaoyu pretrain more-tokens/ -o ckpt/cpt --init ckpt/base --max-steps 500 --lr 3e-4   # continued pretraining

  tiaoyu pretrain tokens-qwen/ -o ckpt/qwen-cpt --init models/qwen --max-steps 500 --lr 1e-5 --optim adamw

  tiaoyu pretrain tokens/ -o ckpt/base --resume --max-steps 3000                        # continue an interrupted run

  tiaoyu pretrain tokens/ -o ckpt/base --preset tiny --max-steps 500 --nproc 2          # 2 processes (DDP)

  torchrun --nproc_per_node 8 -m tiaoyu_cli pretrain tokens/ -o ckpt/base --preset small --max-steps 20000
"""


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
        init: Optional[Path] = typer.Option(None, help="start from this checkpoint or Hugging Face model folder "
                                            "(continued pretraining)"),
        tokenizer: Optional[Path] = typer.Option(None, help="tokenizer folder, or an open model's folder, for a new "
                                                 "model (default: the one recorded with the shards)"),
        seq_len: int = typer.Option(0, help="tokens per training window (0 = the model's max_seq_len; at most 2048 "
                                    "for an open model)"),
        sampling: str = typer.Option("random", help="random windows, or sequential passes over the stream"),
        eval_batches: int = typer.Option(16, help="batches of the val split per evaluation"),
        threads: int = typer.Option(0, help="CPU threads per process for torch (0 = chosen for the model size and the machine's load)"),
        *,
        train: TrainConfig,
    ) -> None:
        if seq_len < 0 or threads < 0 or eval_batches <= 0:
            raise TiaoyuError("--seq-len and --threads must not be negative, --eval-batches must be positive")
        if threads:
            pin_threads(threads)
        o = PretrainRun(tokens=str(tokens), preset=preset, model=parse_overrides(model), init=str(init) if init else None,
                        tokenizer=str(tokenizer) if tokenizer else None, seq_len=seq_len, sampling=sampling,
                        eval_batches=eval_batches)
        run_pretrain(o, train, log=say)
