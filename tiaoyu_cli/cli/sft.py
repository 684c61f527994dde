"""`tiaoyu sft`: supervised fine-tuning on chat records (or classification with --task classify).

The options are tiaoyu_cli.train.stages.finetune.Config, and the run its `run`.
"""

from __future__ import annotations

import typer

from tiaoyu_cli.cli.common import CHAT_HELP, CHAT_RENAME, CHAT_SKIP, config_options, train_options
from tiaoyu_cli.console import say
from tiaoyu_cli.train.engine.config import TrainConfig
from tiaoyu_cli.train.stages import finetune

EXAMPLES = """
Examples:

  tiaoyu sft ckpt/base chat.train.jsonl -o ckpt/sft --eval-data chat.val.jsonl --epochs 3

  tiaoyu sft ckpt/base chat.jsonl -o ckpt/sft-ffn --train ffn --max-steps 500          # only the FFN layers learn

  tiaoyu sft ckpt/base chat.jsonl -o ckpt/sft-prompt --method prompt --virtual-tokens 20 --lr 1e-2

  tiaoyu sft ckpt/base chat.jsonl -o ckpt/sft-adapter --method adapter --adapter-dim 16

  tiaoyu sft ckpt/base chat.jsonl -o ckpt/sft-lora --method lora --rank 8 --alpha 16   # saved merged

  tiaoyu sft ckpt/base chat.jsonl -o ckpt/sft --replay tokens/ --replay-ratio 0.1      # against forgetting

  tiaoyu sft ckpt/base cls.train.jsonl --task classify -o ckpt/cls --eval-data cls.val.jsonl

  tiaoyu sft ckpt/base chat.jsonl -o ckpt/sft --pack --max-len 256 --overflow skip --skip-bad
"""


def register(app: typer.Typer) -> None:
    @app.command("sft", epilog=EXAMPLES,
                 help="Supervised fine-tuning on chat records (loss on assistant tokens), or --task classify.")
    @train_options(out="ckpt/sft", lr=5e-4, batch_size=16, warmup_steps=20, weight_decay=0.0, log_every=10)
    @config_options(finetune.Config, CHAT_HELP, rename=CHAT_RENAME, skip=CHAT_SKIP, args=("base", "data"))
    def sft(*, cfg: finetune.Config, train: TrainConfig) -> None:
        finetune.run(cfg, train, log=say)
