"""Tool calls: the template (ids, loss mask, Jinja and transformers parity), old tokenizers refused."""

from __future__ import annotations

import json

import pytest

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.tokenizer import CHAT_TEMPLATE, Tokenizer, train_tokenizer
from tiaoyu_cli.tokenizer.core import BASE_SPECIAL_TOKENS, make_config
from tokenizer_corpus import make_records, write_jsonl

CALC = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression: + - * / ** and parentheses.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string", "description": "e.g. 12*(3+4)"}},
                   "required": ["expression"]}}}
WEATHER = {"type": "function", "function": {"name": "weather", "description": "天气",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}

TOOL_CONV = [
    {"role": "system", "content": "你是助手。"},
    {"role": "user", "content": "What is 123 * 456?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "123*456"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "56088"},
    {"role": "assistant", "content": "123 × 456 = 56088."},
    {"role": "user", "content": "北京和上海的天气？"},
    {"role": "assistant", "content": "Let me check both.", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "weather", "arguments": '{"city": "北京"}'}},
        {"id": "b", "type": "function", "function": {"name": "weather", "arguments": '{"city": "上海"}'}}]},
    {"role": "tool", "tool_call_id": "a", "content": "晴 <tool_call> 20°C"},
    {"role": "tool", "tool_call_id": "b", "content": "雨"},
    {"role": "assistant", "content": "北京晴，上海雨。"},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    corpus = write_jsonl(tmp_path_factory.mktemp("corpus") / "data.jsonl", make_records())
    return train_tokenizer([str(corpus)], tmp_path_factory.mktemp("tok") / "tok", algo="bpe", vocab_size=600)


@pytest.fixture(scope="module")
def old_tok():
    """A tokenizer made before tool calls: only the 8 base specials are control symbols."""
    from tiaoyu_cli.tokenizer import train as tr

    texts = [r.get("text") or "" for r in make_records(300)]
    saved = tr.SPECIAL_TOKENS
    tr.SPECIAL_TOKENS = BASE_SPECIAL_TOKENS
    try:
        proto = tr.train_model_proto(texts, vocab_size=500)
    finally:
        tr.SPECIAL_TOKENS = saved
    return Tokenizer(proto, make_config())


def _jinja(messages, tools, gen):
    pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x: json.dumps(x, ensure_ascii=False)  # as transformers overrides it
    return env.from_string(CHAT_TEMPLATE).render(messages=messages, tools=tools, add_generation_prompt=gen)


# ---------------------------------------------------------------------------- template
def test_tool_template_string(tok):
    s = tok.render_chat(TOOL_CONV[:5], tools=[CALC])
    want_head = ("<|im_start|>system\n你是助手。\n\n# Tools\n\nYou may call one or more functions to assist with the "
                 "user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
                 + json.dumps(CALC, ensure_ascii=False) + "\n</tools>\n\nFor each function call, return a json object "
                 "with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                 '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n')
    want_rest = ("<|im_start|>user\nWhat is 123 * 456?<|im_end|>\n"
                 '<|im_start|>assistant\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "123*456"}}\n'
                 "</tool_call><|im_end|>\n"
                 "<|im_start|>user\n<tool_response>\n56088\n</tool_response><|im_end|>\n"
                 "<|im_start|>assistant\n123 × 456 = 56088.<|im_end|>\n")
    assert s == want_head + want_rest
    s2 = tok.render_chat(TOOL_CONV[5:], add_generation_prompt=True)
    assert s2 == ("<|im_start|>user\n北京和上海的天气？<|im_end|>\n<|im_start|>assistant\nLet me check both.\n"
                  '<tool_call>\n{"name": "weather", "arguments": {"city": "北京"}}\n</tool_call>\n'
                  '<tool_call>\n{"name": "weather", "arguments": {"city": "上海"}}\n</tool_call><|im_end|>\n'
                  "<|im_start|>user\n<tool_response>\n晴 <tool_call> 20°C\n</tool_response>\n"
                  "<tool_response>\n雨\n</tool_response><|im_end|>\n<|im_start|>assistant\n北京晴，上海雨。<|im_end|>\n"
                  "<|im_start|>assistant\n")


def test_tool_ids_and_loss_mask(tok):
    ids, mask = tok.encode_chat(TOOL_CONV, tools=[CALC, WEATHER])
    assert tok.decode(ids, skip_special=False) == tok.render_chat(TOOL_CONV, tools=[CALC, WEATHER])
    learned = tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False)
    assert learned == ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "123*456"}}\n</tool_call>'
                       "<|im_end|>123 × 456 = 56088.<|im_end|>Let me check both.\n"
                       '<tool_call>\n{"name": "weather", "arguments": {"city": "北京"}}\n</tool_call>\n'
                       '<tool_call>\n{"name": "weather", "arguments": {"city": "上海"}}\n</tool_call><|im_end|>'
                       "北京晴，上海雨。<|im_end|>")
    # the tool result's "<tool_call>" text is characters, never the control token; results are not learned
    assert ids.count(tok.tool_call_id) == 2 + 3 and ids.count(tok.tool_response_id) == 3
    assert all(m == 0 for i, m in zip(ids, mask) if i in (tok.tool_response_id, tok.end_tool_response_id))
    # the same ids as encoding the whole string with the markers split out
    assert tok.encode_chat(TOOL_CONV[:2])[0] == tok.encode_chat(TOOL_CONV[:2], tools=None)[0]


@pytest.mark.parametrize("gen", [False, True])
def test_jinja_renders_tools_like_python(tok, gen):
    dict_args = [dict(m, tool_calls=[dict(c, function=dict(c["function"], arguments=json.loads(c["function"]["arguments"])))
                                     for c in m["tool_calls"]]) if m.get("tool_calls") else m for m in TOOL_CONV]
    for msgs, tools in [(TOOL_CONV, [CALC, WEATHER]), (TOOL_CONV[1:], [CALC]), (TOOL_CONV[5:], None),
                        (dict_args, [CALC]), (TOOL_CONV[:2], None), ([], [CALC])]:
        assert _jinja(msgs, tools, gen) == tok.render_chat(msgs, gen, tools=tools)


def test_transformers_apply_chat_template_gives_our_ids(tok):
    pytest.importorskip("google.protobuf")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok.path))
    assert hf.convert_tokens_to_ids(["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]) == [8, 9, 10, 11]
    dict_args = [dict(m, tool_calls=[dict(c, function=dict(c["function"], arguments=json.loads(c["function"]["arguments"])))
                                     for c in m["tool_calls"]]) if m.get("tool_calls") else m for m in TOOL_CONV]
    for msgs in (TOOL_CONV, dict_args):
        plain = [dict(m, content="晴 20°C") if m.get("tool_call_id") == "a" else m for m in msgs]
        for gen in (False, True):
            got = hf.apply_chat_template(plain, tools=[CALC, WEATHER], tokenize=True, add_generation_prompt=gen)
            ours, _ = tok.encode_chat(plain, add_generation_prompt=gen, tools=[CALC, WEATHER])
            assert _ids(got) == ours
        # a tool result holding "<tool_call>" text: transformers keeps it text when asked to sanitize, like we always do
        got = hf.apply_chat_template(msgs, tools=[CALC], tokenize=True, sanitize_control_tokens=True)
        assert _ids(got) == tok.encode_chat(msgs, tools=[CALC])[0]


def _ids(got) -> list[int]:
    return list(got["input_ids"] if hasattr(got, "keys") else got)


def test_old_tokenizer_loads_but_refuses_tools(old_tok):
    assert not old_tok.has_tool_tokens and old_tok.num_special == 8
    assert old_tok.encode_chat(TOOL_CONV[:2])[0]  # plain chat still works
    with pytest.raises(TiaoyuError, match="no tool tokens.*tokenize train"):
        old_tok.encode_chat(TOOL_CONV[:2], tools=[CALC])
    with pytest.raises(TiaoyuError, match="no tool tokens"):
        old_tok.encode_chat(TOOL_CONV[:5])
    # its pieces 8..11 are ordinary text and still decode
    assert old_tok.decode(list(range(8, 12))) == old_tok.decode(list(range(8, 12)), skip_special=False) != ""


@pytest.mark.parametrize("msgs,err", [
    ([{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": 3, "arguments": "{}"}}]}],
     r"tool_calls\[0\]"),
    ([{"role": "assistant", "content": None}], "content must be a string"),
    ([{"role": "tool", "content": None}], "content must be a string"),
    ([{"role": "assistant", "content": "", "tool_calls": "x"}], "tool_calls must be a list"),
])
def test_bad_tool_messages(tok, msgs, err):
    with pytest.raises(TiaoyuError, match=err):
        tok.encode_chat(msgs)


# ---------------------------------------------------------------------------- records and prep
def _prep(tmp_path, objs, **kw):
    import orjson

    from tiaoyu_cli.data.prep import PrepConfig, run_prep

    f = tmp_path / "in.jsonl"
    f.write_bytes(b"".join(orjson.dumps(o) + b"\n" for o in objs))
    out = tmp_path / "out.jsonl"
    run_prep([str(f)], str(out), PrepConfig(**kw))
    return [orjson.loads(x) for x in out.read_bytes().splitlines()]


def test_prep_keeps_openai_tool_records_and_compacts_arguments(tmp_path):
    rec = {"messages": [{"role": "user", "content": "123*456?"},
                        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "calculator", "arguments": '{ "expression" :  "123*456" }'}}]},
                        {"role": "tool", "tool_call_id": "c1", "content": "56088"},
                        {"role": "assistant", "content": "56088"}], "tools": [CALC["function"]], "id": 7}
    [out] = _prep(tmp_path, [rec])
    assert out == {"messages": [{"role": "user", "content": "123*456?"},
                                {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
                                 "function": {"name": "calculator", "arguments": '{"expression": "123*456"}'}}]},
                                {"role": "tool", "content": "56088", "tool_call_id": "c1"},
                                {"role": "assistant", "content": "56088"}], "tools": [CALC]}


def test_prep_converts_sharegpt_function_call_and_hermes(tmp_path):
    share = {"conversations": [{"from": "human", "value": "1+2?"},
                               {"from": "function_call", "value": '{"name": "calculator", "arguments": {"expression": "1+2"}}'},
                               {"from": "observation", "value": "3"}, {"from": "gpt", "value": "3"}],
             "tools": json.dumps([CALC["function"]])}
    hermes = {"conversations": [{"from": "human", "value": "天气?"},
                                {"from": "gpt", "value": 'ok\n<tool_call>\n{"name": "weather", "arguments": {"city": "北京"}}\n'
                                                         '</tool_call>\n<tool_call>\n{"name": "weather", "arguments": '
                                                         '{"city": "上海"}}\n</tool_call>'},
                                {"from": "tool", "value": "<tool_response>\n晴\n</tool_response>\n<tool_response>\n雨\n</tool_response>"},
                                {"from": "gpt", "value": "北京晴"}]}
    a, b = _prep(tmp_path, [share, hermes])
    assert a["tools"] == [CALC]
    assert a["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "1+2"}'}}]}
    assert a["messages"][2] == {"role": "tool", "content": "3", "tool_call_id": "call_1"}
    calls = b["messages"][1]["tool_calls"]
    assert b["messages"][1]["content"] == "ok" and [c["function"]["arguments"] for c in calls] == [
        '{"city": "北京"}', '{"city": "上海"}']
    assert [(m["content"], m["tool_call_id"]) for m in b["messages"][2:4]] == [("晴", "call_1"), ("雨", "call_2")]


@pytest.mark.parametrize("msgs,err", [
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "function": {"name": "calculator", "arguments": "{expression: 1}"}}]}],
     r"in\.jsonl:1: field 'messages\[1\]\.tool_calls\[0\]\.function\.arguments': arguments are not valid JSON"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "function": {"name": "calculator", "arguments": "{}"}}]}, {"role": "tool", "tool_call_id": "zz",
                                                                               "content": "1"}],
     r"in\.jsonl:1: field 'messages\[2\]\.tool_call_id': unknown tool_call_id 'zz'"),
    ([{"role": "user", "content": "q"}, {"role": "tool", "content": "1"}, {"role": "assistant", "content": "a"}],
     r"in\.jsonl:1: field 'messages\[1\]': a tool message with no tool call before it"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": 'x <tool_call>{"name": "f", </tool_call>'}],
     r"in\.jsonl:1: field 'messages\[1\]\.content': <tool_call> 0 does not hold valid JSON"),
])
def test_prep_rejects_bad_tool_records_naming_file_line_field(tmp_path, msgs, err):
    from tiaoyu_cli.errors import DataError

    with pytest.raises(DataError, match=err):
        _prep(tmp_path, [{"messages": msgs}])
    assert _prep(tmp_path, [{"messages": msgs}, {"messages": TOOL_CONV[1:5]}], skip_bad=True)  # counted, skipped


def test_chat_dataset_takes_tool_records_and_masks_results(tok):
    from tiaoyu_cli.data.chat import ChatDataset
    from tiaoyu_cli.errors import DataError

    ds = ChatDataset([{"messages": TOOL_CONV, "tools": [CALC, WEATHER]}], tok, max_len=2048)
    ex = ds.examples[0]
    assert (ex.ids, ex.loss_mask) == tok.encode_chat(TOOL_CONV, tools=[CALC, WEATHER])
    assert ds.tools[0] == [CALC, WEATHER]
    bad = [dict(m) for m in TOOL_CONV]
    bad[2] = dict(bad[2], tool_calls=[{"id": "call_1", "type": "function",
                                       "function": {"name": "calculator", "arguments": {"expression": "1"}}}])
    with pytest.raises(DataError, match=r"<records>:1: field 'messages\[2\]\.tool_calls\[0\]\.function\.arguments': "
                                        "expected a JSON string"):
        ChatDataset([{"messages": bad}], tok, max_len=2048)
    with pytest.raises(DataError, match=r"field 'tools\[0\]\.type'"):
        ChatDataset([{"messages": TOOL_CONV, "tools": [{"type": "retrieval"}]}], tok, max_len=2048)


# ---------------------------------------------------------------------------- calculator
@pytest.mark.parametrize("expr,want", [
    ("123*456", "56088"), ("(1+2)/4", "0.75"), ("1/3", "0.3333333333"), ("2 ** 0.5", "1.414213562"),
    ("-2**2", "-4"), ("2**3**2", "512"), ("2**-1", "0.5"), ("0.1+0.2", "0.3"), (".5 + .25", "0.75"),
    ("12×3÷4", "9"), ("−5 + 2", "-3"), ("1,234*2", "2468"), ("7/8*8", "7"), ("- (3 - 10)", "7"),
    ("999999999999*999999999999", "999999999998000000000001"), ("1.50*2", "3"), ("10/4", "2.5"),
    ("1/0", "error: division by zero"), ("0**-1", "error: division by zero"), ("((1)", "error: missing ')'"),
    ("1 +", "error: the expression ends too early"), ("abc", "error: unexpected 'a' at position 1"),
    ("", "error: empty expression"), ("(-8)**(1/3)", "error: a negative number to a fractional power is not a real number"),
    ("10**100000", "error: the result would have more than 10,000 digits"), ("9**9**9", "error: the result would have more than 10,000 digits"),
    ("(" * 200 + "1" + ")" * 200, "error: nested more than 100 levels deep"), ("1 2", "error: unexpected '2'"),
])
def test_calculator(expr, want):
    from tiaoyu_cli.infer.calculator import calculate

    assert calculate(expr) == want


def test_calculator_never_evals():
    from tiaoyu_cli.infer.calculator import calculate

    assert calculate("__import__('os').system('true')").startswith("error: unexpected")
    assert calculate("1" * 2000).startswith("error: the expression is longer")


# ---------------------------------------------------------------------------- tools and their schemas
MODULE = '''
from typing import Literal, Optional


def add_days(date: str, days: int = 1, unit: Literal["d", "w"] = "d") -> str:
    """Add days to an ISO date.

    Args:
        date: the start, e.g. 2024-01-31
        days: how many to add
    """
    return f"{date}+{days}{unit}"


def explode(x: float) -> str:
    """Always fails.

    :param x: any number
    """
    raise RuntimeError("boom")


def _private(x: int) -> int:
    return x
'''


def test_tools_module_schemas_and_errors(tmp_path):
    from tiaoyu_cli.data.synth_tools import CALCULATOR_SCHEMA
    from tiaoyu_cli.infer.tools import Toolbox, tool_from_callable

    f = tmp_path / "my_tools.py"
    f.write_text(MODULE)
    box = Toolbox.from_names("calculator", module=f)
    assert list(box.tools) == ["calculator", "add_days", "explode"]
    assert box.schemas()[0] == CALCULATOR_SCHEMA  # what synth writes in its records
    assert box.tools["add_days"].schema == {"type": "function", "function": {
        "name": "add_days", "description": "Add days to an ISO date.",
        "parameters": {"type": "object", "properties": {
            "date": {"type": "string", "description": "the start, e.g. 2024-01-31"},
            "days": {"type": "integer", "description": "how many to add"},
            "unit": {"type": "string", "enum": ["d", "w"]}}, "required": ["date"]}}}
    assert box.tools["explode"].parameters["properties"]["x"] == {"type": "number", "description": "any number"}
    run = box.run_text
    assert run('{"name": "add_days", "arguments": {"date": "2024-01-31", "days": 2}}').result == "2024-01-31+2d"
    assert run('{"name": "add_days", "arguments": "{\\"date\\": \\"x\\"}"}').result == "x+1d"
    for text, err in [('{"name": "explode", "arguments": {"x": 1}}', "error: RuntimeError: boom"),
                      ('{"name": "nope", "arguments": {}}', "error: unknown tool 'nope'"),
                      ('{"name": "add_days", "arguments": {}}', "error: missing argument(s) date"),
                      ('{"name": "add_days", "arguments": {"date": "x", "days": "2"}}',
                       "error: argument 'days' must be of type integer, got str"),
                      ('{"name": "add_days", "arguments": {"date": "x", "weeks": 2}}', "error: unknown argument(s) weeks"),
                      ('{"name": "calculator", "arguments": {"expression": 5}}', "error: argument 'expression' must be"),
                      ('{"name": "calculator", "arguments": {"expression": "1/0"}}', "error: division by zero"),
                      ('{"name": "calculator", "arguments": ', "error: the tool call is not valid JSON"),
                      ('["calculator"]', "error: a tool call is")]:
        call = run(text)
        assert call.error and call.result.startswith(err), (text, call.result)
    search = tool_from_callable(lambda query: f"found {query}", schema={
        "name": "search", "description": "Search the corpus.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}})
    box.add(search)  # how the retrieval issue's `search(query) -> str` joins
    assert run('{"name": "search", "arguments": {"query": "cats"}}').result == "found cats"


def test_tools_module_errors(tmp_path):
    from tiaoyu_cli.infer.tools import Toolbox

    with pytest.raises(TiaoyuError, match="unknown tool 'abacus'"):
        Toolbox.from_names("calculator,abacus")
    f = tmp_path / "t.py"
    f.write_text("def f(x):\n    '''Doc.'''\n    return x\n")
    with pytest.raises(TiaoyuError, match=r"t\.py: function 'f': parameter 'x' needs a type hint"):
        Toolbox.from_names(None, module=f)
    f.write_text("def f(x: int):\n    return x\n")
    with pytest.raises(TiaoyuError, match="needs a docstring"):
        Toolbox.from_names(None, module=f)
    f.write_text("raise ValueError('bad')\n")
    with pytest.raises(TiaoyuError, match="importing it failed: ValueError: bad"):
        Toolbox.from_names(None, module=f)
    with pytest.raises(TiaoyuError, match="no such file"):
        Toolbox.from_names(None, module=tmp_path / "missing.py")


def test_tools_cli_json_prints_what_the_template_renders(tmp_path):
    import subprocess
    import sys

    from tiaoyu_cli.infer.tools import Toolbox, builtin_names

    out = subprocess.run([sys.executable, "-m", "tiaoyu_cli", "tools", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    schemas = json.loads(out.stdout)
    assert schemas == Toolbox.from_names(builtin_names()).schemas()
    assert [s["function"]["name"] for s in schemas] == ["calculator", "search"]
    run = subprocess.run([sys.executable, "-m", "tiaoyu_cli", "tools", "--run",
                          '{"name": "calculator", "arguments": {"expression": "(2+3)*4"}}'], capture_output=True, text=True)
    assert json.loads(run.stdout)["result"] == "20"


# ---------------------------------------------------------------------------- one round of the tool loop
def test_tool_runner_step_runs_calls_and_survives_bad_ones(tok):
    from tiaoyu_cli.infer.generate import DecodedResponse
    from tiaoyu_cli.infer.tool_loop import ToolAnswer, ToolRunner
    from tiaoyu_cli.infer.tools import Toolbox

    runner = ToolRunner(None, tok, Toolbox.from_names("calculator"), max_tool_calls=2)
    msgs = [{"role": "user", "content": "123*456?"}]
    ans = ToolAnswer(DecodedResponse("", None, None))
    call = tok.encode("Let me.") + [tok.tool_call_id] + tok.encode('\n{"name": "calculator", "arguments": '
                                                                   '{"expression": "123*456"}}\n') + [tok.end_tool_call_id]
    assert runner.step(msgs, ans, call, "stop")
    assert msgs[-2:] == [{"role": "assistant", "content": "Let me.", "tool_calls": [{"id": "call_1", "type": "function",
                          "function": {"name": "calculator", "arguments": '{"expression": "123*456"}'}}]},
                         {"role": "tool", "tool_call_id": "call_1", "content": "56088"}]
    bad = [tok.tool_call_id] + tok.encode('\n{"name": "calculator", "arguments": {"expr') + [tok.end_tool_call_id]
    assert runner.step(msgs, ans, bad, "stop")  # a malformed call is an error result, and generation goes on
    assert msgs[-1]["content"].startswith("error: the tool call is not valid JSON")
    assert tok.encode_chat(msgs, add_generation_prompt=True)  # the history still renders
    assert not runner.step(msgs, ans, call, "stop")  # a third call is past --max-tool-calls 2
    assert ans.finish == "tool_limit" and len(ans.calls) == 2
    ans2 = ToolAnswer(DecodedResponse("", None, None))
    assert not runner.step(msgs, ans2, tok.encode("56088") + [tok.im_end_id], "stop")
    assert ans2.response.response == "56088" and ans2.finish == "stop"


def test_agentic_rollout_masks_tool_turns_and_matches_the_template(tok):
    """A scripted generator calls the calculator once, then answers: prompt + response equal the template's ids
    of the whole conversation, and exactly the model's tokens are in the mask."""
    from tiaoyu_cli.infer.generate import GenerationResult
    from tiaoyu_cli.infer.tool_loop import agentic_rollout
    from tiaoyu_cli.infer.tools import Toolbox

    call = [tok.tool_call_id] + tok.encode('\n{"name": "calculator", "arguments": {"expression": "123*456"}}\n') + [
        tok.end_tool_call_id]
    answer = tok.encode("123 * 456 = 56088") + [tok.im_end_id]
    rounds = []

    def fake_generate(model, prompts, n, params, stops, seed=None):
        rounds.append(len(prompts))
        outs = [answer if tok.tool_response_id in p else call for p in prompts]
        return GenerationResult(outs, ["stop"] * len(prompts), prompts)

    msgs = [{"role": "user", "content": "What is 123 * 456?"}]
    prompt = tok.encode_chat(msgs, add_generation_prompt=True)[0]
    ro = agentic_rollout(None, tok, Toolbox.from_names("calculator"), [prompt, prompt], 64, None, generate=fake_generate)
    assert rounds == [2, 2] and ro.finish == ["stop", "stop"]
    full = msgs + [{"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "calculator", "arguments": '{"expression": "123*456"}'}}]},
        {"role": "tool", "tool_call_id": "c", "content": "56088"}, {"role": "assistant", "content": "123 * 456 = 56088"}]
    ids, learn = tok.encode_chat(full)
    assert prompt + ro.responses[0] == ids[:-1]  # all but the final "\n" after <|im_end|>
    assert [t for t, m in zip(ro.responses[0], ro.masks[0]) if m] == call + answer
    # SFT's loss mask on the same conversation, except the <|im_end|> that closes a call turn: the rollout
    # inserts it (generation paused at </tool_call>), SFT learns it
    diff = [k for k, (a, b) in enumerate(zip(ro.masks[0], learn[len(prompt):-1])) if a != b]
    assert len(ro.masks[0]) == len(learn) - len(prompt) - 1 and diff == [len(call)]
    assert ro.responses[0][len(call)] == tok.im_end_id
    assert [c.result for c in ro.calls[0]] == ["56088"]
    ro = agentic_rollout(None, tok, Toolbox.from_names("calculator"), [prompt], 64, None, max_tool_calls=0,
                         generate=fake_generate)
    assert ro.finish == ["tool_limit"] and ro.masks[0] == [1] * len(call)


def test_agentic_rollout_stays_inside_the_context(tok):
    """Each round gets only the room left in the context and a tool turn that would not fit ends the
    conversation ("length"): nothing is cut from the left, so the RL forward sees what the sampler saw
    (before, rows past the context were left-truncated for sampling only: log-probs off by up to 15 nats)."""
    from tiaoyu_cli.infer.generate import GenerationResult
    from tiaoyu_cli.infer.tool_loop import agentic_rollout, tool_turn_ids
    from tiaoyu_cli.infer.tools import Toolbox

    call = [tok.tool_call_id] + tok.encode('\n{"name": "calculator", "arguments": {"expression": "2+3"}}\n') + [
        tok.end_tool_call_id]
    seen = []

    def fake_generate(model, prompts, n, params, stops, seed=None):
        seen.append([(len(p), n) for p in prompts])
        return GenerationResult([call[:n] for _ in prompts], ["stop" if n >= len(call) else "length"] * len(prompts),
                                prompts)

    short = tok.encode_chat([{"role": "user", "content": "2+3?"}], add_generation_prompt=True)[0]
    long = tok.encode_chat([{"role": "user", "content": "2+3? " * 40}], add_generation_prompt=True)[0]
    context = len(long) + len(call) + len(tool_turn_ids(tok, "5")) + 5  # room for one call and its result
    ro = agentic_rollout(None, tok, Toolbox.from_names("calculator"), [short, long], 64, None, seed=0,
                         max_tool_calls=10, generate=fake_generate, context=context)
    assert all(L + n <= context for rnd in seen for L, n in rnd)
    for p, r, f in zip([short, long], ro.responses, ro.finish):
        assert len(p) + len(r) <= context and f == "length"
    assert len(ro.calls[1]) == 1 and len(ro.calls[0]) > 1  # the shorter prompt had room for more rounds
    assert [len(m) for m in ro.masks] == [len(r) for r in ro.responses]


def test_agentic_grpo_rollout_layout_and_reward(tok):
    """The Rollout PPO/GRPO train on: inserted tool turns masked out; the reward reads only the last turn
    and charges failed calls."""
    from tiaoyu_cli.data.preference import PromptExample
    from tiaoyu_cli.infer.generate import GenerationResult
    from tiaoyu_cli.infer.tools import Toolbox
    from tiaoyu_cli.train.rl.rollout import ToolVerifiableReward
    from tiaoyu_cli.train.rl.tool_rollout import generate_agentic_rollout

    good = [tok.tool_call_id] + tok.encode('\n{"name": "calculator", "arguments": {"expression": "2+3"}}\n') + [
        tok.end_tool_call_id]
    bad = [tok.tool_call_id] + tok.encode('\n{"name": "calc') + [tok.end_tool_call_id]

    def fake_generate(model, prompts, n, params, stops, seed=None):
        outs = []
        for p in prompts:
            if tok.tool_response_id not in p:
                outs.append(good if len(outs) == 0 else bad)
            else:
                outs.append(tok.encode("5") + [tok.im_end_id])
        return GenerationResult(outs, ["stop"] * len(prompts), prompts)

    prompt = tok.encode_chat([{"role": "user", "content": "2+3?"}], add_generation_prompt=True)[0]
    ro = generate_agentic_rollout(None, tok, Toolbox.from_names("calculator"), [prompt, prompt], 32,
                                  generate=fake_generate)
    assert ro.mask.shape == (2, max(len(r) for r in ro.responses))
    for i in range(2):
        chosen = [t for t, m in zip(ro.responses[i], ro.mask[i].tolist()) if m]
        assert chosen == (good if i == 0 else bad) + tok.encode("5") + [tok.im_end_id]
        assert tok.tool_response_id in ro.responses[i] and int(ro.mask[i].sum()) == len(chosen)
    ex = [PromptExample(prompt, answer="5"), PromptExample(prompt, answer="5")]
    s = ToolVerifiableReward(tok, call_penalty=0.5)(ex, ro)
    assert s.correct.tolist() == [1.0, 1.0] and s.reward.tolist() == [1.0, 0.5]
    # "5" inside the tool result is not an answer: a rollout that ends without answering scores 0
    ro.responses[0] = ro.responses[0][:-2]
    assert ToolVerifiableReward(tok)(ex[:1], ro.rows([0])).correct.tolist() == [0.0]


def test_search_tool_answers_from_the_retrieve_index(tmp_path):
    """`--tools search --retrieve DOCS`: the search tool returns the best passages; without --retrieve it
    answers with an error text the model reads (never a crash)."""
    from tiaoyu_cli.infer import tools as T
    from tiaoyu_cli.infer.retrieval import make_search, open_retriever

    no_index = T.Toolbox.from_names("search").run("search", {"query": "Lina"})[0]
    assert no_index.startswith("error: no documents to search")
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "Lina lives in Stoneford."}\n{"text": "王丽住在青石城。"}\n{"text": "Bo likes rice."}\n',
                    encoding="utf-8")
    old = dict(T._BUILTINS)
    try:
        T.use_search(make_search(open_retriever(str(docs)), 1))
        box = T.Toolbox.from_names("search")
        assert box.run("search", {"query": "Where does Lina live?"})[0] == "Lina lives in Stoneford."
        assert box.run("search", {"query": "王丽住在哪里"})[0] == "王丽住在青石城。"
    finally:
        T._BUILTINS.clear()
        T._BUILTINS.update(old)


def test_tool_answer_accuracy_asks_the_question_and_scores_the_final_answer(tok, monkeypatch):
    """SFT's `--eval-tools` eval: the prompt is the question alone (the calls are the model's to make), the
    reference is the record's `answer`, the score is the final answer's; format_rate = answers that called."""
    from tiaoyu_cli.data.chat import ChatDataset
    from tiaoyu_cli.data.synth_tools import tool_records
    from tiaoyu_cli.infer.generate import DecodedResponse
    from tiaoyu_cli.infer.tool_loop import ToolAnswer, ToolRunner
    from tiaoyu_cli.infer.tools import ToolCall, Toolbox
    from tiaoyu_cli.train.rl.answers import split_record, tool_answer_accuracy

    recs = tool_records(0, 2, ("en",), "val", word_frac=0.0, digits=(3,))
    msgs, gold = split_record(recs[0])
    assert [m["role"] for m in msgs] == ["user"] and gold == str(recs[0]["answer"])
    # without an `answer` field (e.g. read back from a chat dataset) the reference is the final turn
    assert split_record({"messages": recs[0]["messages"]}) == (msgs, recs[0]["messages"][-1]["content"])
    ds = ChatDataset(recs, tok, 256)
    assert ds.answers == [str(r["answer"]) for r in recs]
    seen = []

    def scripted(self, convs, max_new_tokens, params, seed=None):
        seen.extend(convs)
        right = ToolAnswer(DecodedResponse(f"It is {recs[0]['answer']}.", None, None),
                           calls=[ToolCall("calculator", '{"expression": "1+1"}', "2", id="call_1")])
        return [right, ToolAnswer(DecodedResponse("7", None, None))]

    monkeypatch.setattr(ToolRunner, "answer_batch", scripted)
    rep = tool_answer_accuracy(None, tok, recs, Toolbox.from_names("calculator"))
    assert seen == [split_record(r)[0] for r in recs]
    assert (rep.correct, rep.total, rep.accuracy, rep.format_rate) == (1, 2, 0.5, 0.5)
    assert rep.samples[0]["tool_calls"] == [{"name": "calculator", "arguments": '{"expression": "1+1"}', "result": "2"}]
