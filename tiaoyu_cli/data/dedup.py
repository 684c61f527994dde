"""Duplicate detection for `tiaoyu prep`: exact (default) and near-duplicates (MinHash, `--near-dup`).

Exact: every kept record is reduced to an 8-byte BLAKE2b hash of its canonical JSON; a record
whose hash was seen before is a duplicate. The hashes live in `U64Set`, an open-addressing
table of unsigned 64-bit integers (`array('Q')`): 8 bytes per slot, at most half full, so about
16 bytes per distinct record — 16 MB for a million records — instead of the ~70 bytes a
Python `set` of ints costs. (Two different records share a hash with probability ~n²/2⁶⁵:
about 3·10⁻⁸ for a million records.)

Near-duplicates (MinHash + LSH banding, after Broder 1997 and Leskovec et al., *Mining of
Massive Datasets* ch. 3):

* A document is the set of its character 5-grams ("shingles", lower-cased, whitespace runs
  folded) — characters, not words, so Chinese works the same as English.
* Jaccard similarity J(A, B) = |A ∩ B| / |A ∪ B|. For a random hash function h,
  P[min h(A) = min h(B)] = J(A, B). A signature of `num_perm` such minima (one per hash
  function hᵢ(x) = (aᵢ·x + bᵢ mod 2⁶⁴) >> 32, aᵢ odd) estimates J.
* The signature is cut into b bands of r rows (b·r = num_perm). Two documents become
  candidates when any band is identical; that happens with probability 1 − (1 − Jʳ)ᵇ, an
  S-curve whose steep part sits near the threshold t ≈ (1/b)^(1/r). `choose_bands` picks the
  (b, r) that minimises false positives plus false negatives around `--near-dup-threshold`.
* A document is a near-duplicate when one of its bands was seen in an earlier kept document;
  otherwise its b band hashes are added (to a `U64Set`, so about 16·b bytes per document).
  There is no pairwise verification, so memory stays linear and small; the price is the
  S-curve's soft edge (a few pairs just under the threshold are dropped, a few just above kept).
"""

from __future__ import annotations

import hashlib
import re
from array import array

import numpy as np

_MASK64 = (1 << 64) - 1


def hash64(data: bytes) -> int:
    """Stable 64-bit hash (BLAKE2b), never 0 (0 marks an empty slot in U64Set)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") or 1


class U64Set:
    """A set of nonzero 64-bit integers in a flat `array('Q')` with linear probing."""

    def __init__(self, capacity: int = 1 << 16):
        cap = 1
        while cap < capacity:
            cap <<= 1
        self._table = array("Q", bytes(8 * cap))
        self._mask = cap - 1
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def add(self, h: int) -> bool:
        """Insert h; return True when it was new, False when it was already there."""
        t, mask = self._table, self._mask
        i = (h ^ (h >> 29)) & mask
        while True:
            v = t[i]
            if v == 0:
                t[i] = h
                self._n += 1
                if 2 * self._n > len(t):
                    self._grow()
                return True
            if v == h:
                return False
            i = (i + 1) & mask

    def __contains__(self, h: int) -> bool:
        t, mask = self._table, self._mask
        i = (h ^ (h >> 29)) & mask
        while True:
            v = t[i]
            if v == 0:
                return False
            if v == h:
                return True
            i = (i + 1) & mask

    def _grow(self) -> None:
        old = self._table
        self._table = array("Q", bytes(16 * len(old)))
        self._mask = len(self._table) - 1
        self._n = 0
        for v in old:
            if v:
                self.add(v)

    def nbytes(self) -> int:
        return len(self._table) * 8


def choose_bands(num_perm: int, threshold: float) -> tuple[int, int]:
    """(bands, rows) with bands·rows ≤ num_perm minimising the area of false positives
    (∫₀ᵗ P) plus false negatives (∫ₜ¹ 1 − P) of P(J) = 1 − (1 − Jʳ)ᵇ."""
    js = np.linspace(0.0, 1.0, 401)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        r = num_perm // b
        p = 1.0 - (1.0 - js ** r) ** b
        below = js < threshold
        err = np.trapezoid(np.where(below, p, 0.0), js) + np.trapezoid(np.where(below, 0.0, 1.0 - p), js)
        if err < best_err:
            best, best_err = (b, r), err
    return best


_WS = re.compile(r"\s+")


class MinHashDedup:
    """Near-duplicate filter; `seen(text)` returns True for a near-duplicate of an earlier kept text."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 0):
        if not 0.0 < threshold < 1.0:
            raise ValueError("near-dup threshold must be between 0 and 1")
        self.threshold, self.ngram = threshold, ngram
        self.bands, self.rows = choose_bands(num_perm, threshold)
        rng = np.random.default_rng(seed)
        n = self.bands * self.rows
        self._a = (rng.integers(0, 1 << 63, n, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)  # odd multipliers
        self._b = rng.integers(0, 1 << 63, n, dtype=np.uint64)
        self._seen = U64Set()

    def shingles(self, text: str) -> np.ndarray:
        """64-bit hashes of the character n-grams of the folded text (uint64 array)."""
        s = _WS.sub(" ", text.lower()).strip()
        cps = np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        n = self.ngram
        if len(cps) < n:
            cps = np.concatenate([cps, np.zeros(n - len(cps), dtype=np.uint64)])
        m = len(cps) - n + 1
        h = np.zeros(m, dtype=np.uint64)
        p = np.uint64(0x100000001B3)
        for j in range(n):  # polynomial rolling hash of each n-gram, then a 64-bit mix
            h = h * p + cps[j:j + m]
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
        return np.unique(h)

    def signature(self, text: str) -> np.ndarray:
        """MinHash signature: for each hash function the minimum over the shingles (uint64)."""
        sh = self.shingles(text)
        out = np.empty(len(self._a), dtype=np.uint64)
        step = max(1, 1 << 16 >> 7)  # shingle blocks keep the (shingles × perms) product small
        out[:] = np.iinfo(np.uint64).max
        for i in range(0, len(sh), step):
            blk = sh[i:i + step, None] * self._a[None, :] + self._b[None, :]
            np.minimum(out, (blk >> np.uint64(32)).min(axis=0), out=out)
        return out

    def band_keys(self, sig: np.ndarray) -> list[int]:
        bands = sig.reshape(self.bands, self.rows)
        return [hash64(i.to_bytes(2, "little") + bands[i].tobytes()) for i in range(self.bands)]

    def seen(self, text: str) -> bool:
        keys = self.band_keys(self.signature(text))
        if any(k in self._seen for k in keys):
            return True
        for k in keys:
            self._seen.add(k)
        return False
