"""`tiaoyu pretrain`: next-token prediction on token shards.

    tiaoyu pretrain tokens/ -o ckpt/base --preset tiny --max-steps 2000

Open the shards, build a new model of a preset size on the shards' tokenizer (or continue from --init,
or resume the run's own model), check that they fit together, and hand a `PretrainStage`
(objectives/pretrain.py) to the one run path (`engine.run.run_stage`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import List, Optional

from tiaoyu_cli.checkpoint import load_config, load_model, load_tokenizer, load_trainer_info, resolve_checkpoint
from tiaoyu_cli.data.shards import check_fingerprint, open_tokens
from tiaoyu_cli.device import pin_threads
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.model import Transformer
from tiaoyu_cli.model import preset as make_preset
from tiaoyu_cli.model.config import parse_overrides
from tiaoyu_cli.tokenizer import model_token_ids, open_tokenizer
from tiaoyu_cli.train.engine.config import TrainConfig
from tiaoyu_cli.train.engine.run import Plan, run_stage
from tiaoyu_cli.train.objectives.pretrain import PretrainConfig, PretrainStage


@dataclass(kw_only=True)
class Config:
    """Everything `tiaoyu pretrain` takes besides the loop's TrainConfig: what it trains on and from, and the
    objective's own config (its seq_len 0 here: the model's max_seq_len, at most 2048 for an open model)."""

    tokens: Path = field(metadata={"help": "token folder from `tiaoyu tokenize encode` (train/ and val/ inside)"})
    preset: str = field(default="tiny", metadata={"help": "model preset: tiny | small | base | moe-small | moe-tiny"})
    model: Optional[List[str]] = field(default=None, metadata={
        "help": "override a model field, KEY=VALUE (repeatable), e.g. dim=256, n_layers=6, position=learned, "
                "tie_embeddings=false"})
    init: Optional[Path] = field(default=None, metadata={
        "help": "start from this checkpoint or Hugging Face model folder (continued pretraining)"})
    tokenizer: Optional[Path] = field(default=None, metadata={
        "help": "tokenizer folder, or an open model's folder, for a new model (default: the one recorded with the "
                "shards)"})
    threads: int = field(default=0, metadata={
        "help": "CPU threads per process for torch (0 = chosen for the model size and the machine's load)"})
    pretrain: PretrainConfig = field(default_factory=partial(PretrainConfig, seq_len=0))


# an open model's context (32k, 128k tokens) is far more than a window of continued pretraining needs by default
OPEN_DEFAULT_SEQ_LEN = 2048


def find_tokenizer(tokens: Path, given: str | None):
    """The tokenizer that made the shards: --tokenizer, else the path meta.json records, else one beside them
    (tiaoyu's own, or an open model's tokenizer.json folder)."""
    if given is not None:
        return open_tokenizer(given)
    for meta_path in (tokens / "meta.json", tokens.parent / "meta.json"):
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            for key in ("tokenizer_path", "tokenizer", "tokenizer_dir"):
                cand = meta.get(key)
                if isinstance(cand, str) and Path(cand).exists():
                    return open_tokenizer(cand)
    if (tokens / "tokenizer.model").exists() or (tokens / "tokenizer.json").exists():
        return open_tokenizer(tokens)
    raise TiaoyuError(f"cannot tell which tokenizer made {tokens}: pass --tokenizer tok/")


def prepare(o: Config, train: TrainConfig) -> Plan:
    """Open the shards, build (or load) the model and tokenizer, check that they fit together."""
    tokens = Path(o.tokens)
    train_sh, val_sh = open_tokens(tokens)
    for shards in (train_sh, val_sh):  # map every shard now: a truncated file fails here, not mid-run
        if shards is not None:
            shards.arrays()
    sl = o.pretrain.seq_len
    overrides = parse_overrides(o.model)
    if train.resume:  # the run's own architecture and tokenizer, whatever --preset says
        ckpt = resolve_checkpoint(train.out)
        net = Transformer(load_config(ckpt))
        tok = load_tokenizer(ckpt)
        if not sl:
            sl = int((load_trainer_info(ckpt).get("stage_config") or {}).get("seq_len") or 0)
    elif o.init is not None:
        net, init_dir = load_model(o.init, config_overrides=overrides or None)
        tok = load_tokenizer(init_dir)
        if o.tokenizer is not None and open_tokenizer(o.tokenizer).fingerprint != tok.fingerprint:
            raise TiaoyuError(f"--tokenizer {o.tokenizer} is not the tokenizer of --init {init_dir}: continued "
                              "pretraining keeps the model's own tokenizer (leave --tokenizer out)")
    else:  # a new model of a preset size on the tokenizer's vocabulary (tiaoyu's own or an open model's)
        tok = find_tokenizer(tokens, o.tokenizer)
        cfg = make_preset(o.preset, **{"vocab_size": tok.vocab_size, **model_token_ids(tok), **overrides})
        net = Transformer(cfg)
    check_fingerprint(train_sh, tok)
    if not sl and net.config.family:
        sl = min(net.config.max_seq_len, OPEN_DEFAULT_SEQ_LEN)
    sl = sl or net.config.max_seq_len
    if sl > net.config.max_seq_len:
        raise TiaoyuError(f"--seq-len {sl} exceeds the model's max_seq_len {net.config.max_seq_len} "
                          f"(positions it was built for); use --seq-len ≤ {net.config.max_seq_len}"
                          + ("" if o.init or train.resume else f" or --model max_seq_len={sl}"))
    if train_sh.vocab_size > net.config.vocab_size:
        raise TiaoyuError(f"the shards use a vocabulary of {train_sh.vocab_size}, the model only {net.config.vocab_size}")
    if train_sh.num_tokens < sl + 2:
        raise TiaoyuError(f"{tokens} holds {train_sh.num_tokens} training tokens, fewer than one window of "
                          f"--seq-len {sl} + 1; use a smaller --seq-len or more data")
    stage = PretrainStage(train_sh, val_sh, dataclasses.replace(o.pretrain, seq_len=sl),
                          batch_size=train.batch_size, seed=train.seed)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    line = (f"pretrain: {net.num_parameters() / 1e6:.2f}M parameters, {train_sh.num_tokens:,} training tokens, "
            f"seq_len {sl}, {world} process(es), {train.batch_size * train.grad_accum * world * sl:,} tokens per step")
    return Plan(net, stage, tok, parent=str(o.init) if o.init else None, lines=[line], eval_before=False)


def run(cfg: Config, train: TrainConfig, log=print) -> dict:
    """`tiaoyu pretrain`: next-token prediction on token shards, through the one run path."""
    if cfg.pretrain.seq_len < 0 or cfg.threads < 0 or cfg.pretrain.eval_batches <= 0:
        raise TiaoyuError("--seq-len and --threads must not be negative, --eval-batches must be positive")
    if cfg.threads:
        pin_threads(cfg.threads)
    return run_stage("pretrain", train, lambda: prepare(cfg, train), log=log)
