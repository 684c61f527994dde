"""A learnable token stream for loop tests (test_trainer, test_muon): repeating patterns with noise,
written over two shards so training windows cross the shard boundary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tiaoyu_cli.data.shards import ShardWriter, TokenShards
from tiaoyu_cli.model import Transformer, preset

V = 64


def pattern_shards(folder: Path) -> TokenShards:
    rng = np.random.default_rng(0)
    pattern = rng.integers(8, V, 50)
    stream = np.concatenate([np.roll(pattern, int(rng.integers(0, 50)))[: rng.integers(10, 50)] for _ in range(800)])
    w = ShardWriter(folder, np.uint16, len(stream) // 2 + 7)  # windows cross the shard boundary
    w.add(stream.astype(np.uint16))
    w.close({"tokenizer_fingerprint": "test", "vocab_size": V, "split": "train"})
    return TokenShards(folder)


def small_model(**kw) -> Transformer:
    """A 2-layer model over the pattern vocabulary (seeded: the same weights every call)."""
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                              max_seq_len=64, **kw))
