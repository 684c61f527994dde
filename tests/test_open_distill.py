"""`tiaoyu distill` with a Hugging Face model folder as the teacher (tiny random models and tokenizers built
here). White box: a student built from --student-preset takes the teacher's tokenizer (files, vocabulary, ids,
template and generation config), so transformers loads it as a Llama model that chats with the teacher's template.
Black box: the teacher answers through its own template and end-of-turn ids, as transformers' greedy generate does."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from hf_tokenizers import auto_tokenizer
from rlhf_fixtures import read_jsonl, run_cli, write_jsonl
from test_open_chat import hf_generate, make_folder
from tiaoyu_cli.checkpoint import load_model, load_tokenizer

transformers = pytest.importorskip("transformers")

RECORDS = [{"messages": [{"role": "user", "content": "What is 12 + 7?"}, {"role": "assistant", "content": "It is 19."}]},
           {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}] * 3
STUDENT = ["--student-preset", "tiny", "--model", "dim=64", "--model", "n_layers=2", "--model", "ffn_dim=128"]
COMMON = ["--max-steps", "2", "--batch-size", "2", "--lr", "1e-3", "--device", "cpu", "--dtype", "fp32", "--seed", "0"]


def check_student(teacher, student):
    """The student folder: tiaoyu's Llama layout on the teacher's tokenizer, loaded by transformers with our logits."""
    cfg = json.loads((student / "config.json").read_text())
    tok = load_tokenizer(teacher)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["vocab_size"] == tok.vocab_size
    assert cfg["eos_token_id"] == tok.eos_id
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (student / name).read_bytes() == (teacher / name).read_bytes(), name
    gen = "generation_config.json"
    assert json.loads((student / gen).read_text()) == json.loads((teacher / gen).read_text())
    assert load_tokenizer(student).stop_ids == tok.stop_ids
    msgs = RECORDS[0]["messages"][:1]
    assert auto_tokenizer(student).apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == \
        auto_tokenizer(teacher).apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ours, _ = load_model(student)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    ids = torch.tensor([tok.encode("What is 12 + 7? It is 19.")])
    with torch.no_grad():
        assert (ours.eval()(ids).logits - theirs(ids).logits).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["qwen2", "llama3"])
def test_white_box_student_takes_the_teachers_tokenizer(kind, tmp_path):
    teacher = make_folder(kind, tmp_path / "teacher")
    data = write_jsonl(tmp_path / "chat.jsonl", RECORDS)
    run_cli(["distill", "--teacher", teacher, *STUDENT, data, "-o", tmp_path / "kd", "--mode", "white"] + COMMON)
    metrics = [m for m in read_jsonl(tmp_path / "kd" / "metrics.jsonl") if "kd" in m]
    assert len(metrics) == 2 and all(m["kd"] > 0 for m in metrics)
    check_student(teacher, tmp_path / "kd" / "latest")


def test_black_box_teacher_answers_with_its_template(tmp_path):
    teacher = make_folder("qwen3", tmp_path / "teacher")
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is 12 + 7?"}, {"prompt": "你好"}])
    run_cli(["distill", "--teacher", teacher, *STUDENT, data, "-o", tmp_path / "kd", "--mode", "black",
             "--max-new-tokens", "8"] + COMMON)
    tok, at = load_tokenizer(teacher), auto_tokenizer(teacher)
    stops = sorted(tok.stop_ids)
    for rec in read_jsonl(tmp_path / "kd" / "teacher.jsonl"):
        prompt = at.apply_chat_template(rec["messages"][:1], add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
        theirs = hf_generate(teacher, prompt, 8, stops)
        want = at.decode([t for t in theirs if t not in stops], skip_special_tokens=True).strip()
        assert rec["messages"][-1] == {"role": "assistant", "content": want}
    check_student(teacher, tmp_path / "kd" / "latest")
