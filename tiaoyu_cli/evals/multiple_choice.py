"""Multiple choice by log-likelihood, scored as lm-evaluation-harness scores it.

For an item with prompt `context` and choices c_1 … c_k, each choice's score is

    ll_i = Σ_t log p(cont_i[t] | context, cont_i[:t])        (summed log-probs of its tokens)

    acc        = [argmax_i ll_i == gold]
    acc_norm   = [argmax_i ll_i / len(c_i) == gold]            (len in characters: lm-eval's acc_norm)
    acc_bytes  = [argmax_i ll_i / len(c_i.encode()) == gold]  (UTF-8 bytes: lm-eval's acc_bytes)

Tokenisation follows lm-eval's `_encode_pair`: trailing spaces of the context move to the
continuation, then `ctx = encode(context)`, `cont = encode(context + continuation)[len(ctx):]`
(where tokens merge across the boundary, `cont = encode(continuation)`, see `encode_request`);
a BOS token goes first (lm-eval: `add_bos_token=True`) — for an open model's tokenizer, what it puts before
a text itself (`document_affixes`: Llama 3's <|begin_of_text|>, nothing for Qwen), as transformers'
`tokenizer(text)` does. Inputs longer than the model's context
keep their last max_len + 1 tokens, as lm-eval does.

Speed: the choices of an item share their prompt. Items are sorted by prompt length and batched;
one forward pass over the (left-padded) prompts fills a KV cache, which is copied to every
choice's row; a second pass runs only the continuations (right-padded). A prompt is computed once
instead of once per choice. Items too long for that fall back to one full sequence per choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from tiaoyu_cli.device import autocast
from tiaoyu_cli.infer.generate import left_pad
from tiaoyu_cli.model.kv_cache import KVCache


@dataclass
class MCRequest:
    context: str
    continuations: list[str]  # delimiter already included (" A", " Paris")


@dataclass
class Encoded:
    ctx: list[int]
    conts: list[list[int]]


def encode_request(tok, req: MCRequest, bos: bool = True) -> Encoded:
    """lm-eval's `_encode_pair` for every choice of one request (the context is encoded once).

    Where encoding context + continuation as one string merges tokens across the boundary (the
    whole does not start with the context's tokens: common in Chinese with no delimiter), lm-eval's
    split would score tokens that are partly context, or none at all; there the continuation is
    encoded on its own instead, so every choice is scored after the same context tokens.
    """
    context = req.context
    n_spaces = len(context) - len(context.rstrip())
    moved = context[len(context) - n_spaces:] if n_spaces else ""
    context = context[:len(context) - n_spaces]
    ctx = tok.encode(context)
    conts = []
    for cont in req.continuations:
        whole = tok.encode(context + moved + cont)
        if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
            conts.append(whole[len(ctx):])
        else:
            conts.append(tok.encode(moved + cont))
    return Encoded(tok.document_affixes()[0] + ctx if bos else ctx, conts)


def _full_sequence_lls(model, ctx: list[int], conts: list[list[int]], max_len: int, device) -> list[float]:
    """One full sequence per choice, truncated on the left to max_len + 1 tokens (lm-eval's rule)."""
    out = []
    for cont in conts:
        seq = (ctx + cont)[-(max_len + 1):]
        ids = torch.tensor([seq[:-1]], device=device)
        logp = model(ids).logits.float().log_softmax(-1)[0]  # [T, V]
        n = len(cont)
        tgt = torch.tensor(seq[-n:], device=device)
        out.append(float(logp[-n:].gather(-1, tgt[:, None]).sum()))
    return out


def _batch_lls(model, batch: list[Encoded], pad_id: int, device) -> list[list[float]]:
    """Shared-prompt scoring of a batch of items (see the module docstring)."""
    ctx_ids, ctx_mask = left_pad([e.ctx for e in batch], pad_id, device)  # [B, Lp]
    B, Lp = ctx_ids.shape
    rows = [b for b, e in enumerate(batch) for _ in e.conts]
    conts = [c for e in batch for c in e.conts]
    Lc = max(len(c) for c in conts)
    cache = KVCache.for_model(model, B, Lp + Lc)
    first = model(ctx_ids, attention_mask=ctx_mask, kv_cache=cache, last_only=True).logits[:, -1].float()
    first = first.log_softmax(-1)  # [B, V]: log p of each continuation's first token
    sel = torch.tensor(rows, device=device)
    cache.select(sel)  # copy each prompt's keys/values to its choices' rows
    out = [[] for _ in batch]
    lens = [len(c) for c in conts]
    if Lc > 1:
        ids = torch.full((len(conts), Lc - 1), pad_id, dtype=torch.long)
        mask = torch.zeros((len(conts), Lc - 1), dtype=torch.long)
        for r, c in enumerate(conts):
            ids[r, :len(c) - 1] = torch.tensor(c[:-1])
            mask[r, :len(c) - 1] = 1
        logp = model(ids.to(device), attention_mask=mask.to(device), kv_cache=cache).logits.float().log_softmax(-1)
    for r, c in enumerate(conts):
        ll = float(first[rows[r], c[0]])
        if lens[r] > 1:
            tgt = torch.tensor(c[1:], device=device)
            ll += float(logp[r, :lens[r] - 1].gather(-1, tgt[:, None]).sum())
        out[rows[r]].append(ll)
    return out


def loglikelihoods(model, tok, requests: list[MCRequest], batch_size: int = 16, bos: bool = True,
                   dtype: torch.dtype = torch.float32,
                   progress: Callable[[int], None] | None = None) -> list[list[float]]:
    """Log-likelihood of every continuation of every request: out[i][j] for request i, choice j."""
    device = next(model.parameters()).device
    max_len = model.config.max_seq_len
    pad_id = getattr(model.config, "pad_token_id", 0)
    enc = [encode_request(tok, r, bos) for r in requests]
    for i, e in enumerate(enc):
        if any(len(c) == 0 for c in e.conts):
            raise ValueError(f"request {i}: a continuation encodes to no tokens")
    out: list[list[float] | None] = [None] * len(enc)
    order = sorted(range(len(enc)), key=lambda i: -(len(enc[i].ctx) + max(map(len, enc[i].conts))))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(device, dtype):
            shared = []
            for i in order:
                e = enc[i]
                if len(e.ctx) + max(map(len, e.conts)) - 1 > max_len:
                    out[i] = _full_sequence_lls(model, e.ctx, e.conts, max_len, device)
                    if progress:
                        progress(1)
                else:
                    shared.append(i)
            for s in range(0, len(shared), batch_size):
                idx = shared[s:s + batch_size]
                for i, lls in zip(idx, _batch_lls(model, [enc[i] for i in idx], pad_id, device)):
                    out[i] = lls
                if progress:
                    progress(len(idx))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def argmax(xs: list[float]) -> int:
    """First index of the maximum (numpy's argmax tie rule, which lm-eval uses)."""
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def score_item(lls: list[float], choices: list[str], gold: int) -> dict:
    """acc, acc_norm (per character) and acc_bytes (per UTF-8 byte) of one item, lm-eval's definitions."""
    chars = [max(len(c), 1) for c in choices]
    nbytes = [max(len(c.encode("utf-8")), 1) for c in choices]
    pred = argmax(lls)
    pred_norm = argmax([ll / n for ll, n in zip(lls, chars)])
    pred_bytes = argmax([ll / n for ll, n in zip(lls, nbytes)])
    return {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold), "acc_bytes": float(pred_bytes == gold),
            "pred": pred}


def mean_stderr(xs: list[float]) -> tuple[float, float]:
    """Mean and its standard error, sqrt(Σ(x - mean)² / (n - 1) / n): lm-eval's `mean_stderr`
    (for 0/1 scores, sqrt(p(1 - p) / (n - 1)))."""
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)
