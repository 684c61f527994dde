"""Losses and estimators of preference alignment and RL fine-tuning: pure functions on tensors.

Nothing here knows about models, batches or the Trainer; each function is its formula (written in
its docstring) and is tested against hand-computed numbers in tests/test_rl_losses.py.

Notation: σ is the logistic sigmoid, log σ(x) = −softplus(−x) (computed that way: no overflow);
"mask" tensors hold 1 where a token belongs to a response and 0 on prompt and padding.

    reward model    L = −log σ(r_chosen − r_rejected − margin)
    DPO             L = −log σ(β [(log π_c − log ref_c) − (log π_r − log ref_r)])   (+ label smoothing)
    PPO             per-token reward −β_kl (log π − log ref), sequence score on the last token;
                    GAE advantages; clipped policy loss; clipped value loss
    GRPO            group-normalised sequence advantages; clipped ratio; optional β · k3 KL
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ---- helpers -------------------------------------------------------------------------------------


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x·mask (over `dim`, or over everything)."""
    x = x * mask
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x·mask / Σ mask (over `dim`, or over everything); 0 where the mask is empty."""
    mask = mask.to(x.dtype)
    return masked_sum(x, mask, dim) / masked_sum(torch.ones_like(x), mask, dim).clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / sqrt(var + eps) with mean and (population) variance over the masked elements;
    with shift_mean=False the mean is added back (scale only). Masked-out elements become 0."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] per position, in fp32.   logits [B, T, V], labels [B, T] → [B, T]

    Computed as logit[label] − logsumexp(logits), which never materialises the [B, T, V] log-softmax."""
    logits = logits.float()
    picked = logits.gather(-1, labels.unsqueeze(-1).clamp(min=0)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log π(response | prompt) = Σ_t mask_t · log softmax(logits_t)[labels_t].   → [B]

    `logits` are the model outputs for inputs ids[:, :-1], `labels` = ids[:, 1:], `mask` marks the
    response tokens among the labels."""
    return masked_sum(token_logps(logits, labels), mask.to(torch.float32), dim=-1)


# ---- reward model --------------------------------------------------------------------------------


def reward_pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                         margin: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Bradley–Terry pairwise loss of a reward model (InstructGPT; margin as in Llama 2):

        L = −(1/B) Σ_i log σ(r_chosen,i − r_rejected,i − margin_i)

    r_chosen, r_rejected: [B] scalar rewards of the two responses to the same prompt; margin: a
    float or a [B] tensor (how much better chosen should score). Minimising L pushes chosen above
    rejected; at r_c = r_r and margin 0 the loss is log 2."""
    diff = r_chosen.float() - r_rejected.float() - margin
    return -F.logsigmoid(diff).mean()


# ---- DPO -----------------------------------------------------------------------------------------


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float = 0.1, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimisation (Rafailov et al. 2023), with conservative label smoothing (cDPO):

        h = (log π(y_c|x) − log ref(y_c|x)) − (log π(y_r|x) − log ref(y_r|x))
        L = −(1 − ε) log σ(β h) − ε log σ(−β h)          (mean over the batch; ε = label_smoothing)

    The inputs are [B] summed response log-probs. ε > 0 treats each label as flipped with
    probability ε, so L no longer goes to 0 as h grows (its minimum is at β h = log((1−ε)/ε)).

    Returns (loss, chosen_rewards, rejected_rewards), the implicit rewards
    β (log π − log ref) of each response (detached), for logging margins and accuracy."""
    pc, pr = policy_chosen_logps.float(), policy_rejected_logps.float()
    rc, rr = ref_chosen_logps.float(), ref_rejected_logps.float()
    h = (pc - rc) - (pr - rr)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses.mean(), (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()


# ---- KL estimators -------------------------------------------------------------------------------


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log π(y) − log ref(y) per sampled token: unbiased for KL(π ‖ ref) under y ~ π, but
    each sample can be negative. PPO uses it as the per-token penalty."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 (Schulman's "approximating KL" note; GRPO's KL term), per sampled token:

        k3 = exp(log ref − log π) − (log ref − log π) − 1

    Unbiased for KL(π ‖ ref) under y ~ π, and ≥ 0 for every sample (e^x − x − 1 ≥ 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


# ---- PPO -----------------------------------------------------------------------------------------


def ppo_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                kl_coef: float) -> torch.Tensor:
    """Per-token rewards of RLHF-PPO (Ziegler et al. 2019; InstructGPT):

        r_t = −kl_coef · (log π(y_t) − log ref(y_t))          on every response token
        r_T += score                                           on the last response token T

    scores [B]; logp, ref_logp, mask [B, R] over the response positions (mask 1 on real tokens,
    right-padded). Returns [B, R], zero on padding."""
    mask = mask.to(logp.dtype)
    rewards = -kl_coef * kl_k1(logp, ref_logp) * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # index of the last response token per row
    rewards = rewards.clone()
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, gamma: float = 1.0, lam: float = 0.95,
        last_value: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016) along the last dimension (time):

        δ_t = r_t + γ (1 − d_t) V_{t+1} − V_t
        A_t = δ_t + γ λ (1 − d_t) A_{t+1}
        R_t = A_t + V_t                                       (the value targets, "returns")

    d_t = 1 marks the last step of an episode (nothing is bootstrapped across it). After the last
    column, V_{T} = last_value (default 0) and A_{T} = 0. rewards, values, dones: [..., T].
    Returns (advantages, returns), without gradient."""
    rewards, values, dones = rewards.detach().float(), values.detach().float(), dones.detach().float()
    T = rewards.shape[-1]
    adv = torch.zeros_like(rewards)
    next_v = torch.zeros_like(rewards[..., 0]) if last_value is None else last_value.detach().float()
    next_a = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(T)):
        nonterminal = 1.0 - dones[..., t]
        delta = rewards[..., t] + gamma * nonterminal * next_v - values[..., t]
        next_a = delta + gamma * lam * nonterminal * next_a
        adv[..., t] = next_a
        next_v = values[..., t]
    return adv, adv + values


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017), as a loss to minimise, per token:

        ρ_t = exp(log π(y_t) − log π_old(y_t))
        L   = mean_t max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε))      (= −min(ρA, clip(ρ)A))

    The mean is over masked tokens. Returns (loss, stats) with clipfrac (share of tokens where the
    clipped term was chosen) and approx_kl = mean[(ρ − 1) − log ρ] (k3 of π_old vs π)."""
    mask = mask.to(torch.float32)
    log_ratio = logp.float() - old_logp.float()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl}


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss, per token:

        V_clip = V_old + clip(V − V_old, −ε, ε)
        L      = ½ · mean_t max((V_t − R_t)², (V_clip,t − R_t)²)

    (mean over masked tokens). Returns (loss, clipfrac: share of tokens where the clipped error was larger)."""
    mask = mask.to(torch.float32)
    values, old_values, returns = values.float(), old_values.float(), returns.float()
    v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
    err, err_clip = (values - returns) ** 2, (v_clip - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clip), mask)
    with torch.no_grad():
        clipfrac = masked_mean((err_clip > err).float(), mask)
    return loss, clipfrac


# ---- GRPO ----------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome advantages (Shao et al. 2024, DeepSeekMath): each of the G answers to one prompt
    is compared with its own group,

        A_i = (r_i − mean(r_group)) / (std(r_group) + eps)        (std with Bessel's correction, as TRL)

    rewards: [N·G] flat, grouped consecutively (prompt 0's G answers first). scale=False leaves out the
    division by std (Dr. GRPO). A group whose answers all score the same gets advantage 0: it teaches nothing."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        adv = adv / (std + eps)
    return adv.view(-1)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip: float = 0.2, beta: float = 0.0,
              ref_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's objective as a loss (DeepSeekMath eq. 3), for sequences i with tokens t:

        ρ_{i,t} = exp(log π(o_{i,t}) − log π_old(o_{i,t}))
        J       = (1/N) Σ_i (1/|o_i|) Σ_t [ min(ρ A_i, clip(ρ, 1 − ε, 1 + ε) A_i) − β k3_{i,t} ]
        L       = −J

    k3 = exp(log ref − log π) − (log ref − log π) − 1 (see `kl_k3`); advantages: [N], one per
    sequence, broadcast over its tokens; logp, old_logp, ref_logp, mask: [N, T]. With one update
    per rollout π_old = π numerically (ρ = 1) and only the gradient of ρ remains.
    Returns (loss, stats: clipfrac, kl (mean k3 per token, 0 without a reference))."""
    mask = mask.to(torch.float32)
    log_ratio = logp.float() - old_logp.float()
    ratio = torch.exp(log_ratio)
    adv = advantages.float().unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * adv
    per_token = torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(per_token)
    if ref_logp is not None:
        kl = kl_k3(logp.float(), ref_logp.float())
        if beta:
            per_token = per_token - beta * kl
    per_seq = masked_mean(per_token, mask, dim=-1)  # (1/|o_i|) Σ_t
    loss = -per_seq.mean()
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped < unclipped).float(), mask),
                 "kl": masked_mean(kl, mask)}
    return loss, stats
