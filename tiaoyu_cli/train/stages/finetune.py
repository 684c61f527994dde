"""The runs of `tiaoyu sft` (chat or --task classify) and `tiaoyu lora`: read the options, build the
datasets and the model, say what trains, and hand it to the one run path (`engine.run.run_stage`).

    tiaoyu sft ckpt/base chat.jsonl -o ckpt/sft --eval-data chat.val.jsonl --epochs 3
    tiaoyu lora ckpt/base chat.jsonl -o adapter/ --rank 8

The objectives live in objectives/sft.py (assistant-token cross-entropy) and objectives/classify.py.
"""

from __future__ import annotations

from dataclasses import dataclass
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

_LORA = L.LoraConfig()


@dataclass
class ChatOptions:
    """Options of a chat fine-tuning run (sft or lora) besides the loop's TrainConfig."""

    base: Path
    data: Path
    eval_data: Optional[Path] = None
    eval_samples: int = 200
    eval_max_new_tokens: int = 32
    eval_tools: str = ""
    tool_schemas: Optional[bool] = None
    eval_before: bool = True
    max_len: int = 0
    overflow: str = "truncate"
    pack: bool = False
    skip_bad: bool = False
    train_parts: Optional[str] = None
    method: str = "full"
    virtual_tokens: int = 20
    adapter_dim: int = 16
    rank: int = _LORA.rank
    alpha: float = _LORA.alpha
    lora_dropout: float = _LORA.dropout
    targets: str = ",".join(_LORA.targets)
    replay: Optional[Path] = None
    replay_ratio: float = 0.1
    pretrain_val: Optional[Path] = None


def shards_for(path: Path, tok, what: str):
    """(train, val) token shards of `path`, checked against the tokenizer."""
    train_sh, val_sh = open_tokens(path)
    try:
        check_fingerprint(train_sh, tok)
    except TiaoyuError as e:
        raise TiaoyuError(f"{what} {path}: {e}") from None
    return train_sh, val_sh


def prepare_chat(o: ChatOptions, train: TrainConfig, stage_name: str, save_as: str) -> Plan:
    cfg = SFTConfig(max_len=o.max_len, overflow=o.overflow, pack=o.pack, train=o.train_parts or "full",
                    method=o.method, virtual_tokens=o.virtual_tokens, adapter_dim=o.adapter_dim, lora_rank=o.rank,
                    lora_alpha=o.alpha, lora_dropout=o.lora_dropout, lora_targets=o.targets,
                    replay_ratio=o.replay_ratio if o.replay else 0.0, eval_samples=o.eval_samples,
                    eval_max_new_tokens=o.eval_max_new_tokens, eval_tools=o.eval_tools)
    cfg.validate()
    lora_cfg = None
    if o.method == "lora":
        lora_cfg = L.LoraConfig(rank=o.rank, alpha=o.alpha, dropout=o.lora_dropout, targets=L.parse_targets(o.targets))
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
    max_len = o.max_len or mcfg.max_seq_len
    if max_len > mcfg.max_seq_len:
        raise TiaoyuError(f"--max-len {max_len} exceeds the model's max_seq_len {mcfg.max_seq_len}")
    cfg.max_len = max_len

    data = ChatDataset(o.data, tok, max_len, overflow=o.overflow, skip_bad=o.skip_bad)
    cfg.tool_schemas = o.tool_schemas if o.tool_schemas is not None else data.tool_schemas()
    rows = pack_examples(data.examples, max_len, seed=train.seed) if o.pack else data.examples
    eval_ds, eval_records = None, []
    if o.eval_data is not None:
        eval_ds = ChatDataset(o.eval_data, tok, max_len, overflow=o.overflow, skip_bad=o.skip_bad)
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
    trainable, total = count_parameters(model, *([prompt] if prompt is not None else []))

    stage = SFTStage(rows, cfg, train.batch_size, seed=train.seed, eval_data=eval_ds, eval_records=eval_records,
                     replay=replay, base_val=base_val, prompt=prompt, save_as=save_as, lora_cfg=lora_cfg,
                     base_info=L.base_info(mcfg, tok, base_dir), name=stage_name,
                     info={"trainable_params": trainable, "total_params": total,
                           "trainable_share": trainable / max(1, total), "data": str(o.data),
                           "eval_data": str(o.eval_data) if o.eval_data else None,
                           "replay": str(o.replay) if o.replay else None, "data_stats": vars(data.stats)})
    what = {"full": f"--train {o.train_parts or 'full'}", "lora": f"LoRA r={o.rank} α={o.alpha} on {o.targets}",
            "adapter": f"bottleneck adapters (width {o.adapter_dim})",
            "prompt": f"soft prompt of {o.virtual_tokens} vectors"}[o.method]
    lines = [f"{stage_name}: {base_dir} → {train.out}; {what}; {describe_trainable(trainable, total)}",
             f"data: {data.stats.summary()}" + (f"; packed into {len(rows):,} rows of ≤ {max_len} tokens" if o.pack else "")]
    if eval_ds is not None:
        lines.append(f"eval: {eval_ds.stats.summary()}; answer accuracy on {min(len(eval_records), o.eval_samples)} questions")
    if replay is not None:
        lines.append(f"replay: {replay.num_tokens:,} pretraining tokens, ratio {cfg.replay_ratio}")
    return Plan(model, stage, tok, parent=str(base_dir), lines=lines,
                eval_before=o.eval_before and (eval_ds is not None or base_val is not None))


def run_chat(o: ChatOptions, train: TrainConfig, stage_name: str = "sft", save_as: str = "full", log=print) -> dict:
    """Chat fine-tuning (sft, or lora with save_as="adapter"). Returns the final eval (with "before")."""
    res = run_stage(stage_name, train, lambda: prepare_chat(o, train, stage_name, save_as),
                    default_epochs=1.0, log=log)
    if save_as == "adapter":
        publish_final_adapter(Path(train.out), log)
    return res


def prepare_classify(o: ChatOptions, train: TrainConfig) -> Plan:
    """--task classify reads base, data, eval_data, max_len, skip_bad, train_parts and eval_before of the options."""
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
    cfg = ClassifyConfig(max_len=o.max_len or model.config.max_seq_len)
    if cfg.max_len > model.config.max_seq_len:
        raise TiaoyuError(f"--max-len {cfg.max_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    stage = ClassifyStage(pairs, labels, tok, cfg, train.batch_size, seed=train.seed, eval_data=eval_pairs)
    counts = ", ".join(f"{label} {st.counts[label]:,}" for label in labels)
    line = (f"classify: {base_dir} → {train.out}; {len(labels)} labels ({counts}); {describe_trainable(trainable, total)}"
            + (f"; {st.bad} bad records skipped" if st.bad else "")
            + (f"; {stage.truncated} texts truncated to {cfg.max_len} tokens" if stage.truncated else ""))
    return Plan(model, stage, tok, parent=str(base_dir), lines=[line], eval_before=bool(eval_pairs) and o.eval_before)


def run_classify(o: ChatOptions, train: TrainConfig, log=print) -> dict:
    """`tiaoyu sft --task classify`: a classification head on the base, cross-entropy over the labels."""
    return run_stage("classify", train, lambda: prepare_classify(o, train), default_epochs=1.0, log=log)
