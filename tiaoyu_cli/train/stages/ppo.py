"""`tiaoyu rlhf ppo`: RLHF with a reward model (or verifiable answers), a value head and a KL leash.

    tiaoyu rlhf ppo ckpt/sft prompts.jsonl --reward ckpt/rm -o ckpt/ppo --max-steps 200
    tiaoyu rlhf ppo ckpt/sft questions.jsonl --reward verifiable -o ckpt/ppo-v --max-steps 200

Load the policy, its frozen reference and the reward (a reward model, or verifiable answers), read the prompts
(holding out --val-frac of them when no --val file is given), and hand a `PPOStage` (objectives/ppo.py) to the
one run path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.train.engine.config import TrainConfig
from tiaoyu_cli.train.engine.run import Plan, run_stage
from tiaoyu_cli.train.objectives.ppo import PPOConfig, PPOStage
from tiaoyu_cli.train.rl.models import load_policy, load_reference, load_reward_model
from tiaoyu_cli.train.rl.prompts import RLInputs, load_rl_prompts, prompt_room
from tiaoyu_cli.train.rl.rollout import ModelReward, VerifiableReward


@dataclass(kw_only=True)
class Config(RLInputs):
    """Everything `tiaoyu rlhf ppo` takes besides the loop's TrainConfig (ref, val, val_frac, eval_before and
    skip_bad come from RLInputs; the reward is PPOConfig's `reward`)."""

    start: Path = field(metadata={"help": "policy checkpoint to start from (usually the SFT model)"})
    data: Path = field(metadata={"help": "prompts JSONL: {prompt} (with --reward verifiable: {prompt, answer})"})
    ppo: PPOConfig = field(default_factory=PPOConfig)


def prepare(cfg: Config, train: TrainConfig) -> Plan:
    """Load policy, reference and reward (model or verifiable), read the prompts."""
    p = cfg.ppo
    p.validate()
    if not p.reward:
        raise TiaoyuError("--reward: give a reward model checkpoint (from `tiaoyu rlhf reward`) or 'verifiable'")
    notes = []
    model, folder, tok = load_policy(cfg.start, "PPO")
    verifiable = p.reward == "verifiable"
    if verifiable:
        reward = VerifiableReward(tok, p.format_reward, p.think_format)
    else:
        rm, _ = load_reward_model(p.reward, tok)
        if rm.config.max_seq_len < model.config.max_seq_len:
            notes.append(f"note: the reward model reads at most {rm.config.max_seq_len} tokens")
        reward = ModelReward(rm, batch_size=train.batch_size)
    ctx = model.config.max_seq_len
    if not verifiable:
        ctx = min(ctx, rm.config.max_seq_len)
    room = prompt_room(ctx, p.max_new_tokens, what="the context")
    hint = f" in the context of {ctx} tokens with --max-new-tokens {p.max_new_tokens}"
    prompts, held, skipped = load_rl_prompts(cfg.data, cfg.val, tok, room, need_answer=verifiable,
                                             skip_bad=cfg.skip_bad, context_hint=hint, val_frac=cfg.val_frac,
                                             seed=train.seed)
    ref_model = load_reference(cfg.ref or folder, tok)
    line = (f"ppo: {len(prompts)} prompts, {len(held)} held out"
        + (f", {skipped} bad records skipped" if skipped else "")
        + f"; reward {'verifiable answers' if verifiable else p.reward}; {p.rollout_batch_size} prompts per rollout, "
        f"{p.epochs} PPO epochs, kl_coef {p.kl_coef}")
    stage = PPOStage(prompts, held, p, batch_size=train.batch_size, tokenizer=tok, reward=reward,
                     ref_model=ref_model, dim=model.config.dim, seed=train.seed)
    return Plan(model, stage, tok, parent=str(folder), lines=notes + [line], eval_before=bool(held) and cfg.eval_before)


def run(cfg: Config, train: TrainConfig, log=print) -> dict:
    """`tiaoyu rlhf ppo`: train; returns the final metrics plus `before`."""
    return run_stage("ppo", train, lambda: prepare(cfg, train), log=log)
