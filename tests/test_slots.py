"""Continuous-batching slots (infer/slots.py): rows that join, decode and leave at different times
compute exactly what each sequence computes alone (the model's full forward pass), for every
position scheme and for grouped-query attention — with the numpy step (plain fp32 RoPE models on CPU)
and with the torch one (`SlotStep`: everything else)."""

from __future__ import annotations

import random

import pytest
import torch

from tiaoyu_cli.infer.fast import numpy_step
from tiaoyu_cli.infer.fast.numpy_step import NumpyStep, _packs
from tiaoyu_cli.infer.slots import SlotBatch
from tiaoyu_cli.model import Transformer, preset


def model_for(position: str, moe: bool = False) -> Transformer:
    torch.manual_seed(0)
    cfg = preset("moe-tiny" if moe else "tiny", vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                 ffn_dim=96, max_seq_len=64, position=position)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("position,moe,kind", [("rope", False, "numpy"), ("rope", False, "numpy-packs"),
                                               ("rope", False, "torch"), ("learned", False, "torch"),
                                               ("sinusoidal", False, "torch"), ("rope", True, "torch")])
def test_rows_joining_and_leaving_match_the_full_forward(position, moe, kind, monkeypatch):
    if kind == "torch":
        monkeypatch.setattr(NumpyStep, "prepare", staticmethod(lambda *a, **k: None))
    if kind == "numpy-packs":  # joining prompts in several packed groups (and a prompt longer than a group alone)
        monkeypatch.setattr(numpy_step, "PACK_TOKENS", 10)
    model = model_for(position, moe)
    rng = random.Random(0)
    seqs: dict[int, list[int]] = {}  # sequence id → its tokens so far
    rows: list[int] = []  # row → sequence id
    last: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        slots = SlotBatch(model, capacity=4, max_len=64)
        assert (slots.decoder.name == "numpy") == kind.startswith("numpy")
        next_id = 0
        for step in range(40):
            # sometimes a new sequence joins (if a slot is free)
            if slots.n < 4 and rng.random() < 0.4:  # one or several at once (one forward pass, or packed groups)
                k = rng.randint(1, 4 - slots.n)
                prompts = [[rng.randrange(8, 300) for _ in range(rng.randint(1, 12))] for _ in range(k)]
                out = slots.prefill_many(prompts) if k > 1 or rng.random() < 0.5 else slots.prefill(prompts[0])[None]
                for prompt, logits in zip(prompts, out):
                    seqs[next_id] = prompt
                    last[next_id] = logits
                    rows.append(next_id)
                    next_id += 1
            # every row's latest logits equal the full forward over its whole sequence
            for sid in rows:
                full = model(torch.tensor([seqs[sid]])).logits[0, -1]
                torch.testing.assert_close(last[sid], full, atol=1e-4, rtol=1e-4)
            if not rows:
                continue
            toks = [int(last[s].argmax()) if rng.random() < 0.5 else rng.randrange(8, 300) for s in rows]
            out = slots.step(toks)
            for r, (sid, t) in enumerate(zip(rows, toks)):
                seqs[sid].append(t)
                last[sid] = out[r]
            # some rows finish (or are full)
            done = [r for r, s in enumerate(rows) if rng.random() < 0.15 or len(seqs[s]) >= 60]
            for src, dst in slots.release(done):
                rows[dst] = rows[src]
            rows = [s for r, s in enumerate(rows) if r < slots.n]
            assert slots.lengths == [len(seqs[s]) for s in rows]
        assert next_id >= 8  # rows came and went


def test_packs_are_consecutive_groups_within_the_budget(monkeypatch):
    monkeypatch.setattr(numpy_step, "PACK_TOKENS", 10)
    prompts = [[1] * n for n in (3, 4, 3, 12, 1, 9, 2)]
    groups = _packs(prompts)
    assert [(i, [len(p) for p in g]) for i, g in groups] == [(0, [3, 4, 3]), (3, [12]), (4, [1, 9]), (6, [2])]


@pytest.mark.parametrize("n_kv_heads", [1, 4])
def test_packed_prefill_with_one_kv_head_and_with_one_per_head(n_kv_heads, monkeypatch):
    """Multi-query and plain multi-head attention through the packed prefill (the join/leave test above
    runs grouped-query attention): logits after the prompts and after one step equal the forward pass."""
    monkeypatch.setattr(numpy_step, "PACK_TOKENS", 12)
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, ffn_dim=96, max_seq_len=64)
    model = Transformer(cfg).eval()
    rng = random.Random(n_kv_heads)
    prompts = [[rng.randrange(8, 300) for _ in range(rng.randint(1, 20))] for _ in range(4)]
    with torch.inference_mode():
        slots = SlotBatch(model, capacity=4, max_len=64)
        assert slots.decoder.name == "numpy"
        out = slots.prefill_many(prompts)
        toks = [int(o.argmax()) for o in out]
        step = slots.step(toks)
        for i, (p, t) in enumerate(zip(prompts, toks)):
            full = model(torch.tensor([p + [t]])).logits[0]
            torch.testing.assert_close(out[i], full[-2], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(step[i], full[-1], atol=1e-4, rtol=1e-4)
