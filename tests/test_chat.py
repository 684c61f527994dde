"""`tiaoyu chat` end to end on a tiny checkpoint: --prompt, JSONL batches on stdin (order and fields
kept, same answers as the library), completion mode for pretrain checkpoints, the REPL on a
pseudo-terminal, chat-session history, and clear errors for bad input."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

from tiaoyu_cli.errors import DataError, TiaoyuError
from tiaoyu_cli.infer.generate import DecodedResponse, decode_response, generate
from tiaoyu_cli.infer.sampling import SamplingParams
from tiaoyu_cli.infer.session import (ChatSession, GenerationOptions, answer_records, load_chat_model,
                                      read_prompt_records, resolve_mode, response_fields)


BIN = [sys.executable, "-m", "tiaoyu_cli"]
WORDS = "the cat dog sees runs big small red blue tree house water book school happy and with".split()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A 300-token tokenizer and a random tiny model saved as an sft run and as a pretrain run."""
    from tiaoyu_cli.model import ModelConfig, Transformer
    from tiaoyu_cli.tokenizer import train_tokenizer
    from tiaoyu_cli.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("chat")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) for _ in range(400)]
    (d / "text.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in lines))
    tok = train_tokenizer([str(d / "text.jsonl")], d / "tok", vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                    ffn_dim=128, max_seq_len=192, tie_embeddings=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not n.endswith("norm.weight"):
                p.normal_(0.0, 0.2)
        model.lm_head.weight[:8 + 256] = 0.0  # logit 0 for special and byte tokens: greedy picks words, keeps talking
    save_checkpoint(d / "sft", 10, model, tok, info={"stage": "sft"})
    save_checkpoint(d / "base", 10, model, tok, info={"stage": "pretrain"})
    return d


def run(args, stdin: bytes | None = None, timeout: int = 120):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run(BIN + list(map(str, args)), input=stdin if stdin is not None else b"", capture_output=True,
                          timeout=timeout, env=env)


def cli(args, stdin: bytes = b"", monkeypatch=None, capfd=None):
    from tiaoyu_cli.cli.main import main

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capfd.readouterr()
    return e.value.code, out, err


def greedy_answer(cm, ids: list[int], stops, n: int) -> DecodedResponse:
    toks = generate(cm.model, [ids], n, temperature=0, stop_ids=stops)[0]
    return decode_response(cm.tokenizer, toks, stops)


def test_prompt_answers_once_on_stdout(ckpts):
    r = run(["chat", ckpts / "sft", "--prompt", "the cat sees", "--temperature", "0", "--max-new-tokens", "24",
             "--device", "cpu"])
    assert r.returncode == 0, r.stderr.decode()
    cm = load_chat_model(ckpts / "sft", device="cpu")
    assert cm.mode == "chat"
    ids = cm.tokenizer.encode_chat([{"role": "user", "content": "the cat sees"}], add_generation_prompt=True)[0]
    want = greedy_answer(cm, ids, [3, 5], 24)
    assert len(want.response) > 5
    assert r.stdout.decode("utf-8") == want.response + "\n"


def test_stdin_jsonl_batch_keeps_order_and_fields(ckpts):
    records = [
        {"prompt": "the dog", "id": 1},
        {"messages": [{"role": "user", "content": "big tree"}], "meta": {"k": [1, 2]}},
        {"prompt": "a much longer prompt about the small red house and the water", "id": 3},
        {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "blue book"}], "id": 4},
        {"messages": [{"role": "user", "content": "happy cat"}, {"role": "assistant", "content": "old"}], "id": 5},
    ]
    data = "\n".join(json.dumps(r) for r in records[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in records[2:]) + "\n"
    r = run(["chat", ckpts / "sft", "--temperature", "0", "--max-new-tokens", "12", "--batch-size", "2",
             "--system", "you help"], stdin=data.encode())
    assert r.returncode == 0, r.stderr.decode()
    out = [json.loads(line) for line in r.stdout.decode("utf-8").splitlines()]
    assert len(out) == len(records)
    cm = load_chat_model(ckpts / "sft", device="cpu")
    tok = cm.tokenizer
    sys_msg = [{"role": "system", "content": "you help"}]
    convs = [sys_msg + [{"role": "user", "content": "the dog"}], sys_msg + records[1]["messages"],
             sys_msg + [{"role": "user", "content": records[2]["prompt"]}], records[3]["prompt"],
             sys_msg + records[4]["messages"][:1]]  # a trailing assistant turn is answered again
    for rec, got, conv in zip(records, out, convs):
        assert {k: v for k, v in got.items() if k != "response"} == rec  # every input field kept, in order
        ids = tok.encode_chat(conv, add_generation_prompt=True)[0]
        assert got["response"] == greedy_answer(cm, ids, [3, 5], 12).response


def test_pretrain_checkpoint_completes_plain_text(ckpts, monkeypatch, capfd):
    code, out, err = cli(["chat", ckpts / "base", "-p", "the cat", "--temperature", "0", "--max-new-tokens", "16"],
                         monkeypatch=monkeypatch, capfd=capfd)
    assert code == 0, err
    cm = load_chat_model(ckpts / "base")
    assert cm.mode == "complete" and cm.stage == "pretrain"
    want = greedy_answer(cm, cm.tokenizer.encode("the cat", bos=True), [3], 16)
    assert len(want.response) > 5 and out == want.response + "\n"  # nothing but the answer on stdout


def test_malformed_stdin_line_is_a_clear_error(ckpts, monkeypatch, capfd):
    code, out, err = cli(["chat", ckpts / "sft"], stdin=b'{"prompt": "the cat"}\n{"prompt": oops}\n',
                         monkeypatch=monkeypatch, capfd=capfd)
    assert code == 2
    assert "<stdin>:2" in err and "malformed JSON" in err
    assert "Traceback" not in err and out == ""


def test_repl_on_a_terminal(ckpts):
    pty = pytest.importorskip("pty")
    master, slave = pty.openpty()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120", "TERM": "dumb"}
    p = subprocess.Popen(BIN + ["chat", str(ckpts / "sft"), "--temperature", "0", "--max-new-tokens", "8"],
                         stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    os.write(master, "the cat\n/system be nice\n/help\nbig dog\n/exit\n".encode())
    chunks = []
    try:
        while True:
            try:
                b = os.read(master, 4096)
            except OSError:
                break
            if not b:
                break
            chunks.append(b)
    finally:
        rc = p.wait(timeout=120)
        os.close(master)
    text = b"".join(chunks).decode("utf-8", "replace")
    assert rc == 0, text
    assert text.count("bot ›") == 2
    assert "system prompt: 'be nice'" in text and "/reset" in text


# ---- in-process: errors, sessions, record handling --------------------------------------------------

@pytest.mark.parametrize("breakage,expect", [
    ("missing", "no such checkpoint folder"),
    ("no_weights", "missing model.safetensors"),
    ("corrupt_weights", "corrupt or unreadable safetensors"),
    ("corrupt_config", "corrupt JSON"),
    ("no_tokenizer", "missing tokenizer.model"),
])
def test_bad_checkpoints_are_clear_errors(ckpts, tmp_path, monkeypatch, capfd, breakage, expect):
    bad = tmp_path / "ckpt"
    if breakage != "missing":
        shutil.copytree(ckpts / "sft" / "latest", bad)
    if breakage == "no_weights":
        (bad / "model.safetensors").unlink()
    elif breakage == "corrupt_weights":
        (bad / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    elif breakage == "corrupt_config":
        (bad / "config.json").write_text("{not json")
    elif breakage == "no_tokenizer":
        (bad / "tokenizer.model").unlink()
    code, out, err = cli(["chat", bad, "-p", "hi"], monkeypatch=monkeypatch, capfd=capfd)
    assert code == 2 and expect in err and "Traceback" not in err and out == ""


def test_bad_options_and_records(ckpts, monkeypatch, capfd):
    code, _, err = cli(["chat", ckpts / "sft", "--temperature", "-1", "-p", "x"], monkeypatch=monkeypatch, capfd=capfd)
    assert code == 2 and "--temperature" in err
    code, _, err = cli(["chat", ckpts / "sft", "--mode", "poem", "-p", "x"], monkeypatch=monkeypatch, capfd=capfd)
    assert code == 2 and "--mode" in err
    code, out, err = cli(["chat", ckpts / "sft"], stdin=b'{"prompt": "a"}\n{"text": "no prompt"}\n',
                         monkeypatch=monkeypatch, capfd=capfd)
    assert code == 2 and "<stdin>:2" in err and "prompt" in err and out == ""  # checked before generating
    code, _, err = cli(["chat", ckpts / "sft"], stdin=b'{"messages": [{"role": "robot", "content": "x"}]}\n',
                       monkeypatch=monkeypatch, capfd=capfd)
    assert code == 2 and "<stdin>:1" in err and "robot" in err
    if not torch.cuda.is_available():
        code, _, err = cli(["chat", ckpts / "sft", "--device", "cuda", "-p", "x"], monkeypatch=monkeypatch, capfd=capfd)
        assert code == 2 and "CUDA is not available" in err


def test_read_prompt_records_names_the_line():
    recs = read_prompt_records([b'{"prompt": "a"}\n', b"\n", b'{"prompt": "b"}\n'])
    assert recs == [(1, {"prompt": "a"}), (3, {"prompt": "b"})]
    with pytest.raises(DataError, match="<stdin>:2"):
        read_prompt_records([b'{"prompt": "a"}\n', b"[1, 2]\n"])


def test_response_fields_split_and_keep_inputs():
    d = DecodedResponse("<think>2+2 is 4</think>4", "2+2 is 4", "4")
    out = response_fields({"prompt": "2+2?", "answer": "4", "id": 7}, d)
    assert out == {"prompt": "2+2?", "answer": "4", "id": 7, "response": "<think>2+2 is 4</think>4",
                   "reasoning": "2+2 is 4", "input_answer": "4"}
    assert response_fields({"prompt": "x"}, DecodedResponse("y", None, None)) == {"prompt": "x", "response": "y"}


def test_mode_resolution():
    assert resolve_mode("auto", "pretrain") == "complete"
    assert resolve_mode("auto", "sft") == "chat" and resolve_mode("auto", None) == "chat"
    assert resolve_mode("complete", "sft") == "complete"
    with pytest.raises(TiaoyuError):
        resolve_mode("poem", None)


def test_session_history_commands_and_truncation(ckpts):
    cm = load_chat_model(ckpts / "sft", device="cpu")
    opts = GenerationOptions(max_new_tokens=16, sampling=SamplingParams(0.0))
    s = ChatSession(cm, system="be brief", options=opts)
    budget = cm.model.config.max_seq_len - 16
    long_text = "the dog and the cat"
    for turn in range(6):
        "".join(p.text for p in s.send(f"{long_text} {turn}"))
        assert len(s.prompt_ids("next")) <= budget
    assert s.turns == 6
    assert s.dropped_turns > 0  # the oldest turns were forgotten to fit the context
    assert s.history[-2]["content"].endswith("5") and s.history[-1]["role"] == "assistant"
    assert all(m["content"].split()[-1] != "0" for m in s.history if m["role"] == "user")
    ids = s.prompt_ids("hello")
    assert cm.tokenizer.decode(ids, skip_special=False).startswith("<|im_start|>system\nbe brief<|im_end|>")
    assert s.handle_command("/reset") == "reset" and s.history == []
    assert s.handle_command("/system talk like a cat") == "system" and s.system == "talk like a cat"
    assert s.handle_command("/exit") == "exit" and s.handle_command("/quit") == "exit"
    assert s.handle_command("not a command") is None
    with pytest.raises(TiaoyuError):
        s.handle_command("/dance")


def test_answer_records_batched_equals_one_by_one(ckpts):
    cm = load_chat_model(ckpts / "sft", device="cpu")
    recs = [(i + 1, {"prompt": " ".join(WORDS[i:i + 1 + i % 5])}) for i in range(7)]
    opts = GenerationOptions(max_new_tokens=10, sampling=SamplingParams(0.0))
    batched = list(answer_records(cm, recs, opts, batch_size=3))
    single = [next(answer_records(cm, [r], opts, batch_size=1)) for r in recs]
    assert batched == single
    assert [b["prompt"] for b in batched] == [r["prompt"] for _, r in recs]
