"""`tiaoyu pretrain`: train a decoder-only transformer from scratch (or continue one) on token shards."""

from __future__ import annotations

import typer

from tiaoyu_cli.cli.common import config_options, train_options
from tiaoyu_cli.console import say
from tiaoyu_cli.train.engine.config import TrainConfig
from tiaoyu_cli.train.stages import pretrain as pretrain_stage

PRETRAIN_HELP = {  # the objective's config (objectives/pretrain.py)
    "seq_len": "tokens per training window (0 = the model's max_seq_len; at most 2048 for an open model)",
    "sampling": "random windows, or sequential passes over the stream",
    "eval_batches": "batches of the val split per evaluation",
}

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
    @config_options(pretrain_stage.Config, PRETRAIN_HELP, args=("tokens",))
    def pretrain(*, cfg: pretrain_stage.Config, train: TrainConfig) -> None:
        pretrain_stage.run(cfg, train, log=say)
