"""`tiaoyu lora`: train a LoRA adapter (PEFT layout) on chat records, and merge adapters into checkpoints.

    tiaoyu lora BASE DATA -o adapter/ [--rank 8 --alpha 16 --targets q,k,v,o,gate,up,down]   (= `lora train`)
    tiaoyu lora merge BASE ADAPTER -o ckpt/merged

The training run is `tiaoyu sft --method lora` (train/stages/finetune.py `run`, adapter_only) except for what it saves:
each step folder holds only the adapter (adapter_model.safetensors, adapter_config.json,
tiaoyu_base.json) plus the tokenizer, trainer.json and train_state; the final adapter is also copied
to the top of -o, so `peft.PeftModel.from_pretrained(model, "adapter/")` and
`tiaoyu chat BASE --adapter adapter/` work on the folder itself.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer

from tiaoyu_cli.checkpoint import load_model, load_tokenizer, resolve_checkpoint, save_model_files
from tiaoyu_cli.cli.common import CHAT_HELP, CHAT_RENAME, CHAT_SKIP, config_options, sub_app, train_options
from tiaoyu_cli.console import say
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.io import atomic_dir
from tiaoyu_cli.model.lora import load_adapter, merge_lora, resolve_adapter_dir
from tiaoyu_cli.train.engine.config import TrainConfig
from tiaoyu_cli.train.stages import finetune

EXAMPLES = """
Examples:

  tiaoyu lora ckpt/base chat.train.jsonl -o adapter/ --rank 8 --alpha 16 --eval-data chat.val.jsonl --epochs 3

  tiaoyu lora ckpt/base chat.jsonl -o adapter-qv/ --targets q,v --rank 4 --max-steps 300

  tiaoyu lora merge ckpt/base adapter/ -o ckpt/merged

  tiaoyu chat ckpt/base --adapter adapter/ --prompt "What is 12 + 7?"
"""


LORA_HELP = {
    "base": "base checkpoint (run folder or step folder); stays frozen",
    "data": "chat records JSONL ({\"messages\": […]})",
    **{k: CHAT_HELP[k].removeprefix("--method lora: ") for k in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")},
}

lora_app = sub_app("lora", "LoRA: train an adapter on chat records (`tiaoyu lora BASE DATA -o adapter/`, same as "
                           "`lora train`), or fold one into a checkpoint (`tiaoyu lora merge BASE ADAPTER -o OUT`).",
                   default="train", epilog=EXAMPLES)


def register(app: typer.Typer) -> None:
    app.add_typer(lora_app, name="lora")


@lora_app.command("train", epilog=EXAMPLES, help="Train a LoRA adapter on chat records (the default subcommand).")
@train_options(out="adapter", lr=2e-3, batch_size=16, warmup_steps=20, weight_decay=0.0, log_every=10)
@config_options(finetune.Config, {**CHAT_HELP, **LORA_HELP}, rename=CHAT_RENAME, args=("base", "data"),
                skip=(*CHAT_SKIP, "task", "train_parts", "method", "virtual_tokens", "adapter_dim"))
def train_cmd(*, cfg: finetune.Config, train: TrainConfig) -> None:
    cfg = dataclasses.replace(cfg, adapter_only=True, sft=dataclasses.replace(cfg.sft, method="lora"))
    finetune.run(cfg, train, log=say)


MERGE_EXAMPLES = """
Examples:

  tiaoyu lora merge ckpt/base adapter/ -o ckpt/merged
  tiaoyu lora merge ckpt/sft adapter/ -o ckpt/sft-merged --force    # adapter trained on other weights
"""


@lora_app.command("merge", epilog=MERGE_EXAMPLES, help="Fold a LoRA adapter into its base: W ← W + (α/r)·B·A, written as a full checkpoint.")
def merge_cmd(
    base: Path = typer.Argument(..., help="the base checkpoint the adapter was trained on"),
    adapter: Path = typer.Argument(..., help="adapter folder (with adapter_config.json), or a lora run folder"),
    out: Path = typer.Option(..., "-o", "--out", help="output checkpoint folder (must not exist)"),
    force: bool = typer.Option(False, "--force", help="merge even if the adapter was trained on other weights "
                               "of the same architecture"),
) -> None:
    """Write OUT/ with config.json, model.safetensors, tokenizer files, generation_config.json, trainer.json."""


    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TiaoyuError(f"-o {out}: already exists and is not an empty folder; choose another -o")
    base_dir = resolve_checkpoint(base)
    tok = load_tokenizer(base_dir)
    model, base_dir = load_model(base_dir)
    adir = resolve_adapter_dir(adapter)
    cfg, warnings = load_adapter(model, adir, tokenizer=tok, base_dir=base_dir)
    if warnings and not force:
        raise TiaoyuError(warnings[0] + "; pass --force to merge anyway")
    for w in warnings:
        say(f"warning: {w}")
    merge_lora(model)
    with atomic_dir(out) as tmp:
        save_model_files(tmp, model, tok)
        info = {"stage": "lora", "step": None, "parent": str(base_dir), "adapter": str(adir), "merged": True,
                "lora": {"rank": cfg.rank, "alpha": cfg.alpha, "targets": cfg.targets}}
        (tmp / "trainer.json").write_text(json.dumps(info, indent=2, ensure_ascii=False), encoding="utf-8")
    say(f"merged {adir} (r={cfg.rank}, α={cfg.alpha}, {','.join(cfg.targets)}) into {base_dir} → {out}")
