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
from tiaoyu_cli.train.engine.stage import StepOutput
from tiaoyu_cli.train.losses.rl import gae, masked_whiten, ppo_policy_loss, ppo_rewards, ppo_value_loss
from tiaoyu_cli.train.rl.layout import Rollout, response_logps
from tiaoyu_cli.train.rl.rollout import RolloutConfig, RolloutStage, Scores, sequence_kl


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


class RunningMeanStd:
    """Mean and variance of a stream of numbers (parallel Welford / Chan et al.). Used to normalise
    PPO rewards: r' = (r − mean) / (std + eps), statistics updated with every rollout batch."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten().cpu()
        n = x.numel()
        if n == 0:
            return
        b_mean = float(x.mean())
        b_m2 = float(((x - b_mean) ** 2).sum())
        tot = self.count + n
        delta = b_mean - self.mean
        self.mean += delta * n / tot
        self.m2 += b_m2 + delta * delta * self.count * n / tot
        self.count = tot

    @property
    def var(self) -> float:
        return self.m2 / self.count if self.count else 1.0

    @property
    def std(self) -> float:
        return self.var ** 0.5

    def normalize(self, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        return (x - self.mean) / (self.std + eps)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, st: dict) -> None:
        self.count, self.mean, self.m2 = int(st.get("count", 0)), float(st.get("mean", 0.0)), float(st.get("m2", 0.0))


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
