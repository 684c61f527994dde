"""The forward pass of a small fp32 model on CPU for generation, in numpy: the prompt into the KV cache,
then one token per step (tokens [B] → next-token logits [B, V]).

Why a second implementation: on a CPU a decode step of a small model is not arithmetic but the cost
of calling ~25 operators per layer plus reading the weights. A torch CPU operator costs 2–50 µs to
dispatch on one token (`F.rms_norm` alone is six operators), a numpy one a few, so on small presets this
runs faster than `OneTokenStep` (benchmarks/bench_decode.py measures both, transformers and llama.cpp;
figures in benchmarks/RESULTS.md). It computes what `Transformer.forward` computes with the cache (tests/test_numpy_step.py
compares logits, tokens and log-probs), on numpy views of the KVCache tensors, so `KVCache.select`
(rows that finished leave the batch) works unchanged; the cached keys hold this step's pair order, so
a cache filled here is read here.

The weights are rearranged once per model version (`prepared_weights` in weights.py; files never see it):

    A  = [P·Wq/√hd ; P·Wk ; Wv] · diag(g1)   P puts each head's rotary pairs (x_j, x_j+hd/2) side by side,
    GU = [−Wgate ; Wup] · diag(g2)           the attention scale goes into Wq, the norm weights g into
    D  = −Wdown                              the product after the norm, the gate's sign into D
    per layer:  x̂ = x / rms(x)
                q‖k‖v = x̂ Aᵀ
                q‖k as complex numbers z_j = x_j + i·x_j+hd/2, times e^{i·pos·θ_j}   (RoPE: one product)
                cache[:, :, L] = k, v;  a = softmax(q Kᵀ + mask) V           (GQA: q grouped per KV head)
                x = x + a Woᵀ;  x̂ = x / rms(x);  −g‖u = x̂ GUᵀ;  x = x + ((−g)·u / (1 + exp(−g))) Dᵀ
    logits = (x / rms(x) · g_final) Wembᵀ

Chosen by the step factory (infer/steps.py) for the stock dense RoPE Transformer with fp32 weights on CPU
without autocast (`NumpyStep.prepare`); LoRA wrappers, MoE layers, autocast and GPUs keep `OneTokenStep`.
One row runs the same loop compiled (decode_kernel.c, built and loaded by kernel.py: `c_kernel`), and the
numpy loop where there is no compiler. The serve slots (infer/slots.py) use `prefill_rows` and `slot_step`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tiaoyu_cli.infer.fast.kernel import c_kernel
from tiaoyu_cli.infer.fast.torch_step import OneTokenStep
from tiaoyu_cli.infer.fast.weights import Prepared, prepared_weights, rope_rotations
from tiaoyu_cli.model.kv_cache import KVCache
from tiaoyu_cli.model.transformer import Transformer

_BLAS: dict = {"libs": None, "threads": None}


def set_blas_threads(n: int) -> None:
    """Threads of numpy's BLAS (OpenBLAS), through threadpoolctl's handle on the loaded library (found
    once per process; setting is one C call). Without threadpoolctl numpy keeps its default."""
    if _BLAS["threads"] == n:
        return
    _BLAS["threads"] = n
    if _BLAS["libs"] is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _BLAS["libs"] = []
            return
        _BLAS["libs"] = ThreadpoolController().select(user_api="blas").lib_controllers
    for lib in _BLAS["libs"]:
        lib.set_num_threads(n)


class NumpyStep:
    """Drop-in for `OneTokenStep` (same constructor, `prefill`, `select`, `__call__`) on CPU in fp32; for
    the serve slots also `prefill_rows` and `slot_step` (as `SlotStep`)."""

    name = "numpy"

    def __init__(self, model: Transformer, cache: KVCache, positions: torch.Tensor | None = None,
                 prepared: Prepared | None = None):
        cfg = model.config
        self.model, self.cache, self.cfg = model, cache, cfg
        B = cache.k.shape[1]
        # [B] position of the next token per row (set by prefill for an empty cache)
        self.positions = np.zeros(B, np.int64) if positions is None else positions.cpu().numpy().astype(np.int64)
        w = prepared or prepared_weights(model)
        self.layers, self.final_norm = w.layers, w.final_norm
        self.rot = w.rot if len(w.rot) >= cache.max_len else rope_rotations(cfg, cache.max_len)
        self.emb = model.model.embed_tokens.weight.detach().numpy()  # [V, d]
        self.out = model.output_weight.detach().numpy()  # [V, d] (the embedding when tied)
        self.eps = float(model.model.norm.eps)
        self.nq, self.nv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.ones = np.ones((cache.max_len, 1), np.float32)
        # one row: matrix-vector products, which read the weights faster on torch's thread count; several
        # rows: one thread — OpenBLAS splitting small products like [4, 128] × [128, 448] over threads is
        # slower than one (benchmarks/bench_decode.py)
        set_blas_threads(torch.get_num_threads() if cache.k.shape[1] == 1 else 1)
        self._views()

    @staticmethod
    def prepare(model, device: torch.device, exact: bool, batch: int = 1) -> Prepared | None:
        """The prepared weights when this step should run the model, else None (`OneTokenStep` runs it).

        It can run the stock dense RoPE Transformer with fp32 weights and plain layers on CPU without
        autocast. It should where it was measured faster (benchmarks/bench_decode.py; figures in
        benchmarks/RESULTS.md): one row always; several rows only for a narrow model (dim ≤ 256) and at one
        torch thread or ≤ 4 rows — a wide model's batched products, or torch's second thread on 16 rows,
        are faster in torch.
        """
        if device.type != "cpu" or not exact or not OneTokenStep.supports(model) or model.config.position != "rope":
            return None
        if batch > 1 and not (model.config.dim <= 256 and (torch.get_num_threads() == 1 or batch <= 4)):
            return None
        return prepared_weights(model)

    def _views(self) -> None:
        cache = self.cache
        # per layer (K, V) [B, Hkv, P, hd]: numpy views of the cache's tensors (K holds this step's pair order)
        self.kv = list(zip(cache.k.numpy(), cache.v.numpy()))
        km = cache.key_mask.cpu().numpy()
        self.padded = not km[:, :cache.length].all()
        self.neg = np.where(km, np.float32(0), np.float32(-np.inf))[:, None, None, :]  # [B, 1, 1, P]
        # one row: the compiled step (faster than the numpy loop on narrow models; on a wide model level with
        # it at one thread, while numpy's BLAS on two threads is faster there)
        one_thread_enough = self.cfg.dim <= 256 or torch.get_num_threads() == 1
        self.c_args = self._c_args() if one_thread_enough and c_kernel() is not None else None  # (row 0 of the cache)

    def _c_args(self) -> tuple | None:
        """The compiled step's constant arguments for row 0 of this cache: dims and a pointer table."""
        cfg, K0 = self.cfg, self.kv[0][0]
        if not (self.emb.flags.c_contiguous and self.out.flags.c_contiguous and K0.flags.c_contiguous):
            return None
        P = K0.shape[2]
        dims = np.array([cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim,
                         cfg.vocab_size, P], dtype=np.int32)
        scratch = np.empty(2 * cfg.dim + 2 * self.nq + 3 * self.nv + 2 * cfg.ffn_dim + P, np.float32)
        keep = [w for ws in self.layers for w in ws] + [K[0] for K, _ in self.kv] + [V[0] for _, V in self.kv]
        ptrs = np.array([ws[i].ctypes.data for i in range(4) for ws in self.layers]
                        + [K[0].ctypes.data for K, _ in self.kv] + [V[0].ctypes.data for _, V in self.kv]
                        + [self.final_norm.ctypes.data, self.out.ctypes.data, scratch.ctypes.data], dtype=np.uintp)
        rot, emb = self.rot, self.emb
        return (dims.ctypes.data, ptrs.ctypes.data, (dims, ptrs, scratch, keep), rot.ctypes.data, rot.strides[0],
                emb.ctypes.data, emb.strides[0])

    def select(self, keep: torch.Tensor) -> None:
        self.cache.select(keep)
        self.positions = self.positions[keep.cpu().numpy()]
        self._views()

    def _rms(self, x: np.ndarray) -> np.ndarray:
        """x / rms(x) per row (the norm weight is folded into the next product)."""
        if x.shape[0] == 1:  # one row: the scale as a Python float (two numpy calls instead of five)
            return x * (1.0 / math.sqrt(float(np.dot(x[0], x[0])) / x.shape[1] + self.eps))
        ms = np.einsum("bd,bd->b", x, x) / x.shape[1]
        return x * (1.0 / np.sqrt(ms + self.eps))[:, None]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """One new token per row: tokens [B] → logits [B, V]."""
        B = tokens.shape[0]
        pos = self.positions
        neg = self.neg[:, :, :, :self.cache.length + 1] if self.padded else None
        ids = tokens.numpy()
        if B == 1 and neg is None and self.c_args is not None:  # one row: the compiled step, if built
            logits = self._c_step(int(ids[0]), int(pos[0]), self.cache.length)
            self.cache.length += 1
        elif B == 1 and neg is None:  # else the same loop as _layers without the batch axis (~12 % less time)
            logits = self._one_row(int(ids[0]), int(pos[0]))
        else:
            logits = self._forward(self.emb[ids], self.rot[pos], neg, B, 1)  # (x: a fresh copy)
        if not math.isfinite(float(np.add.reduce(logits, axis=None))):  # inf/NaN: redo with the row max (see _layers)
            self.cache.length -= 1
            logits = self._forward(self.emb[ids], self.rot[pos], neg, B, 1, shift_own=False)
        self.positions = pos + 1
        return torch.from_numpy(logits)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The prompt into an empty cache: ids, mask [B, T] (1 = token, 0 = padding; left padding, as generate
        pads) → logits [B, V] at the last column (continuous batching packs instead: prefill_rows).

        What `Transformer.forward(ids, attention_mask=mask, kv_cache=cache)` computes: padding does not
        advance positions, a query sees the earlier non-padding keys and itself.
        """
        cache = self.cache
        if cache.length:
            raise ValueError("NumpyStep.prefill needs an empty cache")
        B, T = ids.shape
        km = mask.bool().cpu().numpy()
        cache.key_mask[:, :T] = mask.bool()
        pos = np.maximum(km.cumsum(-1) - 1, 0)  # [B, T]
        j = np.arange(T)
        see = (j[None, :] <= j[:, None])[None] & km[:, None, :] | np.eye(T, dtype=bool)[None]  # [B, T(query), T(key)]
        neg = np.where(see, np.float32(0), np.float32(-np.inf))  # [B, T, T]
        g = self.cfg.n_heads // self.cfg.n_kv_heads
        neg = np.tile(neg[:, None], (1, 1, g, 1)) if g > 1 else neg[:, None]  # [B, 1, g·T, T]: query rows (head, t)
        x = self.emb[ids.cpu().numpy().reshape(-1)]  # [B·T, d]
        flat = pos.reshape(-1)
        logits = torch.from_numpy(self._forward(x, self.rot[flat], neg, B, T, shift_own=False))
        self.positions = km.sum(-1).astype(np.int64)
        self._views()
        return logits

    def prefill_rows(self, prompts: list[list[int]], first: int) -> torch.Tensor:
        """Continuous batching (infer/slots.py): prompts into rows first … first+k−1 of the cache (each from
        column 0); logits [k, V] at each prompt's last token. The prompts run packed, one after another in
        one sequence with a block-diagonal causal mask — no padding, so a join of short and long prompts
        costs its real tokens (on `bench_serve.py`'s prompts, 3–30 words, padding to the longest was about
        half the work) — in groups of at most PACK_TOKENS tokens (`_packs`)."""
        return torch.cat([self._prefill_pack(group, first + i) for i, group in _packs(prompts)])

    def _prefill_pack(self, prompts: list[list[int]], first: int) -> torch.Tensor:
        """One packed group of `prefill_rows`: its keys and values go to a scratch cache and then to each row."""
        lens = [len(p) for p in prompts]
        N, k = sum(lens), len(prompts)
        starts = np.cumsum([0] + lens[:-1])
        pos = np.concatenate([np.arange(n) for n in lens])
        seg = np.repeat(np.arange(k), lens)
        see = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])  # [N (query), N (key)]
        g = self.cfg.n_heads // self.cfg.n_kv_heads
        neg = np.where(see, np.float32(0), np.float32(-np.inf))
        neg = (np.tile(neg, (g, 1)) if g > 1 else neg)[None, None]  # [1, 1, g·N, N]: query rows (head, t)
        Hkv, hd = self.cfg.n_kv_heads, self.cfg.head_dim
        scratch = [(np.empty((1, Hkv, N, hd), np.float32), np.empty((1, Hkv, N, hd), np.float32)) for _ in self.kv]
        if N > len(self.ones):
            self.ones = np.ones((N, 1), np.float32)
        x = self.emb[np.concatenate(prompts)]
        with np.errstate(over="ignore", invalid="ignore"):
            x = self._layers(x, self.rot[pos], neg, 1, N, 0, scratch, shift_own=False)
        for (K, V), (Ks, Vs) in zip(self.kv, scratch):
            for i, (a, n) in enumerate(zip(starts.tolist(), lens)):
                K[first + i, :, :n] = Ks[0, :, a:a + n]
                V[first + i, :, :n] = Vs[0, :, a:a + n]
        return torch.from_numpy(self._head(x[starts + np.asarray(lens) - 1]))

    def _forward(self, x: np.ndarray, rot: np.ndarray, neg: np.ndarray | None, B: int, T: int,
                 shift_own: bool = True) -> np.ndarray:
        """x [B·T, d] (row b·T + t) at cache columns L … L+T−1 → logits [B, V] of each row's last position."""
        cache = self.cache
        L = cache.length
        with np.errstate(over="ignore", invalid="ignore"):  # exp(−gate) may overflow: silu is then −0; an
            # overflow in attention gives NaN, which __call__ catches
            x = self._layers(x, rot, neg, B, T, L, self.kv, shift_own)
        cache.length = L + T
        if T > 1:  # the last position of every row
            x = x[T - 1::T]
        return self._head(x)

    def _c_step(self, token: int, pos: int, column: int) -> np.ndarray:
        """decode_kernel.c on row 0: the token at rotary position `pos`, its key/value into cache column
        `column` (attending to columns 0 … column). Logits [1, V]."""
        dims, ptrs, _keep, rot, rot_stride, emb, emb_stride = self.c_args
        logits = np.empty((1, self.cfg.vocab_size), np.float32)
        c_kernel()(dims, ptrs, self.eps, column, rot + pos * rot_stride, emb + token * emb_stride, logits.ctypes.data)
        return logits

    def _one_row(self, token: int, pos: int) -> np.ndarray:
        """`_forward` for one row and one token, on vectors: a third fewer numpy calls per layer (no batch
        axis to reshape around), which is most of what a step of a small model costs. Logits [1, V]."""
        cfg, cache, eps = self.cfg, self.cache, self.eps
        hd, Hkv = cfg.head_dim, cfg.n_kv_heads
        g, nq, nv, F = cfg.n_heads // Hkv, self.nq, self.nv, cfg.ffn_dim
        nqk, L = nq + nv, cache.length
        S, rot, x = L + 1, self.rot[pos], self.emb[token].copy()  # x [d]
        d, ones = x.shape[0], self.ones[:S]
        with np.errstate(over="ignore", invalid="ignore"):  # see _forward
            for (A, Wo, GU, Wd), (K, V) in zip(self.layers, self.kv):
                K, V = K[0], V[0]  # [Hkv, P, hd]
                y = (x * (1.0 / math.sqrt(float(x @ x) / d + eps))) @ A
                qk = (y[:nqk].view(np.complex64) * rot).view(np.float32)  # RoPE
                K[:, L] = qk[nq:].reshape(Hkv, hd)
                V[:, L] = y[nqk:].reshape(Hkv, hd)
                s = qk[:nq].reshape(Hkv, g, hd) @ K[:, :S].transpose(0, 2, 1)  # [Hkv, g, S]
                s -= s[:, :, -1:]  # the own key's score (see _layers)
                np.exp(s, out=s)
                a = s @ V[:, :S]
                a /= s @ ones
                x += a.reshape(nq) @ Wo
                gu = (x * (1.0 / math.sqrt(float(x @ x) / d + eps))) @ GU
                ng = gu[:F]  # −gate
                act = ng * gu[F:]
                np.exp(ng, out=ng)
                ng += 1.0
                act /= ng
                x += act @ Wd
        cache.length = S
        return self._head(x[None])

    def _head(self, x: np.ndarray) -> np.ndarray:
        return (self._rms(x) * self.final_norm) @ self.out.T

    def slot_step(self, tokens, pos, width: int) -> torch.Tensor:
        """Continuous batching (infer/slots.py): rows 0 … n−1 of the cache, each at its own length — token
        [n] goes to column pos[r] of row r, which sees columns 0 … pos[r]; width = max(pos) + 1."""
        tokens, pos = np.asarray(tokens, dtype=np.int64), np.asarray(pos)
        B = len(tokens)
        if B == 1 and self.c_args is not None:  # one request running: the compiled step on row 0
            return torch.from_numpy(self._c_step(int(tokens[0]), int(pos[0]), int(pos[0])))
        neg = None
        if B > 1 and (pos != width - 1).any():
            neg = np.where(np.arange(width)[None, :] > pos[:, None], np.float32(-np.inf), np.float32(0))[:, None, None]
        kv = [(K[:B], V[:B]) for K, V in self.kv]
        with np.errstate(over="ignore", invalid="ignore"):
            x = self._layers(self.emb[tokens], self.rot[pos], neg, B, 1, width - 1, kv, False, cols=pos)
        return torch.from_numpy(self._head(x))

    def _layers(self, x, rot, neg, B: int, T: int, L: int, kv: list, shift_own: bool = True,
                cols: np.ndarray | None = None) -> np.ndarray:
        """The blocks on x [B·T, d]: T new columns L … L+T−1 of every row, or (T = 1, `cols`) column cols[r] of row r."""
        cfg = self.cfg
        hd, Hkv = cfg.head_dim, cfg.n_kv_heads
        g = cfg.n_heads // Hkv
        nq, nv = self.nq, self.nv
        nqk, F, N, S = nq + nv, cfg.ffn_dim, B * T, L + T
        rows = np.arange(B) if cols is not None else None
        for (A, Wo, GU, Wd), (K, V) in zip(self.layers, kv):
            y = self._rms(x) @ A  # [N, q‖k‖v], q and k with each head's pairs (x_j, x_j+hd/2) side by side
            qk = (y[:, :nqk].view(np.complex64) * rot).view(np.float32)  # RoPE: x_j + i·x_j+hd/2 times e^{i·pos·θ_j}
            if cols is not None:  # each row at its own column
                K[rows, :, cols] = qk[:, nq:].reshape(B, Hkv, hd)
                V[rows, :, cols] = y[:, nqk:].reshape(B, Hkv, hd)
                q = qk[:, :nq].reshape(B, Hkv, g, hd)
            elif T == 1:
                K[:, :, L] = qk[:, nq:].reshape(B, Hkv, hd)
                V[:, :, L] = y[:, nqk:].reshape(B, Hkv, hd)
                q = qk[:, :nq].reshape(B, Hkv, g, hd)
            else:
                K[:, :, L:S] = qk[:, nq:].reshape(B, T, Hkv, hd).transpose(0, 2, 1, 3)
                V[:, :, L:S] = y[:, nqk:].reshape(B, T, Hkv, hd).transpose(0, 2, 1, 3)
                q = qk[:, :nq].reshape(B, T, Hkv, g, hd).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, g * T, hd)
            s = q @ K[:, :, :S].swapaxes(-1, -2)  # [B, Hkv, g·T, S] (scale already in q)
            if neg is not None:
                s += neg
            if T == 1 and shift_own:  # softmax is shift-invariant: the query's own (newest) key scores 0, so
                s -= s[..., -1:]  # the sum is ≥ 1 (no underflow) and one call is saved; a key > 88 above
            else:  # the own key overflows to inf → NaN, which `__call__` catches and redoes with the row max
                s -= np.maximum.reduce(s, axis=-1, keepdims=True)  # (ufunc methods skip ndarray.max's wrapper)
            np.exp(s, out=s)
            a = s @ V[:, :, :S]  # [B, Hkv, g·T, hd]
            a /= s @ self.ones[:S]  # the row sums as a product (cheaper than a reduction here)
            if T > 1:
                a = a.reshape(B, Hkv, g, T, hd).transpose(0, 3, 1, 2, 4)
            x += a.reshape(N, nq) @ Wo
            gu = self._rms(x) @ GU  # [N, 2·ffn]
            ng, up = gu[:, :F], gu[:, F:]  # −gate, up
            act = ng * up
            np.exp(ng, out=ng)
            ng += 1.0
            act /= ng
            x += act @ Wd  # Wd = −Wdown
        return x


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
