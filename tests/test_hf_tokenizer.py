"""The Hugging Face tokenizer back-end (tokenizer/hf.py) behind the one tokenizer interface: ids, decoding,
special tokens by role, the folder's own chat template rendered as transformers renders it, the
assistant-only loss mask derived from the template, the fingerprint. Tokenizers are tiny, trained here
(tests/hf_tokenizers.py); transformers' AutoTokenizer on the same folder is the reference."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest

from hf_tokenizers import (LLAMA3_GENERATION_TEMPLATE, auto_tokenizer, make_llama3_tokenizer,
                           make_qwen_tokenizer)
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.tokenizer import HFTokenizer, Tokenizer, open_tokenizer

pytest.importorskip("transformers")

KINDS = {"qwen": make_qwen_tokenizer, "llama3": make_llama3_tokenizer}


@pytest.fixture(scope="module", params=list(KINDS))
def pair(request, tmp_path_factory):
    folder = KINDS[request.param](tmp_path_factory.mktemp(request.param))
    return request.param, open_tokenizer(folder), auto_tokenizer(folder), folder


TEXTS = ["Hello world, this is a tiny corpus.", "  leading spaces and trailing  ", "你好，世界！ mixed 中文 and English",
         "line one\nline two\n\n\tindented", "numbers 12345 + 678 = 13023", "<|im_end|> written as text <|eot_id|>",
         "emoji 🙂 and accents café naïve", ""]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 + 7?"}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "What is 12 + 7?"}, {"role": "assistant", "content": "It is 19."},
     {"role": "user", "content": "你好"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": " d "}, {"role": "user", "content": "e"}],
]


def test_backend_chosen_by_files(pair):
    _, tok, _, folder = pair
    assert isinstance(tok, HFTokenizer) and tok.backend == "hf"
    assert open_tokenizer(folder / "tokenizer.json").fingerprint == tok.fingerprint


def test_encode_matches_auto_tokenizer(pair):
    _, tok, at, _ = pair
    for s in TEXTS:
        assert tok.encode(s, bos=True) == at(s)["input_ids"], s  # post-processor: BOS where the folder adds one
        assert tok.encode(s) == at(s, add_special_tokens=False)["input_ids"], s
    assert tok.encode_batch(TEXTS, bos=True) == [at(s)["input_ids"] for s in TEXTS]
    assert tok.encode("x", eos=True)[-1] == tok.eos_id


def test_decode_matches_auto_tokenizer(pair):
    _, tok, at, _ = pair
    for s in TEXTS:
        ids = at(s)["input_ids"]
        assert tok.decode(ids) == at.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special=False) == at.decode(ids, skip_special_tokens=False)
    with pytest.raises(TiaoyuError, match="outside the vocabulary"):
        tok.decode([-1])
    ids = at("hello world")["input_ids"]
    padded = ids + [tok.vocab_size + 3]  # an embedding row past the tokenizer's vocabulary: no text
    assert tok.decode(padded) == at.decode(padded, skip_special_tokens=True) == at.decode(ids, skip_special_tokens=True)


def test_special_tokens_by_role(pair):
    kind, tok, at, _ = pair
    assert tok.bos_id == at.bos_token_id
    assert tok.eos_id == at.eos_token_id
    assert tok.pad_id == at.pad_token_id
    if kind == "qwen":
        assert tok.bos_id is None
        assert tok.stop_ids == {at.convert_tokens_to_ids("<|im_end|>"), at.convert_tokens_to_ids("<|endoftext|>")}
        assert tok.im_start_id == at.convert_tokens_to_ids("<|im_start|>")
        assert tok.think_id == at.convert_tokens_to_ids("<think>") and tok.end_think_id is not None
        assert not tok.is_special(tok.think_id)  # an added token, not special: it decodes as text
    else:
        assert tok.stop_ids == {at.convert_tokens_to_ids("<|end_of_text|>"), at.convert_tokens_to_ids("<|eot_id|>")}
        assert tok.im_start_id is None and tok.think_id is None
    assert all(tok.is_special(i) for i in tok.stop_ids)


def test_chat_template_matches_apply_chat_template(pair):
    _, tok, at, _ = pair
    for msgs in CONVERSATIONS:
        for gen in (True, False):
            want = at.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
            assert tok.render_chat(msgs, add_generation_prompt=gen) == want
            ids = at.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=False)
            assert tok.encode_chat(msgs, add_generation_prompt=gen)[0] == ids


def test_template_sees_reasoning_and_tools(tmp_path):
    folder = make_qwen_tokenizer(tmp_path / "q")
    tok, at = open_tokenizer(folder), auto_tokenizer(folder)
    msgs = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2", "reasoning": "one and one"}]
    tools = [{"type": "function", "function": {"name": "calculator", "description": "计算",
                                               "parameters": {"type": "object", "properties": {}}}}]
    for kw in ({}, {"tools": tools}):
        want = at.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False, **kw)
        got = tok.render_chat(msgs, **kw)
        assert got == want
    assert "<think>\none and one\n</think>" in got and '"计算"' in got  # reasoning_content alias; tojson keeps 计算


def test_raise_exception_is_a_clear_error(tmp_path):
    tok = open_tokenizer(make_llama3_tokenizer(tmp_path / "l"))
    with pytest.raises(TiaoyuError, match="must start with a user or system message"):
        tok.render_chat([{"role": "assistant", "content": "hi"}])


def test_template_runs_in_a_sandbox(tmp_path):
    folder = make_qwen_tokenizer(tmp_path / "q")
    (folder / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}")
    with pytest.raises(TiaoyuError, match="chat template"):
        open_tokenizer(folder).render_chat([{"role": "user", "content": "x"}])
    (folder / "chat_template.jinja").write_text("{% set ns = namespace(_x=1) %}{{ ns }}")
    with pytest.raises(TiaoyuError, match="chat template"):
        open_tokenizer(folder).render_chat([{"role": "user", "content": "x"}])


def test_no_template_is_a_clear_error(tmp_path):
    folder = make_qwen_tokenizer(tmp_path / "q")
    (folder / "chat_template.jinja").unlink()
    tok = open_tokenizer(folder)
    assert tok.chat_template is None
    with pytest.raises(TiaoyuError, match="no chat template.*--mode complete"):
        tok.encode_chat([{"role": "user", "content": "x"}], add_generation_prompt=True)


def test_loss_mask_from_the_template(pair):
    """1 on each assistant answer through its end-of-turn token; 0 on system, user turns and role headers."""
    kind, tok, _, _ = pair
    msgs = CONVERSATIONS[3]
    ids, mask = tok.encode_chat(msgs)
    assert len(ids) == len(mask)
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    learned = [tok.decode(r, skip_special=False) for r in runs]
    end = "<|im_end|>" if kind == "qwen" else "<|eot_id|>"
    want = ["b", " d " if kind == "qwen" else "d"]  # the llama3 template trims content
    assert learned == [w + end for w in want]


def test_generation_blocks_give_transformers_mask(tmp_path):
    folder = make_llama3_tokenizer(tmp_path / "g", template=LLAMA3_GENERATION_TEMPLATE)
    tok, at = open_tokenizer(folder), auto_tokenizer(folder)
    msgs = CONVERSATIONS[3]
    out = at.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = tok.encode_chat(msgs)
    assert ids == out["input_ids"] and mask == out["assistant_masks"] and sum(mask) > 0


def test_fingerprint_save_and_pickle(pair, tmp_path):
    _, tok, _, folder = pair
    assert HFTokenizer.load(folder).fingerprint == tok.fingerprint
    out = tok.save(tmp_path / "copy")
    for f in folder.iterdir():
        if f.name != "generation_config.json":
            assert (out / f.name).read_bytes() == f.read_bytes()  # copied unchanged
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.fingerprint == tok.fingerprint and clone.encode("hello world") == tok.encode("hello world")
    assert clone.stop_ids == tok.stop_ids
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 77
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert open_tokenizer(other).fingerprint != tok.fingerprint  # the fingerprint covers tokenizer_config.json


def test_own_tokenizer_has_the_same_interface(tmp_path):
    """tiaoyu's SentencePiece tokenizer answers the questions the chat code asks an open model's."""
    from tiaoyu_cli.tokenizer import train_tokenizer

    words = "the cat dog sees runs big small red blue tree house water book".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 6)) for i in range(300)]
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in lines))
    train_tokenizer([str(tmp_path / "text.jsonl")], tmp_path / "tok", vocab_size=300)
    tok = open_tokenizer(tmp_path / "tok")
    assert isinstance(tok, Tokenizer)
    assert tok.backend == "sentencepiece" and tok.stop_ids == {3, 5}
    assert tok.is_special(5) and not tok.is_special(tok.num_special)
    assert "<|im_start|>" in tok.chat_template
