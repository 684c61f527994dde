"""Model proofs: attention against a naive implementation, causality, GQA, MoE routing and its aux
loss, position variants, and left padding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tiaoyu_cli.model import ModelConfig, Transformer
from tiaoyu_cli.model.moe import MoE, load_balancing_loss
from tiaoyu_cli.model.transformer import Attention, rope_tables, sinusoidal_table


SMALL = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=32)


def make(seed: int = 0, std: float = 0.1, **kw) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(**{**SMALL, **kw})).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, std)
            else:
                p.uniform_(0.5, 1.5)  # norms away from 1 so they matter
    return m


def naive_rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate the pair (x[i], x[i + hd/2]) by angle pos · theta^(-2i/hd), written out per pair."""
    hd = x.shape[-1]
    out = x.clone()
    for i in range(hd // 2):
        ang = pos.float() * theta ** (-2 * i / hd)  # [T]
        c, s = torch.cos(ang), torch.sin(ang)
        a, b = x[..., i], x[..., i + hd // 2]
        out[..., i] = a * c - b * s
        out[..., i + hd // 2] = a * s + b * c
    return out


def test_attention_equals_naive_softmax():
    cfg = ModelConfig(**SMALL)
    torch.manual_seed(0)
    attn = Attention(cfg, 0).eval()
    B, T, H, Hkv, hd = 2, 7, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    x = torch.randn(B, T, cfg.dim)
    pos = torch.arange(T)
    rope = rope_tables(hd, pos.expand(B, T), cfg.rope_theta)
    ours = attn(x, rope, None, None)

    q = attn.q_proj(x).view(B, T, H, hd)
    k = attn.k_proj(x).view(B, T, Hkv, hd)
    v = attn.v_proj(x).view(B, T, Hkv, hd)
    want = torch.zeros(B, T, H, hd)
    for b in range(B):
        for h in range(H):
            g = h // (H // Hkv)  # the K/V head this query head shares
            qh = naive_rope(q[b, :, h], pos, cfg.rope_theta)  # [T, hd]
            kh = naive_rope(k[b, :, g], pos, cfg.rope_theta)
            scores = qh @ kh.T / math.sqrt(hd)
            scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
            want[b, :, h] = scores.softmax(-1) @ v[b, :, g]
    want = attn.o_proj(want.reshape(B, T, H * hd))
    assert torch.allclose(ours, want, atol=1e-5), (ours - want).abs().max()


@pytest.mark.parametrize("kw", [{}, {"position": "learned"}, {"position": "sinusoidal"},
                                {"n_experts": 4, "n_experts_per_tok": 2}])
def test_future_tokens_never_change_past_logits(kw):
    m = make(**kw)
    torch.manual_seed(1)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 12))
    with torch.no_grad():
        base = m(ids).logits
        for t in (1, 5, 11):
            changed = ids.clone()
            changed[:, t:] = torch.randint(0, SMALL["vocab_size"], changed[:, t:].shape)
            assert not torch.equal(changed[:, t:], ids[:, t:])
            out = m(changed).logits
            assert torch.allclose(out[:, :t], base[:, :t], atol=1e-5)
            assert not torch.allclose(out[:, t:], base[:, t:], atol=1e-3)  # the change did reach later positions


def test_gqa_equals_repeated_kv_heads():
    gqa = make(n_heads=4, n_kv_heads=2)
    mha = Transformer(ModelConfig(**{**SMALL, "n_heads": 4, "n_kv_heads": 4})).eval()
    rep, hd = 2, gqa.config.head_dim
    sd = {}
    for k, v in gqa.state_dict().items():
        if k.endswith(("k_proj.weight", "v_proj.weight")):
            v = v.view(2, hd, -1).repeat_interleave(rep, dim=0).reshape(4 * hd, -1)  # KV head g serves heads 2g, 2g+1
        sd[k] = v
    mha.load_state_dict(sd)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(gqa(ids).logits, mha(ids).logits, atol=1e-5)


@pytest.mark.parametrize("shared", [0, 1])
def test_moe_equals_loop_over_tokens_and_experts(shared):
    cfg = ModelConfig(**{**SMALL, "n_experts": 4, "n_experts_per_tok": 2, "n_shared_experts": shared})
    torch.manual_seed(0)
    moe = MoE(cfg).eval()
    x = torch.randn(2, 5, cfg.dim)
    out, aux = moe(x)
    want = torch.zeros_like(x)
    for b in range(2):
        for t in range(5):
            xt = x[b, t]
            probs = F.softmax(moe.gate.weight @ xt, dim=-1)
            top = sorted(range(4), key=lambda e: -probs[e].item())[:2]
            norm = sum(probs[e] for e in top)
            for e in top:
                ex = moe.experts[e]
                y = ex.w2.weight @ (F.silu(ex.w1.weight @ xt) * (ex.w3.weight @ xt))
                want[b, t] += probs[e] / norm * y
            if shared:
                s = moe.shared_experts
                want[b, t] += s.down_proj.weight @ (F.silu(s.gate_proj.weight @ xt) * (s.up_proj.weight @ xt))
    assert torch.allclose(out, want, atol=1e-5)
    assert aux.item() == 0.0  # no aux loss in eval


def test_aux_loss_by_hand():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    # k = 1, both tokens pick expert 0: f = [1, 0], P = [0.55, 0.45] → 2 · (1·0.55 + 0·0.45) = 1.1
    assert load_balancing_loss(probs, torch.tensor([[0], [0]]), 2).item() == pytest.approx(1.1)
    # k = 2, perfectly balanced slots: f = [[.5, .5], [.5, .5]] → 2 · (0.5 + 0.5) = 2 = k
    assert load_balancing_loss(probs, torch.tensor([[0, 1], [1, 0]]), 2).item() == pytest.approx(2.0)
    # everything on one expert with all the probability: k · E
    one = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert load_balancing_loss(one, torch.tensor([[0], [0]]), 3).item() == pytest.approx(3.0)


def test_model_aux_loss_is_coef_times_layer_mean():
    m = make(n_experts=4, n_experts_per_tok=2, moe_aux_loss_coef=0.05).train()
    per_layer = []
    for block in m.model.layers:
        block.block_sparse_moe.register_forward_hook(lambda mod, inp, out: per_layer.append(out[1].detach()))
    ids = torch.randint(0, SMALL["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    out = m(ids)
    assert len(per_layer) == 2 and all(v.item() > 0 for v in per_layer)
    assert out.aux_loss.item() == pytest.approx(0.05 * sum(v.item() for v in per_layer) / 2, rel=1e-6)
    out.aux_loss.backward()
    assert m.model.layers[0].block_sparse_moe.gate.weight.grad.abs().sum() > 0  # the router learns from it
    assert make().train()(ids).aux_loss is None  # dense model: none


@pytest.mark.parametrize("kw", [{"position": "learned"}, {"position": "sinusoidal"}, {"tie_embeddings": False},
                                {"position": "learned", "tie_embeddings": False, "dropout": 0.1}])
def test_position_variants_and_untied_head_train(kw):
    m = make(**kw).train()
    ids = torch.randint(0, SMALL["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    out = m(ids)
    assert out.logits.shape == (2, 16, SMALL["vocab_size"])
    F.cross_entropy(out.logits[:, :-1].reshape(-1, SMALL["vocab_size"]), ids[:, 1:].reshape(-1)).backward()
    names = {n for n, _ in m.named_parameters()}
    assert ("lm_head.weight" in names) == (not m.config.tie_embeddings)
    if not m.config.tie_embeddings:
        assert m.lm_head.weight.grad.abs().sum() > 0
        assert m.output_weight is m.lm_head.weight
    if kw.get("position") == "learned":
        assert m.model.embed_positions.weight.grad[:16].abs().sum() > 0
        assert m.model.embed_positions.weight.grad[16:].abs().sum() == 0  # only the positions used
    if m.config.position != "rope":
        with pytest.raises(ValueError):  # learned/sinusoidal tables end at max_seq_len
            m(torch.zeros(1, SMALL["max_seq_len"] + 1, dtype=torch.long))


def test_sinusoidal_table_values():
    t = sinusoidal_table(10, 8)
    pos, i = 3, 1  # table[pos, 2i] = sin(pos / 10000^(2i/d)), table[pos, 2i+1] = cos(…)
    assert t[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 8)), abs=1e-6)
    assert t[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 8)), abs=1e-6)


@pytest.mark.parametrize("kw", [{}, {"position": "learned"}, {"position": "sinusoidal"},
                                {"n_experts": 4, "n_experts_per_tok": 2}])
def test_left_padded_batch_equals_rows_alone(kw):
    m = make(**kw)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, SMALL["vocab_size"], (n,), generator=g) for n in (9, 4, 1, 6)]
    L = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, L - len(r):] = r
        mask[b, L - len(r):] = 1
    with torch.no_grad():
        batch = m(ids, attention_mask=mask).logits
        for b, r in enumerate(rows):
            alone = m(r[None]).logits[0]
            assert torch.allclose(batch[b, L - len(r):], alone, atol=1e-5), (b, kw)
