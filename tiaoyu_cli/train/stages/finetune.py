"""The runs of `tiaoyu sft` (chat or --task classify) and `tiaoyu lora`: read the options, build the
datasets and the model, say what trains, and hand it to the one run path (`engine.run.run_stage`).

    tiaoyu sft ckpt/base chat.jsonl -o ckpt/sft --eval-data chat.val.jsonl --epochs 3
    tiaoyu lora ckpt/base chat.jsonl -o adapter/ --rank 8

The objectives live in objectives/sft.py (assistant-token cross-entropy) and objectives/classify.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

from tiaoyu_cli.checkpoint import load_model, load_tokenizer, resolve_checkpoint
from tiaoyu_cli.data.chat import ChatDataset, pack_examples, read_classification
from tiaoyu_cli.data.shards import check_fingerprint, open_tokens
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.model import adapters as A
from tiaoyu_cli.model import lora as L
from tiaoyu_cli.train.engine.config import TrainConfig
from tiaoyu_cli.train.engine.outdir import publish_final_adapter
from tiaoyu_cli.train.engine.run import Plan, run_stage
from tiaoyu_cli.train.objectives.classify import ClassifyConfig, ClassifyStage, build_classifier
from tiaoyu_cli.train.objectives.sft import (SFTConfig, SFTStage, count_parameters, describe_trainable,
                                             select_trainable)

@dataclass(kw_only=True)
class Config:
    """Everything `tiaoyu sft` (chat or --task classify) and `tiaoyu lora` take besides the loop's TrainConfig:
    the inputs, and the objective's config `sft` (--task classify reads only its max_len). Its default
    replay_ratio is 0.1, the share used once --replay names pretraining tokens (without --replay it is 0)."""

    base: Path = field(metadata={"help": "checkpoint to fine-tune (run folder or step folder)"})
    data: Path = field(metadata={
        "help": "chat records JSONL ({\"messages\": […]}); {\"text\",\"label\"} with --task classify"})
    task: str = field(default="chat", metadata={"help": "chat | classify"})
    eval_data: Optional[Path] = field(default=None, metadata={
        "help": "held-out records: val loss + answer accuracy by generation"})
    eval_before: bool = field(default=True, metadata={"help": "evaluate the starting model too"})
    skip_bad: bool = field(default=False, metadata={"help": "skip (and count) invalid records instead of stopping"})
    train_parts: Optional[str] = field(default=None, metadata={
        "help": "which weights learn: full | ffn | attn | head | embeddings, comma-separated (default: full; with "
                "another --method: none)"})
    replay: Optional[Path] = field(default=None, metadata={
        "help": "pretraining token folder to mix in against forgetting"})
    pretrain_val: Optional[Path] = field(default=None, metadata={
        "help": "token folder whose val split measures forgetting (base_val_loss; default: --replay's)"})
    adapter_only: bool = field(default=False, metadata={
        "help": "save only the LoRA adapter at each checkpoint, not the merged model (`tiaoyu lora`)"})
    sft: SFTConfig = field(default_factory=partial(SFTConfig, replay_ratio=0.1))


def shards_for(path: Path, tok, what: str):
    """(train, val) token shards of `path`, checked against the tokenizer."""
    train_sh, val_sh = open_tokens(path)
    try:
        check_fingerprint(train_sh, tok)
    except TiaoyuError as e:
        raise TiaoyuError(f"{what} {path}: {e}") from None
    return train_sh, val_sh


def prepare_chat(o: Config, train: TrainConfig, stage_name: str, save_as: str) -> Plan:
    s = o.sft
    cfg = dataclasses.replace(s, train=o.train_parts or "full", replay_ratio=s.replay_ratio if o.replay else 0.0)
    cfg.validate()
    lora_cfg = None
    if s.method == "lora":
        lora_cfg = L.LoraConfig(rank=s.lora_rank, alpha=s.lora_alpha, dropout=s.lora_dropout, targets=L.parse_targets(s.lora_targets))
        lora_cfg.validate()
    base_dir = resolve_checkpoint(o.base)
    tok = load_tokenizer(base_dir)
    model, base_dir = load_model(base_dir)
    mcfg = model.config
    if mcfg.num_labels:
        raise TiaoyuError(f"{base_dir} is a classifier (num_labels {mcfg.num_labels}); chat fine-tuning needs a "
                          f"language-model checkpoint")
    if tok.vocab_size > mcfg.vocab_size:
        raise TiaoyuError(f"{base_dir}: tokenizer has {tok.vocab_size} tokens, the model only {mcfg.vocab_size}")
    max_len = s.max_len or mcfg.max_seq_len
    if max_len > mcfg.max_seq_len:
        raise TiaoyuError(f"--max-len {max_len} exceeds the model's max_seq_len {mcfg.max_seq_len}")
    cfg.max_len = max_len

    data = ChatDataset(o.data, tok, max_len, overflow=s.overflow, skip_bad=o.skip_bad)
    cfg.tool_schemas = s.tool_schemas if s.tool_schemas is not None else data.tool_schemas()
    rows = pack_examples(data.examples, max_len, seed=train.seed) if s.pack else data.examples
    eval_ds, eval_records = None, []
    if o.eval_data is not None:
        eval_ds = ChatDataset(o.eval_data, tok, max_len, overflow=s.overflow, skip_bad=o.skip_bad)
        eval_records = [{"messages": m, **({"answer": a} if a is not None else {})}
                        for m, a in zip(eval_ds.messages, eval_ds.answers) if m[-1]["role"] == "assistant"]
    replay = base_val = None
    if o.replay is not None:
        replay, base_val = shards_for(o.replay, tok, "--replay")
    if o.pretrain_val is not None:
        _, base_val = shards_for(o.pretrain_val, tok, "--pretrain-val")
        if base_val is None:
            raise TiaoyuError(f"--pretrain-val {o.pretrain_val}: the token folder has no val/ split")

    # what trains
    prompt = None
    if s.method == "full":
        select_trainable(model, o.train_parts or "full")
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if s.method == "lora":
            L.apply_lora(model, lora_cfg)
        elif s.method == "adapter":
            A.apply_bottleneck(model, s.adapter_dim)
        else:
            prompt = A.SoftPrompt(s.virtual_tokens, mcfg.dim, init_from=model.model.embed_tokens.weight, seed=train.seed)
        if o.train_parts:  # extra base parts to train alongside the added weights
            keep = {n for n, p in model.named_parameters() if p.requires_grad}
            select_trainable(model, o.train_parts)
            for n, p in model.named_parameters():
                if n in keep:
                    p.requires_grad_(True)
    trainable, total = count_parameters(model, *([prompt] if prompt is not None else []))

    stage = SFTStage(rows, cfg, train.batch_size, seed=train.seed, eval_data=eval_ds, eval_records=eval_records,
                     replay=replay, base_val=base_val, prompt=prompt, save_as=save_as, lora_cfg=lora_cfg,
                     base_info=L.base_info(mcfg, tok, base_dir), name=stage_name,
                     info={"trainable_params": trainable, "total_params": total,
                           "trainable_share": trainable / max(1, total), "data": str(o.data),
                           "eval_data": str(o.eval_data) if o.eval_data else None,
                           "replay": str(o.replay) if o.replay else None, "data_stats": vars(data.stats)})
    what = {"full": f"--train {o.train_parts or 'full'}", "lora": f"LoRA r={s.lora_rank} α={s.lora_alpha} on {s.lora_targets}",
            "adapter": f"bottleneck adapters (width {s.adapter_dim})",
            "prompt": f"soft prompt of {s.virtual_tokens} vectors"}[s.method]
    lines = [f"{stage_name}: {base_dir} → {train.out}; {what}; {describe_trainable(trainable, total)}",
             f"data: {data.stats.summary()}" + (f"; packed into {len(rows):,} rows of ≤ {max_len} tokens" if s.pack else "")]
    if eval_ds is not None:
        lines.append(f"eval: {eval_ds.stats.summary()}; answer accuracy on {min(len(eval_records), s.eval_samples)} questions")
    if replay is not None:
        lines.append(f"replay: {replay.num_tokens:,} pretraining tokens, ratio {cfg.replay_ratio}")
    return Plan(model, stage, tok, parent=str(base_dir), lines=lines,
                eval_before=o.eval_before and (eval_ds is not None or base_val is not None))


def prepare_classify(o: Config, train: TrainConfig) -> Plan:
    """--task classify reads base, data, eval_data, skip_bad, train_parts, eval_before and sft.max_len."""
    pairs, st = read_classification(o.data, skip_bad=o.skip_bad)
    labels = sorted(st.counts)
    if len(labels) < 2:
        raise TiaoyuError(f"{o.data}: classification needs at least two labels, found {labels}")
    eval_pairs = read_classification(o.eval_data, skip_bad=o.skip_bad)[0] if o.eval_data else None
    base_dir = resolve_checkpoint(o.base)
    tok = load_tokenizer(base_dir)
    model, base_dir = build_classifier(base_dir, labels)
    select_trainable(model, o.train_parts or "full")
    trainable, total = count_parameters(model)
    cfg = ClassifyConfig(max_len=o.sft.max_len or model.config.max_seq_len)
    if cfg.max_len > model.config.max_seq_len:
        raise TiaoyuError(f"--max-len {cfg.max_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    stage = ClassifyStage(pairs, labels, tok, cfg, train.batch_size, seed=train.seed, eval_data=eval_pairs)
    counts = ", ".join(f"{label} {st.counts[label]:,}" for label in labels)
    line = (f"classify: {base_dir} → {train.out}; {len(labels)} labels ({counts}); {describe_trainable(trainable, total)}"
            + (f"; {st.bad} bad records skipped" if st.bad else "")
            + (f"; {stage.truncated} texts truncated to {cfg.max_len} tokens" if stage.truncated else ""))
    return Plan(model, stage, tok, parent=str(base_dir), lines=[line], eval_before=bool(eval_pairs) and o.eval_before)


def run(cfg: Config, train: TrainConfig, log=print) -> dict:
    """`tiaoyu sft` (chat, or --task classify: a classification head on the base, cross-entropy over the labels)
    and `tiaoyu lora` (adapter_only). Returns the final eval (with "before")."""
    if cfg.task not in ("chat", "classify"):
        raise TiaoyuError(f"--task {cfg.task!r}: choose chat or classify")
    if cfg.sft.eval_samples < 0 or cfg.sft.max_len < 0:
        raise TiaoyuError("--eval-samples and --max-len must not be negative")
    if cfg.task == "classify":
        if cfg.sft.method != "full":
            raise TiaoyuError(f"--task classify trains with --method full (and --train PARTS), not --method {cfg.sft.method}")
        return run_stage("classify", train, lambda: prepare_classify(cfg, train), default_epochs=1.0, log=log)
    if cfg.adapter_only and cfg.sft.method != "lora":
        raise TiaoyuError(f"only a LoRA run saves an adapter alone (--method lora, not {cfg.sft.method})")
    name, save_as = ("lora", "adapter") if cfg.adapter_only else ("sft", "merged" if cfg.sft.method == "lora" else "full")
    res = run_stage(name, train, lambda: prepare_chat(cfg, train, name, save_as), default_epochs=1.0, log=log)
    if save_as == "adapter":
        publish_final_adapter(Path(train.out), log)
    return res
