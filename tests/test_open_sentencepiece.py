"""A Hugging Face folder whose tokenizer is a foreign SentencePiece `tokenizer.model` (Llama 2, Mistral 7B v0.1,
TinyLlama: tokenizer.model + tokenizer_config.json + special_tokens_map.json, no tokenizer.json), built here: a
SentencePiece BPE trained as Llama 2's was (byte fallback, identity normalisation, spaces kept, digits split,
<unk> <s> </s> at 0 1 2, <s> and </s> control symbols) inside a tiny random LlamaForCausalLM folder.

References: transformers' tokenizer on the same folder, and the SentencePiece library itself. The slow
LlamaTokenizer (`use_fast=False`, transformers 4.x) encodes text without added tokens as `[bos] + sp.encode(text)`
and, in legacy mode, each piece of text between added tokens as `sp.encode(piece)`; transformers 5 converts the
model into a `tokenizers` pipeline that agrees with that except on a piece of text starting with a space (there its
Metaspace drops one "▁"), so those texts are checked against SentencePiece only."""

from __future__ import annotations

import io
import json
import os
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

from hf_tokenizers import CORPUS, auto_tokenizer
from test_open_models import spread
from tiaoyu_cli.tokenizer import SPFolderTokenizer, open_tokenizer

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

EXTRA = ["Hello world  and   spaces", "  leading spaces here", "数字 12345 和 中文 的 句子 。",
         "def f(x):\n\treturn x * 2\n", "[INST] <<SYS>> [/INST] It is 19."]
TEXTS = ["Hello world, this is a test.", "你好，世界！今天天气很好。", "def add(a, b):\n    return a + b\n",
         "emoji 🙂🚀 and ß", "What is 12 + 7? It is 19.", "Hello  world   x", "\n\nx", "x ▁ y", "",
         # spaces at the start
         " Hello", "  two spaces", " ", "▁odd",
         # special and added tokens in the text
         "<s>Hello</s> there", "a <s> b", "a</s>  b", "one<pad>two", "[INST] hi [/INST] yo </s><s>[INST] again"]
SPECIAL_RE = re.compile("(<s>|</s>|<pad>)")


def train_model(path: Path) -> Path:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS + EXTRA * 3), model_writer=buf, vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    path.write_bytes(buf.getvalue())
    return path


def make_tokenizer(folder: Path, legacy: bool | None = False, template: str | None = LLAMA2_TEMPLATE) -> Path:
    """tokenizer.model, tokenizer_config.json and special_tokens_map.json as Llama 2's folder has them, with one
    token added past the model's vocabulary (`<pad>`, as some Llama 2 fine-tunes add it)."""
    folder.mkdir(parents=True, exist_ok=True)
    sp = spm.SentencePieceProcessor(model_file=str(train_model(folder / "tokenizer.model")))
    n = sp.get_piece_size()

    def tok(t):
        return {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": True}

    cfg = {"add_bos_token": True, "add_eos_token": False,
           "added_tokens_decoder": {"0": tok("<unk>"), "1": tok("<s>"), "2": tok("</s>"), str(n): tok("<pad>")},
           "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": legacy,
           "model_max_length": 1000000000000000019884624838656, "pad_token": "<pad>", "padding_side": "right",
           "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>"}
    if legacy is None:
        del cfg["legacy"]
    if template:
        cfg["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": tok("<s>"), "eos_token": tok("</s>"), "unk_token": tok("<unk>"), "pad_token": tok("<pad>")}))
    return folder


def sp_reference(folder: Path, text: str, legacy: bool) -> list[int] | None:
    """The slow LlamaTokenizer's ids by its definition over the SentencePiece library: [bos] + sp.encode(text) for
    text without added tokens; in legacy mode, each piece between added tokens encoded alone. None: not defined
    here (non-legacy text with added tokens, checked against transformers)."""
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    ids = {"<s>": 1, "</s>": 2, "<pad>": sp.get_piece_size()}
    if not SPECIAL_RE.search(text):
        return [1] + sp.encode(text)
    if not legacy:
        return None
    return [1] + [i for part in SPECIAL_RE.split(text) if part
                  for i in ([ids[part]] if part in ids else sp.encode(part))]


def transformers_agrees(text: str, legacy: bool | None) -> bool:
    """Whether transformers 5's converted tokenizer follows SentencePiece on `text` (module docstring). Without a
    `legacy` key it reads the folder as non-legacy, the slow tokenizer (and tiaoyu) as legacy: they agree on text
    without added tokens only."""
    if text[:1] in (" ", "▁"):
        return False
    if legacy is None:
        return not SPECIAL_RE.search(text)
    return not (legacy and re.search(r"(<s>|</s>|<pad>) ", text))


@pytest.mark.parametrize("legacy", [False, True, None])
def test_ids_and_decoding_equal_transformers(legacy, tmp_path):
    folder = make_tokenizer(tmp_path / "tok", legacy)
    ours = open_tokenizer(folder)
    at = auto_tokenizer(folder)
    assert isinstance(ours, SPFolderTokenizer) and (ours.bos_id, ours.eos_id, ours.unk_id) == (1, 2, 0)
    assert ours.pad_id == at.pad_token_id == len(ours) - 1 and ours.stop_ids == {2}
    compared = 0
    for text in TEXTS:
        ids = ours.encode(text, bos=True)
        want = sp_reference(folder, text, legacy is not False)
        if want is not None:
            assert ids == want, text
        if transformers_agrees(text, legacy):
            assert ids == at(text)["input_ids"], text
            compared += 1
        assert ours.encode(text) == ids[1:]  # bos=False: no specials added
        for skip in (True, False):
            if legacy is not None or not SPECIAL_RE.search(text):
                assert ours.decode(ids, skip_special=skip) == at.decode(ids, skip_special_tokens=skip), (text, skip)
        if not SPECIAL_RE.search(text) and "▁" not in text:
            assert ours.decode(ids) == text  # round trip
    assert compared >= 9
    assert ours.encode_batch(TEXTS, bos=True) == [ours.encode(t, bos=True) for t in TEXTS]


CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 + 7?"}, {"role": "assistant", "content": "It is 19."},
     {"role": "user", "content": "你好"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 7?"},
     {"role": "assistant", "content": "It is 19."}],
]


@pytest.mark.parametrize("template,legacy", [(LLAMA2_TEMPLATE, False), (LLAMA2_TEMPLATE, True),
                                             (MISTRAL_TEMPLATE, True)])
def test_chat_template_ids_equal_apply_chat_template(template, legacy, tmp_path):
    from tiaoyu_cli.errors import TiaoyuError

    folder = make_tokenizer(tmp_path / "tok", legacy, template)
    ours, at = open_tokenizer(folder), auto_tokenizer(folder)
    for messages in CONVERSATIONS:
        if template is MISTRAL_TEMPLATE and messages[0]["role"] == "system":
            with pytest.raises(TiaoyuError, match="roles must alternate"):
                ours.encode_chat(messages)
            continue
        for gen in (False, True):
            want = at.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False)
            ids, mask = ours.encode_chat(messages, add_generation_prompt=gen)
            assert ids == want, (messages, gen)
            assert ours.render_chat(messages, add_generation_prompt=gen) == at.apply_chat_template(
                messages, add_generation_prompt=gen, tokenize=False)
        ids, mask = ours.encode_chat(messages[:3] if messages[0]["role"] == "system" else messages[:2])
        learned = ours.decode([i for i, m in zip(ids, mask) if m], skip_special=False)
        assert learned == ("It is 19. </s>" if template is LLAMA2_TEMPLATE else "It is 19.</s>")


SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=256)


def make_folder(folder: Path, legacy: bool | None = False) -> Path:
    """A tiny random LlamaForCausalLM saved by transformers around the SentencePiece tokenizer."""
    make_tokenizer(folder, legacy)
    n = len(open_tokenizer(folder))
    cfg = transformers.LlamaConfig(**SIZES, vocab_size=n, bos_token_id=1, eos_token_id=2, pad_token_id=n - 1)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = spread(transformers.LlamaForCausalLM(cfg), seed=1).eval()
    model.save_pretrained(folder)
    assert not (folder / "tokenizer.json").exists()
    return folder


def run_cli(args, monkeypatch, capfd) -> str:
    from tiaoyu_cli.cli.main import main

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    with pytest.raises(SystemExit) as e:
        main(args)
    out, err = capfd.readouterr()
    assert e.value.code in (0, None), err
    return out


def test_greedy_chat_equals_transformers_generate(tmp_path, monkeypatch, capfd):
    from test_open_chat import hf_generate
    from tiaoyu_cli.infer.sampling import SamplingParams
    from tiaoyu_cli.infer.session import ChatSession, GenerationOptions, load_chat_model

    folder = make_folder(tmp_path / "llama2")
    at = auto_tokenizer(folder)
    messages = [{"role": "user", "content": "What is 12 + 7?"}]
    prompt = at.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    free = hf_generate(folder, prompt, 10, [10 ** 6])
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    p = folder / "generation_config.json"  # the answer ends at the folder's end-of-turn id, mid-answer
    p.write_text(json.dumps({**json.loads(p.read_text()), "eos_token_id": [2, free[k]]}))
    theirs = hf_generate(folder, prompt, 10, [2, free[k]])
    assert theirs == free[:k + 1]
    cm = load_chat_model(folder, device="cpu")
    session = ChatSession(cm, options=GenerationOptions(max_new_tokens=10, sampling=SamplingParams(temperature=0)))
    assert session.prompt_ids(messages[0]["content"]) == prompt
    out = run_cli(["chat", str(folder), "-p", messages[0]["content"], "--temperature", "0", "--max-new-tokens", "10",
                   "--device", "cpu"], monkeypatch, capfd)
    assert out.rstrip("\n") == at.decode(free[:k], skip_special_tokens=True).rstrip("\n")


def test_sft_trains_and_the_output_loads_in_transformers(tmp_path, monkeypatch, capfd):
    from tiaoyu_cli.checkpoint import load_model, load_tokenizer

    src = make_folder(tmp_path / "src", legacy=True)
    data = tmp_path / "chat.jsonl"
    records = [{"messages": c} for c in CONVERSATIONS for _ in range(3)]
    records = [{"messages": r["messages"][:3] if r["messages"][0]["role"] == "system" else r["messages"][:2]}
               for r in records]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    run_cli(["sft", str(src), str(data), "-o", str(tmp_path / "out"), "--max-steps", "8", "--batch-size", "2",
             "--lr", "1e-2", "--log-every", "1", "--device", "cpu"], monkeypatch, capfd)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) >= 4 and losses[-1] < losses[0] * 0.7, losses
    out = tmp_path / "out" / "latest"
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert not (out / "tokenizer.json").exists()
    assert load_tokenizer(out).fingerprint == load_tokenizer(src).fingerprint
    ours, _ = load_model(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    ids = auto_tokenizer(out)("What is 12 + 7? It is 19.")["input_ids"]
    assert ids == load_tokenizer(out).encode("What is 12 + 7? It is 19.", bos=True)
    with torch.no_grad():
        assert (ours.eval()(torch.tensor([ids])).logits - theirs(torch.tensor([ids])).logits).abs().max() < 1e-4


def test_gguf_has_the_sentencepiece_vocabulary_and_transformers_logits(tmp_path, monkeypatch, capfd):
    """`export --format gguf`: llama.cpp's "llama" tokenizer with every piece, score and type of tokenizer.model, the
    added <pad> as a control token, ids by role, BOS and the space prefix as the folder adds them, its template; a
    forward pass over the file's tensors as llama.cpp computes it gives transformers' logits."""
    pytest.importorskip("gguf")
    import numpy as np

    from test_export import read_gguf
    from test_open_gguf import gguf_forward, hf_logits

    src = make_folder(tmp_path / "src")
    out = tmp_path / "m.gguf"
    run_cli(["export", str(src), "--format", "gguf", "-o", str(out)], monkeypatch, capfd)
    field, tensors = read_gguf(out)
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    n = sp.get_piece_size()
    assert field("general.architecture") == "llama" and field("tokenizer.ggml.model") == "llama"
    assert field("tokenizer.ggml.tokens") == [sp.id_to_piece(i) for i in range(n)] + ["<pad>"]
    assert np.allclose(field("tokenizer.ggml.scores")[:n], [sp.get_score(i) for i in range(n)])
    types = field("tokenizer.ggml.token_type")
    assert types[0] == 2 and types[1] == types[2] == types[n] == 3  # unknown, control
    assert all(types[i] == (6 if sp.is_byte(i) else 1) for i in range(3, n))  # byte pieces, normal pieces
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id"),
            field("tokenizer.ggml.unknown_token_id"), field("tokenizer.ggml.padding_token_id")) == (1, 2, 0, n)
    assert field("tokenizer.ggml.add_bos_token") is True and field("tokenizer.ggml.add_eos_token") is False
    assert field("tokenizer.ggml.add_space_prefix") is True
    assert field("tokenizer.chat_template") == LLAMA2_TEMPLATE
    ids = open_tokenizer(src).encode("What is 12 + 7? It is 19. 你好！", bos=True)
    got, want = gguf_forward(field, tensors, ids), hf_logits(src, ids)
    assert np.abs(want).max() > 0.5 and np.abs(got - want).max() < 1e-4


def test_bad_model_file_is_a_clear_error(tmp_path):
    from tiaoyu_cli.errors import TiaoyuError

    folder = make_tokenizer(tmp_path / "tok")
    (folder / "tokenizer.model").write_bytes(b"\x0a\x05<unk>\x15\x00\x00")  # a first piece, then the file ends
    with pytest.raises(TiaoyuError, match="tokenizer.model"):
        open_tokenizer(folder)
