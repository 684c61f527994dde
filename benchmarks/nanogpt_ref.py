"""A minimal nanoGPT-style training loop: the reference `bench_pretrain.py` measures tiaoyu against.

Written for the benchmark, in the spirit of nanoGPT's model.py/train.py: a GPT-2 block
(LayerNorm → causal self-attention via F.scaled_dot_product_attention → LayerNorm → GELU MLP 4d),
learned positions, LM head tied to the token embedding, plain fp32, torch.optim.AdamW, grad clip 1.0.
No autocast, no logging inside the loop: the plainest fast loop one would write by hand.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # [B, H, T, hd]
        k = k.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
        v = v.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, 4 * d, bias=False)
        self.proj = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, n_heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = MLP(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, n_layers: int, n_heads: int, seq_len: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(Block(d, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for b in self.blocks:
            x = b(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied head
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def flops_per_token(vocab: int, d: int, n_layers: int, seq_len: int) -> float:
    """6·N (active matmul weights incl. the head) + 12·L·d·T attention, as for tiaoyu's model."""
    n = n_layers * (4 * d * d + 8 * d * d) + vocab * d
    return 6 * n + 12 * n_layers * d * seq_len


def train(tokens: np.ndarray, vocab: int, d: int, n_layers: int, n_heads: int, seq_len: int, batch: int,
          steps: int, warmup: int = 2, lr: float = 1e-3, seed: int = 0,
          device: torch.device | str = "cpu") -> tuple[float, float]:
    """Run warmup + steps optimizer steps on random windows of `tokens`; return timed tokens per
    wall-clock second and per CPU second of this process."""
    torch.manual_seed(seed)
    device = torch.device(device)
    model = GPT(vocab, d, n_layers, n_heads, seq_len).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(seed)
    data = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    t0 = None
    for it in range(warmup + steps):
        if it == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
        ix = torch.from_numpy(rng.integers(0, len(data) - seq_len - 1, batch))
        x = torch.stack([data[i:i + seq_len] for i in ix]).to(device)
        y = torch.stack([data[i + 1:i + 1 + seq_len] for i in ix]).to(device)
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    final = float(loss.detach())  # waits for the device
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if not math.isfinite(final):
        raise RuntimeError("reference loop diverged")
    return steps * batch * seq_len / wall, steps * batch * seq_len / cpu
