"""`tiaoyu serve` function calling, driven by the `openai` client: tool_calls back (streamed and not), the
tool result sent back as a `tool` message and the final answer, tool_choice, and 400s for bad tools.

The generation loop is scripted (as in test_serve.py's reasoning test) so the model "decides" to call
the calculator; the tokenizer, template, parsing and HTTP path are the real ones."""

from __future__ import annotations

import json
import threading

import pytest

openai = pytest.importorskip("openai")

CALC = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}


@pytest.fixture(scope="module")
def scripted(base_ckpt):
    """(client, seen prompts, tokenizer): the model calls calculator {"expression": "123*456"} until the prompt
    holds a <tool_response>, then answers with the number it finds there."""
    from tiaoyu_cli.checkpoint import load_model, load_tokenizer
    from tiaoyu_cli.infer.generate import Step
    from tiaoyu_cli.serve.server import Engine, ServeConfig, make_server

    tok = load_tokenizer(base_ckpt)
    model, _ = load_model(base_ckpt)
    seen: list[list[int]] = []

    def steps(model, prompts, n, params, stops, gen):
        seen.append(list(prompts[0]))
        p = prompts[0]
        if tok.tool_response_id in p:
            k = len(p) - 1 - p[::-1].index(tok.tool_response_id)
            result = tok.decode(p[k + 1:p.index(tok.end_tool_response_id, k)]).strip()
            script = tok.encode(f"123 * 456 = {result}") + [tok.im_end_id]
        elif p[-1] == tok.tool_call_id:  # tool_choice "required": the prompt opened the call
            script = tok.encode('\n{"name": "calculator", "arguments": {"expression": "1+1"}}\n') + [tok.end_tool_call_id,
                                                                                                        tok.im_end_id]
        elif tok.tool_call_id in p[len(p) - 1 - p[::-1].index(tok.im_start_id):]:  # a named tool_choice: only the arguments are left to write
            script = tok.encode('{"expression": "2*2"}}\n') + [tok.end_tool_call_id, tok.im_end_id]
        else:
            script = (tok.encode("Let me compute.") + [tok.tool_call_id]
                      + tok.encode('\n{"name": "calculator", "arguments": {"expression": "123*456"}}\n')
                      + [tok.end_tool_call_id, tok.im_end_id])
        for t in script[:n]:
            yield Step(list(range(len(prompts))), [t] * len(prompts), None)

    engine = Engine(model, tok, "chat", ServeConfig(), steps=steps)
    engine.context = 4096  # the scripted loop has no context limit; the schemas alone are ~450 tokens here
    srv = make_server(engine, "127.0.0.1", 0, "t", quiet=True)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1", api_key="x", max_retries=0, timeout=60)
    yield c, seen, tok
    srv.shutdown()
    srv.server_close()
    engine.close()


def _run_tool(call) -> str:
    from tiaoyu_cli.infer.tools import Toolbox

    return Toolbox.from_names("calculator").run(call.function.name, json.loads(call.function.arguments))[0]


def test_round_trip_not_streamed(scripted):
    c, seen, tok = scripted
    msgs = [{"role": "user", "content": "What is 123 * 456?"}]
    r = c.chat.completions.create(model="t", messages=msgs, tools=[CALC], max_tokens=200)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls"
    assert ch.message.content == "Let me compute."
    [call] = ch.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "calculator" and json.loads(call.function.arguments) == {"expression": "123*456"}
    assert tok.decode(seen[-1], skip_special=False) == tok.render_chat(msgs, True, tools=[CALC])  # schemas rendered
    msgs += [ch.message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": _run_tool(call)}]
    r2 = c.chat.completions.create(model="t", messages=msgs, tools=[CALC], max_tokens=200)
    assert r2.choices[0].message.content == "123 * 456 = 56088" and r2.choices[0].finish_reason == "stop"
    assert not r2.choices[0].message.tool_calls


def test_round_trip_streamed(scripted):
    c, _, _ = scripted
    msgs = [{"role": "user", "content": "What is 123 * 456?"}]
    chunks = list(c.chat.completions.create(model="t", messages=msgs, tools=[CALC], max_tokens=200, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert text == "Let me compute."
    assert deltas[0].index == 0 and deltas[0].id.startswith("call_") and deltas[0].function.name == "calculator"
    args = "".join(d.function.arguments or "" for d in deltas)
    assert json.loads(args) == {"expression": "123*456"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    call_id = deltas[0].id
    msgs += [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": "calculator", "arguments": args}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "56088"}]
    chunks = list(c.chat.completions.create(model="t", messages=msgs, tools=[CALC], max_tokens=200, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "123 * 456 = 56088"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_tool_choice(scripted):
    c, seen, tok = scripted
    msgs = [{"role": "user", "content": "2*2?"}]
    named = {"type": "function", "function": {"name": "calculator"}}
    r = c.chat.completions.create(model="t", messages=msgs, tools=[CALC], tool_choice=named, max_tokens=200)
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"expression": "2*2"}
    r = c.chat.completions.create(model="t", messages=msgs, tools=[CALC], tool_choice="required", max_tokens=200)
    assert r.choices[0].message.tool_calls[0].function.name == "calculator"
    c.chat.completions.create(model="t", messages=msgs, tools=[CALC], tool_choice="none", max_tokens=200)
    assert tok.tool_call_id not in seen[-1] and b"<tools>" not in tok.decode(seen[-1]).encode()  # no schemas


@pytest.mark.parametrize("kw,msg", [
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [{"type": "code_interpreter"}]}, "only function tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, "parameters"),
    ({"tools": [CALC], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not in tools"),
    ({"tools": [CALC], "tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "tool_call_id": "x", "content": "1"}]},
     "no tool call before it"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "calculator", "arguments": "{1"}}]},
                   {"role": "tool", "tool_call_id": "a", "content": "1"}]}, "not valid JSON"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "calculator", "arguments": "{}"}}]},
                   {"role": "tool", "tool_call_id": "b", "content": "1"}]}, "unknown tool_call_id 'b'"),
])
def test_bad_tool_requests_are_400(scripted, kw, msg):
    c, _, _ = scripted
    body = {"model": "t", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **kw}
    with pytest.raises(openai.BadRequestError, match=msg):
        c.chat.completions.create(**body)
    assert c.chat.completions.create(model="t", messages=[{"role": "user", "content": "hi"}], max_tokens=3)  # still up


def test_chat_cli_tool_errors_and_a_run_that_never_crashes(base_ckpt, tmp_path):
    """`tiaoyu chat --tools`: clear errors for an unknown tool and a text-continuation checkpoint; on a model
    that never learned tools (the pretrained base, forced to chat mode) it still answers, with exit 0."""
    import subprocess
    import sys

    def chat(*args, stdin=""):
        return subprocess.run([sys.executable, "-m", "tiaoyu_cli", "chat", str(base_ckpt), *args], input=stdin,
                              capture_output=True, text=True, timeout=300)

    r = chat("--tools", "abacus", "--mode", "chat", "--prompt", "hi")
    assert r.returncode == 2 and "unknown tool 'abacus'" in r.stderr
    r = chat("--tools", "calculator", "--prompt", "hi")
    assert r.returncode == 2 and "--tools needs chat mode" in r.stderr
    r = chat("--tools", "calculator", "--mode", "chat", "--no-tool-schemas", "--max-new-tokens", "24",
             "--temperature", "0", stdin='{"prompt": "What is 12 * 34?"}\n')
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert isinstance(rec["response"], str) and isinstance(rec["tool_calls"], list)
