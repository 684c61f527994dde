"""The torch decode steps: `OneTokenStep` (one new token per row of a left-padded batch: what
`decode_steps` runs for LoRA, MoE, autocast, GPUs and batches the numpy step does not take) and
`SlotStep` (the same for continuous batching, every row at its own length).

Both compute what `Transformer.forward(tokens[:, None], kv_cache=cache, last_only=True)` computes, with
less work per step: the rotary tables are computed once, Q/K/V and gate/up run as fused products
(`fused_weights`), grouped-query attention reads the cached K/V directly (`enable_gqa`, no repeated
copies), and no causal mask is built (a single query may see every cached key; only left padding is
masked). They call the model's own modules wherever a layer is not a plain bias-free nn.Linear, so
LoRA-wrapped and MoE layers work. Their prompts go through `Transformer.forward` itself.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from tiaoyu_cli.infer.fast.weights import fused_weights, is_plain_linear
from tiaoyu_cli.model.kv_cache import KVCache
from tiaoyu_cli.model.transformer import Attention, Block, RMSNorm, Transformer, rope_tables


def _linear(mod: torch.nn.Module):
    if is_plain_linear(mod):
        return functools.partial(F.linear, weight=mod.weight)
    return mod


class OneTokenStep:
    """The decode step for one new token per row: tokens [B] → next-token logits [B, V].

    Same computation as `Transformer.forward(tokens[:, None], kv_cache=cache, last_only=True)`,
    with less work per step (this loop runs once per generated token, so its overhead is the
    decode speed of a small model):

        x = embed(token) (+ position embedding)                               [B, d]
        per layer:  q‖k‖v = RMSNorm(x) · Wqkvᵀ  (one product; `fused_weights`)  [B, (H+2Hkv)·hd]
                    RoPE on q and k together, at the row's position
                    write k, v into the preallocated cache at column `length`
                    softmax(q · Kᵀ / √hd) · V over the cached columns (SDPA, one query, no causal
                    mask; GQA by `enable_gqa`, no repeated K/V copies)
                    x = x + o_proj(…)                    (one addmm: product and residual)
                    g‖u = RMSNorm(x) · Wguᵀ;  x = x + (silu(g)·u) · Wdownᵀ    (two products)
        logits = RMSNorm(x) · Wᵀ
    """

    name = "torch"

    def __init__(self, model: Transformer, cache: KVCache, positions: torch.Tensor | None = None):
        """`positions` [B]: where each row's next token goes (padding excluded) in a cache filled elsewhere;
        None for an empty cache that `prefill` fills."""
        cfg = model.config
        self.model, self.cache, self.cfg = model, cache, cfg
        device = cache.k.device
        if positions is None:
            positions = torch.zeros(cache.k.shape[1], dtype=torch.long, device=device)
        self.positions = positions.clone()  # [B] position of the next token in each row (padding excluded)
        self.padded = not bool(cache.key_mask[:, :cache.length].all())
        hd = cfg.head_dim
        if cfg.position == "rope":
            cos, sin = rope_tables(hd, torch.arange(cache.max_len, device=device)[None], cfg.rope_theta,
                                   cfg.rope_scaling)
            sign = torch.ones(hd, device=device)
            sign[: hd // 2] = -1  # rotate_half(x) = roll(x, hd/2) · [-1 … -1, 1 … 1]
            self.cos, self.sin = cos[0], sin[0] * sign  # [P, hd]
        self._views()
        # addmm adds the residual inside the product; under autocast it would run in bf16 and make the
        # residual stream bf16, so there the step adds separately (as the model's forward does)
        self.exact = not torch.is_autocast_enabled(device.type)

        # what each layer uses, looked up once (nn.Module attribute access is slow Python); a plain
        # nn.Linear becomes F.linear with its weight, anything else (e.g. a LoRA wrapper) is called as is
        self.layers = []
        for b, (qkv, o_t, gu, down_t) in zip(model.model.layers, fused_weights(model)):
            a = b.self_attn
            if hasattr(b, "block_sparse_moe") or getattr(b, "experts_out", False):
                moe = b.block_sparse_moe if hasattr(b, "block_sparse_moe") else b.mlp
                ffn = lambda h, moe=moe: moe(h[:, None])[0][:, 0]  # noqa: E731
            else:
                gate, up, down = _linear(b.mlp.gate_proj), _linear(b.mlp.up_proj), _linear(b.mlp.down_proj)
                ffn = lambda h, gate=gate, up=up, down=down: down(F.silu(gate(h)) * up(h))  # noqa: E731
            self.layers.append((self._norm_args(b.input_layernorm), _linear(a.q_proj), _linear(a.k_proj),
                                _linear(a.v_proj), _linear(a.o_proj), self._norm_args(b.post_attention_layernorm),
                                ffn, qkv, o_t, gu, down_t))
        self.final_norm = self._norm_args(model.model.norm)

    def _views(self) -> None:
        self.kc, self.vc = self.cache.k.unbind(0), self.cache.v.unbind(0)  # per layer [B, Hkv, P, hd]

    @staticmethod
    def supports(model) -> bool:
        """True for the stock tiaoyu Transformer (anything else uses model.forward). Biased projections run
        as modules and scaled RoPE through the same tables; q/k norms (qwen3) and a sliding window (mistral)
        are not here: such models decode through model.forward."""
        return (type(model) is Transformer and model.config.plain_attention
                and all(type(b) is Block and type(b.self_attn) is Attention
                        and type(b.input_layernorm) is RMSNorm for b in model.model.layers))

    @staticmethod
    def _norm_args(norm: RMSNorm) -> tuple:
        return norm.weight.shape, norm.weight.float(), norm.eps  # fp32 weights: .float() is the tensor itself

    @staticmethod
    def _norm(x: torch.Tensor, args: tuple) -> torch.Tensor:
        """RMSNorm.forward in one fused op (fp32, like the module)."""
        return F.rms_norm(x if x.dtype == torch.float32 else x.float(), *args)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The prompt into the empty cache through `Transformer.forward` itself: ids, mask [B, T] (left
        padding) → logits [B, V] at the last column."""
        logits = self.model(ids, attention_mask=mask, kv_cache=self.cache, last_only=True).logits[:, -1]
        self.positions = mask.sum(-1)
        self.padded = not bool(self.cache.key_mask[:, :self.cache.length].all())
        return logits

    def select(self, keep: torch.Tensor) -> None:
        self.cache.select(keep)
        self.positions = self.positions[keep]
        self._views()

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        cfg, cache, m, norm = self.cfg, self.cache, self.model.model, self._norm
        B, hd, H, Hkv = tokens.shape[0], cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        half, Hq = hd // 2, H + Hkv
        L, S = cache.length, cache.length + 1
        pos = self.positions
        x = F.embedding(tokens, m.embed_tokens.weight)  # [B, d]
        rope = cfg.position == "rope"
        if rope:
            cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # [B, 1, hd]
        elif cfg.position == "learned":
            x = x + m.embed_positions(pos)
        else:
            x = x + m.sinusoidal[pos].to(x.dtype)
        key_mask = cache.key_mask[:, None, None, :S] if self.padded else None  # [B, 1, 1, S]
        for i, (norm1, q_proj, k_proj, v_proj, o_proj, norm2, ffn, qkv_w, o_t, gu_w, down_t) in enumerate(self.layers):
            h = norm(x, norm1)
            if qkv_w is not None:
                qkv = F.linear(h, qkv_w).view(B, Hq + Hkv, hd)  # q‖k‖v heads: [B, H + 2·Hkv, hd]
                qk, v = qkv[:, :Hq], qkv[:, Hq:]
            else:
                qk = torch.cat([q_proj(h).view(B, H, hd), k_proj(h).view(B, Hkv, hd)], dim=1)
                v = v_proj(h).view(B, Hkv, hd)
            if rope:
                if cos.dtype != qk.dtype:
                    cos, sin = cos.to(qk.dtype), sin.to(qk.dtype)
                qk = torch.addcmul(qk * cos, qk.roll(half, -1), sin)  # q and k rotated together: [B, H + Hkv, hd]
            q, k = qk[:, :H], qk[:, H:]
            kc, vc = self.kc[i], self.vc[i]
            kc.select(2, L).copy_(k)
            vc.select(2, L).copy_(v)
            q = q.unsqueeze(2)  # [B, H, 1, hd]
            if q.dtype != kc.dtype:
                q = q.to(kc.dtype)
            y = F.scaled_dot_product_attention(  # one query per row sees every cached key: no causal mask
                q, kc.narrow(2, 0, S), vc.narrow(2, 0, S),
                attn_mask=key_mask, enable_gqa=True).view(B, H * hd)  # [B, H·hd]
            x = torch.addmm(x, y, o_t) if o_t is not None and self.exact else x + o_proj(y)
            h = norm(x, norm2)
            if gu_w is not None:
                g, u = F.linear(h, gu_w).chunk(2, dim=-1)
                act = F.silu(g).mul_(u)  # [B, ffn]
                x = torch.addmm(x, act, down_t) if self.exact else x + F.linear(act, down_t.t())
            else:
                x = x + ffn(h)
        cache.length = S
        self.positions = pos + 1
        return F.linear(norm(x, self.final_norm), self.model.output_weight)


class SlotStep(OneTokenStep):
    """The decode step of a slot cache (infer/slots.py): rows 0 … n−1, each at its own length. Prompts
    go through `Transformer.forward` (right-padded, into views of their rows); each decode step writes
    row r's key at column pos[r] and masks the columns past it."""

    def prefill_rows(self, prompts: list[list[int]], first: int) -> torch.Tensor:
        """Prompts into rows first … first+k−1 (each from column 0) → logits [k, V] at each prompt's last
        token. One forward pass, the prompts right-padded: the padding sits after each row's length,
        hidden by the key mask and overwritten as the row grows."""
        k, model, device, max_len = len(prompts), self.model, self.cache.k.device, self.cache.max_len
        width = max(len(p) for p in prompts)
        ids = torch.zeros(k, width, dtype=torch.long)
        mask = torch.zeros(k, width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
            mask[i, :len(p)] = 1
        view = KVCache.__new__(KVCache)  # the rows' own cache: views into the big tensors
        view.k, view.v = self.cache.k[:, first:first + k], self.cache.v[:, first:first + k]
        view.key_mask = torch.ones(k, max_len, dtype=torch.bool, device=device)
        view.length, view.max_len = 0, max_len
        ids, mask = ids.to(device), mask.to(device)
        if k == 1:  # no padding: the logits of the last position only
            return model(ids, kv_cache=view, last_only=True).logits[:, -1]
        # the final hidden state at each row's last real token, then the LM head on those alone
        h = model(ids, attention_mask=mask, kv_cache=view, compute_logits=False).hidden
        last = torch.tensor([len(p) - 1 for p in prompts], device=device)
        return F.linear(h[torch.arange(k, device=device), last], model.output_weight)

    def slot_step(self, tokens: list[int] | torch.Tensor, lengths: list[int], width: int) -> torch.Tensor:
        """tokens[r] for row r at column lengths[r] (the row's current length); width = max(lengths) + 1.
        Logits [n, V]."""
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.cache.k.device)
        pos = torch.tensor(lengths, dtype=torch.long, device=self.cache.k.device)
        cfg, cache, m, norm = self.cfg, self.cache, self.model.model, self._norm
        B, hd, H, Hkv = tokens.shape[0], cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        half = hd // 2
        L = cache.k.shape[3]
        # where each row's new key goes in a layer's cache seen as [slots·kv_heads·max_len, hd]
        dest = ((torch.arange(B, device=tokens.device)[:, None] * Hkv + torch.arange(Hkv, device=tokens.device)) * L
                + pos[:, None]).reshape(-1)  # [n·kv_heads]
        x = m.embed_tokens(tokens)  # [n, d]
        rope = cfg.position == "rope"
        if rope:
            cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # [n, 1, hd]
        elif cfg.position == "learned":
            x = x + m.embed_positions(pos)
        else:
            x = x + m.sinusoidal[pos].to(x.dtype)
        mask = None  # rows at the full width see every column: no mask needed when all are
        if B > 1 and bool((pos != width - 1).any()):
            cols = torch.arange(width, device=tokens.device)
            hidden = (cols[None, :] > pos[:, None])[:, None, None, :]  # [n, 1, 1, width]
            # additive, in the cache's dtype: made once per step, not converted by every layer's SDPA
            mask = torch.zeros(hidden.shape, dtype=cache.k.dtype, device=tokens.device).masked_fill_(hidden, float("-inf"))
        for i, (norm1, q_proj, k_proj, v_proj, o_proj, norm2, ffn, *_fused) in enumerate(self.layers):
            h = norm(x, norm1)
            q = q_proj(h).view(B, H, hd)
            k = k_proj(h).view(B, Hkv, hd)
            v = v_proj(h).view(B, Hkv, hd)
            if rope:
                if cos.dtype != q.dtype:
                    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
                q = q * cos + q.roll(half, -1) * sin
                k = k * cos + k.roll(half, -1) * sin
            cache.k[i].view(-1, hd).index_copy_(0, dest, k.reshape(-1, hd).to(cache.k.dtype))
            cache.v[i].view(-1, hd).index_copy_(0, dest, v.reshape(-1, hd).to(cache.v.dtype))
            y = F.scaled_dot_product_attention(
                q.view(B, H, 1, hd).to(cache.k.dtype), cache.k[i, :B, :, :width], cache.v[i, :B, :, :width],
                attn_mask=mask, enable_gqa=True)  # [n, H, 1, hd]
            x = x + o_proj(y.reshape(B, H * hd))
            h = norm(x, norm2)
            x = x + ffn(h)
        return F.linear(norm(x, self.final_norm), self.model.output_weight)
