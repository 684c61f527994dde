"""A Hugging Face folder whose tokenizer is a foreign SentencePiece `tokenizer.model` (Llama 2, Mistral 7B v0.1,
TinyLlama: `tokenizer.model` + `tokenizer_config.json` + `special_tokens_map.json`, no `tokenizer.json`), behind
the interface HFTokenizer (hf.py) gives every open folder: specials by role, added tokens, the folder's own
template rendered in the same sandbox, a fingerprint over tokenizer.model + tokenizer_config.json.

The ids are those of transformers' slow, sentencepiece-backed `LlamaTokenizer` (`use_fast=False` in transformers
4.x) on the same folder, computed the way it computes them:

    1. text is cut at the added tokens (tokenizer_config.json `added_tokens_decoder`, added_tokens.json, the special
       tokens by role), longest first, honouring their lstrip/rstrip/single_word flags;
    2. `legacy: true` (the default when the key is absent): each piece of text between them is encoded by
       SentencePiece as the model file says, dummy prefix ("▁") included;
       `legacy: false`: the model's dummy prefix is switched off, one "▁" is put before the whole text instead
       (`add_prefix_space`, default true; dropped when a special token follows it), and a piece of text that starts
       with a space is encoded behind "<unk>" whose pieces are then cut off, so SentencePiece keeps the space;
    3. `tokenizer(text)` adds BOS/EOS as `add_bos_token` (default true) and `add_eos_token` say.

The model is read with the `sentencepiece` library itself rather than converted into a `tokenizers` pipeline at load
time: a conversion (transformers' LlamaConverter) rebuilds BPE merges from piece scores and a Metaspace pre-tokenizer,
which already differs from SentencePiece on text that starts with a space ("  x", " Hello": the converted tokenizer
drops one "▁") and on chunks after special tokens in legacy mode, and it needs transformers, which is only an extra
here. Switching the dummy prefix off edits one field of the model's protobuf (read and written below by hand, so the
`protobuf` package is not needed either). Decoding is what transformers' Llama decoder does: pieces joined, "▁" read
as a space, <0xXX> byte pieces joined into UTF-8, one leading space dropped when a dummy prefix was added.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import sentencepiece as spm

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.tokenizer.hf import CONFIG_FILE, TOKENIZER_JSON, HFTokenizer, ROLES, _token_text

MODEL_FILE = "tokenizer.model"
SPACE = "\u2581"  # SentencePiece's space


def is_sentencepiece_folder(path) -> bool:
    """A folder whose tokenizer is a foreign SentencePiece model: tokenizer.model, no tokenizer.json, and not made by
    `tiaoyu tokenize train` (whose ids 0..7 are tiaoyu's own control tokens)."""
    from tiaoyu_cli.tokenizer.core import BASE_SPECIAL_TOKENS

    p = Path(path)
    if not (p / MODEL_FILE).is_file() or (p / TOKENIZER_JSON).is_file():
        return False
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto((p / MODEL_FILE).read_bytes())
    except Exception:  # not a model at all: Tokenizer.load names the file and the reason
        return False
    n = len(BASE_SPECIAL_TOKENS)
    return sp.get_piece_size() < n or [sp.id_to_piece(i) for i in range(n)] != BASE_SPECIAL_TOKENS


# ---- the few protobuf fields read or written here (wire format: varint keys, length-delimited messages) ----------

def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return value, i
        shift += 7


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(buf: bytes):
    """(field number, wire type, value, raw bytes of the whole field) for each field of a message."""
    i = 0
    while i < len(buf):
        start = i
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            value, i = _varint(buf, i)
        elif wt == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wt in (1, 5):
            value, i = buf[i:i + (8 if wt == 1 else 4)], i + (8 if wt == 1 else 4)
        else:
            raise ValueError(f"unsupported wire type {wt}")
        if i > len(buf):
            raise ValueError("truncated field")
        yield num, wt, value, buf[start:i]


NORMALIZER_SPEC, ADD_DUMMY_PREFIX = 3, 3  # ModelProto.normalizer_spec, NormalizerSpec.add_dummy_prefix


def dummy_prefix(model_proto: bytes) -> bool:
    """The model's NormalizerSpec.add_dummy_prefix (true unless the file says otherwise)."""
    value = True
    for num, wt, v, _ in _fields(model_proto):
        if num == NORMALIZER_SPEC and wt == 2:
            for n2, w2, v2, _ in _fields(v):
                if n2 == ADD_DUMMY_PREFIX and w2 == 0:
                    value = bool(v2)
    return value


def without_dummy_prefix(model_proto: bytes) -> bytes:
    """The model with NormalizerSpec.add_dummy_prefix = false (what transformers' non-legacy LlamaTokenizer loads)."""
    out, seen = bytearray(), False
    for num, wt, v, raw in _fields(model_proto):
        if num == NORMALIZER_SPEC and wt == 2:
            spec = b"".join(r for n2, _, _, r in _fields(v) if n2 != ADD_DUMMY_PREFIX) + b"\x18\x00"
            out += b"\x1a" + _put_varint(len(spec)) + spec
            seen = True
        else:
            out += raw
    if not seen:
        out += b"\x1a\x02\x18\x00"
    return bytes(out)


def _piece_spans(serialized: bytes) -> list[tuple[int, int, int]]:
    """(id, begin, end) of each piece of a SentencePieceText (byte offsets into the encoded text)."""
    out = []
    for num, wt, v, _ in _fields(serialized):
        if num == 2 and wt == 2:
            f = {n: val for n, w, val, _ in _fields(v) if w == 0}
            out.append((f.get(2, 0), f.get(4, 0), f.get(5, 0)))
    return out


# ---- the encoder --------------------------------------------------------------------------------------------------

class AddedToken:
    """An added token as tokenizer_config.json's `added_tokens_decoder` states it."""

    __slots__ = ("content", "special", "lstrip", "rstrip", "single_word")

    def __init__(self, content: str, special: bool = False, lstrip: bool = False, rstrip: bool = False,
                 single_word: bool = False):
        self.content, self.special = content, bool(special)
        self.lstrip, self.rstrip, self.single_word = bool(lstrip), bool(rstrip), bool(single_word)


class Encoding:
    __slots__ = ("ids", "offsets")

    def __init__(self, ids: list[int], offsets: list[tuple[int, int]] | None = None):
        self.ids, self.offsets = ids, offsets


class SentencePieceEncoder:
    """The calls HFTokenizer makes of `tokenizers.Tokenizer`, over a SentencePiece model encoded as transformers'
    slow LlamaTokenizer encodes (module docstring)."""

    def __init__(self, model_proto: bytes, config: dict, special_map: dict, where: str):
        def load(proto: bytes):
            sp = spm.SentencePieceProcessor()
            try:
                sp.LoadFromSerializedProto(proto)
            except Exception as e:  # sentencepiece raises RuntimeError/OSError on a bad proto
                raise TiaoyuError(f"{where} is not a valid SentencePiece model ({e})") from None
            return sp

        self.sp = load(model_proto)
        self.size = self.sp.get_piece_size()
        try:
            has_dummy = dummy_prefix(model_proto)
            plain = without_dummy_prefix(model_proto) if has_dummy else model_proto
        except ValueError as e:
            raise TiaoyuError(f"{where} is not a valid SentencePiece model ({e})") from None
        self.legacy = bool(config.get("legacy", True))  # transformers' slow tokenizer defaults to legacy
        if self.legacy:
            self.prefix = has_dummy  # the model adds "▁" before each piece of text
            self.sp_plain = None
        else:
            self.prefix = bool(config.get("add_prefix_space", True))  # one "▁" before the whole text
            self.sp_plain = load(plain)
        self.add_bos = bool(config.get("add_bos_token", True))
        self.add_eos = bool(config.get("add_eos_token", False))

        added: dict[int, AddedToken] = {}
        for k, v in (config.get("added_tokens_decoder") or {}).items():
            text = _token_text(v)
            if text is not None and str(k).lstrip("-").isdigit() and int(k) >= 0:
                d = v if isinstance(v, dict) else {}
                added[int(k)] = AddedToken(text, d.get("special", False), d.get("lstrip", False),
                                           d.get("rstrip", False), d.get("single_word", False))
        for text, i in (config.get("_added_tokens_json") or {}).items():
            if isinstance(text, str) and isinstance(i, int) and i >= 0 and i not in added:
                added[i] = AddedToken(text)
        # special tokens by role and the additional ones are never split, and count as special
        names = [_token_text(config.get(f"{r}_token")) or _token_text(special_map.get(f"{r}_token")) for r in ROLES]
        extra = config.get("additional_special_tokens") or special_map.get("additional_special_tokens") or []
        self.all_special = {t for t in names + [_token_text(x) for x in extra] if t}
        by_text = {t.content: i for i, t in added.items()}
        for text in sorted(self.all_special):
            i = by_text.get(text)
            if i is None:
                j = self.sp.piece_to_id(text)
                if self.sp.id_to_piece(j) != text:
                    continue  # names a token the vocabulary lacks
                i = j
                added[i] = AddedToken(text, special=True)
            added[i].special = True
        self.all_special |= {t.content for t in added.values() if t.special}
        self.added = added
        self.added_ids = {t.content: i for i, t in sorted(added.items())}
        self.vocab_size = max([self.size] + [i + 1 for i in added])
        texts = sorted(self.added_ids, key=len, reverse=True)  # the longest match first, as transformers' trie
        self._split_re = re.compile("(" + "|".join(map(re.escape, texts)) + ")") if texts else None
        self.bos, self.eos = (self.token_to_id(t) if t else None for t in names[:2])
        unk = names[ROLES.index("unk")] or "<unk>"
        self._unk = unk
        self._unk_len = len(self.sp_plain.encode(unk)) if self.sp_plain is not None else 0

    # -- the tokenizers.Tokenizer calls
    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self.vocab_size if with_added_tokens else self.size

    def get_added_tokens_decoder(self) -> dict[int, AddedToken]:
        return dict(self.added)

    def token_to_id(self, text: str) -> int | None:
        if text in self.added_ids:
            return self.added_ids[text]
        i = self.sp.piece_to_id(text)
        return i if 0 <= i < self.size and self.sp.id_to_piece(i) == text else None

    def id_to_token(self, i: int) -> str | None:
        i = int(i)
        if i in self.added:
            return self.added[i].content
        return self.sp.id_to_piece(i) if 0 <= i < self.size else None

    def encode(self, text: str, add_special_tokens: bool = True, offsets: bool = False) -> Encoding:
        ids, spans = self._encode(text, offsets)
        if add_special_tokens:
            if self.add_bos and self.bos is not None:
                ids, spans = [self.bos] + ids, [(0, 0)] + spans
            if self.add_eos and self.eos is not None:
                ids, spans = ids + [self.eos], spans + [(len(text), len(text))]
        return Encoding(ids, spans if offsets else None)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[Encoding]:
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out: list[str] = []
        run = bytearray()  # consecutive <0xXX> pieces: their bytes read as UTF-8 together

        def flush():
            if run:
                try:
                    out.append(run.decode("utf-8"))
                except UnicodeDecodeError:  # as tokenizers' ByteFallback: one U+FFFD per byte
                    out.append("\ufffd" * len(run))
                run.clear()

        for i in ids:
            i = int(i)
            if i in self.added:
                if skip_special_tokens and self.added[i].special:
                    continue
                flush()
                out.append(self.added[i].content)
            elif 0 <= i < self.size:
                if self.sp.is_byte(i):
                    run.append(int(self.sp.id_to_piece(i)[3:5], 16))
                else:
                    flush()
                    out.append(self.sp.id_to_piece(i).replace(SPACE, " "))
        flush()
        text = "".join(out)
        return text[1:] if self.prefix and text.startswith(" ") else text

    # -- encoding as the slow LlamaTokenizer does
    def _chunks(self, text: str) -> list[tuple[str, int, bool]]:
        """(text, start, is an added token) for the parts of `text` cut at the added tokens, with the tokens'
        lstrip/rstrip/single_word flags applied to their neighbours as transformers applies them."""
        parts = self._split_re.split(text) if self._split_re else [text]  # added tokens at odd positions
        starts = [0]
        for t in parts[:-1]:
            starts.append(starts[-1] + len(t))
        toks = list(parts)
        for k in range(1, len(toks), 2):
            t = toks[k]
            if not t:
                continue
            a = self.added[self.added_ids[t]]
            left = toks[k - 1] if k > 0 else None
            right = toks[k + 1] if k + 1 < len(toks) else None
            if a.rstrip and right:
                toks[k + 1] = right.lstrip()
                starts[k + 1] += len(right) - len(toks[k + 1])
            if a.lstrip and left:
                toks[k - 1] = left.rstrip()
            if a.single_word:
                if left and left[-1] != " ":
                    toks[k - 1] += t
                    toks[k] = ""
                elif right and right[0] != " ":
                    toks[k + 1], starts[k + 1] = t + toks[k + 1], starts[k]
                    toks[k] = ""
        return [(t, at, k % 2 == 1) for k, (t, at) in enumerate(zip(toks, starts)) if t]

    def _encode(self, text: str, offsets: bool) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids (and character spans in `text`, when asked) without BOS/EOS."""
        n, shift = len(text), 0
        if not self.legacy and text:
            text = text.replace(SPACE, " ")
            if self.prefix:
                text, shift = SPACE + text, 1
        got: list[tuple[int, int, int]] = []
        for chunk, start, is_added in self._chunks(text):
            if is_added:
                got.append((self.added_ids[chunk], start, start + len(chunk)))
            else:
                got.extend(self._encode_chunk(chunk, start, offsets))
        if (not self.legacy and len(got) > 1 and got[0][0] < self.size and self.sp.id_to_piece(got[0][0]) == SPACE
                and self.id_to_token(got[1][0]) in self.all_special):
            got = got[1:]  # a lone "▁" before a special token (transformers drops it)
        ids = [i for i, _, _ in got]
        spans = [(min(max(a - shift, 0), n), min(max(b - shift, 0), n)) for _, a, b in got] if offsets else []
        return ids, spans

    def _encode_chunk(self, chunk: str, start: int, offsets: bool) -> list[tuple[int, int, int]]:
        sp, lead = self.sp, ""
        if not self.legacy:
            sp = self.sp_plain
            if chunk.startswith((SPACE, " ")):
                lead = self._unk  # encoded behind "<unk>", whose pieces are cut off: the space stays a "▁"
        if not offsets:
            ids = sp.encode(lead + chunk)
            ids = ids[self._unk_len:] if lead and len(ids) >= self._unk_len else ids
            return [(i, start, start) for i in ids]
        got = _piece_spans(sp.encode(lead + chunk, out_type="serialized_proto"))
        if lead and len(got) >= self._unk_len:
            got = got[self._unk_len:]
        # byte offsets into lead + chunk -> character offsets into the text
        data = (lead + chunk).encode("utf-8")
        cut = len(lead.encode("utf-8"))
        chars_before = [0] * (len(data) + 1)  # characters that start before byte b
        for b in range(len(data)):
            chars_before[b + 1] = chars_before[b] + ((data[b] & 0xC0) != 0x80)
        base = len(lead)
        out = []
        for i, a, b in got:
            a, b = max(a, cut), max(b, cut)
            out.append([i, start + chars_before[a] - base, start + chars_before[b] - base])
        # a zero-width piece (the dummy "▁", the first bytes of a byte-fallback character) takes the span of the
        # piece that completes it, so a loss mask over a character covers all its pieces
        for k in range(len(out) - 2, -1, -1):
            if out[k][1] == out[k][2] and out[k + 1][1] == out[k][1]:
                out[k][2] = out[k + 1][2]
        return [tuple(x) for x in out]


class SPFolderTokenizer(HFTokenizer):
    """A foreign SentencePiece folder behind the open-tokenizer interface (module docstring)."""

    main_file = MODEL_FILE

    def _make_encoder(self, files: dict[str, bytes], where: str, special_map: dict):
        config = dict(self.config)
        if "added_tokens.json" in files:  # older folders list added tokens there: {"text": id}
            import json

            try:
                config["_added_tokens_json"] = json.loads(files["added_tokens.json"])
            except (ValueError, UnicodeDecodeError) as e:
                raise TiaoyuError(f"{Path(where).parent / 'added_tokens.json'} is not valid JSON ({e})") from None
        return SentencePieceEncoder(files[MODEL_FILE], config, special_map, where)

    def _encode_with_offsets(self, text: str):
        return self.tk.encode(text, add_special_tokens=False, offsets=True)

    @classmethod
    def load(cls, path) -> "SPFolderTokenizer":
        folder = Path(path)
        if folder.is_file() and folder.name == MODEL_FILE:
            folder = folder.parent
        if not (folder / CONFIG_FILE).is_file():
            raise TiaoyuError(f"{folder}: {MODEL_FILE} without {CONFIG_FILE} (a Hugging Face folder's tokenizer "
                              f"settings: add_bos_token, legacy, special tokens, chat template)")
        return super().load(folder)
