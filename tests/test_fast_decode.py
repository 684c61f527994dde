"""The decode step's inference-only transforms (fused Q/K/V and gate/up, residual inside addmm) give
the same tokens as the model's own forward pass; they follow weight changes; LoRA falls back.

Every test runs twice: with the numpy step (numpy_step.py, what plain fp32 models get on CPU) and with
it switched off (`OneTokenStep`, what LoRA, MoE, autocast and GPUs get)."""

from __future__ import annotations

import pytest
import torch

from tiaoyu_cli.infer.fast.weights import fused_weights
from tiaoyu_cli.infer.generate import generate_detailed
from tiaoyu_cli.infer.sampling import SamplingParams
from tiaoyu_cli.model import Transformer
from tiaoyu_cli.infer.fast.numpy_step import NumpyStep
from tiaoyu_cli.model.lora import LoraConfig, apply_lora

from decode_models import V, small_model


@pytest.fixture(autouse=True, params=["numpy", "torch"])
def step_kind(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(NumpyStep, "prepare", staticmethod(lambda *a, **k: None))
    return request.param

PROMPTS = [[2, 10, 11, 12, 13], [2, 40], [2, 50, 60, 70, 80, 90, 9], [2, 33, 34]]


def make(seed: int = 0, **kw) -> Transformer:
    return small_model(seed, **kw)


def both(m, prompts=PROMPTS, n=20, stops=(3, 5), **kw):
    fast = generate_detailed(m, prompts, n, SamplingParams(0), stops, **kw)
    plain = generate_detailed(m, prompts, n, SamplingParams(0), stops, fast_decode=False, **kw)
    return fast, plain


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 1}, {"n_kv_heads": 4}, {"position": "learned"},
                                {"n_experts": 4, "n_experts_per_tok": 2}])
def test_fast_step_gives_the_plain_paths_tokens(kw):
    m = make(**kw)
    fused = fused_weights(m)
    dense = not kw.get("n_experts")
    assert all(f[0] is not None and f[1] is not None for f in fused)  # attention always fused here
    assert all((f[2] is not None) == dense for f in fused)
    assert fused[0][0].shape == (32 + 2 * m.config.n_kv_heads * 8, 32)
    fast, plain = both(m)
    assert fast.tokens == plain.tokens and fast.finish_reasons == plain.finish_reasons
    assert len({tuple(t) for t in fast.tokens}) > 1
    single = [generate_detailed(m, [p], 20, SamplingParams(0), (3, 5)).tokens[0] for p in PROMPTS]
    assert single == fast.tokens  # batch (with padding, rows dropping out) = one at a time
    fast, plain = both(m, logprobs="model")
    assert max(abs(a - b) for x, y in zip(fast.logprobs, plain.logprobs) for a, b in zip(x, y)) < 1e-4


def test_sampling_matches_too():
    m = make()
    params = SamplingParams(temperature=1.0, top_k=20, repetition_penalty=1.1)
    a = generate_detailed(m, PROMPTS, 24, params, [], seed=3)
    b = generate_detailed(m, PROMPTS, 24, params, [], seed=3, fast_decode=False)
    assert a.tokens == b.tokens


def test_fused_weights_follow_an_in_place_update():
    """RL updates the policy between rollouts: the fused copies must not serve stale weights."""
    m = make()
    before = fused_weights(m)
    assert fused_weights(m) is before  # cached while nothing changes
    fast0, _ = both(m)
    with torch.no_grad():
        for b in m.model.layers:
            b.self_attn.q_proj.weight.mul_(-1.5)  # what an optimizer step does: in place
            b.mlp.up_proj.weight.add_(0.3)
    after = fused_weights(m)
    assert after is not before
    assert torch.equal(after[0][0][:32], m.model.layers[0].self_attn.q_proj.weight)
    fast, plain = both(m)
    assert fast.tokens == plain.tokens != fast0.tokens


def test_lora_layers_run_their_modules():
    m = make()
    apply_lora(m, LoraConfig(rank=4, targets=["q", "v", "up"], dropout=0.0))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3)  # a trained adapter changes the output
    fused = fused_weights(m)
    assert all(f[0] is None and f[2] is None for f in fused)
    fast, plain = both(m)
    assert fast.tokens == plain.tokens


def test_fused_weights_follow_a_real_optimizer_step():
    """torch's AdamW updates the weights without bumping their tensor versions (measured: _version stays 1),
    so the test above is not enough: the Trainer bumps `model.weights_version` after every optimizer step
    and the decode cache keys on it (an RL rollout after a step decodes the updated policy)."""
    from tiaoyu_cli.train.engine.optim import build_optimizer

    m = make()
    both(m)  # decode once: the fused copies exist
    opt = build_optimizer(torch.nn.ModuleDict({"model": m}), 0.05, 0.0, (0.9, 0.95), torch.device("cpu"))
    m.train()
    m(torch.tensor([PROMPTS[0]])).logits.float().logsumexp(-1).mean().backward()
    versions = [p._version for p in m.parameters()]
    opt.step()
    m.eval()
    if [p._version for p in m.parameters()] == versions:  # the optimizer left the versions alone …
        stale, plain = both(m)
        assert stale.tokens != plain.tokens  # … so without the bump the cache serves the old block weights
    m.weights_version = 1  # what Trainer._clip_and_step does
    fast, plain = both(m)
    assert fast.tokens == plain.tokens
