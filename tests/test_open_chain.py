"""An open model through the pretraining half of the pipeline, via the CLI: `tokenize encode --tokenizer FOLDER`
→ `pretrain --init FOLDER` → `sft` → `chat` on a tiny random Qwen2 folder made here, and `pretrain --tokenizer
FOLDER` from scratch. The shards are the documents as the folder's tokenizer encodes them (transformers'
`tokenizer(text)`, then its end-of-text token); the val loss falls; every output folder loads in transformers as
the same class with our logits, its tokenizer files and template unchanged; shards of another tokenizer are one
clear error; `tiaoyu eval` of the folder on the shards is the loss transformers computes on the same tokens."""

from __future__ import annotations

import io
import json
import sys
import warnings

import numpy as np
import pytest
import torch

from hf_tokenizers import auto_tokenizer, make_llama3_tokenizer, make_qwen_tokenizer
from test_open_chat import hf_generate, make_folder
from tiaoyu_cli.checkpoint import load_model, load_tokenizer
from tiaoyu_cli.data.shards import open_tokens
from tiaoyu_cli.tokenizer import open_tokenizer
from tiaoyu_cli.tokenizer.encode import encode_corpus, is_val

transformers = pytest.importorskip("transformers")

NAMES = ["Anna", "Bob", "Carol", "Dan", "Eve", "Li Wei", "王丽", "张伟"]
FRUIT = ["apples", "pears", "plums", "figs"]
DOCS = [f"{NAMES[i % 8]} has {i % 7 + 2} {FRUIT[i % 4]}. {NAMES[(i + 3) % 8]} has {i % 5 + 1} more. "
        f"Together they have {i % 7 + 2 + i % 5 + 1} {FRUIT[i % 4]}." for i in range(160)]
CHATS = [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                       {"role": "assistant", "content": f"It is {a + b}."}]} for a, b in ((12, 7), (3, 4), (5, 6))] * 2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def cli(args: list[str], capfd, monkeypatch) -> tuple[int, str, str]:
    from tiaoyu_cli.cli.main import main

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capfd.readouterr()
    return e.value.code or 0, out, err


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def hf_model(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def expected_stream(at, docs: list[str], sep: int) -> list[int]:
    """The documents as transformers' tokenizer encodes them, each followed by the separator unless it ends so."""
    out = []
    for d in docs:
        ids = at(d)["input_ids"]
        out += ids + ([] if ids and ids[-1] == sep else [sep])
    return out


def hf_stream_loss(folder, stream: torch.Tensor, seq_len: int) -> float:
    """Mean −log p over a token stream cut into windows of seq_len + 1 that overlap by one (eval's windows),
    computed by transformers."""
    model = hf_model(folder)
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, stream.numel() - 1, seq_len):
            w = stream[s:s + seq_len + 1][None]
            logits = model(w[:, :-1]).logits.float()
            total += float(torch.nn.functional.cross_entropy(logits[0], w[0, 1:], reduction="sum"))
            count += w.shape[1] - 1
    return total / count


def assert_same_family(src, out, trained: bool = True):
    """`out` loads in transformers as the class `src` is, with our logits; config, tokenizer files, template and
    generation config as the source had them."""
    a, b = json.loads((src / "config.json").read_text()), json.loads((out / "config.json").read_text())
    for d in (a, b):
        d.pop("dtype", None), d.pop("torch_dtype", None)
    assert a == b
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            assert (out / name).read_bytes() == (src / name).read_bytes(), name
    gen = "generation_config.json"
    assert json.loads((out / gen).read_text()) == json.loads((src / gen).read_text())
    theirs = hf_model(out)
    assert type(theirs).__name__ == a["architectures"][0]
    ours, _ = load_model(out)
    ids = torch.tensor([load_tokenizer(out).encode("Anna has 3 apples. 王丽 has 2 more.")])
    with torch.no_grad():
        mine = ours.eval()(ids).logits
        assert (mine - theirs(ids).logits).abs().max() < 1e-4
        if trained:
            assert (mine - load_model(src)[0].eval()(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("make, prefix, sep", [(make_qwen_tokenizer, [], "<|endoftext|>"),
                                                (make_llama3_tokenizer, ["<|begin_of_text|>"], "<|end_of_text|>")])
def test_shards_hold_documents_as_the_tokenizer_encodes_them(make, prefix, sep, tmp_path):
    """Qwen: `doc <|endoftext|>` (no BOS; its eos <|im_end|> ends a turn, not a document); Llama 3:
    `<|begin_of_text|> doc <|end_of_text|>`. One worker and two give the same shards."""
    folder = make(tmp_path / "tok")
    tok, at = open_tokenizer(folder), auto_tokenizer(folder)
    pre, suf = tok.document_affixes()
    assert [tok.id_to_piece(i) for i in pre] == prefix and [tok.id_to_piece(i) for i in suf] == [sep]
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS[:40]])
    streams = []
    for workers in (1, 2):
        rep = encode_corpus([data], folder, tmp_path / f"t{workers}", workers=workers, val_ratio=0.1)
        assert rep.meta["tokenizer_fingerprint"] == tok.fingerprint and rep.meta["dtype"] == "uint16"
        assert rep.meta["doc_prefix"] == pre and rep.meta["doc_suffix"] == suf and rep.meta["tokenizer_backend"] == "hf"
        train, val = open_tokens(tmp_path / f"t{workers}")
        streams.append((train.get(0, train.num_tokens).tolist(), val.get(0, val.num_tokens).tolist()))
    assert streams[0] == streams[1]
    sep_id = tok.piece_to_id(sep)
    want_train = expected_stream(at, [d for k, d in enumerate(DOCS[:40]) if not is_val(k, 0.1)], sep_id)
    want_val = expected_stream(at, [d for k, d in enumerate(DOCS[:40]) if is_val(k, 0.1)], sep_id)
    assert streams[0] == (want_train, want_val)


def test_a_vocabulary_over_65536_tokens_is_written_as_int32(tmp_path):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    folder = tmp_path / "wide"
    folder.mkdir()
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "w1 w69999 w65536"}, {"text": "w65535 w2"}])
    rep = encode_corpus([data], folder, tmp_path / "tokens", workers=1, val_ratio=0.0)
    assert rep.meta["dtype"] == "int32" and rep.meta["vocab_size"] == 70_001
    train, _ = open_tokens(tmp_path / "tokens")
    assert train.dtype == np.int32
    assert train.get(0, train.num_tokens).tolist() == [1, 69999, 65536, 70_000, 65535, 2, 70_000]


def test_chain_encode_pretrain_sft_chat(tmp_path, capfd, monkeypatch):
    src = make_folder("qwen2", tmp_path / "src")
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": d} for d in DOCS])
    tokens = tmp_path / "tokens"
    code, _, err = cli(["tokenize", "encode", data, "--tokenizer", src, "-o", tokens, "--workers", "1",
                        "--val-ratio", "0.1"], capfd, monkeypatch)
    assert code == 0, err
    meta = json.loads((tokens / "meta.json").read_text())
    assert meta["tokenizer_fingerprint"] == open_tokenizer(src).fingerprint and meta["tokenizer"] == str(src)

    # eval of the open folder on the shards: the loss transformers computes on the same tokens
    code, out, err = cli(["eval", src, tokens, "--seq-len", "32", "--device", "cpu"], capfd, monkeypatch)
    assert code == 0, err
    before = json.loads(out)
    _, val = open_tokens(tokens)
    stream = torch.from_numpy(val.get(0, val.num_tokens).astype(np.int64))
    assert before["tokens"] == stream.numel() - 1
    assert abs(before["loss"] - hf_stream_loss(src, stream, 32)) < 1e-4

    # continued pretraining: the val loss falls, the output keeps the family
    cpt = tmp_path / "cpt"
    code, _, err = cli(["pretrain", tokens, "--init", src, "-o", cpt, "--max-steps", "24", "--seq-len", "32",
                        "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "8",
                        "--eval-batches", "4", "--log-every", "4", "--dtype", "fp32", "--device", "cpu"],
                       capfd, monkeypatch)
    assert code == 0, err
    evals = [m["val_loss"] for m in map(json.loads, (cpt / "metrics.jsonl").read_text().splitlines()) if "val_loss" in m]
    assert len(evals) >= 3 and evals[-1] < evals[0], evals
    assert json.loads((cpt / "latest" / "trainer.json").read_text())["stage"] == "pretrain"
    assert_same_family(src, cpt / "latest")
    code, out, err = cli(["eval", cpt / "latest", tokens, "--seq-len", "32", "--device", "cpu"], capfd, monkeypatch)
    assert code == 0, err
    after = json.loads(out)
    assert after["loss"] < before["loss"] - 0.5, (before["loss"], after["loss"])
    assert abs(after["loss"] - hf_stream_loss(cpt / "latest", stream, 32)) < 1e-4

    # sft on the continued model, then chat with it: greedy answer = transformers' generate
    sft = tmp_path / "sft"
    chats = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    code, _, err = cli(["sft", cpt / "latest", chats, "-o", sft, "--max-steps", "3", "--batch-size", "2",
                        "--lr", "1e-2", "--dtype", "fp32", "--device", "cpu"], capfd, monkeypatch)
    assert code == 0, err
    assert_same_family(src, sft / "latest")
    code, out, err = cli(["chat", sft / "latest", "-p", "What is 12 + 7?", "--temperature", "0",
                          "--max-new-tokens", "8", "--device", "cpu"], capfd, monkeypatch)
    assert code == 0, err
    at = auto_tokenizer(sft / "latest")
    prompt = at.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}], add_generation_prompt=True,
                                    tokenize=True, return_dict=False)
    stops = sorted(open_tokenizer(src).stop_ids)
    theirs = hf_generate(sft / "latest", prompt, 8, stops)
    assert out.rstrip("\n") == at.decode([t for t in theirs if t not in stops], skip_special_tokens=True).rstrip("\n")

    # shards of another tokenizer: one clear error, nothing written
    other = make_llama3_tokenizer(tmp_path / "other")
    code, _, err = cli(["tokenize", "encode", data, "--tokenizer", other, "-o", tmp_path / "tokens-l3",
                        "--workers", "1"], capfd, monkeypatch)
    assert code == 0, err
    code, _, err = cli(["pretrain", tmp_path / "tokens-l3", "--init", src, "-o", tmp_path / "bad", "--max-steps", "2",
                        "--seq-len", "32", "--device", "cpu"], capfd, monkeypatch)
    assert code != 0 and "tokenizer mismatch" in err and str(other) in err and "Traceback" not in err, err
    assert not (tmp_path / "bad" / "latest").exists()
    code, _, err = cli(["pretrain", tokens, "--init", src, "--tokenizer", other, "-o", tmp_path / "bad",
                        "--max-steps", "2", "--seq-len", "32", "--device", "cpu"], capfd, monkeypatch)
    assert code != 0 and "is not the tokenizer of --init" in err, err


def test_tokenize_show_cuts_as_transformers(tmp_path, capfd, monkeypatch):
    src = make_llama3_tokenizer(tmp_path / "l3")
    code, out, err = cli(["tokenize", "show", src, "Hello world, 12 + 7 = 19."], capfd, monkeypatch)
    assert code == 0, err
    ids = [int(line.split("\t")[0]) for line in out.splitlines()]
    assert ids == auto_tokenizer(src)("Hello world, 12 + 7 = 19.", add_special_tokens=False)["input_ids"]


def test_pretrain_from_scratch_on_an_open_tokenizer(tmp_path, capfd, monkeypatch):
    """`pretrain --tokenizer FOLDER --preset tiny`: a new Llama-layout model on the folder's vocabulary, written
    with its tokenizer files and generation config unchanged; transformers loads it with our logits."""
    src = make_folder("qwen2", tmp_path / "src")
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": d} for d in DOCS[:60]])
    tokens = tmp_path / "tokens"
    assert cli(["tokenize", "encode", data, "-t", src, "-o", tokens, "-j", "1"], capfd, monkeypatch)[0] == 0
    out = tmp_path / "base"
    code, _, err = cli(["pretrain", tokens, "--tokenizer", src, "-o", out, "--preset", "tiny", "--model", "dim=64",
                        "--model", "n_layers=2", "--model", "ffn_dim=128", "--seq-len", "32", "--batch-size", "4",
                        "--max-steps", "3", "--dtype", "fp32", "--device", "cpu"], capfd, monkeypatch)
    assert code == 0, err
    ck = out / "latest"
    cfg = json.loads((ck / "config.json").read_text())
    tok = open_tokenizer(src)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["vocab_size"] == tok.vocab_size
    assert cfg["eos_token_id"] == tok.eos_id and cfg["bos_token_id"] == tok.eos_id  # no BOS in Qwen: eos stands in
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            assert (ck / name).read_bytes() == (src / name).read_bytes(), name
    assert json.loads((ck / "generation_config.json").read_text()) == json.loads((src / "generation_config.json").read_text())
    ids = torch.tensor([auto_tokenizer(ck)("Anna has 3 apples.")["input_ids"]])
    with torch.no_grad():
        assert (load_model(ck)[0].eval()(ids).logits - hf_model(ck)(ids).logits).abs().max() < 1e-4
    # --tokenizer of another vocabulary than the shards': the clear mismatch error
    code, _, err = cli(["pretrain", tokens, "--tokenizer", make_llama3_tokenizer(tmp_path / "l3"), "-o",
                        tmp_path / "bad", "--max-steps", "1", "--seq-len", "32", "--device", "cpu"], capfd, monkeypatch)
    assert code != 0 and "tokenizer mismatch" in err, err
