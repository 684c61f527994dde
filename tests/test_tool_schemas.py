"""A checkpoint remembers whether it learned tool calls with the tools' schemas in its prompts, and chat and
serve default to that; a tool prompt longer than the context is a clear error naming the schemas' share,
never a silent cut."""

from __future__ import annotations

import json

import pytest

from rlhf_fixtures import one_thread, read_jsonl, write_jsonl

SCHEMA = {"type": "function", "function": {"name": "calculator", "description": "Evaluate an expression.",
                                           "parameters": {"type": "object", "properties": {
                                               "expression": {"type": "string"}}, "required": ["expression"]}}}


def call_record(with_tools: bool) -> dict:
    rec = {"messages": [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "calculator", "arguments": json.dumps({"expression": "2+3"})}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
        {"role": "assistant", "content": "5"}]}
    return {**rec, "tools": [SCHEMA]} if with_tools else rec


def test_the_data_says_whether_tool_records_carry_schemas(tok_dir):
    from tiaoyu_cli.data.chat import ChatDataset
    from tiaoyu_cli.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_dir)
    plain = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    assert ChatDataset(plain, tok, 512).tool_schemas() is None
    assert ChatDataset(plain + [call_record(False)] * 3, tok, 1024).tool_schemas() is False
    assert ChatDataset(plain + [call_record(True)] * 3, tok, 1024).tool_schemas() is True


def run(args: list[str]) -> int:
    from tiaoyu_cli.cli.main import main

    with one_thread():
        try:
            main(args)
        except SystemExit as e:
            return int(e.code or 0)
    return 0


def test_sft_records_it_and_chat_serve_and_later_stages_follow(base_ckpt, synth_dir, tmp_path, capsys):
    from tiaoyu_cli.infer.session import load_chat_model
    from tiaoyu_cli.serve.server import ServeConfig, load_engine

    data = write_jsonl(tmp_path / "tools.jsonl", read_jsonl(synth_dir / "tools.train.jsonl")[:16])
    assert "tools" not in read_jsonl(data)[0]  # the bundled tool data leaves the schemas out
    loop = ["--device", "cpu", "--dtype", "fp32", "--max-steps", "1", "--batch-size", "2", "--no-eval-before",
            "--max-len", "256"]
    assert run(["sft", str(base_ckpt), str(data), "-o", str(tmp_path / "tools"), *loop]) == 0
    info = json.loads((tmp_path / "tools" / "latest" / "trainer.json").read_text())
    assert info["stage_config"]["tool_schemas"] is False
    cm = load_chat_model(tmp_path / "tools", device="cpu")
    assert cm.tool_schemas is False
    engine, _ = load_engine(tmp_path / "tools", device="cpu")
    try:
        assert engine.config.tool_schemas is False
    finally:
        engine.close()
    engine, _ = load_engine(tmp_path / "tools", device="cpu", config=ServeConfig(tool_schemas=True))
    try:
        assert engine.config.tool_schemas is True  # the flag wins
    finally:
        engine.close()
    # a later stage from that checkpoint inherits it through its parent
    assert run(["sft", str(tmp_path / "tools"), str(synth_dir / "chat.train.jsonl"), "-o", str(tmp_path / "more"),
                *loop]) == 0
    more = json.loads((tmp_path / "more" / "latest" / "trainer.json").read_text())
    assert more["stage_config"]["tool_schemas"] is None
    assert load_chat_model(tmp_path / "more", device="cpu").tool_schemas is False
    # the pretrained base never learned tool calls: not known, chat renders the schemas (the default)
    assert load_chat_model(base_ckpt, device="cpu").tool_schemas is None
    # sft --tool-schemas records what the user chose
    assert run(["sft", str(base_ckpt), str(data), "-o", str(tmp_path / "forced"), *loop, "--tool-schemas"]) == 0
    assert load_chat_model(tmp_path / "forced", device="cpu").tool_schemas is True

    # chat with tools on it: the schemas stay out by default and the answer comes
    capsys.readouterr()
    code = run(["chat", str(tmp_path / "tools"), "--tools", "calculator", "-p", "What is 2 + 3?", "--device", "cpu",
                "--max-new-tokens", "8", "--temperature", "0"])
    out = capsys.readouterr()
    assert code == 0, out.err
    # forcing the schemas into a 256-token context: a clear error naming their share, not garbage
    code = run(["chat", str(tmp_path / "tools"), "--tools", "calculator", "-p", "What is 2 + 3?", "--device", "cpu",
                "--max-new-tokens", "8", "--tool-schemas"])
    err = capsys.readouterr().err
    cm = load_chat_model(tmp_path / "tools", device="cpu")
    if cm.model.config.max_seq_len < 600:
        assert code != 0 and "context" in err and "schemas take" in err and "--no-tool-schemas" in err, err


def test_a_prompt_longer_than_the_context_is_an_error(base_ckpt, tmp_path, capsys):
    from tiaoyu_cli.errors import TiaoyuError
    from tiaoyu_cli.infer.session import ChatSession, ContextError, GenerationOptions, load_chat_model

    cm = load_chat_model(base_ckpt, device="cpu", mode="chat")
    s = ChatSession(cm, options=GenerationOptions(max_new_tokens=16))
    with pytest.raises(ContextError, match="context is") as e:
        s.prompt_ids("word " * 2000)
    assert isinstance(e.value, TiaoyuError)
    assert len(s.prompt_ids("a short question")) < cm.model.config.max_seq_len
    code = run(["chat", str(base_ckpt), "--mode", "chat", "-p", "word " * 2000, "--device", "cpu",
                "--max-new-tokens", "4"])
    err = capsys.readouterr().err
    assert code != 0 and "the prompt is" in err and "Traceback" not in err
