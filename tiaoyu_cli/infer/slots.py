"""Slots for continuous batching: a KV cache of `capacity` rows, one sequence per row, each at its own
length, so a new sequence joins the running batch at the next decode step and a finished one leaves
at once (instead of a batch that starts together and waits for its slowest member).

    slots = SlotBatch(model, capacity=8, max_len=model.config.max_seq_len)
    logits = slots.prefill(prompt_ids)          # a new row: [V] logits of its next token
    logits = slots.prefill_many([a, b, c])      # three new rows in one forward pass: [3, V]
    logits = slots.step(next_tokens)            # one token for every active row: [n, V]
    moves = slots.release([2, 5])               # rows 2 and 5 are done; the last rows move into the gaps

Layout. Keys/values live in one [layers, capacity, kv_heads, max_len, head_dim] tensor. Row r holds
its sequence in columns 0 … len[r]−1 (no padding on the left: every row starts at column 0).
Active rows are always rows 0 … n−1: `release` moves the last active row into a freed one (a copy
of that row's filled columns, once per finished sequence), so the decode step reads the cache as a
plain slice, never a gather.

Prefill runs the model's own forward pass on the prompt alone, writing straight into the row (a
KVCache whose tensors are views of that row). Decode is `SlotStep`: `OneTokenStep` (generate.py)
with a write position per row — `k[layer, r, :, len[r]] = k_r` — and a key mask per row
(column j is visible to row r iff j ≤ len[r]); attention covers columns 0 … max(len), so shorter
rows are masked, not recomputed. Each row computes what it would alone (tests compare with the
model's full forward pass).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tiaoyu_cli.infer.generate import OneTokenStep
from tiaoyu_cli.infer.numpy_step import NumpyStep
from tiaoyu_cli.model.kv_cache import KVCache


class SlotStep(OneTokenStep):
    """One decode step for rows 0 … n−1 of a slot cache, each at its own position."""

    def __init__(self, model, cache: KVCache):
        super().__init__(model, cache, torch.zeros(cache.k.shape[1], dtype=torch.long, device=cache.k.device))

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor, width: int) -> torch.Tensor:  # type: ignore[override]
        """tokens [n], pos [n] (where each token goes = the row's current length), width = max(pos) + 1."""
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


class SlotBatch:
    """The KV store of a continuous batch. Call under `torch.inference_mode()` (and the autocast the
    model runs in); the cache takes the autocast dtype when one is active."""

    def __init__(self, model, capacity: int, max_len: int):
        if not OneTokenStep.supports(model):
            raise TypeError("continuous batching needs the stock tiaoyu Transformer")
        self.model, self.capacity, self.max_len = model, capacity, max_len
        self.cache = KVCache.for_model(model, capacity, max_len)
        self.device = self.cache.k.device
        self.lengths: list[int] = []  # tokens stored in each active row
        # plain fp32 models on CPU: prompts and steps in numpy (numpy_step.py); else the torch step
        self.prepared = NumpyStep.prepare(model, self.device, not torch.is_autocast_enabled(self.device.type), capacity)
        if self.prepared is not None:
            self.np_step = NumpyStep(model, self.cache, torch.zeros(capacity, dtype=torch.long), self.prepared)
        else:
            self.step_fn = SlotStep(model, self.cache)

    @property
    def n(self) -> int:
        return len(self.lengths)

    def prefill(self, prompt: list[int]) -> torch.Tensor:
        """Put a new sequence in row n; return the logits [V] of its next token."""
        return self.prefill_many([prompt])[0]

    def prefill_many(self, prompts: list[list[int]]) -> torch.Tensor:
        """Put new sequences in rows n … n+k−1 and return the logits [k, V] of their next tokens. The
        numpy step packs the prompts into one sequence (NumpyStep.prefill_rows, no padding); the torch
        step runs one forward pass with the prompts right-padded (padding sits after each row's length,
        hidden by the key mask and overwritten as the row grows)."""
        k = len(prompts)
        if self.n + k > self.capacity:
            raise RuntimeError("no free slot")
        for p in prompts:
            if not 0 < len(p) < self.max_len:
                raise ValueError(f"a prompt of {len(p)} tokens does not fit a slot of {self.max_len}")
        r = self.n
        if self.prepared is not None:  # packed, no padding; (the cached keys are in the numpy step's order)
            logits = torch.cat([self.np_step.prefill_rows(group, r + i) for i, group in _packs(prompts)])
            self.lengths.extend(len(p) for p in prompts)
            return logits
        width = max(len(p) for p in prompts)
        ids = torch.zeros(k, width, dtype=torch.long)
        mask = torch.zeros(k, width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
            mask[i, :len(p)] = 1
        view = KVCache.__new__(KVCache)  # the rows' own cache: views into the big tensors
        view.k, view.v = self.cache.k[:, r:r + k], self.cache.v[:, r:r + k]
        view.key_mask = torch.ones(k, self.max_len, dtype=torch.bool, device=self.device)
        view.length, view.max_len = 0, self.max_len
        ids, mask = ids.to(self.device), mask.to(self.device)
        if k == 1:  # no padding: the logits of the last position only
            logits = self.model(ids, kv_cache=view, last_only=True).logits[:, -1]
        else:  # the final hidden state at each row's last real token, then the LM head on those alone
            h = self.model(ids, attention_mask=mask, kv_cache=view, compute_logits=False).hidden
            last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
            logits = F.linear(h[torch.arange(k, device=self.device), last], self.model.output_weight)
        self.lengths.extend(len(p) for p in prompts)
        return logits

    def step(self, tokens: list[int] | torch.Tensor) -> torch.Tensor:
        """Feed one token to every active row (tokens[r] for row r); logits [n, V] of the next ones."""
        n = self.n
        if len(tokens) != n:
            raise ValueError(f"{len(tokens)} tokens for {n} active rows")
        if max(self.lengths) >= self.max_len:
            raise ValueError("a row is full")
        width = max(self.lengths) + 1
        if self.prepared is not None:
            logits = self.np_step.slot_step(np.asarray(tokens, dtype=np.int64), np.asarray(self.lengths), width)
        else:
            t = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
            pos = torch.tensor(self.lengths, dtype=torch.long, device=self.device)
            logits = self.step_fn(t, pos, width)
        self.lengths = [x + 1 for x in self.lengths]
        return logits

    def release(self, rows: list[int]) -> list[tuple[int, int]]:
        """Free `rows`; returns the moves (src, dst) made to keep the active rows 0 … n−1, in order —
        apply them to any per-row state kept alongside."""
        moves = []
        for r in sorted(set(rows), reverse=True):
            last = self.n - 1
            if r != last:
                used = self.lengths[last]
                self.cache.k[:, r, :, :used] = self.cache.k[:, last, :, :used]
                self.cache.v[:, r, :, :used] = self.cache.v[:, last, :, :used]
                self.lengths[r] = used
                moves.append((last, r))
            self.lengths.pop()
        return moves


PACK_TOKENS = 128  # prompt tokens per packed prefill (its attention is N × N, mostly masked: keep N small;
#                   bench: 8 and 32 prompts of 5–40 tokens on tiny were fastest at 128 of 32…512)


def _packs(prompts: list[list[int]]) -> list[tuple[int, list[list[int]]]]:
    """Consecutive groups of prompts of at most PACK_TOKENS tokens (a longer prompt alone), with the index
    of each group's first prompt."""
    groups: list[tuple[int, list[list[int]]]] = []
    size = 0
    for i, p in enumerate(prompts):
        if not groups or size + len(p) > PACK_TOKENS:
            groups.append((i, []))
            size = 0
        groups[-1][1].append(p)
        size += len(p)
    return groups
