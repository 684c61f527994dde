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

The weights are rearranged once per model version (cached like `fused_weights`; files never see it):

    A  = [P·Wq/√hd ; P·Wk ; Wv] · diag(g1)   P puts each head's rotary pairs (x_j, x_j+hd/2) side by side,
    GU = [−Wgate ; Wup] · diag(g2)           the attention scale goes into Wq, the norm weights g into
    D  = −Wdown                              the product after the norm, the gate's sign into D
    per layer:  x̂ = x / rms(x)
                q‖k‖v = x̂ Aᵀ
                q‖k as complex numbers z_j = x_j + i·x_j+hd/2, times e^{i·pos·θ_j}   (RoPE: one product)
                cache[:, :, L] = k, v;  a = softmax(q Kᵀ + mask) V           (GQA: q grouped per KV head)
                x = x + a Woᵀ;  x̂ = x / rms(x);  −g‖u = x̂ GUᵀ;  x = x + ((−g)·u / (1 + exp(−g))) Dᵀ
    logits = (x / rms(x) · g_final) Wembᵀ

Used by `decode_steps` for the stock dense RoPE Transformer with fp32 weights on CPU without autocast
(`NumpyStep.prepare`); LoRA wrappers, MoE layers, autocast and GPUs keep `OneTokenStep`. One row runs
the same loop compiled (decode_kernel.c, built on first use by the system C compiler; `c_kernel`),
and the numpy loop where there is no compiler.

The compiled step is a shared library loaded into this process, so its cache is guarded: the folder
(~/.cache/tiaoyu, or $XDG_CACHE_HOME/tiaoyu) is created 0700 and must be this user's and writable by
no one else; a cached library that is not this user's regular file, or is writable by group or others,
is deleted and rebuilt; a build goes to a unique temp file in that folder and is renamed into place;
the library is opened once, checked on the open file, and loaded through that descriptor. The cache
key holds the source, the flags, the compiler's path and version and the CPU. When the compiled step
is unavailable (other than by TIAOYU_C_KERNEL=0) one warning on stderr says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import weakref
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from tiaoyu_cli.model.kv_cache import KVCache
from tiaoyu_cli.model.transformer import Transformer, rope_tables

_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
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


_C: dict = {"fn": None, "tried": False}
C_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros",
           "-shared", "-fPIC"]


class KernelUnavailable(Exception):
    """Why the compiled step cannot be used (the message ends up in the one warning)."""


def c_kernel():
    """The one-row step compiled from decode_kernel.c (built once per machine into ~/.cache/tiaoyu by the
    system C compiler, ~1 s), or None — no compiler, a failed build, an unsafe cache, or
    TIAOYU_C_KERNEL=0 — and then the numpy code runs. Same function (tests compare both with the model's
    forward pass). Unavailable for a reason other than TIAOYU_C_KERNEL=0: one warning on stderr."""
    if not _C["tried"]:
        _C["tried"] = True
        if os.environ.get("TIAOYU_C_KERNEL", "1") != "0":
            why = None
            try:
                _C["fn"] = _build_kernel()
            except KernelUnavailable as e:
                why = str(e)
            except subprocess.CalledProcessError as e:
                err = (e.stderr or b"").decode("utf-8", "replace").strip().splitlines()
                why = f"the build failed ({err[0] if err else f'exit status {e.returncode}'})"
            except (OSError, subprocess.SubprocessError, AttributeError, RuntimeError) as e:
                why = f"{type(e).__name__}: {e}"
            if why is not None:
                _C["fn"] = None
                from tiaoyu_cli.console import warn

                warn(f"the compiled decode step is unavailable: {why}; decoding uses the numpy step "
                     "(TIAOYU_C_KERNEL=0 silences this)")
    return _C["fn"]


def kernel_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tiaoyu"


def _compiler_version(cc: str) -> str:
    """The first line of `cc --version` (part of the cache key: a new compiler builds anew); '' if it says nothing."""
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = out.stdout.decode("utf-8", "replace").strip().splitlines() if out.returncode == 0 else []
    return lines[0] if lines else ""


def _private_folder(folder: Path) -> None:
    """Create `folder` 0700; refuse one that is a link, not this user's, or writable by group or others."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode):
        raise KernelUnavailable(f"the cache {folder} is not a folder (a link?)")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise KernelUnavailable(f"the cache folder {folder} belongs to another user")
    if st.st_mode & 0o022:
        raise KernelUnavailable(f"the cache folder {folder} is writable by group or others (chmod 700 it)")


def _trusted(fd: int) -> bool:
    """The open file is this user's regular file, writable by no one else."""
    st = os.fstat(fd)
    return (stat.S_ISREG(st.st_mode) and not st.st_mode & 0o022
            and (not hasattr(os, "getuid") or st.st_uid == os.getuid()))


def _open_checked(so: Path) -> int | None:
    """A descriptor of the cached library when it is there and trusted; an untrusted one is deleted (None)."""
    try:
        fd = os.open(so, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError:  # a symbolic link (O_NOFOLLOW), or unreadable
        fd = -1
    if fd >= 0 and _trusted(fd):
        return fd
    if fd >= 0:
        os.close(fd)
    try:
        os.unlink(so)  # planted or tampered with: never loaded, rebuilt
    except FileNotFoundError:
        pass
    return None


def _build_kernel():
    src = Path(__file__).with_name("decode_kernel.c")
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise KernelUnavailable("no C compiler found (cc, gcc or clang; or set CC)")
    if not src.exists():
        raise KernelUnavailable(f"{src} is missing")
    cpu = ""  # -march=native: a build is only reused on the same kind of CPU
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line for line in f if line.startswith(("flags", "Features"))), "")
    key = src.read_bytes() + "\n".join([" ".join(C_FLAGS), cc, _compiler_version(cc), platform.machine(),
                                         platform.processor(), cpu]).encode()
    folder = kernel_folder()
    _private_folder(folder)
    so = folder / f"decode_kernel-{hashlib.sha256(key).hexdigest()[:16]}.so"
    fd = _open_checked(so)
    if fd is None:
        tmp_fd, tmp = tempfile.mkstemp(prefix=".decode_kernel-", suffix=".so", dir=folder)
        os.close(tmp_fd)
        try:
            subprocess.run([cc, *C_FLAGS, str(src), "-o", tmp, "-lm"], check=True, capture_output=True, timeout=120)
            os.chmod(tmp, 0o700)  # the linker may have made a new file with the umask's mode
            os.replace(tmp, so)  # whole or not at all: another process may be building the same file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        fd = _open_checked(so)
        if fd is None:
            raise KernelUnavailable(f"{so} changed while it was being built")
    try:
        # load the very file checked: through its descriptor where /proc has one, else its path (the folder
        # is this user's alone, so the name still points at it)
        via = f"/proc/self/fd/{fd}" if os.path.exists(f"/proc/self/fd/{fd}") else str(so)
        fn = ctypes.CDLL(via).tiaoyu_step
    finally:
        os.close(fd)
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p]
    return fn


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().contiguous().numpy()


class Prepared(NamedTuple):
    layers: list  # per layer (A, Woᵀ, GU, D), C-contiguous float32 [in, out]
    final_norm: np.ndarray  # [d]
    rot: np.ndarray  # [P, (H + Hkv)·hd/2] complex64: e^{i·pos·θ_j} for every q and k head at once


def _rope(cfg, positions: int) -> np.ndarray:
    cos, sin = rope_tables(cfg.head_dim, torch.arange(positions)[None], cfg.rope_theta,
                           cfg.rope_scaling)  # [1, P, hd], halves equal
    half = cfg.head_dim // 2
    rot = (cos[0, :, :half].double() + 1j * sin[0, :, :half].double()).numpy().astype(np.complex64)
    return np.tile(rot, (1, cfg.n_heads + cfg.n_kv_heads))


def prepared_weights(model: Transformer) -> Prepared | None:
    """The weights rearranged for `NumpyStep` (see the module's docstring) and the rotary tables; None
    when a weight is not fp32 or a layer is not plain (LoRA wrappers, MoE experts: `fused_weights`).

    Cached per model until a weight changes (the key of `fused_weights`: tensor versions and the
    Trainer's `weights_version`), so RL rollouts after an optimizer step decode the current policy.
    """
    from tiaoyu_cli.infer.generate import fused_weights

    params = list(model.parameters())
    key = (getattr(model, "weights_version", 0), tuple((id(p), p._version) for p in params))
    hit = _PREPARED.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    out = None
    fused = fused_weights(model)
    if all(p.dtype == torch.float32 for p in params) and all(w is not None for ws in fused for w in ws):
        cfg = model.config
        H, hd = cfg.n_heads, cfg.head_dim
        nqk = (H + cfg.n_kv_heads) * hd
        layers = []
        with torch.no_grad():
            for b, (qkv, o_t, gu, down_t) in zip(model.model.layers, fused):
                w = _np(qkv).copy()  # [(H + 2·Hkv)·hd, d]: q, k, v rows
                w[: H * hd] *= hd ** -0.5  # the attention scale, folded into q (RoPE is linear: before it is fine)
                w[: nqk] = w[: nqk].reshape(-1, 2, hd // 2, w.shape[1]).swapaxes(1, 2).reshape(nqk, -1)  # pairs
                gu = _np(gu).copy()  # [2·ffn, d]: gate, up rows
                gu[: cfg.ffn_dim] *= -1  # −gate: silu(g)·u = −(−g)·u / (1 + exp(−g)), the sign goes into D
                layers.append((np.ascontiguousarray((w * _np(b.input_layernorm.weight)).T),
                               np.ascontiguousarray(_np(o_t)),
                               np.ascontiguousarray((gu * _np(b.post_attention_layernorm.weight)).T),
                               np.ascontiguousarray(-_np(down_t))))
        # one buffer in the order a step reads them (4 KiB-aligned): the weights stream from memory every
        # token, and one run of addresses is what the hardware prefetcher follows best
        sizes = [(m.size + 1023) // 1024 * 1024 for ws in layers for m in ws]
        buf = np.empty(sum(sizes), np.float32)
        packed, at = [], 0
        for ws in layers:
            views = []
            for m in ws:
                v = buf[at:at + m.size].reshape(m.shape)
                v[...] = m
                views.append(v)
                at += (m.size + 1023) // 1024 * 1024
            packed.append(tuple(views))
        out = Prepared(packed, _np(model.model.norm.weight), _rope(cfg, cfg.max_seq_len))
    _PREPARED[model] = (key, out)
    return out


class NumpyStep:
    """Drop-in for `OneTokenStep` (same constructor, `select`, `__call__`) on CPU in fp32."""

    def __init__(self, model: Transformer, cache: KVCache, positions: torch.Tensor, prepared: Prepared | None = None):
        cfg = model.config
        self.model, self.cache, self.cfg = model, cache, cfg
        self.positions = positions.cpu().numpy().astype(np.int64)  # [B] position of the next token per row
        w = prepared or prepared_weights(model)
        self.layers, self.final_norm = w.layers, w.final_norm
        self.rot = w.rot if len(w.rot) >= cache.max_len else _rope(cfg, cache.max_len)
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
        from tiaoyu_cli.infer.generate import OneTokenStep

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
        half the work); their keys and values go to a scratch cache and then to each row."""
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

    def slot_step(self, tokens: np.ndarray, pos: np.ndarray, width: int) -> torch.Tensor:
        """Continuous batching (infer/slots.py): rows 0 … n−1 of the cache, each at its own length — token
        [n] goes to column pos[r] of row r, which sees columns 0 … pos[r]; width = max(pos) + 1."""
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
