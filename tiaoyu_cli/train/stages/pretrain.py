"""`tiaoyu pretrain`: next-token prediction on token shards.

    tiaoyu pretrain tokens/ -o ckpt/base --preset tiny --max-steps 2000

Open the shards, build a new model of a preset size on the shards' tokenizer (or continue from --init,
or resume the run's own model), check that they fit together, and hand a `PretrainStage`
(objectives/pretrain.py) to the one run path (`engine.run.run_stage`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tiaoyu_cli.checkpoint import load_config, load_model, load_tokenizer, load_trainer_info, resolve_checkpoint
from tiaoyu_cli.data.shards import check_fingerprint, open_tokens
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.model import Transformer
from tiaoyu_cli.model import preset as make_preset
from tiaoyu_cli.tokenizer import model_token_ids, open_tokenizer
from tiaoyu_cli.train.engine.config import TrainConfig
from tiaoyu_cli.train.engine.run import Plan, run_stage
from tiaoyu_cli.train.objectives.pretrain import PretrainConfig, PretrainStage


@dataclass
class PretrainRun:
    """What `tiaoyu pretrain` trains on and from (the loop's options are the TrainConfig)."""

    tokens: str
    preset: str = "tiny"
    model: dict | None = None  # model config overrides (--model KEY=VALUE)
    init: str | None = None  # continue from this checkpoint (ours, or a Hugging Face model folder)
    tokenizer: str | None = None  # default: the one recorded with the shards (ours, or an open model's folder)
    seq_len: int = 0  # 0 = the model's max_seq_len
    sampling: str = "random"
    eval_batches: int = 16


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


def prepare_pretrain(o: PretrainRun, train: TrainConfig) -> Plan:
    """Open the shards, build (or load) the model and tokenizer, check that they fit together."""
    tokens = Path(o.tokens)
    train_sh, val_sh = open_tokens(tokens)
    for shards in (train_sh, val_sh):  # map every shard now: a truncated file fails here, not mid-run
        if shards is not None:
            shards.arrays()
    sl = o.seq_len
    if train.resume:  # the run's own architecture and tokenizer, whatever --preset says
        ckpt = resolve_checkpoint(train.out)
        net = Transformer(load_config(ckpt))
        tok = load_tokenizer(ckpt)
        if not sl:
            sl = int((load_trainer_info(ckpt).get("stage_config") or {}).get("seq_len") or 0)
    elif o.init is not None:
        net, init_dir = load_model(o.init, config_overrides=o.model or None)
        tok = load_tokenizer(init_dir)
        if o.tokenizer is not None and open_tokenizer(o.tokenizer).fingerprint != tok.fingerprint:
            raise TiaoyuError(f"--tokenizer {o.tokenizer} is not the tokenizer of --init {init_dir}: continued "
                              "pretraining keeps the model's own tokenizer (leave --tokenizer out)")
    else:  # a new model of a preset size on the tokenizer's vocabulary (tiaoyu's own or an open model's)
        tok = find_tokenizer(tokens, o.tokenizer)
        cfg = make_preset(o.preset, **{"vocab_size": tok.vocab_size, **model_token_ids(tok), **(o.model or {})})
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
    stage = PretrainStage(train_sh, val_sh, PretrainConfig(seq_len=sl, sampling=o.sampling, eval_batches=o.eval_batches),
                          batch_size=train.batch_size, seed=train.seed)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    line = (f"pretrain: {net.num_parameters() / 1e6:.2f}M parameters, {train_sh.num_tokens:,} training tokens, "
            f"seq_len {sl}, {world} process(es), {train.batch_size * train.grad_accum * world * sl:,} tokens per step")
    return Plan(net, stage, tok, parent=str(o.init) if o.init else None, lines=[line], eval_before=False)


def run_pretrain(o: PretrainRun, train: TrainConfig, log=print) -> dict:
    """`tiaoyu pretrain`: next-token prediction on token shards, through the one run path."""
    return run_stage("pretrain", train, lambda: prepare_pretrain(o, train), log=log)
