"""`tiaoyu sft`: supervised fine-tuning on chat records (or classification with --task classify).

The work happens in tiaoyu_cli.train.sft (chat) and tiaoyu_cli.train.classify; this module reads
the options, builds datasets and the model, prints what will train, and runs the Trainer.
`tiaoyu lora` (cli/lora.py) uses `run_chat` with method "lora" and an adapter as output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from tiaoyu_cli.cli.common import train_options
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.train.config import TrainConfig

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


def say(msg: str) -> None:
    from tiaoyu_cli.cli.console import console

    console.print(msg, markup=False, highlight=False, soft_wrap=True)


@dataclass
class ChatOptions:
    """Options of a chat fine-tuning run (sft or lora), as the CLI received them."""

    base: Path
    data: Path
    eval_data: Optional[Path] = None
    eval_samples: int = 200
    eval_max_new_tokens: int = 32
    eval_before: bool = True
    max_len: int = 0
    overflow: str = "truncate"
    pack: bool = False
    skip_bad: bool = False
    train_parts: Optional[str] = None
    method: str = "full"
    virtual_tokens: int = 20
    adapter_dim: int = 16
    rank: int = 8
    alpha: float = 16.0
    lora_dropout: float = 0.05
    targets: str = "q,k,v,o,gate,up,down"
    replay: Optional[Path] = None
    replay_ratio: float = 0.1
    pretrain_val: Optional[Path] = None
    nproc: int = 0


def default_budget(train: TrainConfig) -> None:
    if not (train.max_steps or train.max_tokens or train.max_time or train.epochs):
        train.epochs = 1.0
        say("no budget given (--max-steps/--max-tokens/--max-time/--epochs): training 1 epoch")


def maybe_relaunch(nproc: int, train: TrainConfig) -> None:
    """--nproc N: run the same command as N processes (DDP) — after the inputs were checked once."""
    if nproc < 0:
        raise TiaoyuError("--nproc must not be negative")
    if nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        from tiaoyu_cli.cli.pretrain import relaunch_with_torchrun
        from tiaoyu_cli.train.trainer import check_output, check_writable

        default_budget(train)
        train.validate()
        check_output(train.out, train.resume)
        check_writable(train.out)
        relaunch_with_torchrun(nproc)


def _shards_for(path: Path, tok, what: str):
    from tiaoyu_cli.data.shards import check_fingerprint, open_tokens

    train_sh, val_sh = open_tokens(path)
    try:
        check_fingerprint(train_sh, tok)
    except TiaoyuError as e:
        raise TiaoyuError(f"{what} {path}: {e}") from None
    return train_sh, val_sh


def run_chat(o: ChatOptions, train: TrainConfig, stage_name: str = "sft", save_as: str = "full") -> dict:
    """Build everything for a chat fine-tuning run and train. Returns the final eval (with "before")."""
    import torch

    from tiaoyu_cli.data.chat import ChatDataset, pack_examples
    from tiaoyu_cli.model import adapters as A
    from tiaoyu_cli.model import lora as L
    from tiaoyu_cli.train import distributed as D
    from tiaoyu_cli.checkpoint import load_model, load_tokenizer, resolve_checkpoint
    from tiaoyu_cli.device import resolve_device, resolve_dtype
    from tiaoyu_cli.train.sft import (SFTConfig, SFTStage, count_parameters, describe_trainable, select_trainable)
    from tiaoyu_cli.train.trainer import Trainer, TrainingInterrupted, check_output

    default_budget(train)
    train.validate()
    cfg = SFTConfig(max_len=o.max_len, overflow=o.overflow, pack=o.pack, train=o.train_parts or "full",
                    method=o.method, virtual_tokens=o.virtual_tokens, adapter_dim=o.adapter_dim, lora_rank=o.rank,
                    lora_alpha=o.alpha, lora_dropout=o.lora_dropout, lora_targets=o.targets,
                    replay_ratio=o.replay_ratio if o.replay else 0.0, eval_samples=o.eval_samples,
                    eval_max_new_tokens=o.eval_max_new_tokens)
    cfg.validate()
    lora_cfg = None
    if o.method == "lora":
        lora_cfg = L.LoraConfig(rank=o.rank, alpha=o.alpha, dropout=o.lora_dropout, targets=L.parse_targets(o.targets))
        lora_cfg.validate()
    check_output(train.out, train.resume)
    device = resolve_device(train.device, int(os.environ.get("LOCAL_RANK", "0")))
    resolve_dtype(train.dtype, device)
    base_dir = resolve_checkpoint(o.base)
    tok = load_tokenizer(base_dir)
    torch.manual_seed(train.seed)  # before anything random is built (LoRA A, adapters, soft prompt)
    model, base_dir = load_model(base_dir)
    mcfg = model.config
    if mcfg.num_labels:
        raise TiaoyuError(f"{base_dir} is a classifier (num_labels {mcfg.num_labels}); chat fine-tuning needs a "
                          f"language-model checkpoint")
    if tok.vocab_size > mcfg.vocab_size:
        raise TiaoyuError(f"{base_dir}: tokenizer has {tok.vocab_size} tokens, the model only {mcfg.vocab_size}")
    max_len = o.max_len or mcfg.max_seq_len
    if max_len > mcfg.max_seq_len:
        raise TiaoyuError(f"--max-len {max_len} exceeds the model's max_seq_len {mcfg.max_seq_len}")
    cfg.max_len = max_len

    data = ChatDataset(o.data, tok, max_len, overflow=o.overflow, skip_bad=o.skip_bad)
    rows = pack_examples(data.examples, max_len, seed=train.seed) if o.pack else data.examples
    eval_ds, eval_records = None, []
    if o.eval_data is not None:
        eval_ds = ChatDataset(o.eval_data, tok, max_len, overflow=o.overflow, skip_bad=o.skip_bad)
        eval_records = [{"messages": m} for m in eval_ds.messages if m[-1]["role"] == "assistant"]
    replay = base_val = None
    if o.replay is not None:
        replay, base_val = _shards_for(o.replay, tok, "--replay")
    if o.pretrain_val is not None:
        _, base_val = _shards_for(o.pretrain_val, tok, "--pretrain-val")
        if base_val is None:
            raise TiaoyuError(f"--pretrain-val {o.pretrain_val}: the token folder has no val/ split")

    # what trains
    prompt = None
    if o.method == "full":
        select_trainable(model, o.train_parts or "full")
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if o.method == "lora":
            L.apply_lora(model, lora_cfg)
        elif o.method == "adapter":
            A.apply_bottleneck(model, o.adapter_dim)
        else:
            prompt = A.SoftPrompt(o.virtual_tokens, mcfg.dim, init_from=model.model.embed_tokens.weight, seed=train.seed)
        if o.train_parts:  # extra base parts to train alongside the added weights
            keep = {n for n, p in model.named_parameters() if p.requires_grad}
            select_trainable(model, o.train_parts)
            for n, p in model.named_parameters():
                if n in keep:
                    p.requires_grad_(True)
    trainable, total = count_parameters(model, *( [prompt] if prompt is not None else []))

    info = L.base_info(mcfg, tok, base_dir)
    stage = SFTStage(rows, cfg, train.batch_size, seed=train.seed, eval_data=eval_ds, eval_records=eval_records,
                     replay=replay, base_val=base_val, prompt=prompt, save_as=save_as, lora_cfg=lora_cfg,
                     base_info=info, name=stage_name,
                     info={"trainable_params": trainable, "total_params": total,
                           "trainable_share": trainable / max(1, total), "data": str(o.data),
                           "eval_data": str(o.eval_data) if o.eval_data else None,
                           "replay": str(o.replay) if o.replay else None, "data_stats": vars(data.stats)})
    trainer = None
    try:
        trainer = Trainer(model, stage, train, tokenizer=tok, parent=str(base_dir), log=say)
        main = trainer.dist.is_main
        if main:
            what = {"full": f"--train {o.train_parts or 'full'}", "lora": f"LoRA r={o.rank} α={o.alpha} on {o.targets}",
                    "adapter": f"bottleneck adapters (width {o.adapter_dim})",
                    "prompt": f"soft prompt of {o.virtual_tokens} vectors"}[o.method]
            say(f"{stage_name}: {base_dir} → {train.out}; {what}; {describe_trainable(trainable, total)}")
            say(f"data: {data.stats.summary()}" + (f"; packed into {len(rows):,} rows of ≤ {max_len} tokens"
                                                    if o.pack else ""))
            if eval_ds is not None:
                say(f"eval: {eval_ds.stats.summary()}; answer accuracy on {min(len(eval_records), o.eval_samples)} questions")
            if replay is not None:
                say(f"replay: {replay.num_tokens:,} pretraining tokens, ratio {cfg.replay_ratio}")
        before: dict = {}
        if main and not train.resume and o.eval_before and (eval_ds is not None or base_val is not None):
            before = trainer.evaluate_start()
            stage.extra_info["eval_before"] = before
            say("before: " + "  ".join(f"{k} {v:.4g}" for k, v in before.items()))
        res = trainer.fit()
        if main:
            after = {k: v for k, v in res.items() if k not in ("step", "tokens")}
            parts = []
            for k, v in after.items():
                parts.append(f"{k} {before[k]:.4g} → {v:.4g}" if k in before else f"{k} {v:.4g}")
            say(f"done: step {res['step']}" + (": " + ", ".join(parts) if parts else "") + f" → {train.out}/latest")
        return {**res, "before": before}
    except KeyboardInterrupt:
        raise TrainingInterrupted("interrupted before training started; nothing was saved") from None
    finally:
        if trainer is not None:
            D.cleanup(trainer.dist)


def run_classify(base: Path, data: Path, eval_data: Optional[Path], max_len: int, skip_bad: bool,
                 train_parts: Optional[str], method: str, train: TrainConfig, eval_before: bool = True) -> dict:
    import torch

    from tiaoyu_cli.data.chat import read_classification
    from tiaoyu_cli.train import distributed as D
    from tiaoyu_cli.checkpoint import load_tokenizer, resolve_checkpoint
    from tiaoyu_cli.train.classify import ClassifyConfig, ClassifyStage, build_classifier
    from tiaoyu_cli.device import resolve_device, resolve_dtype
    from tiaoyu_cli.train.sft import count_parameters, describe_trainable, select_trainable
    from tiaoyu_cli.train.trainer import Trainer, TrainingInterrupted, check_output

    if method != "full":
        raise TiaoyuError(f"--task classify trains with --method full (and --train PARTS), not --method {method}")
    default_budget(train)
    train.validate()
    check_output(train.out, train.resume)
    device = resolve_device(train.device, int(os.environ.get("LOCAL_RANK", "0")))
    resolve_dtype(train.dtype, device)
    pairs, st = read_classification(data, skip_bad=skip_bad)
    labels = sorted(st.counts)
    if len(labels) < 2:
        raise TiaoyuError(f"{data}: classification needs at least two labels, found {labels}")
    eval_pairs = read_classification(eval_data, skip_bad=skip_bad)[0] if eval_data else None
    base_dir = resolve_checkpoint(base)
    tok = load_tokenizer(base_dir)
    torch.manual_seed(train.seed)
    model, base_dir = build_classifier(base_dir, labels)
    select_trainable(model, train_parts or "full")
    trainable, total = count_parameters(model)
    cfg = ClassifyConfig(max_len=max_len or model.config.max_seq_len)
    if cfg.max_len > model.config.max_seq_len:
        raise TiaoyuError(f"--max-len {cfg.max_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    stage = ClassifyStage(pairs, labels, tok, cfg, train.batch_size, seed=train.seed, eval_data=eval_pairs)
    trainer = None
    try:
        trainer = Trainer(model, stage, train, tokenizer=tok, parent=str(base_dir), log=say)
        main = trainer.dist.is_main
        if main:
            counts = ", ".join(f"{l} {st.counts[l]:,}" for l in labels)
            say(f"classify: {base_dir} → {train.out}; {len(labels)} labels ({counts}); "
                f"{describe_trainable(trainable, total)}"
                + (f"; {st.bad} bad records skipped" if st.bad else "")
                + (f"; {stage.truncated} texts truncated to {cfg.max_len} tokens" if stage.truncated else ""))
        before: dict = {}
        if main and eval_pairs and eval_before and not train.resume:
            before = trainer.evaluate_start()
            say("before: " + "  ".join(f"{k} {v:.4g}" for k, v in before.items()))
        res = trainer.fit()
        if main:
            parts = [f"{k} {before[k]:.4g} → {v:.4g}" if k in before else f"{k} {v:.4g}"
                     for k, v in res.items() if k not in ("step", "tokens")]
            say(f"done: step {res['step']}" + (": " + ", ".join(parts) if parts else "") + f" → {train.out}/latest")
        return {**res, "before": before}
    except KeyboardInterrupt:
        raise TrainingInterrupted("interrupted before training started; nothing was saved") from None
    finally:
        if trainer is not None:
            D.cleanup(trainer.dist)


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
        nproc: int = typer.Option(0, help="launch N processes with torchrun on this machine (DDP)"),
        *,
        train: TrainConfig,
    ) -> None:
        if task not in ("chat", "classify"):
            raise TiaoyuError(f"--task {task!r}: choose chat or classify")
        if eval_samples < 0 or max_len < 0:
            raise TiaoyuError("--eval-samples and --max-len must not be negative")
        if task == "classify":
            maybe_relaunch(nproc, train)
            run_classify(base, data, eval_data, max_len, skip_bad, train_parts, method, train, eval_before)
            return
        o = ChatOptions(base=base, data=data, eval_data=eval_data, eval_samples=eval_samples,
                        eval_max_new_tokens=eval_max_new_tokens, eval_before=eval_before, max_len=max_len,
                        overflow=overflow, pack=pack, skip_bad=skip_bad, train_parts=train_parts, method=method,
                        virtual_tokens=virtual_tokens, adapter_dim=adapter_dim, rank=rank, alpha=alpha,
                        lora_dropout=lora_dropout, targets=targets, replay=replay, replay_ratio=replay_ratio,
                        pretrain_val=pretrain_val, nproc=nproc)
        maybe_relaunch(nproc, train)
        run_chat(o, train, stage_name="sft", save_as="merged" if method == "lora" else "full")


def classify_cli(ckpt: Path, text: Optional[str], device: str, batch_size: int, adapter: Optional[Path] = None) -> None:
    """`tiaoyu chat CKPT --classify`: one label for --prompt TEXT (stdout), or for every {"text"} record of
    JSONL on stdin (the record + "label" + "probs"; a record's own "label" is kept as "input_label", and the
    accuracy against those is reported on stderr)."""
    import sys

    from tiaoyu_cli.data.jsonl import dumps
    from tiaoyu_cli.infer.session import read_prompt_records
    from tiaoyu_cli.checkpoint import load_model, load_tokenizer, resolve_checkpoint
    from tiaoyu_cli.train.classify import classify_texts
    from tiaoyu_cli.device import resolve_device
    from tiaoyu_cli.errors import DataError

    if adapter is not None:
        raise TiaoyuError("--adapter does not combine with --classify")
    if batch_size < 1:
        raise TiaoyuError(f"--batch-size must be >= 1, got {batch_size}")
    path = resolve_checkpoint(ckpt)
    model, path = load_model(path, device=resolve_device(device))
    if not model.config.num_labels:
        raise TiaoyuError(f"{path} has no classification head: train one with `tiaoyu sft BASE DATA --task classify`")
    tok = load_tokenizer(path)
    model.eval()
    if text is not None:
        res = classify_texts(model, tok, [text])[0]
        say("  ".join(f"{k} {v:.3f}" for k, v in res["probs"].items()))
        sys.stdout.write(res["label"] + "\n")
        return
    if sys.stdin.isatty():
        raise TiaoyuError("--classify: give --prompt TEXT, or JSONL records {\"text\": …} on stdin")
    records = read_prompt_records(sys.stdin.buffer, "<stdin>")
    texts = []
    for line, rec in records:
        t = rec.get("text")
        if not isinstance(t, str) or not t.strip():
            raise DataError("expected a non-empty string", "<stdin>", line, "text")
        texts.append(t)
    results = classify_texts(model, tok, texts, batch_size=batch_size)
    out = sys.stdout.buffer
    right = labelled = 0
    for (line, rec), res in zip(records, results):
        rec = dict(rec)
        if "label" in rec:
            labelled += 1
            right += str(rec["label"]).strip() == res["label"]
            rec["input_label"] = rec["label"]
        rec["label"], rec["probs"] = res["label"], res["probs"]
        out.write(dumps(rec))
    out.flush()
    say(f"classify: {len(records)} record(s) labelled by {path}"
        + (f"; accuracy {right / labelled:.3f} on the {labelled} that carried a label" if labelled else ""))
