"""Helper of the decode tests (test_fast_decode, test_numpy_step): a small random model whose
logits are spread out, so greedy choices are not near-ties and every decode path can be compared
token for token with the plain forward pass."""

from __future__ import annotations

import torch

from tiaoyu_cli.model import Transformer
from tiaoyu_cli.model.config import ModelConfig

V = 96  # vocabulary of the small models


def small_model(seed: int = 0, std: float = 0.25, norms: bool = False, **kw) -> Transformer:
    """dim 32, 2 layers, 4 heads over 2 KV heads (override any field with kw), weights N(0, std).
    norms=True draws the RMSNorm weights from U(0.5, 1.5) instead of leaving them at one, so that
    a path folding them into the products after them is checked."""
    torch.manual_seed(seed)
    cfg = {"vocab_size": V, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 48, "max_seq_len": 64}
    m = Transformer(ModelConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if not n.endswith("norm.weight"):
                p.normal_(0.0, std)
            elif norms:
                p.uniform_(0.5, 1.5)
    return m
