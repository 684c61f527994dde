"""AdamW with decoupled weight decay on matrices only, and learning-rate schedules."""

from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    device: torch.device) -> torch.optim.AdamW:
    """No decay on norms, biases and embeddings (1-D tensors and `embed_*`). The fused AdamW kernel
    (one pass over all parameters) on CUDA and CPU, where this torch has it; else the default."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embed" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
        except (RuntimeError, ValueError, TypeError):  # an older torch without the fused kernel here
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def lr_at(step: int, total: int, base_lr: float, warmup: int, schedule: str = "cosine", min_ratio: float = 0.1,
          decay_frac: float = 0.2) -> float:
    """Learning rate at optimizer step `step` (0-based) of `total`.

    - linear warmup over `warmup` steps, then
    - cosine: half-cosine from base_lr down to min_ratio·base_lr at `total`;
    - wsd (warmup-stable-decay): constant, then linear decay to min_ratio over the last `decay_frac` of steps;
    - constant.
    """
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return base_lr
    min_lr = base_lr * min_ratio
    if schedule == "wsd":
        decay_start = int(total * (1 - decay_frac))
        if step < decay_start:
            return base_lr
        t = min(1.0, (step - decay_start) / max(1, total - decay_start))
        return base_lr + (min_lr - base_lr) * t
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * t))
