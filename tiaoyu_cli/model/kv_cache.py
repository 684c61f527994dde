"""Key/value cache for generation: prefill the prompt once, then decode one token at a time.

Keys and values of every layer are preallocated as [n_layers, B, n_kv_heads, max_len, head_dim].
`key_mask[b, j]` is False where position j of row b is left padding, so a batch of prompts of
different lengths can be generated together.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_mask = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0  # positions filled so far
        self.max_len = max_len

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int) -> "KVCache":
        cfg = model.config
        p = next(model.parameters())
        dtype = torch.get_autocast_dtype(p.device.type) if torch.is_autocast_enabled(p.device.type) else p.dtype
        return cls(cfg.n_layers, batch_size, cfg.n_kv_heads, cfg.head_dim, max_len, p.device, dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v ([B, n_kv, T, hd]) at the current position; return all keys/values so far."""
        t = k.shape[2]
        end = self.length + t
        self.k[layer, :, :, self.length:end] = k.to(self.k.dtype)
        self.v[layer, :, :, self.length:end] = v.to(self.v.dtype)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (drop finished sequences)."""
        self.k = self.k[:, rows]
        self.v = self.v[:, rows]
        self.key_mask = self.key_mask[rows]
