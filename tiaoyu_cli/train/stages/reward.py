"""`tiaoyu rlhf reward`: a reward model learnt from preference pairs.

    tiaoyu rlhf reward ckpt/sft prefs.jsonl -o ckpt/rm --epochs 1

Build the reward model from the start checkpoint (its network plus a one-output `score` head), read the pairs
(and hold out --val-frac of them when no --val file is given) and hand a `RewardStage` (objectives/reward.py:
the Bradley–Terry loss) to the one run path.
"""

from __future__ import annotations

from tiaoyu_cli.checkpoint import load_tokenizer
from tiaoyu_cli.data.preference import load_pairs
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.train.engine.run import Plan, run_stage
from tiaoyu_cli.train.objectives.reward import RewardConfig, RewardStage, reward_model_from
from tiaoyu_cli.train.rl.prompts import split_holdout


def prepare_reward(start, data, train, cfg: RewardConfig, val=None, skip_bad: bool = False) -> Plan:
    """Build the reward model from `start` (its LM plus a one-output score head) and read the pairs."""
    model, folder = reward_model_from(start)
    tok = load_tokenizer(folder)
    max_len = cfg.max_len or model.config.max_seq_len
    if max_len > model.config.max_seq_len:
        raise TiaoyuError(f"--max-len {max_len} exceeds the model's context of {model.config.max_seq_len}")
    stats: dict = {}
    pairs = load_pairs(data, tok, max_len, skip_bad, stats)
    if val is not None:
        held = load_pairs(val, tok, max_len, skip_bad)
    else:
        pairs, held = split_holdout(pairs, cfg.val_frac, train.seed)
    line = (f"reward: {len(pairs)} training pairs, {len(held)} held out"
            + (f", {stats['skipped']} bad records skipped" if stats.get("skipped") else "")
            + f"; model {model.num_parameters() / 1e6:.2f}M parameters from {folder}")
    stage = RewardStage(pairs, held, cfg, batch_size=train.batch_size, seed=train.seed)
    return Plan(model, stage, tok, parent=str(folder), lines=[line], eval_before=bool(held))


def run_reward(start, data, train, cfg: RewardConfig, val=None, skip_bad: bool = False,
               log=print) -> dict:
    """`tiaoyu rlhf reward`: train, and return the final metrics plus `before` (the untrained head's)."""
    return run_stage("reward", train, lambda: prepare_reward(start, data, train, cfg, val, skip_bad),
                     log=log)
