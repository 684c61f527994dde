"""Feed-forward layers: SwiGLU, and a mixture of SwiGLU experts (Mixtral layout).

MoE: a softmax router scores every expert per token, the top-k experts run, their outputs are
mixed with the router probabilities renormalised over the chosen k. An optional shared expert
runs on every token. The load-balancing loss (Switch Transformer / Mixtral) pushes the router
to spread tokens: aux = E · Σ_e f_e · P_e, with f_e the fraction of routing slots sent to expert e
and P_e the mean router probability of e.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tiaoyu_cli.model.config import ModelConfig


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Expert(nn.Module):
    """One Mixtral expert: w2(silu(w1(x)) * w3(x)) — w1 = gate, w3 = up, w2 = down."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def load_balancing_loss(router_probs: torch.Tensor, topk_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """aux = E · Σ_k Σ_e f_{k,e} · P_e  (Mixtral's formula).

    router_probs: [N, E] softmax probabilities; topk_idx: [N, k] chosen experts.
    f_{k,e} = share of tokens whose k-th choice is e; P_e = mean router probability of e.
    Perfect balance gives k; everything on one expert gives k·E.
    """
    one_hot = F.one_hot(topk_idx, n_experts).float()  # [N, k, E]
    f = one_hot.mean(0)  # [k, E]
    p = router_probs.float().mean(0)  # [E]
    return n_experts * (f * p[None]).sum()


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.n_experts_per_tok
        self.gate = nn.Linear(cfg.dim, cfg.n_experts, bias=False)  # the router
        self.experts = nn.ModuleList(Expert(cfg.dim, cfg.ffn_dim) for _ in range(cfg.n_experts))
        self.shared_experts = (
            SwiGLU(cfg.dim, cfg.ffn_dim * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = x.shape
        flat = x.reshape(-1, D)  # [N, d]
        probs = F.softmax(self.gate(flat).float(), dim=-1)  # [N, E]
        weights, idx = probs.topk(self.top_k, dim=-1)  # [N, k]
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = mix_experts(flat, self.experts, idx, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        aux = load_balancing_loss(probs, idx, self.n_experts) if self.training else probs.new_zeros(())
        return out.view(B, T, D), aux


def mix_experts(flat: torch.Tensor, experts: nn.ModuleList, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_k weights[n, k] · expert_{idx[n, k]}(flat[n]) for every token n; each expert runs only on its tokens."""
    out = torch.zeros_like(flat)
    for e, expert in enumerate(experts):
        token_ids, slot = (idx == e).nonzero(as_tuple=True)
        if token_ids.numel() == 0:
            continue
        y = expert(flat[token_ids]) * weights[token_ids, slot, None]
        out.index_add_(0, token_ids, y.to(out.dtype))
    return out


class SparseMoE(nn.Module):
    """The Qwen2-MoE / Qwen3-MoE expert layer, under the names their files use: `mlp.gate` (the router),
    `mlp.experts.E.{gate,up,down}_proj`, and for qwen2_moe `mlp.shared_expert` scaled per token by
    sigmoid(`mlp.shared_expert_gate`·x). The top-k probabilities are renormalised only when the
    config says so (`norm_topk_prob`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k, self.norm_topk = cfg.n_experts, cfg.n_experts_per_tok, cfg.norm_topk_prob
        hidden = cfg.expert_ffn_dim or cfg.ffn_dim
        self.gate = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(cfg.dim, hidden) for _ in range(cfg.n_experts))
        if cfg.gated_shared_ffn_dim:
            self.shared_expert = SwiGLU(cfg.dim, cfg.gated_shared_ffn_dim)
            self.shared_expert_gate = nn.Linear(cfg.dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        probs = F.softmax(self.gate(flat).float(), dim=-1)  # [N, E]
        weights, idx = probs.topk(self.top_k, dim=-1)  # [N, k]
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        out = mix_experts(flat, self.experts, idx, weights.to(x.dtype))
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        aux = load_balancing_loss(probs, idx, self.n_experts) if self.training else probs.new_zeros(())
        return out.view(B, T, D), aux
