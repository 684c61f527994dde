"""`tiaoyu rlhf dpo`: preference optimisation against a frozen reference, no reward model, no sampling.

    tiaoyu rlhf dpo ckpt/sft prefs.jsonl -o ckpt/dpo --beta 0.1 --epochs 1
    tiaoyu rlhf dpo ckpt/sft prefs.jsonl -o ckpt/dpo-lora --method lora --rank 8

Load the policy and its reference (the start checkpoint, --ref, or with LoRA the policy with its adapters
off), read the pairs, and hand a `DPOStage` (objectives/dpo.py) to the one run path; with --method lora the
final adapter is published at the top of the run folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.model.lora import LoraConfig
from tiaoyu_cli.train.engine.config import TrainConfig
from tiaoyu_cli.train.engine.outdir import publish_final_adapter
from tiaoyu_cli.train.engine.run import Plan, run_stage
from tiaoyu_cli.train.objectives.dpo import DPOConfig, DPOStage
from tiaoyu_cli.train.rl.lora import adapters_off, apply_lora_for_rl
from tiaoyu_cli.train.rl.models import load_policy, load_reference
from tiaoyu_cli.train.rl.pairs import PairInputs, load_pair_split

_LORA = LoraConfig()


@dataclass(kw_only=True)
class Config(PairInputs):
    """Everything `tiaoyu rlhf dpo` takes besides the loop's TrainConfig (data, val and skip_bad come from
    PairInputs); the LoRA defaults are LoraConfig's."""

    start: Path = field(metadata={"help": "policy checkpoint to start from (usually the SFT model)"})
    ref: Optional[Path] = field(default=None, metadata={
        "help": "reference checkpoint (default: the start checkpoint)"})
    method: str = field(default="full", metadata={
        "help": "full (all weights) | lora (adapters; the reference is the same model with adapters off)"})
    rank: int = field(default=_LORA.rank, metadata={"help": "--method lora: rank r"})
    alpha: float = field(default=_LORA.alpha, metadata={"help": "--method lora: scale α (update = α/r · B·A)"})
    lora_dropout: float = field(default=_LORA.dropout, metadata={"help": "--method lora: dropout on the LoRA input"})
    targets: str = field(default=",".join(_LORA.targets), metadata={"help": "--method lora: layers to adapt"})
    dpo: DPOConfig = field(default_factory=DPOConfig)


def prepare(cfg: Config, train: TrainConfig) -> Plan:
    """Load policy and reference, read the pairs."""
    d = cfg.dpo
    d.validate()
    if cfg.method not in ("full", "lora"):
        raise TiaoyuError(f"--method {cfg.method!r}: choose full or lora")
    model, folder, tok = load_policy(cfg.start, "DPO")
    max_len = d.max_len or model.config.max_seq_len
    if max_len > model.config.max_seq_len:
        raise TiaoyuError(f"--max-len {max_len} exceeds the model's context of {model.config.max_seq_len}")
    pairs, held, skipped = load_pair_split(cfg, tok, max_len, d.val_frac, train.seed)
    ref_model, ref_context, save_lora = None, None, None
    if cfg.method == "lora":
        lora = {"rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.lora_dropout, "targets": cfg.targets}
        model, save_lora = apply_lora_for_rl(model, lora, tok, folder)
        if cfg.ref is not None:  # an explicit reference: a full frozen model after all
            ref_model = load_reference(cfg.ref, tok)
        else:
            ref_context = lambda: adapters_off(model)  # noqa: E731
    else:
        ref_model = load_reference(cfg.ref or folder, tok)
    line = (f"dpo: {len(pairs)} training pairs, {len(held)} held out"
        + (f", {skipped} bad records skipped" if skipped else "")
        + f"; β {d.beta}, reference {cfg.ref or folder}" + (" (adapters off)" if ref_context else "")
        + f"; {model.num_parameters(trainable_only=True) / 1e6:.2f}M trainable parameters")
    stage = DPOStage(pairs, held, d, batch_size=train.batch_size, ref_model=ref_model, ref_context=ref_context,
                     seed=train.seed, saver=save_lora)
    return Plan(model, stage, tok, parent=str(folder), lines=[line], eval_before=bool(held))


def run(cfg: Config, train: TrainConfig, log=print) -> dict:
    """`tiaoyu rlhf dpo`: train; returns the final metrics plus `before` (held-out metrics of the start).
    With --method lora the final adapter is also published at the top of the run folder."""
    res = run_stage("dpo", train, lambda: prepare(cfg, train), log=log)
    if cfg.method == "lora":
        publish_final_adapter(Path(train.out), log)
    return res
