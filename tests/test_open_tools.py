"""Tool calls with an open model's own template (Hermes format: <tool_call>{json}</tool_call> as Qwen2.5/Qwen3
write them): the rounds of `chat --tools`, serve's tool prompts and agentic RL rollouts lay out the
conversation exactly as transformers' `apply_chat_template` renders the same messages; a folder that
cannot run tools is one clear error. The model's own turns are scripted here (a tiny random model does not
call tools); what is checked is everything around them."""

from __future__ import annotations

import json
import os

import pytest
import torch

from hf_tokenizers import QWEN_SPECIALS, _bpe, auto_tokenizer, make_llama3_tokenizer, make_qwen_tokenizer
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.infer import tool_loop
from tiaoyu_cli.infer.generate import GenerationResult
from tiaoyu_cli.infer.sampling import SamplingParams
from tiaoyu_cli.infer.tools import Toolbox
from tiaoyu_cli.tokenizer.hf import HFTokenizer

transformers = pytest.importorskip("transformers")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# A Hermes-style template as Qwen2.5's lays it out: schemas in the system turn, each call a
# <tool_call> block inside the assistant turn, tool results as <tool_response> blocks in a user turn.
HERMES_TEMPLATE = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call functions.\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools>\\nReturn each call inside <tool_call></tool_call> tags.<|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant' }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tc in message.tool_calls or [] %}
{%- set f = tc.function if tc.function is defined else tc %}
{{- '\\n<tool_call>\\n{"name": "' + f.name + '", "arguments": ' + (f.arguments | tojson) + '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- else %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12+7"}}\n</tool_call>'
USER = [{"role": "user", "content": "What is 12 + 7?"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    f = make_qwen_tokenizer(tmp_path_factory.mktemp("hermes"))
    cfg = json.loads((f / "tokenizer_config.json").read_text())
    cfg["chat_template"] = HERMES_TEMPLATE
    (f / "tokenizer_config.json").write_text(json.dumps(cfg))
    (f / "chat_template.jinja").unlink(missing_ok=True)
    return f


@pytest.fixture(scope="module")
def tok(folder):
    return HFTokenizer.load(folder)


def hf_ids(folder, messages, tools=None, add_generation_prompt=True) -> list[int]:
    at = auto_tokenizer(folder)
    return at.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                  tokenize=True, return_dict=False)


def scripted(turns: list[str], tok):
    """A stand-in for generate_detailed: round k answers turns[k] (stopping where a stop id ends it)."""
    calls = []

    def gen(model, prompts, max_new_tokens, params=None, stop_ids=(), seed=None, **kw):
        text = turns[len(calls)]
        calls.append([list(p) for p in prompts])
        toks = tok.encode(text)
        stops = set(stop_ids)
        cut = next((k + 1 for k, t in enumerate(toks) if t in stops), None)
        out = toks[:cut] if cut else toks
        return GenerationResult([out] * len(prompts), ["stop" if cut else "length"] * len(prompts),
                                [list(p) for p in prompts])

    gen.calls = calls
    return gen


def test_tool_prompt_and_turn_layout_equal_apply_chat_template(folder, tok):
    box = Toolbox.from_names(["calculator"])
    schemas = box.schemas()
    prompt = tok.encode_chat(USER, add_generation_prompt=True, tools=schemas)[0]
    assert prompt == hf_ids(folder, USER, schemas)
    assert tok.has_tool_tokens and tok.end_tool_call_id in tok.tool_stop_ids

    gen = scripted([CALL, "It is 19.<|im_end|>"], tok)
    ro = tool_loop.agentic_rollout(None, tok, box, [prompt], 64, SamplingParams(temperature=0), seed=0, generate=gen)
    call_ids = tok.encode(CALL)
    answer_ids = tok.encode("It is 19.<|im_end|>")
    response = ro.responses[0]
    assert ro.calls[0][0].result == "19" and ro.finish == ["stop"]
    conv = USER + [{"role": "assistant", "content": "",
                    "tool_calls": [{"id": "call_1", "type": "function",
                                    "function": {"name": "calculator", "arguments": {"expression": "12+7"}}}]},
                   {"role": "tool", "tool_call_id": "call_1", "content": "19"}]
    # prompt + the model's call + the inserted tool turn is the template's rendering of the conversation so far
    assert prompt + response[:len(response) - len(answer_ids)] == hf_ids(folder, conv, schemas)
    assert response[len(response) - len(answer_ids):] == answer_ids
    # the mask: 1 on what the model chose (the call, the answer), 0 on the inserted tool turn
    n_turn = len(response) - len(call_ids) - len(answer_ids)
    assert ro.masks[0] == [1] * len(call_ids) + [0] * n_turn + [1] * len(answer_ids)
    # the second round was prompted with exactly that sequence
    assert gen.calls[1][0] == hf_ids(folder, conv, schemas)
    # the reward reads the last assistant turn
    from tiaoyu_cli.train.rl.tool_rollout import last_turn

    assert last_turn(tok, response) == answer_ids


def test_tool_runner_renders_each_round_with_the_template(folder, tok, monkeypatch):
    gen = scripted([CALL, "It is 19.<|im_end|>"], tok)
    monkeypatch.setattr(tool_loop, "generate_detailed", gen)
    runner = tool_loop.ToolRunner(None, tok, Toolbox.from_names(["calculator"]))
    [ans] = runner.answer_batch([list(USER)], 64, SamplingParams(temperature=0))
    assert [c.name for c in ans.calls] == ["calculator"] and ans.calls[0].result == "19"
    assert ans.response.response == "It is 19." and ans.finish == "stop"
    # round 2's prompt: the call as the template renders an assistant tool_calls message (arguments given to
    # it as an object, though the OpenAI message carries them as JSON text), then the result
    conv = USER + ans.messages[:2]
    assert isinstance(conv[1]["tool_calls"][0]["function"]["arguments"], str)
    as_object = [conv[0], {**conv[1], "tool_calls": [{**c, "function": {**c["function"], "arguments": json.loads(
        c["function"]["arguments"])}} for c in conv[1]["tool_calls"]]}, conv[2]]
    assert gen.calls[1][0] == hf_ids(folder, as_object, runner.schemas)


def test_serve_tool_prompt_equals_apply_chat_template(folder, tok):
    from tiaoyu_cli.serve.tools_api import chat_prompt

    schemas = Toolbox.from_names(["calculator"]).schemas()
    ids, job = chat_prompt(tok, "chat", list(USER), schemas, "auto")
    assert ids == hf_ids(folder, USER, schemas) and job is not None
    ids, _ = chat_prompt(tok, "chat", list(USER), schemas, "required")
    assert ids[-1] == tok.tool_call_id


def test_folders_that_cannot_run_tools_say_why(tmp_path, folder):
    llama = make_llama3_tokenizer(tmp_path / "llama")  # no <tool_call> tokens
    with pytest.raises(TiaoyuError, match="no <tool_call> and </tool_call> tokens"):
        tool_loop.ToolRunner(None, HFTokenizer.load(llama), Toolbox.from_names(["calculator"]))
    qwen = make_qwen_tokenizer(tmp_path / "qwen")  # the markers, but a template that ignores tool calls
    cfg = json.loads((qwen / "tokenizer_config.json").read_text())
    (qwen / "chat_template.jinja").write_text(
        "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    with pytest.raises(TiaoyuError, match="does not render tools"):
        HFTokenizer.load(qwen).require_tool_tokens()
    assert not HFTokenizer.load(llama).has_tool_tokens
    del cfg


def test_chat_tools_cli_on_an_open_folder(folder, tmp_path):
    """`tiaoyu chat FOLDER --tools calculator` runs on a real (tiny, random) model: the prompt carries the
    schemas, the answer ends at an end-of-turn id, nothing is refused."""
    from typer.testing import CliRunner

    from tiaoyu_cli.cli.main import app

    m = open_model(folder, tmp_path)
    res = CliRunner().invoke(app, ["chat", str(m), "--tools", "calculator", "-p", "What is 12 + 7?",
                                   "--temperature", "0", "--max-new-tokens", "8"])
    assert res.exit_code == 0, res.output


def open_model(folder, tmp_path):
    """A tiny random Qwen2 model with the Hermes tokenizer folder's files beside it."""
    from test_open_chat import SIZES, spread

    cfg = transformers.Qwen2Config(**{**SIZES, "tie_word_embeddings": True, "max_position_embeddings": 1024})
    torch.manual_seed(0)
    model = spread(transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), seed=1).eval()
    m = tmp_path / "qwen"
    model.save_pretrained(m)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (m / name).write_bytes((folder / name).read_bytes())
    return m


def test_grpo_prompts_carry_the_schemas_and_rollouts_call_tools(folder, tok, tmp_path):
    """`rlhf grpo --tools` on an open folder: its prompts are re-rendered with the tools' schemas where its template
    puts them (as the model's makers trained it), and the run trains and writes the family back."""
    from rlhf_fixtures import read_jsonl, run_cli, write_jsonl
    from tiaoyu_cli.data.preference import PromptExample, encode_prompt
    from tiaoyu_cli.train.objectives.grpo import schemas_in_prompts

    schemas = Toolbox.from_names(["calculator"]).schemas()
    ex = PromptExample(encode_prompt(tok, USER), "19", {"prompt": USER, "answer": "19"}, 3)
    schemas_in_prompts([ex], tok, schemas, 10_000)
    assert ex.prompt_ids == hf_ids(folder, USER, schemas)
    with pytest.raises(TiaoyuError, match="line 3: field 'prompt'"):
        schemas_in_prompts([PromptExample(encode_prompt(tok, USER), "19", {"prompt": USER}, 3)], tok, schemas, 50)

    src = open_model(folder, tmp_path)
    data = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "What is 12 + 7?", "answer": "19"}] * 6)
    run_cli(["rlhf", "grpo", src, data, "-o", tmp_path / "grpo", "--tools", "calculator", "--group-size", "2",
             "--rollout-batch-size", "2", "--max-new-tokens", "8", "--max-steps", "2", "--batch-size", "2",
             "--device", "cpu", "--dtype", "fp32", "--seed", "0"])
    metrics = read_jsonl(tmp_path / "grpo" / "metrics.jsonl")
    assert any(m.get("step") == 2 and "loss" in m for m in metrics)
    out = json.loads((tmp_path / "grpo" / "latest" / "config.json").read_text())
    assert out["architectures"] == ["Qwen2ForCausalLM"]
