"""`tiaoyu sft`: supervised fine-tuning on chat records (or classification with --task classify).

This module only declares the options; the run is tiaoyu_cli.train.finetune (run_chat, run_classify).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tiaoyu_cli.cli.common import train_options
from tiaoyu_cli.console import say
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.train.config import TrainConfig
from tiaoyu_cli.train.finetune import ChatOptions, ClassifyOptions, run_chat, run_classify

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
    def sft(
        base: Path = typer.Argument(..., help="checkpoint to fine-tune (run folder or step folder)"),
        data: Path = typer.Argument(..., help="chat records JSONL ({\"messages\": […]}); {\"text\",\"label\"} with --task classify"),
        task: str = typer.Option("chat", help="chat | classify"),
        eval_data: Optional[Path] = typer.Option(None, help="held-out records: val loss + answer accuracy by generation"),
        eval_samples: int = typer.Option(200, help="questions of --eval-data answered at each evaluation (0 = none)"),
        eval_max_new_tokens: int = typer.Option(32, help="most tokens per generated eval answer"),
        eval_before: bool = typer.Option(True, "--eval-before/--no-eval-before", help="evaluate the starting model too"),
        max_len: int = typer.Option(0, help="most tokens per record (0 = the model's max_seq_len)"),
        overflow: str = typer.Option("truncate", help="longer records: truncate | skip"),
        pack: bool = typer.Option(False, "--pack/--no-pack", help="pack several records per row (no attention across records)"),
        skip_bad: bool = typer.Option(False, "--skip-bad", help="skip (and count) invalid records instead of stopping"),
        train_parts: Optional[str] = typer.Option(None, "--train", help="which weights learn: full | ffn | attn | head | "
                                                  "embeddings, comma-separated (default: full; with another --method: none)"),
        method: str = typer.Option("full", help="full | lora | adapter | prompt"),
        virtual_tokens: int = typer.Option(20, help="--method prompt: soft-prompt length"),
        adapter_dim: int = typer.Option(16, help="--method adapter: bottleneck width"),
        rank: int = typer.Option(8, help="--method lora: rank r"),
        alpha: float = typer.Option(16.0, help="--method lora: scale α (update = α/r · B·A)"),
        lora_dropout: float = typer.Option(0.05, help="--method lora: dropout on the LoRA input"),
        targets: str = typer.Option("q,k,v,o,gate,up,down", help="--method lora: layers to adapt"),
        replay: Optional[Path] = typer.Option(None, help="pretraining token folder to mix in against forgetting"),
        replay_ratio: float = typer.Option(0.1, help="share of the loss from replayed pretraining windows"),
        pretrain_val: Optional[Path] = typer.Option(None, help="token folder whose val split measures forgetting "
                                                    "(base_val_loss; default: --replay's)"),
        *,
        train: TrainConfig,
    ) -> None:
        if task not in ("chat", "classify"):
            raise TiaoyuError(f"--task {task!r}: choose chat or classify")
        if eval_samples < 0 or max_len < 0:
            raise TiaoyuError("--eval-samples and --max-len must not be negative")
        if task == "classify":
            if method != "full":
                raise TiaoyuError(f"--task classify trains with --method full (and --train PARTS), not --method {method}")
            run_classify(ClassifyOptions(base=base, data=data, eval_data=eval_data, max_len=max_len, skip_bad=skip_bad,
                                         train_parts=train_parts, eval_before=eval_before), train, log=say)
            return
        o = ChatOptions(base=base, data=data, eval_data=eval_data, eval_samples=eval_samples,
                        eval_max_new_tokens=eval_max_new_tokens, eval_before=eval_before, max_len=max_len,
                        overflow=overflow, pack=pack, skip_bad=skip_bad, train_parts=train_parts, method=method,
                        virtual_tokens=virtual_tokens, adapter_dim=adapter_dim, rank=rank, alpha=alpha,
                        lora_dropout=lora_dropout, targets=targets, replay=replay, replay_ratio=replay_ratio,
                        pretrain_val=pretrain_val)
        run_chat(o, train, stage_name="sft", save_as="merged" if method == "lora" else "full", log=say)
