"""`tiaoyu sft`: supervised fine-tuning on chat records (or classification with --task classify).

This module only declares the options; the run is tiaoyu_cli.train.stages.finetune (run_chat, run_classify).
"""

from __future__ import annotations

from pathlib import Path

import typer

from tiaoyu_cli.cli.common import CHAT_HELP, config_options, train_options
from tiaoyu_cli.console import say
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.train.engine.config import TrainConfig
from tiaoyu_cli.train.stages.finetune import ChatOptions, run_chat, run_classify

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
    @config_options(ChatOptions, CHAT_HELP, rename={"train_parts": "train"}, args=("base", "data"))
    def sft(
        base: Path = typer.Argument(..., help="checkpoint to fine-tune (run folder or step folder)"),
        data: Path = typer.Argument(..., help="chat records JSONL ({\"messages\": […]}); {\"text\",\"label\"} with --task classify"),
        task: str = typer.Option("chat", help="chat | classify"),
        *,
        cfg: ChatOptions,
        train: TrainConfig,
    ) -> None:
        if task not in ("chat", "classify"):
            raise TiaoyuError(f"--task {task!r}: choose chat or classify")
        if cfg.eval_samples < 0 or cfg.max_len < 0:
            raise TiaoyuError("--eval-samples and --max-len must not be negative")
        if task == "classify":
            if cfg.method != "full":
                raise TiaoyuError(f"--task classify trains with --method full (and --train PARTS), not --method {cfg.method}")
            run_classify(cfg, train, log=say)
            return
        run_chat(cfg, train, stage_name="sft", save_as="merged" if cfg.method == "lora" else "full", log=say)
