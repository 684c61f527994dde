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
  P[min h(A) = min h(B)] = J(A, B), so a signature of K minima estimates J.
* Classic MinHash computes K hash functions of every shingle (cost shingles × K). We use
  one-permutation hashing (Li, Owen & Zhang 2012): one 64-bit hash per shingle, its top
  log2(K) bits pick one of K bins, and each bin keeps its minimum — cost shingles × 1.
  A bin no shingle fell into borrows the minimum of the next non-empty bin to its right
  (circularly) plus an offset for the distance ("rotation densification", Shrivastava &
  Li 2014), so every bin is filled and equal bins still mean "probably the same shingle".
  Signatures are computed for batches of documents in one numpy pass.
* The signature is cut into b bands of r rows (b·r ≤ K). Two documents become candidates
  when any band is identical; that happens with probability 1 − (1 − Jʳ)ᵇ, an S-curve whose
  steep part sits near the threshold t ≈ (1/b)^(1/r). `choose_bands` picks the (b, r) that
  minimises false positives plus false negatives around `--near-dup-threshold`.
* Documents are decided in input order: one is a near-duplicate when one of its bands was
  seen in an earlier kept document; otherwise its b band hashes are added (to a `U64Set`,
  so about 16·b bytes per document). There is no pairwise verification, so memory stays
  linear and small; the price is the S-curve's soft edge (a few pairs just under the
  threshold are dropped, a few just above kept).
"""

from __future__ import annotations

import hashlib
from array import array

import numpy as np

_MASK64 = (1 << 64) - 1
_U64 = np.uint64


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

    def add_many(self, hashes) -> np.ndarray:
        """Insert a batch (array-like of uint64, in order); return a bool array, True where the hash
        was new — not in the set before and not earlier in the batch. The same answers as calling
        `add` on each in turn, in a few numpy passes instead of a Python loop per hash."""
        hs = np.asarray(hashes, dtype=np.uint64)
        out = np.zeros(len(hs), dtype=bool)
        if not len(hs):
            return out
        _, first = np.unique(hs, return_index=True)  # later copies inside the batch are never new
        while 2 * (self._n + len(first)) > len(self._table):
            self._grow()
        table = np.frombuffer(self._table, dtype=np.uint64)  # a writable view, no copy
        mask = _U64(self._mask)
        keys = hs[first]
        slot = (keys ^ (keys >> _U64(29))) & mask  # the slot `add` would start at
        new = np.zeros(len(keys), dtype=bool)
        todo = np.arange(len(keys))
        while todo.size > 16:  # numpy rounds while many keys probe; the last few in a plain loop
            k, s = keys[todo], slot[todo]
            v = table[s]
            empty = v == 0
            e = np.nonzero(empty)[0]
            won = np.zeros(len(todo), dtype=bool)
            if e.size:  # several keys may reach one empty slot: one write lands, the others probe on
                table[s[e]] = k[e]
                won[e] = table[s[e]] == k[e]
                new[todo[won]] = True
            move = ~empty & (v != k)  # a different key sits there: linear probing
            slot[todo[move]] = (s[move] + _U64(1)) & mask
            todo = todo[move | (empty & ~won)]
        tab, m = self._table, self._mask
        for j, h, i in zip(todo.tolist(), keys[todo].tolist(), slot[todo].tolist()):
            while True:
                v = tab[i]
                if v == 0:
                    tab[i] = h
                    new[j] = True
                    break
                if v == h:
                    break
                i = (i + 1) & m
        self._n += int(new.sum())
        out[first[new]] = True
        return out

    def _grow(self) -> None:
        old = np.frombuffer(self._table, dtype=np.uint64)
        values = old[old != 0].copy()
        self._table = array("Q", bytes(16 * len(old)))
        self._mask = len(self._table) - 1
        self._n = 0
        self.add_many(values)

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


def _mix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: spreads every input bit over the whole word (in place)."""
    h ^= h >> _U64(33)
    h *= _U64(0xFF51AFD7ED558CCD)
    h ^= h >> _U64(33)
    h *= _U64(0xC4CEB9FE1A85EC53)
    h ^= h >> _U64(33)
    return h


class MinHashDedup:
    """Near-duplicate filter. `check(texts)` returns, for a batch in input order, True for each
    text that is a near-duplicate of an earlier kept one (earlier batches included)."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 0):
        if not 0.0 < threshold < 1.0:
            raise ValueError("near-dup threshold must be between 0 and 1")
        if num_perm & (num_perm - 1):
            raise ValueError("num_perm must be a power of two")
        self.threshold, self.ngram, self.num_perm = threshold, ngram, num_perm
        self.bins_bits = num_perm.bit_length() - 1
        self.bands, self.rows = choose_bands(num_perm, threshold)
        self.salt = _U64(_mix64(np.array([seed + 0x5EED], dtype=np.uint64))[0])
        self._seen = U64Set()

    def fold(self, text: str) -> str:
        s = " ".join(text.lower().split())
        return s if len(s) >= self.ngram else s.ljust(self.ngram, "\0")

    def shingles(self, text: str) -> np.ndarray:
        """64-bit hashes of the character n-grams of one folded text."""
        return self._shingle_hashes([self.fold(text)])[0]

    def _shingle_hashes(self, folded: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(hashes, document index) of every n-gram of every text, in one vectorised pass."""
        n = self.ngram
        lens = np.fromiter((len(t) for t in folded), dtype=np.int64, count=len(folded))
        cps = np.frombuffer("".join(folded).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        m = len(cps) - n + 1
        h = np.zeros(m, dtype=np.uint64)
        for j in range(n):  # polynomial hash of each n-gram (mod 2^64)
            h = h * _U64(0x100000001B3) + cps[j:j + m]
        doc = np.repeat(np.arange(len(folded)), lens)[:m]
        ends = np.cumsum(lens)
        valid = np.arange(m) + n <= ends[doc]  # the n-gram lies inside one document
        return _mix64(h[valid] ^ self.salt), doc[valid]

    def signatures(self, texts: list[str]) -> np.ndarray:
        """(len(texts), num_perm) uint64 one-permutation MinHash signatures, densified."""
        k, bits = self.num_perm, self.bins_bits
        h, doc = self._shingle_hashes([self.fold(t) for t in texts])
        cell = doc * k + (h >> _U64(64 - bits)).astype(np.int64)  # (document, bin)
        val = h & _U64((1 << (64 - bits)) - 1)  # the rest of the hash
        empty = _U64(np.iinfo(np.uint64).max)
        sig = np.full(len(texts) * k, empty, dtype=np.uint64)
        np.minimum.at(sig, cell, val)  # each (document, bin) keeps its minimum
        sig = sig.reshape(len(texts), k)
        # rotation densification: an empty bin takes the next non-empty bin's value (circularly),
        # plus an offset for the distance
        filled = sig != empty
        idx = np.where(np.concatenate([filled, filled], axis=1), np.arange(2 * k), 2 * k)
        nxt = np.minimum.accumulate(idx[:, ::-1], axis=1)[:, ::-1][:, :k]
        dist = (nxt - np.arange(k)).astype(np.uint64)
        src = np.take_along_axis(np.concatenate([sig, sig], axis=1), np.minimum(nxt, 2 * k - 1), axis=1)
        return np.where(filled, sig, src + dist * _U64(0x9E3779B97F4A7C15))

    def band_keys(self, sigs: np.ndarray) -> np.ndarray:
        """(documents, bands) nonzero uint64 keys: each band's r rows hashed together with its index."""
        b, r = self.bands, self.rows
        rows = sigs[:, : b * r].reshape(len(sigs), b, r)
        key = np.broadcast_to(np.arange(1, b + 1, dtype=np.uint64), (len(sigs), b)).copy()
        for j in range(r):
            key = _mix64(key * _U64(0x100000001B3) ^ rows[:, :, j])
        return key | _U64(1)

    def keys(self, texts: list[str]) -> list[list[int]]:
        """The band keys of each text: the vectorised, order-free half of `check` (prep's workers
        compute them; the parent decides in input order with `check_keys`)."""
        return self.band_keys(self.signatures(texts)).tolist() if texts else []

    def check(self, texts: list[str]) -> list[bool]:
        return self.check_keys(self.keys(texts))

    def check_keys(self, keys: list[list[int]]) -> list[bool]:
        """For band keys in input order: True where an earlier kept document shares a band."""
        out = []
        seen = self._seen
        for row in keys:
            dup = any(k in seen for k in row)
            if not dup:
                for k in row:
                    seen.add(k)
            out.append(dup)
        return out

    def seen(self, text: str) -> bool:
        """One text at a time (slower than `check` on a batch)."""
        return self.check([text])[0]
