"""PPO: RLHF with a reward model (or verifiable answers), a value head and a KL leash.

    tiaoyu rlhf ppo ckpt/sft prompts.jsonl --reward ckpt/rm -o ckpt/ppo --max-steps 200
    tiaoyu rlhf ppo ckpt/sft questions.jsonl --reward verifiable -o ckpt/ppo-v --max-steps 200

The InstructGPT recipe (seed 002: collect samples → estimate advantages → clipped update → repeat):

1. Rollout: sample answers to a batch of prompts with the KV-cache generator.
2. Score: r = reward model score of prompt + answer (or 1 for the exact final answer with
   `--reward verifiable`), normalised with a running mean/std over all rollouts so far (and clipped).
3. Per-token rewards: −kl_coef · (log π − log ref) on every answer token — the KL penalty that
   keeps the policy near the reference (the start checkpoint) — plus the score on the last token.
4. Values V_t from a value head (a Linear on the policy's last hidden state, trained alongside it as
   a Trainer extra module); advantages and returns by GAE(γ, λ); advantages whitened per rollout.
5. `--ppo-epochs` shuffled passes over the rollout minimising

       L = clipped policy loss(ρ, A, ε) + vf_coef · clipped value loss(V, V_old, R, ε_v)

Logged per rollout: reward (raw), kl (Σ_t log π − log ref per answer), value statistics; per
step: policy/value loss, clip fractions, approx_kl between π and π_old.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from tiaoyu_cli.data.preference import PromptExample
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.train.losses_rl import gae, masked_whiten, ppo_policy_loss, ppo_rewards, ppo_value_loss
from tiaoyu_cli.train.rl_common import (
    Rollout,
    RunningMeanStd,
    load_policy,
    load_reference,
    load_reward_model,
    load_rl_prompts,
    prompt_room,
    response_logps,
)
from tiaoyu_cli.train.rollout import ModelReward, RolloutConfig, RolloutStage, Scores, VerifiableReward, sequence_kl
from tiaoyu_cli.train.run import Plan, run_stage
from tiaoyu_cli.train.stage import StepOutput


@dataclass
class PPOConfig(RolloutConfig):
    reward: str = "verifiable"  # a reward model checkpoint, or "verifiable"
    epochs: int = 2  # PPO epochs: passes over each rollout
    kl_coef: float = 0.05  # β of the per-token KL penalty
    clip: float = 0.2  # ε of the policy ratio
    vf_clip: float = 0.2  # ε of the value change
    vf_coef: float = 0.1  # weight of the value loss
    gamma: float = 1.0
    lam: float = 0.95
    reward_norm: bool = True  # normalise scores by a running mean/std
    reward_clip: float = 5.0  # clip normalised scores to ±this (0 = off)
    whiten_advantages: bool = True

    def validate(self) -> None:
        super().validate()
        if self.kl_coef < 0 or self.vf_coef < 0:
            raise TiaoyuError("--kl-coef and --vf-coef must not be negative")
        if not 0 < self.clip < 1 or self.vf_clip <= 0:
            raise TiaoyuError("--clip must be in (0, 1) and --vf-clip positive")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise TiaoyuError("--gamma and --lam must be in [0, 1]")


class ValueHead(nn.Module):
    """V(s_t) = w · h_t + b on the policy's final hidden state (zero-initialised: V = 0 at the start)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.float()).squeeze(-1)


class PPOStage(RolloutStage):
    name = "ppo"

    def __init__(self, prompts: list[PromptExample], val_prompts: list[PromptExample], cfg: PPOConfig,
                 batch_size: int, tokenizer, reward, ref_model: nn.Module, dim: int, seed: int = 0):
        cfg.validate()
        if ref_model is None:
            raise TiaoyuError("PPO needs a reference model for its KL penalty")
        super().__init__(prompts, val_prompts, cfg, batch_size, reward, tokenizer, ref_model, seed)
        self.value_head = ValueHead(dim)
        self.score_stats = RunningMeanStd()

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"value_head": self.value_head}

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.value_head(hidden)

    def make_targets(self, ro: Rollout, scores: Scores, examples):
        c = self.cfg
        old_logp, old_values = self.forward_chunks(self.trainer.raw_model, ro, with_values=True)
        ref_logp = self.forward_chunks(self.ref_model, ro)
        raw = scores.reward.to(old_logp.device)
        score = raw
        if c.reward_norm:
            self.score_stats.update(raw)
            score = self.score_stats.normalize(raw)
        if c.reward_clip > 0:
            score = score.clamp(-c.reward_clip, c.reward_clip)
        mask = ro.mask.float()
        rewards = ppo_rewards(score, old_logp, ref_logp, mask, c.kl_coef)
        last = (mask.sum(-1).long() - 1).clamp(min=0)
        dones = torch.zeros_like(mask)
        dones[torch.arange(mask.shape[0]), last] = 1.0
        adv, returns = gae(rewards, old_values * mask, dones, c.gamma, c.lam)
        n_tok = mask.sum().clamp(min=1)
        adv_mean = float((adv * mask).sum() / n_tok)  # before whitening: what GAE made of the rewards
        adv_std = float((((adv - adv_mean) * mask) ** 2).sum().div(n_tok).sqrt())
        if c.whiten_advantages:
            adv = masked_whiten(adv, mask)
        kl, kl3 = sequence_kl(old_logp, ref_logp, ro.mask)
        stats = {"kl": kl, "kl_k3": kl3, "score_norm": float(score.mean()),
                 "value_mean": float((old_values * mask).sum() / n_tok), "adv_mean": adv_mean, "adv_std": adv_std,
                 "returns_mean": float((returns * mask).sum() / n_tok)}
        return {"old_logp": old_logp, "old_values": old_values, "adv": adv, "returns": returns}, stats

    def step(self, model: nn.Module, batch) -> StepOutput:
        ro, t = batch
        logp, hidden = response_logps(model, ro, with_hidden=True)
        values = self.value_head(hidden)
        pg, st = ppo_policy_loss(logp, t["old_logp"], t["adv"], ro.mask, self.cfg.clip)
        vf, vclip = ppo_value_loss(values, t["old_values"], t["returns"], ro.mask, self.cfg.vf_clip)
        loss = pg + self.cfg.vf_coef * vf
        metrics = {"pg_loss": pg.detach(), "vf_loss": vf.detach(), "clipfrac": st["clipfrac"],
                   "approx_kl": st["approx_kl"], "vf_clipfrac": vclip, **self.rollout_metrics()}
        return StepOutput(loss, metrics, tokens=int(ro.attention_mask.sum()))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "score_stats": self.score_stats.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "score_stats" in state:
            self.score_stats.load_state_dict(state["score_stats"])


# ---- the run -------------------------------------------------------------------------------------------


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
