"""The tiaoyu transformer: a decoder-only language model a student can read top to bottom.

    tokens [B, T]
      → embed_tokens (+ learned/sinusoidal positions if not RoPE) → dropout        x: [B, T, d]
      → N × Block:  x = x + Attention(RMSNorm(x))      causal, grouped-query, RoPE
                    x = x + FFN(RMSNorm(x))            SwiGLU, or a mixture of experts
      → RMSNorm → lm_head (tied to embed_tokens by default)                        logits: [B, T, V]

Module names are exactly the Hugging Face Llama names (`model.layers.0.self_attn.q_proj`, …, and
Mixtral's `block_sparse_moe.experts.E.w1/w3/w2` for MoE), so `model.state_dict()` *is* the
`model.safetensors` transformers loads.

Open families (model/config.py) switch on what they add: q/k/v(/o) and MLP biases (qwen2, llama's
attention_bias/mlp_bias), `self_attn.q_norm`/`k_norm` RMSNorm over each head before RoPE (qwen3),
an explicit head size, scaled RoPE frequencies (`rope_frequencies`: linear, llama3, yarn), a
sliding attention window (mistral) and Qwen-MoE expert layers under `mlp.*` (model/moe.py SparseMoE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tiaoyu_cli.model.config import ModelConfig
from tiaoyu_cli.model.kv_cache import KVCache
from tiaoyu_cli.model.moe import MoE, SparseMoE, SwiGLU


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · weight   (computed in fp32, like Llama)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(head_dim: int, positions: torch.Tensor, theta: float,
                scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin for rotary embeddings at integer `positions` [B, T] → each [B, T, head_dim].

    Frequencies θ_i = theta^(-2i/hd); the two halves of a head share them (Llama's "rotate_half" layout).
    `scaling` (a config's `rope_scaling`) changes the frequencies and, for yarn, the size of cos and sin.
    """
    inv_freq, attention_factor = rope_frequencies(head_dim, theta, scaling)
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)  # [B, T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [B, T, hd]
    if attention_factor != 1.0:
        return emb.cos() * attention_factor, emb.sin() * attention_factor
    return emb.cos(), emb.sin()


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> tuple[torch.Tensor, float]:
    """The rotary frequencies [hd/2] (fp32) and the factor on cos/sin, for plain RoPE or a scaled one:

    linear   every frequency divided by `factor` (positions interpolated)
    llama3   wavelengths longer than original_max/low_freq_factor divided by `factor`, shorter than
             original_max/high_freq_factor kept, a smooth blend between
    yarn     per dimension a blend of the plain and the divided frequency: kept where a dimension turns
             more than beta_fast times over the original context, divided where less than beta_slow times,
             a linear ramp between; cos/sin scaled by 0.1·ln(factor) + 1 (or `attention_factor`)
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    factor = float(scaling.get("factor") or 1.0)
    if kind == "linear":
        return inv_freq / factor, 1.0
    original = float(scaling["original_max_position_embeddings"])
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        middle = (wavelen >= original / high) & (wavelen <= original / low)
        return torch.where(middle, blended, scaled), 1.0
    if kind == "yarn":
        attention_factor = scaling.get("attention_factor")
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")

        def log_scale(m: float) -> float:
            return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

        if attention_factor is None:
            attention_factor = log_scale(mscale) / log_scale(mscale_all) if mscale and mscale_all else log_scale(1.0)
        fast, slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)

        def turns_dim(turns: float) -> float:  # the dimension whose frequency turns `turns` times over `original`
            return head_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = turns_dim(fast), turns_dim(slow)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, head_dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        keep = 1 - ramp  # 1: the plain frequency, 0: divided by factor
        pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep, float(attention_factor)
    raise ValueError(f"rope type {kind!r} is not supported")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+hd/2}) by angle pos·θ_i.  x: [B, H, T, hd], cos/sin: [B, T, hd]."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """The fixed sin/cos position table of "Attention Is All You Need": [n_pos, dim]."""
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_pos, dim)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return table


class Attention(nn.Module):
    """Causal multi-head self-attention with grouped-query heads (n_kv_heads ≤ n_heads) and RoPE."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.use_rope = cfg.position == "rope"
        self.rope_theta = cfg.rope_theta
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)
        if cfg.qk_norm:  # qwen3: every query and key head normalised before RoPE
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None, kv_cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.transpose(1, 2)  # [B, H, T, hd]
        k = k.transpose(1, 2)  # [B, Hkv, T, hd]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)  # [B, Hkv, S, hd], S = past + T
            q = q.to(k.dtype)
        if self.n_kv_heads != self.n_heads:  # GQA: each K/V head serves n_heads / n_kv_heads query heads
            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )  # softmax(q·kᵀ/√hd + mask)·v : [B, H, T, hd]
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(y)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.sparse_mlp and layer not in cfg.dense_layers:
            self.mlp = SparseMoE(cfg)  # Qwen-MoE's names for the expert layer
        elif cfg.is_moe and not cfg.sparse_mlp:
            self.block_sparse_moe = MoE(cfg)  # Mixtral's name for the expert layer
        else:
            self.mlp = SwiGLU(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.experts_out = hasattr(self, "block_sparse_moe") or isinstance(getattr(self, "mlp", None), SparseMoE)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask, kv_cache):
        x = x + self.drop(self.self_attn(self.input_layernorm(x), rope, mask, kv_cache))
        h = self.post_attention_layernorm(x)
        if hasattr(self, "block_sparse_moe"):
            out, aux = self.block_sparse_moe(h)
        elif self.experts_out:
            out, aux = self.mlp(h)
        else:
            out, aux = self.mlp(h), None
        return x + self.drop(out), aux


class Backbone(nn.Module):
    """`model.*` in the checkpoint: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        if cfg.position == "learned":
            self.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.dim)
        elif cfg.position == "sinusoidal":
            self.register_buffer("sinusoidal", sinusoidal_table(cfg.max_seq_len, cfg.dim), persistent=False)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, V] (or [B, 1, V] with last_only)
    hidden: torch.Tensor  # final-norm hidden states [B, T, d]
    aux_loss: torch.Tensor | None  # MoE load-balancing loss (already × coef), None for dense models
    scores: torch.Tensor | None = None  # [B, T, num_labels] from the sequence head, if any


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.num_labels:
            self.score = nn.Linear(cfg.dim, cfg.num_labels, bias=False)  # HF *ForSequenceClassification name
        self.apply(self._init_weights)
        # GPT-2 style: shrink the residual-branch output projections by 1/sqrt(2·layers)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", ".w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_embeddings else self.lm_head.weight

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        attention_mask: torch.Tensor | None = None,  # [B, T], 1 = real token, 0 = padding (left or right)
        kv_cache: KVCache | None = None,
        last_only: bool = False,  # compute logits for the last position only (generation)
        compute_logits: bool = True,
        input_embeds_prefix: torch.Tensor | None = None,  # [B, P, d] soft-prompt vectors put before the tokens
        position_ids: torch.Tensor | None = None,  # [B, T] packed rows: positions restart in every record
        seq_ids: torch.Tensor | None = None,  # [B, T] packed rows: the record of each token (−1 = padding)
    ) -> ModelOutput:
        cfg = self.config
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)  # [B, T, d]
        if input_embeds_prefix is not None:
            P = input_embeds_prefix.shape[1]
            x = torch.cat([input_embeds_prefix.to(x.dtype), x], dim=1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)
            T = T + P
        past = kv_cache.length if kv_cache is not None else 0
        if past + T > cfg.max_seq_len and cfg.position != "rope":
            raise ValueError(f"sequence of {past + T} tokens exceeds max_seq_len {cfg.max_seq_len}")

        # positions and the attention mask
        mask = None
        if seq_ids is not None:  # packed rows: a token sees only the earlier tokens of its own record
            positions = position_ids
            mask = self._packed_mask(seq_ids)
        else:
            if kv_cache is not None:
                if attention_mask is not None:
                    kv_cache.key_mask[:, past:past + T] = attention_mask.bool()
                key_mask = kv_cache.key_mask[:, : past + T]
            else:
                key_mask = attention_mask.bool() if attention_mask is not None else None
            if key_mask is not None:
                positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # padding does not advance positions
                if kv_cache is not None or not bool(key_mask.all()):
                    mask = self._attention_mask(key_mask, past, T)
            else:
                positions = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
                if past > 0:
                    mask = self._attention_mask(None, past, T, device=input_ids.device)

        if cfg.sliding_window and past + T > cfg.sliding_window:
            mask = self._window_mask(mask, past, T, cfg.sliding_window, input_ids.device)

        rope = None
        if cfg.position == "rope":
            rope = rope_tables(cfg.head_dim, positions, cfg.rope_theta, cfg.rope_scaling)
        elif cfg.position == "learned":
            x = x + self.model.embed_positions(positions)
        else:
            x = x + self.model.sinusoidal[positions].to(x.dtype)
        x = self.drop(x)

        aux_total = None
        for block in self.model.layers:
            x, aux = block(x, rope, mask, kv_cache)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        if kv_cache is not None:
            kv_cache.length += T
        h = self.model.norm(x)  # [B, T, d]

        logits = None
        if compute_logits:
            hl = h[:, -1:] if last_only else h
            logits = F.linear(hl, self.output_weight)  # [B, T, V]
        scores = self.score(h) if cfg.num_labels else None
        if aux_total is not None:
            aux_total = aux_total * (cfg.moe_aux_loss_coef / cfg.n_layers)
        return ModelOutput(logits=logits, hidden=h, aux_loss=aux_total, scores=scores)

    @staticmethod
    def _window_mask(mask: torch.Tensor | None, past: int, T: int, window: int, device) -> torch.Tensor:
        """`mask` (None: plain causal) narrowed to a sliding window: query column i sees key column j only
        when i − j < window (columns of the cache, padding included, as transformers counts them)."""
        S = past + T
        q_col = torch.arange(past, S, device=device)[:, None]
        k_col = torch.arange(S, device=device)[None, :]
        near = (q_col - k_col) < window  # [T, S]
        if mask is None:
            mask = (k_col <= q_col)[None, None]
        return mask & near[None, None]

    @staticmethod
    def _packed_mask(seq_ids: torch.Tensor) -> torch.Tensor:
        """Boolean [B, 1, T, T] for packed rows: query i sees key j iff j ≤ i and both belong to the same record
        (seq_ids equal, not padding). A query always sees itself (no all-masked row)."""
        T = seq_ids.shape[1]
        idx = torch.arange(T, device=seq_ids.device)
        causal = idx[None, :] <= idx[:, None]  # [T, T] key ≤ query
        same = (seq_ids[:, :, None] == seq_ids[:, None, :]) & (seq_ids[:, None, :] >= 0)  # [B, T, T]
        return ((same & causal[None]) | torch.eye(T, dtype=torch.bool, device=seq_ids.device)[None])[:, None]

    @staticmethod
    def _attention_mask(key_mask: torch.Tensor | None, past: int, T: int, device=None) -> torch.Tensor:
        """Boolean [B|1, 1, T, past+T]: query i (at absolute position past+i) sees key j iff j ≤ past+i and
        j is not padding. A query always sees itself, so rows of padding never become all-masked (NaN)."""
        S = past + T
        dev = key_mask.device if key_mask is not None else device
        q_pos = torch.arange(past, S, device=dev)[:, None]
        k_pos = torch.arange(S, device=dev)[None, :]
        causal = k_pos <= q_pos  # [T, S]
        if key_mask is None:
            return causal[None, None]
        m = causal[None] & key_mask[:, None, :]  # [B, T, S]
        m = m | (k_pos == q_pos)[None]
        return m[:, None]
