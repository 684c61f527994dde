"""`tiaoyu eval` and `tiaoyu eval bench` on a Hugging Face model folder: text is scored as the shards lay it out
(the folder's own BOS and end-of-text around each document), multiple-choice prompts start with the BOS the
folder's tokenizer puts first (Llama 3) or none (Qwen), and the log-likelihoods and GSM8K's greedy answers are
transformers' on the same tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hf_tokenizers import auto_tokenizer
from test_open_chain import DOCS, cli, expected_stream, hf_model, hf_stream_loss, write_jsonl
from test_open_chat import hf_generate, make_folder, set_stops
from tiaoyu_cli.evals.bench import BenchConfig, run_bench
from tiaoyu_cli.evals.multiple_choice import encode_request, MCRequest
from tiaoyu_cli.tokenizer import open_tokenizer

transformers = pytest.importorskip("transformers")
FIX = Path(__file__).parent / "fixtures" / "bench"


@pytest.mark.parametrize("kind", ["qwen2", "llama3"])
def test_eval_text_is_transformers_loss_on_the_shard_layout(kind, tmp_path, capfd, monkeypatch):
    src = make_folder(kind, tmp_path / "src")
    tok, at = open_tokenizer(src), auto_tokenizer(src)
    data = write_jsonl(tmp_path / "val.jsonl", [{"text": d} for d in DOCS[:12]])
    code, out, err = cli(["eval", src, data, "--seq-len", "24", "--device", "cpu"], capfd, monkeypatch)
    assert code == 0, err
    got = json.loads(out)
    stream = torch.tensor(expected_stream(at, DOCS[:12], tok.document_affixes()[1][-1]))
    assert got["tokens"] == stream.numel() - 1
    assert abs(got["loss"] - hf_stream_loss(src, stream, 24)) < 1e-4
    # the same documents as token shards: the same number
    tokens = tmp_path / "tokens"
    assert cli(["tokenize", "encode", data, "-t", src, "-o", tokens, "-j", "1", "--val-ratio", "0"],
               capfd, monkeypatch)[0] == 0
    code, out, err = cli(["eval", src, tokens, "--seq-len", "24", "--device", "cpu"], capfd, monkeypatch)
    assert code == 0, err
    assert json.loads(out)["loss"] == pytest.approx(got["loss"], abs=1e-6)


@pytest.mark.parametrize("kind, bos", [("qwen2", False), ("llama3", True)])
def test_bench_multiple_choice_on_an_open_folder(kind, bos, tmp_path):
    src = make_folder(kind, tmp_path / "src")
    tok, at = open_tokenizer(src), auto_tokenizer(src)
    e = encode_request(tok, MCRequest("Question: What is 12 + 7?\nAnswer:", [" 19", " 20"]))
    assert e.ctx == at("Question: What is 12 + 7?\nAnswer:")["input_ids"]  # the BOS transformers adds, or none
    assert (e.ctx[0] == tok.bos_id) == bos
    result = run_bench(src, FIX / "mmlu", BenchConfig(task="mmlu", shots=1, device="cpu", keep_items=True))
    assert result["n"] == 6
    model = hf_model(src)
    from tiaoyu_cli.evals import bench_formats as bf
    from tiaoyu_cli.evals.bench import load_docs

    cfg = BenchConfig(task="mmlu", shots=1)
    docs, shots_for, names = load_docs(FIX / "mmlu", cfg)
    for doc, item in zip(docs, result["items"]):
        prefix = bf.fewshot_prefix("mmlu", doc.subject, shots_for(doc), names, "letters")
        enc = encode_request(tok, MCRequest(prefix + doc.text, [doc.delimiter + c for c in doc.choices]))
        assert enc.ctx == at(prefix + doc.text)["input_ids"]
        want = []
        with torch.no_grad():
            for cont in enc.conts:
                seq = torch.tensor([enc.ctx + cont])
                logp = model(seq[:, :-1]).logits.float().log_softmax(-1)[0]
                want.append(float(logp[-len(cont):].gather(-1, seq[0, -len(cont):, None]).sum()))
        assert item["lls"] == pytest.approx(want, abs=1e-3)


@pytest.mark.parametrize("chat", ["yes", "no"])
def test_bench_gsm8k_on_an_open_folder_answers_as_transformers(chat, tmp_path):
    """Greedy answers are transformers' `generate` on the same prompt, stopping at the folder's end-of-turn ids."""
    src = make_folder("llama3", tmp_path / "src")
    tok, at = open_tokenizer(src), auto_tokenizer(src)
    result = run_bench(src, FIX / "gsm8k", BenchConfig(task="gsm8k", shots=1, chat=chat, max_new_tokens=6,
                                                        device="cpu", keep_items=True))
    assert result["n"] == 2 and result["chat_template"] == (chat == "yes")
    stops = sorted(tok.stop_ids)
    from tiaoyu_cli.evals.bench import load_docs

    docs, shots_for, _ = load_docs(FIX / "gsm8k", BenchConfig(task="gsm8k", shots=1))
    firsts = []
    for doc, item in zip(docs, result["items"]):
        if chat == "no":
            prompt = at("".join(d.text + " " + d.target + "\n\n" for d in shots_for(doc)) + doc.text)["input_ids"]
            assert prompt[0] == tok.bos_id and prompt[1] != tok.bos_id  # one BOS, the tokenizer's
        else:
            q = [d.text.removeprefix("Question: ").removesuffix("\nAnswer:") for d in shots_for(doc) + [doc]]
            messages = [{"role": "user", "content": q[0]}, {"role": "assistant", "content": shots_for(doc)[0].target},
                        {"role": "user", "content": q[1]}]
            prompt = at.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        theirs = hf_generate(src, prompt, 6, stops)
        firsts.append(theirs[0])
        assert item["answer"] == at.decode([t for t in theirs if t not in stops],
                                           skip_special_tokens=True).split("Question:")[0]
    if chat == "no":  # an answer ends at the folder's end-of-turn ids: make the first greedy token one of them
        set_stops(src, stops + [firsts[0]])
        again = run_bench(src, FIX / "gsm8k", BenchConfig(task="gsm8k", shots=1, chat=chat, max_new_tokens=6,
                                                           device="cpu", keep_items=True))
        assert again["items"][0]["answer"] == tok.decode([firsts[0]])  # stopped after it (an ordinary token here)
