"""`tiaoyu distill`: KD losses against hand-computed values, temperature, masking, top-k cache,
the white-box stage (chat data and token shards), black-box data path, bad input, learning."""

from __future__ import annotations

import math

import pytest
import torch

from tiaoyu_cli.train.distill import distill_loss, divergence, kd_loss, topk_kd_loss

# teacher p = softmax([0, 0]) = [1/2, 1/2]; student q = softmax([ln 3, 0]) = [3/4, 1/4]
P = [0.5, 0.5]
Q = [0.75, 0.25]
M = [0.625, 0.375]
FORWARD = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(p‖q) = ½ ln(4/3) ≈ 0.14384
REVERSE = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(q‖p) ≈ 0.13081
JSD = 0.5 * (0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375)
             + 0.75 * math.log(0.75 / 0.625) + 0.25 * math.log(0.25 / 0.375))  # ≈ 0.03382


def _pair(temperature: float = 1.0):
    """Logits that give p and q above after dividing by `temperature`."""
    teacher = torch.tensor([[0.0, 0.0]]) * temperature
    student = torch.tensor([[math.log(3.0), 0.0]]) * temperature
    return student, teacher


def test_hand_values_are_what_they_say():
    assert FORWARD == pytest.approx(0.5 * math.log(4 / 3))
    assert FORWARD == pytest.approx(0.143841, abs=1e-6)
    assert REVERSE == pytest.approx(0.130812, abs=1e-6)
    assert JSD == pytest.approx(0.033822, abs=1e-6)


@pytest.mark.parametrize("kind,expected", [("forward", FORWARD), ("reverse", REVERSE), ("jsd", JSD)])
def test_kd_loss_matches_hand_computed(kind, expected):
    s, t = _pair()
    assert float(kd_loss(s, t, temperature=1.0, divergence_kind=kind)) == pytest.approx(expected, rel=1e-5)
    # the divergence itself on probabilities
    d = divergence(torch.tensor(P).log(), torch.tensor(Q).log(), kind)
    assert float(d) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind,expected", [("forward", FORWARD), ("reverse", REVERSE), ("jsd", JSD)])
def test_temperature_divides_logits_and_scales_by_t_squared(kind, expected):
    # logits scaled by T give the same softened distributions, so the loss is T² × the T=1 value
    for T in (2.0, 4.0):
        s, t = _pair(T)
        assert float(kd_loss(s, t, temperature=T, divergence_kind=kind)) == pytest.approx(T * T * expected, rel=1e-5)
    # and on fixed logits a higher temperature softens both distributions (a different value)
    s, t = _pair()
    assert float(kd_loss(s, t, temperature=3.0, divergence_kind=kind)) != pytest.approx(expected, rel=1e-2)


def test_identical_distributions_give_zero_and_jsd_is_bounded():
    z = torch.randn(3, 5, 11)
    for kind in ("forward", "reverse", "jsd"):
        assert float(kd_loss(z, z.clone(), divergence_kind=kind)) == pytest.approx(0.0, abs=1e-6)
    # disjoint one-hot-like distributions: JSD → ln 2, KL is large
    a = torch.tensor([[50.0, -50.0]])
    b = torch.tensor([[-50.0, 50.0]])
    assert float(kd_loss(a, b, divergence_kind="jsd")) == pytest.approx(math.log(2), rel=1e-4)
    assert float(kd_loss(a, b, divergence_kind="forward")) > 50


def test_forward_and_reverse_differ_and_swap():
    torch.manual_seed(0)
    s, t = torch.randn(4, 7), torch.randn(4, 7)
    f = kd_loss(s, t, divergence_kind="forward")
    r = kd_loss(s, t, divergence_kind="reverse")
    assert float(f) != pytest.approx(float(r), rel=1e-3)
    # reverse KL(q‖p) is the forward KL with the roles swapped
    assert float(r) == pytest.approx(float(kd_loss(t, s, divergence_kind="forward")), rel=1e-5)


def test_mask_keeps_only_response_positions():
    torch.manual_seed(0)
    s, t = torch.randn(2, 6, 9), torch.randn(2, 6, 9)
    mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]])
    full = kd_loss(s, t, mask)
    # changing logits at masked-out positions changes nothing
    s2, t2 = s.clone(), t.clone()
    s2[mask == 0] += 10 * torch.randn_like(s2[mask == 0])
    t2[mask == 0] -= 7
    assert float(kd_loss(s2, t2, mask)) == pytest.approx(float(full), rel=1e-6)
    # = the mean over the selected positions (not over the whole batch)
    sel = kd_loss(s[mask == 1], t[mask == 1])
    assert float(full) == pytest.approx(float(sel), rel=1e-6)
    # changing a masked-in position does change it
    s2[0, 2, 0] += 3  # (one logit: adding a constant to all of them would not change the softmax)
    assert float(kd_loss(s2, t2, mask)) != pytest.approx(float(full), rel=1e-4)


def test_distill_loss_mixes_ce_and_kd():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 8)
    y = torch.randint(0, 8, (2, 5))
    y[0, :2] = -100
    total, ce, kd = distill_loss(s, t, y, alpha=0.3, temperature=2.0)
    ce_ref = torch.nn.functional.cross_entropy(s.reshape(-1, 8), y.reshape(-1), ignore_index=-100)
    kd_ref = kd_loss(s, t, y != -100, temperature=2.0)
    assert float(ce) == pytest.approx(float(ce_ref), rel=1e-6)
    assert float(kd) == pytest.approx(float(kd_ref), rel=1e-6)
    assert float(total) == pytest.approx(0.3 * float(ce_ref) + 0.7 * float(kd_ref), rel=1e-6)
    total.backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0
    # α = 1: plain CE; α = 0: the teacher alone
    assert float(distill_loss(s, t, y, alpha=1.0)[0]) == pytest.approx(float(ce_ref), rel=1e-6)
    assert float(distill_loss(s, t, y, alpha=0.0, temperature=2.0)[0]) == pytest.approx(float(kd_ref), rel=1e-6)
    with pytest.raises(ValueError):
        distill_loss(s, t, y, alpha=1.5)


def test_distill_loss_without_response_tokens_is_zero_not_nan():
    s, t = torch.randn(1, 3, 4, requires_grad=True), torch.randn(1, 3, 4)
    y = torch.full((1, 3), -100)
    total, ce, kd = distill_loss(s, t, y)
    assert float(total) == 0.0 and math.isfinite(float(ce))
    total.backward()


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_topk_with_full_support_equals_full_loss(kind):
    torch.manual_seed(1)
    s, t = torch.randn(2, 4, 10), torch.randn(2, 4, 10)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]])
    vals, idx = t.topk(10, dim=-1)
    full = kd_loss(s, t, mask, 2.0, kind)
    assert float(topk_kd_loss(s, vals, idx, mask, 2.0, kind)) == pytest.approx(float(full), rel=1e-5)


def test_topk_renormalises_on_the_support():
    # teacher logits [2, 1, 0, -1], top-2 = tokens {0, 1}: p̃ = softmax([2, 1]); student q̃ = softmax(s[{0,1}])
    t = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    s = torch.tensor([[0.0, 0.5, 9.0, 9.0]])  # lots of mass outside the support: invisible to the top-k loss
    vals, idx = t.topk(2, dim=-1)
    p = torch.softmax(torch.tensor([2.0, 1.0]), -1)
    q = torch.softmax(torch.tensor([0.0, 0.5]), -1)
    expected = float((p * (p.log() - q.log())).sum())
    assert float(topk_kd_loss(s, vals, idx)) == pytest.approx(expected, rel=1e-5)
