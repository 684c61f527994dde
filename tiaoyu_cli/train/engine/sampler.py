"""The order in which a stage visits its data: `EpochSampler` for a finite dataset (chat rows, pairs,
prompts) — shuffled passes, resumable from two integers, sliced per process under DDP — and
`WindowSampler` for a token stream (pretraining windows, SFT replay), resumable from its generator."""

from __future__ import annotations

import torch

from tiaoyu_cli.errors import TiaoyuError


class EpochSampler:
    """Shuffled passes over n items: the order of epoch e is randperm(n) under seed (seed, e), so the
    position (epoch, pos) is the whole state. Under DDP every rank draws the same global batch of
    batch_size × world indices and keeps its own slice."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1):
        if n <= 0:
            raise TiaoyuError("no training examples")
        self.n, self.batch_size, self.seed, self.shuffle, self.rank, self.world = n, batch_size, seed, shuffle, rank, world
        self.epoch, self.pos = 0, 0
        self._order: list[int] | None = None

    def _perm(self) -> list[int]:
        if self._order is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
                self._order = torch.randperm(self.n, generator=g).tolist()
            else:
                self._order = list(range(self.n))
        return self._order

    def next_indices(self) -> list[int]:
        out: list[int] = []
        need = self.batch_size * self.world
        while len(out) < need:
            order = self._perm()
            take = order[self.pos:self.pos + need - len(out)]
            out.extend(take)
            self.pos += len(take)
            if self.pos >= self.n:
                self.epoch, self.pos, self._order = self.epoch + 1, 0, None
        return out[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, st: dict) -> None:
        self.epoch, self.pos, self._order = int(st.get("epoch", 0)), int(st.get("pos", 0)), None


class WindowSampler:
    """Draws global batches of windows [start, start+seq_len+1) from a token stream of length n."""

    def __init__(self, n_tokens: int, seq_len: int, global_batch: int, mode: str, seed: int):
        if n_tokens < seq_len + 2:
            raise TiaoyuError(f"the token shards hold {n_tokens} tokens, fewer than one window of "
                              f"--seq-len {seq_len} + 1; use a smaller --seq-len or more data")
        self.n, self.seq_len, self.global_batch, self.mode = n_tokens, seq_len, global_batch, mode
        self.gen = torch.Generator().manual_seed(seed)
        self.cursor = 0  # windows drawn so far (sequential mode)

    def next_starts(self) -> list[int]:
        hi = self.n - self.seq_len - 1
        if self.mode == "random":
            return torch.randint(0, hi + 1, (self.global_batch,), generator=self.gen).tolist()
        n_windows = max(1, hi // self.seq_len)
        starts = [((self.cursor + i) % n_windows) * self.seq_len for i in range(self.global_batch)]
        self.cursor += self.global_batch
        return starts
