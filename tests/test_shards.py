"""Token shards: `encode_corpus` output (dtype, counts, BOS/EOS, order, splits), memory-mapped
reading, and the error paths (fingerprint mismatch, corrupt/missing files, bad records)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from tiaoyu_cli.data.shards import (ShardWriter, TokenShards, check_fingerprint, memmap_tokens, open_tokens,
                                    token_dtype)
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.tokenizer import Tokenizer, train_tokenizer
from tiaoyu_cli.tokenizer.encode import encode_corpus, is_val, iter_blocks
from tokenizer_corpus import make_records, text_records, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    corpus = write_jsonl(d / "data.jsonl", make_records(600))
    tok = train_tokenizer([str(corpus)], d / "tok", vocab_size=600)
    texts = write_jsonl(d / "texts.jsonl", text_records(300))
    return d, tok, texts


def _docs(stream: np.ndarray) -> list[np.ndarray]:
    ends = np.flatnonzero(stream == 3)
    return [stream[s + 1:e] for s, e in zip(np.r_[0, ends[:-1] + 1], ends)]


def test_shards_hold_every_document_in_order(setup):
    d, tok, texts = setup
    rep = encode_corpus([str(texts)], tok.path, d / "tokens", workers=2, val_ratio=0.1, shard_tokens=1000)
    train, val = open_tokens(d / "tokens")
    assert train.dtype == np.uint16 and val.dtype == np.uint16
    records = [json.loads(line)["text"] for line in texts.read_text().splitlines()]
    want_val = [t for k, t in enumerate(records) if is_val(k, 0.1)]
    want_train = [t for k, t in enumerate(records) if not is_val(k, 0.1)]
    assert len(want_val) == 30
    for shards, want in ((train, want_train), (val, want_val)):
        stream = np.concatenate(shards.arrays())
        assert len(stream) == shards.num_tokens == sum(len(tok.encode(t)) + 2 for t in want)
        assert shards.num_documents == len(want)
        assert (stream == 2).sum() == (stream == 3).sum() == len(want)  # one BOS and one EOS per document
        assert stream[0] == 2 and stream[-1] == 3
        assert [tok.decode(x) for x in _docs(stream)] == want
    assert len(train.arrays()) == -(-train.num_tokens // 1000)  # full shards of 1000, then the rest
    assert all(len(a) == 1000 for a in train.arrays()[:-1])
    top = json.loads((d / "tokens" / "meta.json").read_text())
    assert top["tokenizer_fingerprint"] == tok.fingerprint == train.fingerprint
    assert top["vocab_size"] == 600 and top["dtype"] == "uint16"
    assert top["splits"]["train"]["num_tokens"] == train.num_tokens
    assert top["splits"]["val"]["num_documents"] == 30
    assert [s["file"] for s in top["splits"]["train"]["shards"]][:2] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert rep.records == 300 and rep.bytes_read == texts.stat().st_size


def test_one_worker_and_two_workers_write_the_same_tokens(setup, tmp_path, monkeypatch):
    import tiaoyu_cli.tokenizer.encode as enc

    d, tok, _ = setup
    big = write_jsonl(tmp_path / "big.jsonl", make_records(3000, seed=3))
    blocks = list(iter_blocks([str(big)], 0.0, 16 * 1024))
    assert len(blocks) > 8  # many blocks, so both workers get some
    assert b"".join(b.data for b in blocks) == big.read_bytes()
    assert [b.first_line for b in blocks] == [1 + sum(x.data.count(b"\n") for x in blocks[:k]) for k in range(len(blocks))]
    monkeypatch.setattr(enc, "BLOCK_BYTES", 16 * 1024)
    encode_corpus([str(big)], tok.path, tmp_path / "one", workers=1)
    encode_corpus([str(big)], tok.path, tmp_path / "two", workers=2)
    for split in ("train", "val"):
        a = np.concatenate(TokenShards(tmp_path / "one" / split).arrays())
        b = np.concatenate(TokenShards(tmp_path / "two" / split).arrays())
        assert np.array_equal(a, b)
    assert TokenShards(tmp_path / "one" / "val").num_documents == 30  # 1% of 3000 records


def test_all_record_kinds_become_documents(setup, tmp_path):
    d, tok, _ = setup
    recs = [{"text": "你好"}, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"prompt": "p", "chosen": "good", "rejected": "bad"}, {"prompt": "1 + 1 = ?", "answer": "2"},
            {"text": "nice", "label": "pos"}, {"text": ""}]
    data = write_jsonl(tmp_path / "kinds.jsonl", recs)
    rep = encode_corpus([str(data)], tok.path, tmp_path / "tokens", val_ratio=0)
    train, val = open_tokens(tmp_path / "tokens")
    assert val is None and not (tmp_path / "tokens" / "val").exists()
    docs = [tok.decode(x) for x in _docs(np.concatenate(train.arrays()))]
    assert docs == ["你好", "user: hi\nassistant: yo", "p\ngood", "1 + 1 = ?\n2", "nice"]
    assert rep.empty == 1


def test_memmap_reading_and_windows(setup):
    d, tok, texts = setup
    train, _ = open_tokens(d / "tokens")
    arrays = train.arrays()
    assert all(isinstance(a, np.memmap) for a in arrays)
    assert all(not a.flags.writeable for a in arrays)
    stream = np.concatenate(arrays)
    for start, length in [(0, 10), (995, 10), (1000, 1), (990, 2500), (train.num_tokens - 7, 7), (5, 0)]:
        assert np.array_equal(train.get(start, length), stream[start:start + length])
    with pytest.raises(IndexError):
        train.get(train.num_tokens - 3, 4)
    from safetensors.numpy import load_file  # our header parser agrees with the library

    first = train.folder / "shard-00000.safetensors"
    assert np.array_equal(load_file(str(first))["tokens"], memmap_tokens(first))


def test_int32_when_vocab_is_large(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.int32
    w = ShardWriter(tmp_path / "s", token_dtype(100_000), shard_tokens=5)
    w.add(np.array([2, 70000, 99999, 3, 2, 12, 3], dtype=np.int64), 2)
    w.close({"tokenizer_fingerprint": "f" * 16, "vocab_size": 100_000, "split": "train"})
    s = TokenShards(tmp_path / "s")
    assert s.dtype == np.int32 and [len(a) for a in s.arrays()] == [5, 2]
    assert s.get(0, 7).tolist() == [2, 70000, 99999, 3, 2, 12, 3]


def test_val_file_and_split_folder(setup, tmp_path):
    d, tok, texts = setup
    val_data = write_jsonl(tmp_path / "val.jsonl", [{"text": "验证 one"}, {"text": "验证 two"}])
    encode_corpus([str(texts)], tok.path, tmp_path / "tokens", val_inputs=[str(val_data)])
    train, val = open_tokens(tmp_path / "tokens")
    assert train.num_documents == 300 and val.num_documents == 2
    assert [tok.decode(x) for x in _docs(val.get(0, val.num_tokens))] == ["验证 one", "验证 two"]
    alone, none = open_tokens(tmp_path / "tokens" / "val")  # a folder of shards by itself
    assert none is None and alone.num_tokens == val.num_tokens


def test_gzip_and_stdin_inputs(setup, tmp_path, monkeypatch):
    d, tok, texts = setup
    gz = tmp_path / "texts.jsonl.gz"
    gz.write_bytes(gzip.compress(texts.read_bytes()))
    encode_corpus([str(gz)], tok.path, tmp_path / "gz", val_ratio=0)
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(texts.read_bytes())))
    encode_corpus(["-"], tok.path, tmp_path / "stdin", val_ratio=0, workers=1)
    a = TokenShards(tmp_path / "gz" / "train").get(0, 500)
    b = TokenShards(tmp_path / "stdin" / "train").get(0, 500)
    assert np.array_equal(a, b)


def test_fingerprint_mismatch(setup, tmp_path):
    d, tok, texts = setup
    other = train_tokenizer([str(texts)], tmp_path / "other_tok", vocab_size=500)
    train, _ = open_tokens(d / "tokens")
    check_fingerprint(train, tok)  # the right one passes
    with pytest.raises(TiaoyuError) as e:
        check_fingerprint(train, other)
    msg = str(e.value)
    assert tok.fingerprint in msg and other.fingerprint in msg
    assert str(train.folder) in msg and str(other.path) in msg


def test_missing_and_corrupt_token_folders(setup, tmp_path):
    d, tok, texts = setup
    with pytest.raises(TiaoyuError, match="does not exist"):
        open_tokens(tmp_path / "nope")
    encode_corpus([str(texts)], tok.path, tmp_path / "t", val_ratio=0, shard_tokens=2000)
    split = tmp_path / "t" / "train"
    meta = (split / "meta.json").read_text()
    (split / "meta.json").write_text(meta[:40])
    with pytest.raises(TiaoyuError, match="meta.json is corrupt"):
        TokenShards(split)
    m = json.loads(meta)
    del m["vocab_size"]
    (split / "meta.json").write_text(json.dumps(m))
    with pytest.raises(TiaoyuError, match="corrupt.*vocab_size"):
        TokenShards(split)
    (split / "meta.json").write_text(meta)
    shard = split / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(TiaoyuError, match="truncated"):
        TokenShards(split).arrays()
    shard.unlink()
    with pytest.raises(TiaoyuError, match="shard-00001.safetensors listed in meta.json is missing"):
        TokenShards(split)
    (split / "meta.json").unlink()
    with pytest.raises(TiaoyuError, match="no meta.json"):
        TokenShards(split)


@pytest.mark.parametrize("block_bytes", [1 << 20, 1000])
def test_bad_records_and_empty_input(setup, tmp_path, monkeypatch, block_bytes):
    import tiaoyu_cli.tokenizer.encode as enc

    monkeypatch.setattr(enc, "BLOCK_BYTES", block_bytes)  # line numbers stay right across many blocks
    d, tok, texts = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(texts.read_bytes() + b'{"text": ["not", "a", "string"]}\n{"text": "ok"}\n')
    with pytest.raises(TiaoyuError, match=r"bad.jsonl:301: field 'text'"):
        encode_corpus([str(bad)], tok.path, tmp_path / "out", workers=2)
    assert not (tmp_path / "out").exists()  # nothing half-written
    bad.write_bytes(texts.read_bytes() + b'{"text": "a"\n\xff\xfe\n')
    with pytest.raises(TiaoyuError, match=r"bad.jsonl:301: malformed JSON"):
        encode_corpus([str(bad)], tok.path, tmp_path / "out", workers=1)
    (tmp_path / "utf8.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(TiaoyuError, match=r"utf8.jsonl:2: invalid UTF-8"):
        encode_corpus([str(tmp_path / "utf8.jsonl")], tok.path, tmp_path / "out", workers=1)
    rep = encode_corpus([str(bad)], tok.path, tmp_path / "out", skip_bad=True, val_ratio=0)
    assert rep.skipped_bad == 2 and TokenShards(tmp_path / "out" / "train").num_documents == 300
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(TiaoyuError, match="empty input"):
        encode_corpus([str(empty)], tok.path, tmp_path / "out2")
    with pytest.raises(TiaoyuError, match="missing tokenizer"):
        encode_corpus([str(texts)], tmp_path, tmp_path / "out3")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("x")
    with pytest.raises(TiaoyuError, match="not a token folder"):
        encode_corpus([str(texts)], tok.path, precious)
