"""`tiaoyu chat` on a Hugging Face model folder as transformers writes it (save_pretrained: config.json,
model.safetensors, tokenizer.json, tokenizer_config.json, chat template, generation_config.json): the
prompt is the folder's own template, greedy answers equal transformers' `generate` token for token, and
an answer ends at the end-of-turn ids of generation_config.json. Models and tokenizers are tiny, random
and built here."""

from __future__ import annotations

import io
import json
import os
import sys
import warnings

import pytest
import torch

from hf_tokenizers import auto_tokenizer, make_llama3_tokenizer, make_qwen_tokenizer
from test_open_models import spread
from tiaoyu_cli.infer.generate import generate
from tiaoyu_cli.infer.sampling import SamplingParams
from tiaoyu_cli.infer.session import ChatSession, GenerationOptions, answer_records, load_chat_model

transformers = pytest.importorskip("transformers")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=416, max_position_embeddings=256)
FOLDERS = {
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}, make_qwen_tokenizer),
    "qwen3": ("Qwen3Config", {"head_dim": 32}, make_qwen_tokenizer),
    "llama3": ("LlamaConfig", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                                   "rope_theta": 500000.0}}, make_llama3_tokenizer),
}


def make_folder(kind: str, folder, stop_after: list[dict] | None = None):
    """A model folder as transformers writes it: the model's files, then the tokenizer's (with the
    generation_config.json naming the end-of-turn ids)."""
    cls_name, kw, make_tok = FOLDERS[kind]
    cfg = getattr(transformers, cls_name)(**{**SIZES, **kw})
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = spread(transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), seed=1).eval()
    model.save_pretrained(folder)
    make_tok(folder)
    return folder


def hf_generate(folder, prompt_ids: list[int], n: int, eos: list[int]) -> list[int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos[0])
    return out[0, len(prompt_ids):].tolist()


def set_stops(folder, ids: list[int]) -> None:
    p = folder / "generation_config.json"
    g = json.loads(p.read_text())
    g["eos_token_id"] = ids
    p.write_text(json.dumps(g))


MESSAGES = [{"role": "user", "content": "What is 12 + 7?"}]
GREEDY = GenerationOptions(max_new_tokens=12, sampling=SamplingParams(temperature=0))


@pytest.mark.parametrize("kind", list(FOLDERS))
def test_chat_prompt_and_greedy_answer_match_transformers(kind, tmp_path):
    folder = make_folder(kind, tmp_path / kind)
    cm = load_chat_model(folder, device="cpu")
    assert cm.mode == "chat" and cm.model.config.family == json.loads((folder / "config.json").read_text())["model_type"]
    at = auto_tokenizer(folder)
    want_prompt = at.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    session = ChatSession(cm, options=GREEDY)
    assert session.prompt_ids(MESSAGES[0]["content"]) == want_prompt
    stops = sorted(cm.tokenizer.stop_ids)
    theirs = hf_generate(folder, want_prompt, 12, stops)
    text = "".join(p.text for p in session.send(MESSAGES[0]["content"]))
    ours = generate(cm.model, [want_prompt], 12, temperature=0, stop_ids=stops)[0]
    assert ours == theirs
    assert text == at.decode([t for t in theirs if t not in stops], skip_special_tokens=True)
    assert session.history[-1] == {"role": "assistant", "content": text}


@pytest.mark.parametrize("kind", ["qwen3", "llama3"])
def test_answer_ends_at_generation_config_end_of_turn(kind, tmp_path):
    """An id listed in generation_config.json eos_token_id ends the answer, as it ends transformers' generate."""
    folder = make_folder(kind, tmp_path / kind)
    at = auto_tokenizer(folder)
    prompt = at.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    free = hf_generate(folder, prompt, 8, [10 ** 6])  # no stop: what greedy decoding says
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i])  # a token not said before
    set_stops(folder, [free[k]])
    cm = load_chat_model(folder, device="cpu")
    assert free[k] in cm.tokenizer.stop_ids
    theirs = hf_generate(folder, prompt, 8, sorted(cm.tokenizer.stop_ids))
    recs = list(answer_records(cm, [(1, {"messages": MESSAGES})], GREEDY))
    assert theirs == free[:k + 1]
    want = at.decode(free[:k], skip_special_tokens=True)
    assert recs[0]["response"] == want


def test_cli_prompt_on_an_hf_folder(tmp_path, monkeypatch, capfd):
    """`tiaoyu chat FOLDER -p … --temperature 0` prints the answer transformers' greedy generate gives."""
    from tiaoyu_cli.cli.main import main

    folder = make_folder("qwen2", tmp_path / "qwen")
    at = auto_tokenizer(folder)
    prompt = at.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True,
                                    return_dict=False)
    stops = [at.convert_tokens_to_ids("<|im_end|>"), at.convert_tokens_to_ids("<|endoftext|>")]
    theirs = hf_generate(folder, prompt, 10, stops)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    with pytest.raises(SystemExit) as e:
        main(["chat", str(folder), "-p", "hi", "--temperature", "0", "--max-new-tokens", "10", "--device", "cpu"])
    out, err = capfd.readouterr()
    assert e.value.code in (0, None), err
    assert out.rstrip("\n") == at.decode([t for t in theirs if t not in stops], skip_special_tokens=True).rstrip("\n")


def test_complete_mode_encodes_like_transformers(tmp_path):
    """--mode complete: the text as `tokenizer(text)` encodes it (BOS where the folder's tokenizer adds one)."""
    from tiaoyu_cli.infer.session import build_prompt

    folder = make_folder("llama3", tmp_path / "l3")
    cm = load_chat_model(folder, device="cpu", mode="complete")
    at = auto_tokenizer(folder)
    ids = build_prompt(cm.tokenizer, "complete", "Once upon a time", None)
    assert ids == at("Once upon a time")["input_ids"] and ids[0] == at.bos_token_id
    res = list(answer_records(cm, [(1, {"prompt": "Once upon a time"})], GREEDY))
    assert isinstance(res[0]["response"], str)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    from tiaoyu_cli.errors import TiaoyuError

    folder = make_folder("qwen2", tmp_path / "q")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / f).unlink()
    with pytest.raises(TiaoyuError, match="missing tokenizer.model and tokenizer_config.json.*tokenizer.json"):
        load_chat_model(folder, device="cpu")


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_serve_answers_an_hf_folder_as_transformers_does(kind, tmp_path):
    """`tiaoyu serve FOLDER`: the chat answer is transformers' greedy answer with its own template, ending at
    the folder's end-of-turn ids (qwen3's q/k norms take the reference decode path, qwen2 the slot path)."""
    pytest.importorskip("starlette")
    import http.client
    import threading

    from tiaoyu_cli.serve.server import ServeConfig, load_engine, make_server

    folder = make_folder(kind, tmp_path / kind)
    at = auto_tokenizer(folder)
    prompt = at.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    free = hf_generate(folder, prompt, 8, [10 ** 6])
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    set_stops(folder, [free[k]])  # the folder's end of turn comes mid-answer: the server must stop there
    engine, name = load_engine(folder, device="cpu", config=ServeConfig(max_tokens_limit=16))
    srv = make_server(engine, "127.0.0.1", 0, name, quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        stops = sorted(engine.tokenizer.stop_ids)
        theirs = hf_generate(folder, prompt, 12, stops)
        conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=120)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(
            {"messages": MESSAGES, "max_tokens": 12, "temperature": 0}), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        res = json.loads(r.read())
        assert r.status == 200, res
        assert res["usage"]["prompt_tokens"] == len(prompt)
        assert res["choices"][0]["message"]["content"] == at.decode([t for t in theirs if t not in stops],
                                                                    skip_special_tokens=True)
        assert theirs == free[:k + 1] and res["choices"][0]["finish_reason"] == "stop"
    finally:
        srv.shutdown()
        srv.server_close()
        engine.close()
