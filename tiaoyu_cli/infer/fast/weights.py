"""Weights rearranged for the fast decode steps: inference-only transforms that files never see, cached
per model until a weight changes.

- `fused_weights` (for `OneTokenStep`): per layer Wq‖Wk‖Wv as one matrix, Wgate‖Wup as another, and the
  transposed o/down views that `torch.addmm` takes.
- `prepared_weights` (for `NumpyStep` and the compiled step): the same matrices as C-contiguous numpy
  arrays [in, out] with the attention scale, the norm weights and the gate's sign folded in, the rotary
  pairs side by side, in one buffer; and the rotary table as complex numbers (`rope_rotations`).

The cache key holds every weight's tensor version (in-place edits such as load_state_dict) and
`model.weights_version`, which the Trainer bumps after every optimizer step (torch's fused/foreach
optimizer kernels leave `_version` alone), so RL rollouts always decode the current policy.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import numpy as np
import torch

from tiaoyu_cli.model.moe import SwiGLU
from tiaoyu_cli.model.transformer import Transformer, rope_tables

_FUSED: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, list]] = weakref.WeakKeyDictionary()
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_plain_linear(mod: torch.nn.Module) -> bool:
    """A bias-free nn.Linear (not a LoRA wrapper or a quantized layer): its weight can be fused."""
    return type(mod) is torch.nn.Linear and mod.bias is None


def fused_weights(model: Transformer) -> list[tuple[torch.Tensor | None, ...]]:
    """Per layer (Wqkv, Woᵀ, Wgate‖up, Wdownᵀ) for decoding, an inference-only transform that files never see.

    Q, K and V become one [(H + 2·Hkv)·hd, d] matrix and gate/up one [2·ffn, d] matrix, so a decode
    step runs 2 matrix products where it ran 5; the transposed o/down views feed `torch.addmm`,
    which adds the residual in the same call. A layer whose projections are not plain bias-free
    nn.Linear (LoRA wrappers, MoE experts) gets None there and runs its modules. Kept per model
    until a weight changes: tensor versions catch in-place edits such as load_state_dict, and
    `model.weights_version` (bumped by the Trainer after every optimizer step: torch's fused/foreach
    optimizer kernels leave `_version` alone) catches training, so RL rollouts always decode the
    current policy.
    """
    layers = model.model.layers
    weights = [p for b in layers for p in b.parameters()]
    key = (getattr(model, "weights_version", 0), tuple((id(p), p._version) for p in weights))
    hit = _FUSED.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    out = []
    with torch.no_grad():
        for b in layers:
            a = b.self_attn
            attn = all(is_plain_linear(m) for m in (a.q_proj, a.k_proj, a.v_proj, a.o_proj))
            mlp = getattr(b, "mlp", None)
            ffn = mlp is not None and type(mlp) is SwiGLU and all(is_plain_linear(m) for m in (
                mlp.gate_proj, mlp.up_proj, mlp.down_proj))
            out.append((torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]) if attn else None,
                        a.o_proj.weight.t() if attn else None,
                        torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]) if ffn else None,
                        mlp.down_proj.weight.t() if ffn else None))
    _FUSED[model] = (key, out)
    return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().contiguous().numpy()


class Prepared(NamedTuple):
    layers: list  # per layer (A, Woᵀ, GU, D), C-contiguous float32 [in, out]
    final_norm: np.ndarray  # [d]
    rot: np.ndarray  # [P, (H + Hkv)·hd/2] complex64: e^{i·pos·θ_j} for every q and k head at once


def rope_rotations(cfg, positions: int) -> np.ndarray:
    """[P, (H + Hkv)·hd/2] complex64: e^{i·pos·θ_j}, repeated for every q and k head (RoPE as one product)."""
    cos, sin = rope_tables(cfg.head_dim, torch.arange(positions)[None], cfg.rope_theta,
                           cfg.rope_scaling)  # [1, P, hd], halves equal
    half = cfg.head_dim // 2
    rot = (cos[0, :, :half].double() + 1j * sin[0, :, :half].double()).numpy().astype(np.complex64)
    return np.tile(rot, (1, cfg.n_heads + cfg.n_kv_heads))


def prepared_weights(model: Transformer) -> Prepared | None:
    """The weights rearranged for `NumpyStep` (the formulas are in numpy_step.py) and the rotary tables; None
    when a weight is not fp32 or a layer is not plain (LoRA wrappers, MoE experts: `fused_weights`).

    Cached per model until a weight changes (the key of `fused_weights`: tensor versions and the
    Trainer's `weights_version`), so RL rollouts after an optimizer step decode the current policy.
    """
    params = list(model.parameters())
    key = (getattr(model, "weights_version", 0), tuple((id(p), p._version) for p in params))
    hit = _PREPARED.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    out = None
    fused = fused_weights(model)
    if all(p.dtype == torch.float32 for p in params) and all(w is not None for ws in fused for w in ws):
        cfg = model.config
        H, hd = cfg.n_heads, cfg.head_dim
        nqk = (H + cfg.n_kv_heads) * hd
        layers = []
        with torch.no_grad():
            for b, (qkv, o_t, gu, down_t) in zip(model.model.layers, fused):
                w = _np(qkv).copy()  # [(H + 2·Hkv)·hd, d]: q, k, v rows
                w[: H * hd] *= hd ** -0.5  # the attention scale, folded into q (RoPE is linear: before it is fine)
                w[: nqk] = w[: nqk].reshape(-1, 2, hd // 2, w.shape[1]).swapaxes(1, 2).reshape(nqk, -1)  # pairs
                gu = _np(gu).copy()  # [2·ffn, d]: gate, up rows
                gu[: cfg.ffn_dim] *= -1  # −gate: silu(g)·u = −(−g)·u / (1 + exp(−g)), the sign goes into D
                layers.append((np.ascontiguousarray((w * _np(b.input_layernorm.weight)).T),
                               np.ascontiguousarray(_np(o_t)),
                               np.ascontiguousarray((gu * _np(b.post_attention_layernorm.weight)).T),
                               np.ascontiguousarray(-_np(down_t))))
        # one buffer in the order a step reads them (4 KiB-aligned): the weights stream from memory every
        # token, and one run of addresses is what the hardware prefetcher follows best
        sizes = [(m.size + 1023) // 1024 * 1024 for ws in layers for m in ws]
        buf = np.empty(sum(sizes), np.float32)
        packed, at = [], 0
        for ws in layers:
            views = []
            for m in ws:
                v = buf[at:at + m.size].reshape(m.shape)
                v[...] = m
                views.append(v)
                at += (m.size + 1023) // 1024 * 1024
            packed.append(tuple(views))
        out = Prepared(packed, _np(model.model.norm.weight), rope_rotations(cfg, cfg.max_seq_len))
    _PREPARED[model] = (key, out)
    return out
