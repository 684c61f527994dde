"""`tiaoyu rlhf reward`: a reward model learnt from preference pairs.

    tiaoyu rlhf reward ckpt/sft prefs.jsonl -o ckpt/rm --epochs 1

Build the reward model from the start checkpoint (its network plus a one-output `score` head), read the pairs
(and hold out --val-frac of them when no --val file is given) and hand a `RewardStage` (objectives/reward.py:
the Bradley–Terry loss) to the one run path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tiaoyu_cli.checkpoint import load_tokenizer
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.train.engine.config import TrainConfig
from tiaoyu_cli.train.engine.run import Plan, run_stage
from tiaoyu_cli.train.objectives.reward import RewardConfig, RewardStage, reward_model_from
from tiaoyu_cli.train.rl.pairs import PairInputs, load_pair_split


@dataclass(kw_only=True)
class Config(PairInputs):
    """Everything `tiaoyu rlhf reward` takes besides the loop's TrainConfig (data, val and skip_bad come from
    PairInputs)."""

    start: Path = field(metadata={"help": "checkpoint to start from (usually the SFT model)"})
    reward: RewardConfig = field(default_factory=RewardConfig)


def prepare(cfg: Config, train: TrainConfig) -> Plan:
    """Build the reward model from `start` (its LM plus a one-output score head) and read the pairs."""
    model, folder = reward_model_from(cfg.start)
    tok = load_tokenizer(folder)
    max_len = cfg.reward.max_len or model.config.max_seq_len
    if max_len > model.config.max_seq_len:
        raise TiaoyuError(f"--max-len {max_len} exceeds the model's context of {model.config.max_seq_len}")
    pairs, held, skipped = load_pair_split(cfg, tok, max_len, cfg.reward.val_frac, train.seed)
    line = (f"reward: {len(pairs)} training pairs, {len(held)} held out"
            + (f", {skipped} bad records skipped" if skipped else "")
            + f"; model {model.num_parameters() / 1e6:.2f}M parameters from {folder}")
    stage = RewardStage(pairs, held, cfg.reward, batch_size=train.batch_size, seed=train.seed)
    return Plan(model, stage, tok, parent=str(folder), lines=[line], eval_before=bool(held))


def run(cfg: Config, train: TrainConfig, log=print) -> dict:
    """`tiaoyu rlhf reward`: train, and return the final metrics plus `before` (the untrained head's)."""
    return run_stage("reward", train, lambda: prepare(cfg, train), log=log)
