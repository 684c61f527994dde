"""The step factory (infer/steps.py): which step each model gets, and that every step — the two reference
steps and the fast ones — gives `Transformer.forward`'s logits through the same three calls (prefill,
a step, select)."""

from __future__ import annotations

import pytest
import torch

from tiaoyu_cli.infer.steps import make_step
from tiaoyu_cli.model.lora import LoraConfig, apply_lora

from decode_models import small_model

CPU = torch.device("cpu")


def step_for(m, batch: int = 3, **kw):
    with torch.inference_mode():
        return make_step(m, batch, 32, CPU, **kw)


def test_the_factory_picks_the_step_for_the_model():
    assert step_for(small_model()).name == "numpy"  # fp32 RoPE on CPU
    assert step_for(small_model(), fast=False).name == "forward"
    assert step_for(small_model(), use_cache=False).name == "recompute"
    assert step_for(small_model(position="learned")).name == "torch"  # the numpy step is RoPE only
    assert step_for(small_model(n_experts=4, n_experts_per_tok=2)).name == "torch"
    assert step_for(small_model(qk_norm=True)).name == "forward"  # no fast step knows q/k norms
    lora = small_model()
    apply_lora(lora, LoraConfig(rank=4, targets=["q", "v"], dropout=0.0))
    assert step_for(lora).name == "torch"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert step_for(small_model()).name == "torch"  # the numpy step runs fp32 only


@pytest.mark.parametrize("kind", ["numpy", "torch", "forward", "recompute"])
def test_every_step_gives_the_forward_passs_logits(kind):
    m = small_model(position="learned" if kind == "torch" else "rope")
    kw = {"forward": {"fast": False}, "recompute": {"use_cache": False}}.get(kind, {})
    rows = [[2, 50, 60, 70, 80, 90, 9], [2, 10, 11, 12, 13], [2, 40]]
    follow = [[44, 45, 46], [7, 8, 9], [33, 34, 35]]  # fed one per step; row 1 leaves after the first step
    L = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    with torch.inference_mode():
        step = make_step(m, len(rows), 32, CPU, **kw)
        assert step.name == kind
        got = [step.prefill(ids, mask)]
        got.append(step(torch.tensor([f[0] for f in follow])))
        step.select(torch.tensor([0, 2]))
        got.append(step(torch.tensor([follow[0][1], follow[2][1]])))
        for b, r in enumerate(rows):  # each row alone, all of it at once
            want = m(torch.tensor([r + follow[b][:2]])).logits[0, len(r) - 1:]
            torch.testing.assert_close(got[0][b], want[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got[1][b], want[1], atol=1e-4, rtol=1e-4)
            if b != 1:
                torch.testing.assert_close(got[2][[0, 2].index(b)], want[2], atol=1e-4, rtol=1e-4)
