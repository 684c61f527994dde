"""Hostile input to the tools: a calculator whose cost is bounded, a time limit on every tool call, tool-call
text too deep or too long for the JSON parser, and a fuzz of both."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest

from tiaoyu_cli.tokenizer import train_tokenizer
from tokenizer_corpus import make_records, write_jsonl


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    corpus = write_jsonl(tmp_path_factory.mktemp("corpus") / "data.jsonl", make_records())
    return train_tokenizer([str(corpus)], tmp_path_factory.mktemp("tok") / "tok", algo="bpe", vocab_size=600)


def _within(seconds: float, fn, *args):
    """fn(*args) in a daemon thread: its value, or a failure (not a hung test) when it runs past `seconds`."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{getattr(fn, '__name__', fn)}{args!r:.80} ran longer than {seconds} s"
    return out[0]


# ---------------------------------------------------------------------------- calculator: bounded cost
@pytest.mark.parametrize("expr,want", [
    ("2**-8000", "5.75485901e-2409"),  # exact decimal places were searched for one by one: seconds
    ("1" + "/2**11000" * 3, "1.023630196e-9934"),  # never finished
    (("1" + "/2**11000" * 200)[:1000], "error: the result would have more than 10,000 digits"),
    ("1" + "*3**6989/7**3900" * 60, None),
])
def test_calculator_cost_is_bounded(expr, want):
    from tiaoyu_cli.infer.calculator import calculate

    t = time.perf_counter()
    got = _within(5, calculate, expr)
    assert time.perf_counter() - t < 2
    if want is not None:
        assert got == want
    else:
        assert not got.startswith("error") or "digits" in got


@pytest.mark.parametrize("expr,want", [
    ("9**6000", "2.85139009e+5725"),  # passed the digit limit, then raised at Python's int-to-str limit
    ("1/3**6000", "1.87271497e-2863"), ("7/3**4000", "2.291285261e-1908"),  # printed as 0
    ("10**400 * 2**0.5", "1.414213562e+400"), ("(10**400)**0.5", "1e+200"),  # raised OverflowError
    ("3²", "9"), ("10⁻³", "0.001"), ("2³⁴", "17179869184"),  # raised ValueError
    ("1.0001**10000", "2.718145927"), ("0.5**10000.5", "3.544282761e-3011"),
    ("2**0.5*2**0.5", "2"), ("1/10**20", "1e-20"), ("(-2)**-3", "-0.125"), ("(-1)**(10**500)", "1"),
    ("10**999", "1" + "0" * 999), ("10**1000", "1e+1000"), ("1/7", "0.1428571429"), ("-0.75", "-0.75"),
    ("٣+1", "error: unexpected '٣' at position 1"),
])
def test_calculator_large_and_tiny_results_and_no_exceptions(expr, want):
    from tiaoyu_cli.infer.calculator import calculate

    assert _within(5, calculate, expr) == want


def test_calculator_ten_significant_digits_are_exact():
    """The 10 digits printed are n/d rounded half to even, at any magnitude (checked against decimal)."""
    from decimal import Context, Decimal
    from fractions import Fraction

    from tiaoyu_cli.infer.calculator import format_number

    ctx = Context(prec=10, Emax=10**6, Emin=-10**6)
    rng = random.Random(0)
    for _ in range(500):
        n, d = rng.getrandbits(rng.randint(1, 4000)) or 1, rng.getrandbits(rng.randint(1, 4000)) or 1
        got = format_number(Fraction(n, d), exact=False)
        assert Decimal(got) == ctx.divide(Decimal(n), Decimal(d)), (n, d, got)


# ---------------------------------------------------------------------------- time limit on tool calls
SLOW_MODULE = '''
import threading

GATE = threading.Event()


def wait(seconds: float) -> str:
    """Wait, then answer.

    Args:
        seconds: how long
    """
    GATE.wait(seconds)
    return "done"


def leave() -> str:
    """Try to end the process."""
    raise SystemExit(3)
'''


def test_tool_calls_run_under_a_time_limit(tmp_path):
    from tiaoyu_cli.infer import tools as T

    f = tmp_path / "slow_tools.py"
    f.write_text(SLOW_MODULE)
    box = T.Toolbox.from_names("calculator", module=f, timeout=0.2)
    gate = box.tools["wait"].fn.__globals__["GATE"]
    try:
        t = time.perf_counter()
        call = box.run_text('{"name": "wait", "arguments": {"seconds": 30}}')
        assert time.perf_counter() - t < 2
        assert call.error and call.result == "error: the tool call took longer than 0.2 s"
        assert box.run_text('{"name": "wait", "arguments": {"seconds": 0}}').result == "done"
        assert box.run_text('{"name": "calculator", "arguments": {"expression": "2+3"}}').result == "5"
        # a tool's SystemExit is the model's information, not the end of the process
        assert box.run_text('{"name": "leave", "arguments": {}}').result == "error: SystemExit: 3"
        for _ in range(T.MAX_RUNAWAY - 1):
            box.run_text('{"name": "wait", "arguments": {"seconds": 30}}')
        refused = box.run_text('{"name": "calculator", "arguments": {"expression": "2+3"}}')
        assert refused.error and "still running; no new call is started" in refused.result
    finally:
        gate.set()
    deadline = time.time() + 5
    while any(t.is_alive() for t in box._runaway) and time.time() < deadline:
        time.sleep(0.01)
    assert box.run_text('{"name": "calculator", "arguments": {"expression": "2+3"}}').result == "5"
    with pytest.raises(T.TiaoyuError, match="--tool-timeout must be"):
        T.Toolbox(timeout=0)
    assert T.Toolbox.from_names("calculator", timeout=None).run("calculator", {"expression": "1+1"}) == ("2", False)


def test_agentic_rollout_survives_a_slow_tool(tok, tmp_path):
    """RL rollouts read the time limit's error as the call's result and go on."""
    from tiaoyu_cli.infer.generate import GenerationResult
    from tiaoyu_cli.infer.tool_loop import agentic_rollout
    from tiaoyu_cli.infer.tools import Toolbox

    f = tmp_path / "slow_tools2.py"
    f.write_text(SLOW_MODULE)
    box = Toolbox.from_names(None, module=f, timeout=0.1)
    call = [tok.tool_call_id] + tok.encode('\n{"name": "wait", "arguments": {"seconds": 3}}\n') + [tok.end_tool_call_id]
    answer = tok.encode("ok") + [tok.im_end_id]

    def fake_generate(model, prompts, n, params, stops, seed=None):
        return GenerationResult([answer if tok.tool_response_id in p else call for p in prompts], ["stop"] * len(prompts),
                                prompts)

    prompt = tok.encode_chat([{"role": "user", "content": "wait"}], add_generation_prompt=True)[0]
    ro = _within(10, agentic_rollout, None, tok, box, [prompt], 64, None, 0, 5, fake_generate)
    assert ro.finish == ["stop"] and ro.calls[0][0].result == "error: the tool call took longer than 0.1 s"


def test_tools_module_help_says_it_runs_code(tmp_path):
    from typer.testing import CliRunner

    from tiaoyu_cli.cli.main import app

    for cmd in (["tools"], ["chat"], ["rlhf", "grpo"], ["reason"]):
        out = CliRunner().invoke(app, [*cmd, "--help"], env={"COLUMNS": "400", "TERM": "dumb"}).output
        assert "--tool-timeout" in out, cmd
        assert "runs its top-level code" in " ".join(out.split()), cmd


# ---------------------------------------------------------------------------- nesting and length before parsing
def test_check_json_nesting():
    from tiaoyu_cli.io import check_json_nesting, loads_limited

    assert check_json_nesting("[[[]]]", 3) is None
    assert check_json_nesting("[[[[]]]]", 3) == "nested more than 3 levels deep"
    assert check_json_nesting('["[[[[[[", {"a": "]]]]\\"[[[["}]', 2) is None  # brackets inside strings
    assert check_json_nesting('"abc' + "[" * 10, 2) is None  # a truncated string runs to the end
    assert check_json_nesting(b"[" * 100) == "nested more than 64 levels deep"
    assert check_json_nesting("x" * 11, max_len=10) == "longer than 10 characters"
    t = time.perf_counter()
    assert check_json_nesting("[" * 1_000_000, 64) is not None
    assert check_json_nesting('["' + "x" * 1_000_000 + '"]', 64) is None
    assert time.perf_counter() - t < 1
    for bad in ("[" * 100_000, "1" * 5000, "[1", b"\xff[", "{" * 70 + "}" * 70):
        with pytest.raises(json.JSONDecodeError):
            loads_limited(bad)
    assert loads_limited('{"a": [1, NaN]}')["a"][0] == 1


@pytest.mark.parametrize("text,err", [
    ("[" * 100_000, "error: the tool call is nested more than 64 levels deep"),  # was a RecursionError
    ('{"name": "calculator", "arguments": ' + "[" * 5000 + "]" * 5000 + "}", "error: the tool call is nested"),
    ('{"name": "calculator", "arguments": "' + "[" * 100_000 + '"}', "error: the tool call is longer"),
    ('{"name": "calculator", "arguments": "' + "[" * 5_000 + '"}', "error: the arguments are not valid JSON"),
    ('{"name": "calculator", "arguments": {"expression": ' + "9" * 5000 + "}}", "error: the tool call is not valid"),
    ('{"name": "calculator", "arguments": {"expression": "' + "x" * 200_000 + '"}}', "error: the tool call is longer"),
])
def test_deep_or_long_tool_calls_are_errors(text, err):
    from tiaoyu_cli.infer.tools import Toolbox

    call = Toolbox.from_names("calculator").run_text(text)
    assert call.error and call.result.startswith(err), call.result[:120]
    json.dumps(call.to_dict())


def test_deep_tool_call_in_chat_and_rollouts(tok):
    from tiaoyu_cli.infer.generate import DecodedResponse, GenerationResult
    from tiaoyu_cli.infer.tool_loop import ToolAnswer, ToolRunner, agentic_rollout
    from tiaoyu_cli.infer.tools import Toolbox

    deep = [tok.tool_call_id] + tok.encode('{"name": "calculator", "arguments": ' + "[" * 3000) + [tok.end_tool_call_id]
    runner = ToolRunner(None, tok, Toolbox.from_names("calculator"), max_tool_calls=2)
    msgs = [{"role": "user", "content": "hi"}]
    ans = ToolAnswer(DecodedResponse("", None, None))
    assert runner.step(msgs, ans, deep, "stop")
    assert msgs[-1]["content"] == "error: the tool call is nested more than 64 levels deep"
    answer = tok.encode("ok") + [tok.im_end_id]

    def fake_generate(model, prompts, n, params, stops, seed=None):
        return GenerationResult([answer if tok.tool_response_id in p else deep for p in prompts], ["stop"] * len(prompts),
                                prompts)

    ro = agentic_rollout(None, tok, Toolbox.from_names("calculator"), [tok.encode("hi")], 64, None,
                         generate=fake_generate)
    assert ro.calls[0][0].error and ro.finish == ["stop"]


def test_deep_tool_records_are_record_errors():
    from tiaoyu_cli.data.tool_records import (RecordError, calls_from_json_text, canonical_arguments, check_tools,
                                              split_hermes_calls)

    deep = "[" * 100_000
    for fn in (lambda: canonical_arguments(deep, "f"), lambda: calls_from_json_text(deep, "f", [0]),
               lambda: split_hermes_calls(f"<tool_call>{deep}</tool_call>", "f", [0]), lambda: check_tools(deep),
               lambda: canonical_arguments({"a": _nested(900)}, "f")):
        with pytest.raises(RecordError, match="nested"):
            fn()
    assert canonical_arguments({"a": _nested(10)}, "f")


def _nested(n: int):
    x: list = []
    for _ in range(n):
        x = [x]
    return x


# ---------------------------------------------------------------------------- fuzz
def _fuzz_text(rng: random.Random) -> str:
    atoms = ['"calculator"', '"name"', '"arguments"', '"expression"', "NaN", "Infinity", "-Infinity", "1e999",
             "9" * rng.randint(1, 6000), "-0", "true", "null", '"\\ud800"', '"\\u0000"', '"é中😀"', '"\\"',
             "1" + "0" * 400 + ".5", '"' + "2**" * rng.randint(1, 400) + '2"', '"2**-8000"', '"9**6000"',
             '"((((1))))"', '"1/0"', '"3²"', '"' + "/2**11000" * rng.randint(1, 100) + '"']

    def value(depth: int) -> str:
        r = rng.random()
        if depth > rng.choice([3, 10, 80, 3000]) or r < 0.35:
            return rng.choice(atoms)
        if r < 0.65:
            return "[" + ", ".join(value(depth + 1) for _ in range(rng.randint(0, 3))) + "]"
        keys = ['"name"', '"arguments"', '"expression"', '"x"', '"' + "k" * rng.randint(0, 50) + '"']
        return "{" + ", ".join(f"{rng.choice(keys)}: {value(depth + 1)}" for _ in range(rng.randint(0, 3))) + "}"

    shape = rng.random()
    if shape < 0.4:
        args = value(0) if rng.random() < 0.5 else '{"expression": ' + value(0) + "}"
        text = '{"name": "calculator", "arguments": ' + args + "}"
    elif shape < 0.55:
        text = '{"name": "calculator", "arguments": ' + json.dumps(value(0)) + "}"  # arguments as a JSON string
    elif shape < 0.7:
        k = rng.randint(1, 50_000)
        text = rng.choice(["[", "{", '{"a":', "[[{"]) * k
    else:
        text = value(0)
    if rng.random() < 0.3:  # truncated
        text = text[:rng.randint(0, len(text))]
    if rng.random() < 0.1:  # noise
        pos = rng.randint(0, len(text))
        text = text[:pos] + "".join(chr(rng.randint(0, 0x2FFFF)) for _ in range(5)) + text[pos:]
    return text


def _fuzz_expression(rng: random.Random) -> str:
    parts = ["(", ")", "+", "-", "*", "/", "**", "^", "²", "⁻³", "×", "÷", ".", "..", ",", "_", " ", "1", "0", "7",
             "2**11000", "3**6989", "9" * 50, "0.5", "1e5", "٣", "１", "\x00", "é", "(" * 120, ")" * 120]
    return "".join(rng.choice(parts) for _ in range(rng.randint(0, 200)))[:1100]


def test_fuzz_tool_call_parsing_and_the_calculator():
    """Seeded random JSON-like shapes and broken text into the tool-call parser and the calculator, for a
    few seconds: always a result or an error string, never an exception or a hang."""
    from tiaoyu_cli.infer.calculator import calculate
    from tiaoyu_cli.infer.tools import Toolbox, parse_call

    box = Toolbox.from_names("calculator", timeout=5)
    rng = random.Random(1234)
    start = time.perf_counter()
    n = worst = 0
    while time.perf_counter() - start < 3 or n < 50:
        text = _fuzz_text(rng)
        t = time.perf_counter()
        call = box.run_text(text)
        assert isinstance(call.result, str) and (not call.error or call.result.startswith("error: ")), text[:200]
        json.dumps(call.to_dict())  # what chat writes
        try:
            parse_call(text)
        except ValueError:
            pass
        expr = _fuzz_expression(rng)
        got = calculate(expr)
        assert isinstance(got, str) and got, expr
        worst = max(worst, time.perf_counter() - t)
        n += 1
    assert worst < 2, worst


def test_other_json_readers_turn_deep_nesting_into_errors(tmp_path):
    """Config files, JSON files and metrics lines nested past Python's recursion limit: a clear error, no
    RecursionError traceback."""
    from tiaoyu_cli.cli.common import load_config_file
    from tiaoyu_cli.errors import TiaoyuError
    from tiaoyu_cli.io import read_json
    from tiaoyu_cli.evals.plots import read_metrics

    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "c.json").write_text(deep)
    with pytest.raises(TiaoyuError, match="nested too deeply"):
        load_config_file(tmp_path / "c.json")
    with pytest.raises(TiaoyuError, match="nested too deeply"):
        read_json(tmp_path / "c.json")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n' + deep + "\n")  # a torn last line
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]


# ---------------------------------------------------------------------------- the compiled decode step's cache
FAKE_CC = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "fakecc $FAKE_CC_VERSION"; exit 0; fi
while [ $# -gt 0 ]; do
  if [ "$1" = "-o" ]; then cp "$REAL_SO" "$2"; exit 0; fi
  shift
done
exit 1
"""


@pytest.fixture(scope="module")
def real_so(tmp_path_factory):
    """A decode kernel built by the real compiler, once, into a cache of its own."""
    import os

    from tiaoyu_cli.infer.fast import kernel

    cache = tmp_path_factory.mktemp("kernel-cache")
    saved, env = dict(kernel._C), os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    kernel._C.update(tried=False, fn=None)
    try:
        fn = kernel.c_kernel()
    finally:
        kernel._C.update(saved)
        if env is None:
            os.environ.pop("XDG_CACHE_HOME")
        else:
            os.environ["XDG_CACHE_HOME"] = env
    if fn is None:
        pytest.skip("no C compiler here")
    return next((cache / "tiaoyu").glob("decode_kernel-*.so"))


@pytest.fixture
def kernel_env(tmp_path, monkeypatch, real_so):
    """A fresh cache and a fake compiler that 'builds' by copying the real kernel (fast); c_kernel() untried."""
    from tiaoyu_cli.infer.fast import kernel

    cc = tmp_path / "fakecc"
    cc.write_text(FAKE_CC)
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("REAL_SO", str(real_so))
    monkeypatch.setenv("FAKE_CC_VERSION", "1.0")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("TIAOYU_C_KERNEL", raising=False)
    monkeypatch.setitem(kernel._C, "tried", False)
    monkeypatch.setitem(kernel._C, "fn", None)
    return tmp_path / "cache" / "tiaoyu"


def _retry():
    from tiaoyu_cli.infer.fast import kernel

    kernel._C.update(tried=False, fn=None)
    return kernel.c_kernel()


def test_kernel_cache_folder_is_private_and_the_compiler_version_is_in_the_key(kernel_env):
    import stat

    assert _retry() is not None
    assert stat.S_IMODE(kernel_env.stat().st_mode) == 0o700
    (first,) = kernel_env.glob("decode_kernel-*.so")
    assert not first.stat().st_mode & 0o022
    import os

    os.environ["FAKE_CC_VERSION"] = "2.0"  # a new compiler: a new build, not the old one's library
    assert _retry() is not None
    assert len(list(kernel_env.glob("decode_kernel-*.so"))) == 2
    assert not list(kernel_env.glob(".decode_kernel-*"))  # no temp file left


@pytest.mark.parametrize("plant", ["group-writable", "symlink", "other-owner"])
def test_a_planted_kernel_is_refused_and_rebuilt(kernel_env, tmp_path, plant):
    import os

    assert _retry() is not None
    (so,) = kernel_env.glob("decode_kernel-*.so")
    evil = tmp_path / "evil.so"
    evil.write_bytes(b"\x7fELF not a library")  # loading it would fail: a load shows as None
    so.unlink()
    if plant == "group-writable":
        so.write_bytes(evil.read_bytes())
        so.chmod(0o777)
    elif plant == "symlink":
        so.symlink_to(evil)
    else:
        if os.getuid() != 0:
            pytest.skip("making a file another user's needs root")
        so.write_bytes(evil.read_bytes())
        os.chown(so, 65534, 65534)
    assert _retry() is not None  # refused, deleted, rebuilt, loaded
    assert not so.is_symlink() and so.stat().st_uid == os.getuid() and not so.stat().st_mode & 0o022
    assert so.read_bytes() != evil.read_bytes()


def test_an_unsafe_cache_folder_is_refused_with_one_warning(kernel_env, capsys):
    kernel_env.mkdir(parents=True)
    kernel_env.chmod(0o777)
    assert _retry() is None
    from tiaoyu_cli.infer.fast import kernel

    assert kernel.c_kernel() is None  # tried once per process: no second warning
    err = capsys.readouterr().err
    assert err.count("the compiled decode step is unavailable") == 1 and "writable by group or others" in err
    assert not list(kernel_env.iterdir())


def test_a_missing_compiler_is_said_once(tmp_path, monkeypatch, capsys):
    from tiaoyu_cli.infer.fast import kernel

    monkeypatch.setitem(kernel._C, "tried", False)
    monkeypatch.setitem(kernel._C, "fn", None)
    monkeypatch.delenv("TIAOYU_C_KERNEL", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernel.shutil, "which", lambda name: None)
    assert kernel.c_kernel() is None and kernel.c_kernel() is None
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("the compiled decode step is unavailable: no C compiler found") == 1
    monkeypatch.setitem(kernel._C, "tried", False)
    monkeypatch.setenv("TIAOYU_C_KERNEL", "0")
    assert kernel.c_kernel() is None
    assert capsys.readouterr().err == ""  # switched off on purpose: nothing said
