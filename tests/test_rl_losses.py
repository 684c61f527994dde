"""The RL / preference losses against numbers worked out by hand (tiaoyu_cli/train/losses/rl.py)."""

from __future__ import annotations

import math

import pytest
import torch

from tiaoyu_cli.train.losses.rl import (dpo_loss, gae, group_advantages, grpo_loss, kl_k1, kl_k3, masked_mean,
                                        masked_whiten, ppo_policy_loss, ppo_rewards, ppo_value_loss,
                                        reward_pairwise_loss, sequence_logps, token_logps)


def t(*x):
    return torch.tensor(x, dtype=torch.float32)


def softplus(x: float) -> float:  # −log σ(−x)
    return math.log1p(math.exp(x))


# ---- reward model --------------------------------------------------------------------------------

def test_reward_pairwise_loss_by_hand():
    # −log σ(1) = log(1 + e^-1) = 0.313262, −log σ(−1) = 1.313262
    loss = reward_pairwise_loss(t(2.0, 0.0), t(1.0, 1.0))
    assert loss.item() == pytest.approx((0.3132617 + 1.3132617) / 2, abs=1e-6)
    # margin 0.5: −log σ(0.5) = 0.474077, −log σ(−1.5) = 1.701413
    loss = reward_pairwise_loss(t(2.0, 0.0), t(1.0, 1.0), margin=0.5)
    assert loss.item() == pytest.approx((0.4740770 + 1.7014133) / 2, abs=1e-6)
    # per-pair margins
    loss = reward_pairwise_loss(t(2.0, 0.0), t(1.0, 1.0), margin=t(0.0, 0.5))
    assert loss.item() == pytest.approx((0.3132617 + 1.7014133) / 2, abs=1e-6)
    assert reward_pairwise_loss(t(3.0), t(3.0)).item() == pytest.approx(math.log(2), abs=1e-7)


def test_reward_pairwise_gradient_pushes_chosen_up():
    rc, rr = t(0.0).requires_grad_(), t(0.0).requires_grad_()
    reward_pairwise_loss(rc, rr).backward()
    assert rc.grad.item() == pytest.approx(-0.5) and rr.grad.item() == pytest.approx(0.5)  # −σ(0) and +σ(0)


def test_reward_loss_no_overflow():
    assert torch.isfinite(reward_pairwise_loss(t(-500.0), t(500.0)))
    assert reward_pairwise_loss(t(-500.0), t(500.0)).item() == pytest.approx(1000.0)


# ---- DPO -----------------------------------------------------------------------------------------

def test_dpo_loss_by_hand():
    # h = (−1 − −2) − (−3 − −2) = 1 − (−1) = 2
    pc, pr, rc, rr = t(-1.0), t(-3.0), t(-2.0), t(-2.0)
    loss, ch, rj = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(softplus(-0.2), abs=1e-6)  # −log σ(0.2) = 0.598139
    assert loss.item() == pytest.approx(0.5981389, abs=1e-6)
    assert ch.item() == pytest.approx(0.1) and rj.item() == pytest.approx(-0.1)
    loss, ch, rj = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx(0.3132617, abs=1e-6)  # −log σ(1)
    assert (ch - rj).item() == pytest.approx(1.0)  # reward margin β h
    # label smoothing ε = 0.1: 0.9 · (−log σ(1)) + 0.1 · (−log σ(−1))
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * 0.3132617 + 0.1 * 1.3132617, abs=1e-6)


def test_dpo_policy_equal_to_reference_is_log2_and_batch_mean():
    x = t(-4.0, -7.0)
    loss, ch, rj = dpo_loss(x, x - 1, x, x - 1, beta=0.3)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert torch.all(ch == 0) and torch.all(rj == 0)
    # a batch: mean of per-pair losses (h = 2 and h = −2 with β = 0.5)
    loss, _, _ = dpo_loss(t(-1.0, -3.0), t(-3.0, -1.0), t(-2.0, -2.0), t(-2.0, -2.0), beta=0.5)
    assert loss.item() == pytest.approx((0.3132617 + 1.3132617) / 2, abs=1e-6)


def test_dpo_gradient_direction():
    pc, pr = t(-2.0).requires_grad_(), t(-2.0).requires_grad_()
    loss, _, _ = dpo_loss(pc, pr, t(-2.0), t(-2.0), beta=0.1)
    loss.backward()
    # dL/dπ_c = −β σ(−βh) = −0.05 at h = 0
    assert pc.grad.item() == pytest.approx(-0.05) and pr.grad.item() == pytest.approx(0.05)


# ---- KL ------------------------------------------------------------------------------------------

def test_kl_estimators_by_hand():
    logp, ref = t(-1.0, -2.0, -3.0), t(-2.0, -1.0, -3.0)
    k3 = kl_k3(logp, ref)
    # d = ref − logp = −1, 1, 0 → e^d − d − 1 = e^-1, e − 2, 0
    assert k3.tolist() == pytest.approx([math.exp(-1), math.e - 2, 0.0], abs=1e-6)
    assert kl_k1(logp, ref).tolist() == pytest.approx([1.0, -1.0, 0.0])
    # k3 is an unbiased estimator of KL(p‖q) for samples from p: check on a 3-way distribution
    p, q = t(0.6, 0.3, 0.1), t(0.2, 0.5, 0.3)
    exact = float((p * (p / q).log()).sum())
    expect_k3 = float((p * kl_k3(p.log(), q.log())).sum())
    assert expect_k3 == pytest.approx(exact, abs=1e-6)
    assert torch.all(kl_k3(torch.randn(100), torch.randn(100)) >= 0)


# ---- token log-probs -----------------------------------------------------------------------------

def test_sequence_logps_sums_response_tokens_only():
    logits = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, 0.0, 0.0]]])  # [1, 3, 3]
    labels = torch.tensor([[1, 2, 0]])
    mask = torch.tensor([[0, 1, 1]])
    lp = token_logps(logits, labels)
    by_hand = [2.0 - math.log(math.e + math.e ** 2 + 1), -math.log(3), 3.0 - math.log(math.e ** 3 + 2)]
    assert lp[0].tolist() == pytest.approx(by_hand, abs=1e-6)
    assert sequence_logps(logits, labels, mask).item() == pytest.approx(by_hand[1] + by_hand[2], abs=1e-6)


def test_masked_helpers():
    x, m = t(1.0, 2.0, 3.0, 100.0), t(1, 1, 1, 0)
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    w = masked_whiten(x, m)
    assert w[:3].tolist() == pytest.approx([-1.2247449, 0.0, 1.2247449], abs=1e-5)  # population std √(2/3)
    assert w[3].item() == 0.0
    assert masked_whiten(x, m, shift_mean=False)[:3].tolist() == pytest.approx([-1.2247449 + 2, 2.0, 1.2247449 + 2], abs=1e-5)


# ---- PPO -----------------------------------------------------------------------------------------

def test_ppo_rewards_kl_penalty_and_score_on_last_token():
    scores = t(2.0, -1.0)
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-2.0, -1.0, -1.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    r = ppo_rewards(scores, logp, ref, mask, kl_coef=0.1)
    assert r[0].tolist() == pytest.approx([-0.1, 0.0, 2.0])
    assert r[1].tolist() == pytest.approx([0.0, -1.0, 0.0])  # score on the last *real* token


def test_gae_hand_worked_sequence():
    # r = [0, 0, 1], V = [0.5, 0.6, 0.7], episode ends at t=2, γ = 0.9, λ = 0.8
    # t=2: δ = 1 − 0.7 = 0.3                   A = 0.3
    # t=1: δ = 0 + 0.9·0.7 − 0.6 = 0.03        A = 0.03 + 0.72·0.3 = 0.246
    # t=0: δ = 0 + 0.9·0.6 − 0.5 = 0.04        A = 0.04 + 0.72·0.246 = 0.21712
    adv, ret = gae(t(0.0, 0.0, 1.0), t(0.5, 0.6, 0.7), t(0, 0, 1), gamma=0.9, lam=0.8)
    assert adv.tolist() == pytest.approx([0.21712, 0.246, 0.3], abs=1e-6)
    assert ret.tolist() == pytest.approx([0.71712, 0.846, 1.0], abs=1e-6)


def test_gae_episode_boundary_batch_and_limits():
    # an episode ends at t=0: nothing flows back across it
    # t=2: δ = 2 − 0.7 = 1.3; t=1: δ = 0.63 − 0.6 = 0.03, A = 0.03 + 0.72·1.3 = 0.966; t=0: A = 1 − 0.5
    adv, _ = gae(t(1.0, 0.0, 2.0), t(0.5, 0.6, 0.7), t(1, 0, 1), gamma=0.9, lam=0.8)
    assert adv.tolist() == pytest.approx([0.5, 0.966, 1.3], abs=1e-6)
    # batched rows are independent
    r = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 2.0]])
    v = torch.tensor([[0.5, 0.6, 0.7], [0.5, 0.6, 0.7]])
    d = torch.tensor([[0, 0, 1], [1, 0, 1]])
    adv, _ = gae(r, v, d, gamma=0.9, lam=0.8)
    assert adv[0].tolist() == pytest.approx([0.21712, 0.246, 0.3], abs=1e-6)
    assert adv[1].tolist() == pytest.approx([0.5, 0.966, 1.3], abs=1e-6)
    # λ = 1, γ = 1: Monte-Carlo return minus the value; λ = 0: the one-step TD error
    adv, ret = gae(t(1.0, 2.0, 3.0), t(1.0, 1.0, 1.0), t(0, 0, 1), gamma=1.0, lam=1.0)
    assert ret.tolist() == pytest.approx([6.0, 5.0, 3.0]) and adv.tolist() == pytest.approx([5.0, 4.0, 2.0])
    adv, _ = gae(t(1.0, 2.0, 3.0), t(1.0, 1.0, 1.0), t(0, 0, 1), gamma=1.0, lam=0.0)
    assert adv.tolist() == pytest.approx([1.0, 2.0, 2.0])
    # bootstrap from last_value when the sequence is cut (not done)
    adv, _ = gae(t(0.0), t(0.0), t(0), gamma=0.5, lam=1.0, last_value=t(4.0))
    assert adv.tolist() == pytest.approx([2.0])


def test_ppo_policy_loss_clipping_edges():
    # ε = 0.2.   A=+1, ρ=1.5 → clipped: −1.2      A=+1, ρ=0.5 → unclipped: −0.5
    #            A=−1, ρ=1.5 → unclipped: 1.5      A=−1, ρ=0.5 → clipped: 0.8
    old = torch.zeros(1, 5)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5, 9.0]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])  # the last token is padding
    loss, st = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4, abs=1e-6)
    assert st["clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    # clipped tokens give no gradient; the others −A ρ / 4
    assert logp.grad[0].tolist() == pytest.approx([0.0, -0.125, 0.375, 0.0, 0.0], abs=1e-6)
    # ρ = 1: the loss is −mean A, approx_kl 0
    loss, st = ppo_policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[1.0, 3.0]]), torch.ones(1, 2))
    assert loss.item() == pytest.approx(-2.0) and st["approx_kl"].item() == pytest.approx(0.0)


def test_ppo_value_loss_clipping():
    # V − V_old = ±0.5 is clipped to ±0.2:
    # token 1: V_clip = 0.7, (1 − 2)² = 1 < (0.7 − 2)² = 1.69;  token 2: V_clip = 0.3, 0 < 0.09
    loss, cf = ppo_value_loss(t(1.0, 0.0), t(0.5, 0.5), t(2.0, 0.0), t(1, 1), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.09) / 2, abs=1e-6)
    assert cf.item() == pytest.approx(1.0)
    # inside the clip range: plain ½ (V − R)²
    loss, cf = ppo_value_loss(t(0.6), t(0.5), t(1.6), t(1), clip=0.2)
    assert loss.item() == pytest.approx(0.5) and cf.item() == 0.0


# ---- GRPO ----------------------------------------------------------------------------------------

def test_group_advantages_by_hand():
    r = t(1, 0, 0, 1, 1, 1, 1, 1)
    adv = group_advantages(r, group_size=4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # mean 0.5, sample std √(1/3)
    assert adv.tolist() == pytest.approx([a, -a, -a, a, 0, 0, 0, 0], abs=1e-5)
    assert group_advantages(r, 4, scale=False).tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    with pytest.raises(ValueError):
        group_advantages(r, 3)


def test_grpo_loss_by_hand():
    # two sequences: 2 tokens with A = +1, 1 token (+1 padding) with A = −1; ρ = 1
    logp = torch.tensor([[-1.0, -1.0], [-0.5, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = t(1.0, -1.0)
    loss, st = grpo_loss(logp, logp.detach(), adv, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.0)  # −(1/2)[(1/2)(1 + 1) + (−1)]
    loss.backward()
    # ∂L/∂logp = −A_i / (|o_i| N)
    assert logp.grad.flatten().tolist() == pytest.approx([-0.25, -0.25, 0.5, 0.0])
    # with β = 0.1 and a reference: k3 = e^-1 on the first token only
    ref = torch.tensor([[-2.0, -1.0], [-0.5, 0.0]])
    loss, st = grpo_loss(logp.detach(), logp.detach(), adv, mask, clip=0.2, beta=0.1, ref_logp=ref)
    expect = -0.5 * (0.5 * (2 - 0.1 * math.exp(-1)) + (-1.0))
    assert loss.item() == pytest.approx(expect, abs=1e-6)
    assert st["kl"].item() == pytest.approx(math.exp(-1) / 3, abs=1e-6)


def test_grpo_loss_clip_edges():
    # A = +1, ρ = 1.5 → min(1.5, 1.2) = 1.2 (clipped, no gradient); A = −1, ρ = 1.5 → min(−1.5, −1.2) = −1.5
    old = torch.zeros(2, 1)
    logp = torch.log(torch.tensor([[1.5], [1.5]])).requires_grad_()
    loss, st = grpo_loss(logp, old, t(1.0, -1.0), torch.ones(2, 1), clip=0.2)
    assert loss.item() == pytest.approx(-(1.2 - 1.5) / 2, abs=1e-6)
    assert st["clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, 0.75], abs=1e-6)  # −(−1 · 1.5)/2
