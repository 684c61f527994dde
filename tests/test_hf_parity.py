"""Our checkpoints load in Hugging Face transformers unchanged and compute the same thing:
LlamaForCausalLM / MixtralForCausalLM `from_pretrained` on a folder written by `save_checkpoint`
give our logits within 1e-4 (fp32), with and without left padding, and HF's greedy `generate`
equals ours token for token."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from tiaoyu_cli.infer.generate import generate
from tiaoyu_cli.model import ModelConfig, Transformer
from tiaoyu_cli.checkpoint import load_model, save_checkpoint


transformers = pytest.importorskip("transformers")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

BASE = dict(vocab_size=150, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
CASES = {
    "llama": ({}, "LlamaForCausalLM"),
    "llama-untied-mha": ({"tie_embeddings": False, "n_kv_heads": 4}, "LlamaForCausalLM"),
    "mixtral": ({"n_experts": 4, "n_experts_per_tok": 2}, "MixtralForCausalLM"),
}


def _model(kw: dict) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**{**BASE, **kw})).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)  # spread-out logits: greedy choices are not near-ties
    return m


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    kw, arch = CASES[request.param]
    ours = _model(kw)
    folder = save_checkpoint(tmp_path_factory.mktemp(request.param), 1, ours, None, info={"stage": "test"})
    reloaded, _ = load_model(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(hf).__name__ == arch
    return reloaded.eval(), hf


def _padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(map(len, rows))
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, L - len(r):] = torch.tensor(r)
        mask[b, L - len(r):] = 1
    return ids, mask


ROWS = [[2, 17, 33, 8, 99, 120, 45, 61, 7, 12], [2, 140, 3 + 5], [2, 55, 66, 77, 88, 10]]


def test_logits_match(pair):
    ours, hf = pair
    ids = torch.tensor([ROWS[0] * 3])
    with torch.no_grad():
        a = ours(ids).logits
        b = hf(ids).logits
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < 1e-4
    assert a.std() > 0.1  # not a degenerate comparison of near-zero logits


def test_logits_match_with_left_padding(pair):
    ours, hf = pair
    ids, mask = _padded(ROWS)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # HF takes positions explicitly; ours derives them from the mask
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        b = hf(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert (a[real] - b[real]).abs().max().item() < 1e-4


def test_greedy_generate_matches_hf(pair):
    ours, hf = pair
    stops = [3, 5]
    mine = generate(ours, ROWS, 12, temperature=0, stop_ids=stops)
    ids, mask = _padded(ROWS)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=stops,
                          pad_token_id=0)
    for b, toks in enumerate(mine):
        theirs = out[b, ids.shape[1]:].tolist()
        if len(toks) < 12:  # we stopped: HF pads the rest of the row
            assert toks[-1] in stops and all(t == 0 for t in theirs[len(toks):])
        assert theirs[:len(toks)] == toks
