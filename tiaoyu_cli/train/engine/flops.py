"""Model FLOPs per token and accelerator peak FLOPs, for MFU."""

from __future__ import annotations

import torch

from tiaoyu_cli.model.config import ModelConfig


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token ≈ 6·N (forward + backward through the active weights) + attention
    12·L·d·T (PaLM appendix B). For MoE only the top-k experts count as active."""
    d, L = cfg.dim, cfg.n_layers
    attn = d * cfg.head_dim * (cfg.n_heads + 2 * cfg.n_kv_heads) + cfg.n_heads * cfg.head_dim * d
    k = cfg.n_experts_per_tok if cfg.is_moe else 1
    ffn = 3 * d * cfg.ffn_dim * (k + cfg.n_shared_experts)
    n_active = L * (attn + ffn) + cfg.vocab_size * d
    return 6 * n_active + 12 * L * d * seq_len


_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40": 181e12, "A10": 125e12, "4090": 165e12, "3090": 71e12}


def peak_flops(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device)
    for key, val in _PEAK_BF16.items():
        if key in name:
            return val
    return None
