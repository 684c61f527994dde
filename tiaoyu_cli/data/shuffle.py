"""A uniform random shuffle of byte lines in bounded memory (used by `tiaoyu prep --shuffle`).

Lines are collected into runs of about `budget_bytes`; each full run is shuffled in memory and
written to a temp file. The output is a random *interleaving* of the runs: the next line comes
from run i with probability (lines left in run i) / (lines left in all runs). Every
interleaving pattern is then equally likely, and each run's order is a uniform permutation, so
every permutation of the whole input is equally likely: a true uniform shuffle, not the
approximate one of a sliding shuffle buffer.

Memory: one run (`budget_bytes`, 32 MB by default, counted with Python's per-object overhead)
plus one read buffer per run file. Disk: one copy of the input in the temp folder (beside the
output file, or in $TMPDIR when writing to stdout), deleted afterwards. To keep the number of
open files bounded, whenever there are `max_runs` runs the smaller half is merged into one
bigger run by the same interleaving rule, which keeps the shuffle uniform.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from typing import BinaryIO, Iterator

_OVERHEAD = 64  # approximate bytes of Python object overhead per buffered line


class ExternalShuffle:
    def __init__(self, seed: int, budget_bytes: int = 32 << 20, tmp_dir: str | None = None, max_runs: int = 128):
        self.rng = random.Random(seed)
        self.budget, self.tmp_parent, self.max_runs = budget_bytes, tmp_dir, max_runs
        self.buf: list[bytes] = []
        self.size = 0
        self.runs: list[tuple[str, int]] = []  # (path, number of lines)
        self._tmp: str | None = None
        self._n_files = 0

    def add(self, line: bytes) -> None:
        self.buf.append(line)
        self.size += len(line) + _OVERHEAD
        if self.size >= self.budget:
            self._spill()

    def _new_path(self) -> str:
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix=".tiaoyu-shuffle-", dir=self.tmp_parent)
        self._n_files += 1
        return os.path.join(self._tmp, f"run-{self._n_files:06d}")

    def _spill(self) -> None:
        if not self.buf:
            return
        self.rng.shuffle(self.buf)
        path = self._new_path()
        with open(path, "wb") as f:
            f.writelines(self.buf)
        self.runs.append((path, len(self.buf)))
        self.buf, self.size = [], 0
        if len(self.runs) >= self.max_runs:  # merge the smaller half (tiered, so each line is rewritten O(log n) times)
            self.runs.sort(key=lambda r: r[1])
            k = max(2, self.max_runs // 2)
            small, self.runs = self.runs[:k], self.runs[k:]
            path = self._new_path()
            n = 0
            with open(path, "wb") as f:
                for line in self._interleave(small):
                    f.write(line)
                    n += 1
            self.runs.append((path, n))

    def _interleave(self, runs: list[tuple[str, int]]) -> Iterator[bytes]:
        """Yield the lines of the run files in a uniformly random interleaving; delete them after."""
        files: list[BinaryIO] = [open(p, "rb", buffering=1 << 16) for p, _ in runs]
        try:
            yield from interleave([iter(f.readline, b"") for f in files], [n for _, n in runs], self.rng)
        finally:
            for f in files:
                f.close()
            for p, _ in runs:
                os.unlink(p)

    def __iter__(self) -> Iterator[bytes]:
        try:
            if not self.runs:  # everything fits in memory
                self.rng.shuffle(self.buf)
                buf, self.buf = self.buf, []
                yield from buf
                return
            self._spill()
            yield from self._interleave(self.runs)
            self.runs = []
        finally:
            self.close()

    def close(self) -> None:
        self.buf = []
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def interleave(sources: list[Iterator[bytes]], counts: list[int], rng: random.Random) -> Iterator[bytes]:
    """Merge sources of known lengths: each next item comes from source i with probability
    counts_left[i] / total_left, which makes every interleaving pattern equally likely."""
    left = list(counts)
    total = sum(left)
    while total:
        r = rng.randrange(total)
        i = 0
        while r >= left[i]:
            r -= left[i]
            i += 1
        left[i] -= 1
        total -= 1
        yield next(sources[i])
