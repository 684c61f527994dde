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

The computing is the slot step's, from the step factory (`make_slot_step`, infer/steps.py): on CPU in
fp32 `NumpyStep` (the joining prompts packed into one sequence, no padding), else `SlotStep` (the prompts
through the model's own forward pass, written straight into their rows; decode with a write position
per row — `k[layer, r, :, len[r]] = k_r` — and a key mask per row: column j is visible to row r iff
j ≤ len[r]). Attention covers columns 0 … max(len), so shorter rows are masked, not recomputed. Each
row computes what it would alone (tests/test_slots.py compares with the model's full forward pass).
"""

from __future__ import annotations

import torch

from tiaoyu_cli.infer.steps import make_slot_step, supports_slots
from tiaoyu_cli.model.kv_cache import KVCache


class SlotBatch:
    """The KV store of a continuous batch. Call under `torch.inference_mode()` (and the autocast the
    model runs in); the cache takes the autocast dtype when one is active."""

    def __init__(self, model, capacity: int, max_len: int):
        if not self.supports(model):
            raise TypeError("continuous batching needs the stock tiaoyu Transformer")
        self.model, self.capacity, self.max_len = model, capacity, max_len
        self.cache = KVCache.for_model(model, capacity, max_len)
        self.lengths: list[int] = []  # tokens stored in each active row
        self.decoder = make_slot_step(model, self.cache)

    @staticmethod
    def supports(model) -> bool:
        """Whether continuous batching can run `model` (the stock Transformer); others go through decode_steps."""
        return supports_slots(model)

    @property
    def n(self) -> int:
        return len(self.lengths)

    def prefill(self, prompt: list[int]) -> torch.Tensor:
        """Put a new sequence in row n; return the logits [V] of its next token."""
        return self.prefill_many([prompt])[0]

    def prefill_many(self, prompts: list[list[int]]) -> torch.Tensor:
        """Put new sequences in rows n … n+k−1 and return the logits [k, V] of their next tokens (the slot
        step's prefill: packed groups for the numpy step, one right-padded forward pass for the torch one)."""
        k = len(prompts)
        if self.n + k > self.capacity:
            raise RuntimeError("no free slot")
        for p in prompts:
            if not 0 < len(p) < self.max_len:
                raise ValueError(f"a prompt of {len(p)} tokens does not fit a slot of {self.max_len}")
        logits = self.decoder.prefill_rows(prompts, self.n)
        self.lengths.extend(len(p) for p in prompts)
        return logits

    def step(self, tokens: list[int] | torch.Tensor) -> torch.Tensor:
        """Feed one token to every active row (tokens[r] for row r); logits [n, V] of the next ones."""
        n = self.n
        if len(tokens) != n:
            raise ValueError(f"{len(tokens)} tokens for {n} active rows")
        if max(self.lengths) >= self.max_len:
            raise ValueError("a row is full")
        logits = self.decoder.slot_step(tokens, self.lengths, max(self.lengths) + 1)
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

