"""Token shards: the pretraining corpus as memory-mapped safetensors files.

Layout written by `tiaoyu tokenize encode` (DESIGN §1):

    tokens/
      meta.json                       fingerprint, vocab size, dtype, counts per split
      train/meta.json                 the same for one split + its shard list
      train/shard-00000.safetensors   one 1-D tensor "tokens": <s> doc </s> <s> doc </s> …
      val/…

A safetensors file is: 8 bytes little-endian header length N, N bytes of JSON header
({"tokens": {"dtype": "U16", "shape": [T], "data_offsets": [begin, end]}, …}), then the raw
data. `TokenShards.arrays()` parses that header itself and `np.memmap`s the data region, so
reading a corpus costs page cache, never RAM.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from tiaoyu_cli.errors import TiaoyuError

FORMAT = "tiaoyu-tokens"
FORMAT_VERSION = 1
META_FILE = "meta.json"
TENSOR_NAME = "tokens"
SPLITS = ("train", "val")

_ST_DTYPES = {"U16": np.uint16, "I32": np.int32, "U32": np.uint32, "I64": np.int64}
_NP_TO_ST = {"uint16": "U16", "int32": "I32"}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else int32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


# ---------------------------------------------------------------------------- writing
class ShardWriter:
    """Append token arrays; every `shard_tokens` tokens become one shard file in `folder`.

    The caller makes `folder` part of an atomic folder write (tiaoyu_cli.io.atomic_dir), so the
    split appears complete or not at all. Memory: at most one shard's worth of tokens.
    """

    def __init__(self, folder: str | os.PathLike, dtype, shard_tokens: int):
        if shard_tokens < 1:
            raise TiaoyuError("--shard-tokens must be at least 1")
        self.folder = Path(folder)
        self.dtype = np.dtype(dtype)
        self.shard_tokens = int(shard_tokens)
        self.shards: list[dict] = []
        self.num_tokens = 0
        self.num_documents = 0
        self._buf = np.empty(self.shard_tokens, dtype=self.dtype)
        self._fill = 0

    def add(self, tokens: np.ndarray, num_documents: int = 0) -> None:
        tokens = np.asarray(tokens)
        self.num_documents += num_documents
        pos = 0
        while pos < len(tokens):
            take = min(self.shard_tokens - self._fill, len(tokens) - pos)
            self._buf[self._fill:self._fill + take] = tokens[pos:pos + take]
            self._fill += take
            pos += take
            if self._fill == self.shard_tokens:
                self._flush()

    def _flush(self) -> None:
        if self._fill == 0:
            return
        from safetensors.numpy import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        name = shard_name(len(self.shards))
        save_file({TENSOR_NAME: self._buf[:self._fill].copy()}, str(self.folder / name))
        self.shards.append({"file": name, "num_tokens": int(self._fill)})
        self.num_tokens += self._fill
        self._fill = 0

    def close(self, meta: dict) -> dict:
        """Write the last shard and the split's meta.json; return the split's meta."""
        self._flush()
        split_meta = {
            **meta,
            "dtype": self.dtype.name,
            "num_tokens": int(self.num_tokens),
            "num_documents": int(self.num_documents),
            "shards": self.shards,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / META_FILE).write_text(json.dumps(split_meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        return split_meta


# ---------------------------------------------------------------------------- reading
def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """Return (header dict, byte offset where the data region starts)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than 8 bytes")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise TiaoyuError(f"{path} is not a readable safetensors shard ({e})") from None
    if not isinstance(header, dict):
        raise TiaoyuError(f"{path} is not a readable safetensors shard (header is not an object)")
    return header, 8 + n


def memmap_tokens(path: str | os.PathLike) -> np.memmap:
    """Memory-map the 1-D `tokens` tensor of one shard (read-only)."""
    header, data_start = read_safetensors_header(path)
    info = header.get(TENSOR_NAME)
    if not isinstance(info, dict) or info.get("dtype") not in _ST_DTYPES:
        raise TiaoyuError(f"{path}: no 1-D '{TENSOR_NAME}' tensor of a token dtype (U16/I32)")
    shape = info.get("shape")
    begin, end = info.get("data_offsets", [0, -1])
    dtype = np.dtype(_ST_DTYPES[info["dtype"]])
    if not (isinstance(shape, list) and len(shape) == 1 and end - begin == shape[0] * dtype.itemsize):
        raise TiaoyuError(f"{path}: '{TENSOR_NAME}' must be a 1-D tensor whose size matches its data")
    size = os.path.getsize(path)
    if data_start + end > size:
        raise TiaoyuError(f"{path} is truncated ({size} bytes, the header promises {data_start + end})")
    return np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=(shape[0],))


def _load_meta(folder: Path) -> dict:
    p = folder / META_FILE
    if not folder.is_dir():
        raise TiaoyuError(f"token folder {folder} does not exist — run `tiaoyu tokenize encode` first")
    if not p.is_file():
        raise TiaoyuError(f"{folder} has no {META_FILE}: not a token folder (no token shards) — "
                          "run `tiaoyu tokenize encode` first")
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TiaoyuError(f"{p} is corrupt (not valid JSON: {e}); re-run `tiaoyu tokenize encode`") from None
    if not isinstance(meta, dict):
        raise TiaoyuError(f"{p} is corrupt (expected a JSON object); re-run `tiaoyu tokenize encode`")
    return meta


class TokenShards:
    """One split folder (e.g. tokens/train): the concatenation of its shards as one token stream."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        meta = _load_meta(self.folder)
        where = self.folder / META_FILE
        try:
            self.fingerprint = str(meta["tokenizer_fingerprint"])
            self.vocab_size = int(meta["vocab_size"])
            self.dtype = np.dtype(meta["dtype"])
            self.num_tokens = int(meta["num_tokens"])
            self.num_documents = int(meta.get("num_documents", 0))
            shards = meta["shards"]
            self._files = [str(s["file"]) for s in shards]
            self._counts = [int(s["num_tokens"]) for s in shards]
        except (KeyError, TypeError, ValueError) as e:
            raise TiaoyuError(f"{where} is corrupt (bad or missing field {e}); re-run `tiaoyu tokenize encode`") from None
        if sum(self._counts) != self.num_tokens:
            raise TiaoyuError(f"{where} is corrupt: shard token counts add up to {sum(self._counts)}, "
                              f"not num_tokens={self.num_tokens}")
        for f in self._files:
            if not (self.folder / f).is_file():
                raise TiaoyuError(f"{self.folder} is incomplete: {f} listed in {META_FILE} is missing")
        self.meta = meta
        self.split = meta.get("split")
        self._arrays: list[np.memmap] | None = None
        self._starts = np.cumsum([0] + self._counts)  # stream offset where each shard begins

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return (f"TokenShards({str(self.folder)!r}, tokens={self.num_tokens}, docs={self.num_documents}, "
                f"shards={len(self._files)}, dtype={self.dtype.name}, fingerprint={self.fingerprint!r})")

    def arrays(self) -> list[np.memmap]:
        """One read-only np.memmap per shard (opened once, then cached)."""
        if self._arrays is None:
            arrs = []
            for f, n in zip(self._files, self._counts):
                a = memmap_tokens(self.folder / f)
                if len(a) != n:
                    raise TiaoyuError(f"{self.folder / f} holds {len(a)} tokens but {META_FILE} says {n}")
                if a.dtype != self.dtype:
                    raise TiaoyuError(f"{self.folder / f} has dtype {a.dtype.name} but {META_FILE} says {self.dtype.name}")
                arrs.append(a)
            self._arrays = arrs
        return self._arrays

    def get(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the concatenated stream (may span shards), as a new array."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"window [{start}, {start + length}) is outside 0..{self.num_tokens}")
        arrays = self.arrays()
        out = np.empty(length, dtype=self.dtype)
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        filled = 0
        while filled < length:
            a = arrays[k]
            off = start + filled - int(self._starts[k])
            take = min(len(a) - off, length - filled)
            out[filled:filled + take] = a[off:off + take]
            filled += take
            k += 1
        return out


def open_tokens(path: str | os.PathLike) -> tuple[TokenShards, TokenShards | None]:
    """tokens/ -> (train, val or None). A folder that holds shards directly -> (it, None)."""
    p = Path(path)
    if not p.is_dir():
        raise TiaoyuError(f"token folder {p} does not exist — run `tiaoyu tokenize encode` first")
    if (p / "train").is_dir():
        meta = _load_meta(p)  # the top-level meta must be sound too
        train = TokenShards(p / "train")
        val = TokenShards(p / "val") if (p / "val").is_dir() else None
        if val is not None and val.fingerprint != train.fingerprint:
            raise TiaoyuError(f"{p}: train and val were encoded with different tokenizers "
                              f"({train.fingerprint} vs {val.fingerprint})")
        if meta.get("tokenizer_fingerprint") not in (None, train.fingerprint):
            raise TiaoyuError(f"{p / META_FILE} is inconsistent with {p / 'train' / META_FILE} (fingerprints differ)")
        return train, val
    return TokenShards(p), None


def check_fingerprint(shards: TokenShards, tokenizer) -> None:
    """Raise TiaoyuError when `shards` were not encoded with `tokenizer`."""
    if shards.fingerprint != tokenizer.fingerprint:
        made = shards.meta.get("tokenizer")
        raise TiaoyuError(
            f"tokenizer mismatch: the tokens in {shards.folder} were encoded with tokenizer {shards.fingerprint}"
            + (f" ({made})" if isinstance(made, str) and made else "") + ", "
            f"but {tokenizer.path or 'the tokenizer given'} has fingerprint {tokenizer.fingerprint}. Use the tokenizer "
            f"the shards were made with, or re-encode: tiaoyu tokenize encode DATA --tokenizer {tokenizer.path or 'TOK'} -o TOKENS"
        )
