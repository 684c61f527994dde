"""`tiaoyu rlhf ppo`: RLHF with a reward model (or verifiable answers), a value head and a KL leash.

    tiaoyu rlhf ppo ckpt/sft prompts.jsonl --reward ckpt/rm -o ckpt/ppo --max-steps 200
    tiaoyu rlhf ppo ckpt/sft questions.jsonl --reward verifiable -o ckpt/ppo-v --max-steps 200

Load the policy, its frozen reference and the reward (a reward model, or verifiable answers), read the prompts
(holding out --val-frac of them when no --val file is given), and hand a `PPOStage` (objectives/ppo.py) to the
one run path.
"""

from __future__ import annotations

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.train.engine.run import Plan, run_stage
from tiaoyu_cli.train.objectives.ppo import PPOConfig, PPOStage
from tiaoyu_cli.train.rl.models import load_policy, load_reference, load_reward_model
from tiaoyu_cli.train.rl.prompts import load_rl_prompts, prompt_room
from tiaoyu_cli.train.rl.rollout import ModelReward, VerifiableReward


def prepare_ppo(start, data, train, cfg: PPOConfig, val=None, ref=None, val_frac: float = 0.05,
                skip_bad: bool = False, eval_before: bool = True) -> Plan:
    """Load policy, reference and reward (model or verifiable), read the prompts."""
    cfg.validate()
    if not cfg.reward:
        raise TiaoyuError("--reward: give a reward model checkpoint (from `tiaoyu rlhf reward`) or 'verifiable'")
    notes = []
    model, folder, tok = load_policy(start, "PPO")
    verifiable = cfg.reward == "verifiable"
    if verifiable:
        reward = VerifiableReward(tok, cfg.format_reward, cfg.think_format)
    else:
        rm, _ = load_reward_model(cfg.reward, tok)
        if rm.config.max_seq_len < model.config.max_seq_len:
            notes.append(f"note: the reward model reads at most {rm.config.max_seq_len} tokens")
        reward = ModelReward(rm, batch_size=train.batch_size)
    ctx = model.config.max_seq_len
    if not verifiable:
        ctx = min(ctx, rm.config.max_seq_len)
    room = prompt_room(ctx, cfg.max_new_tokens, what="the context")
    hint = f" in the context of {ctx} tokens with --max-new-tokens {cfg.max_new_tokens}"
    prompts, held, skipped = load_rl_prompts(data, val, tok, room, need_answer=verifiable, skip_bad=skip_bad,
                                             context_hint=hint, val_frac=val_frac, seed=train.seed)
    ref_model = load_reference(ref or folder, tok)
    line = (f"ppo: {len(prompts)} prompts, {len(held)} held out"
        + (f", {skipped} bad records skipped" if skipped else "")
        + f"; reward {'verifiable answers' if verifiable else cfg.reward}; {cfg.rollout_batch_size} prompts per rollout, "
        f"{cfg.epochs} PPO epochs, kl_coef {cfg.kl_coef}")
    stage = PPOStage(prompts, held, cfg, batch_size=train.batch_size, tokenizer=tok, reward=reward,
                     ref_model=ref_model, dim=model.config.dim, seed=train.seed)
    return Plan(model, stage, tok, parent=str(folder), lines=notes + [line], eval_before=bool(held) and eval_before)


def run_ppo(start, data, train, cfg: PPOConfig, val=None, ref=None, val_frac: float = 0.05,
            skip_bad: bool = False, eval_before: bool = True, log=print) -> dict:
    """`tiaoyu rlhf ppo`: train; returns the final metrics plus `before`."""
    return run_stage("ppo", train, lambda: prepare_ppo(start, data, train, cfg, val, ref, val_frac, skip_bad,
                                                      eval_before), log=log)
