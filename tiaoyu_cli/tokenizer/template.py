"""The chat template, written once as a list of parts that both the string and the token ids come from.

ChatML, with reasoning and tool calls in the Qwen2.5/Hermes layout (what llama.cpp, vLLM and
transformers already parse):

    <|im_start|>system\\n[SYSTEM\\n\\n]# Tools … <tools>\\n{schema}\\n…</tools> … <|im_end|>\\n     only with tools
    <|im_start|>role\\ncontent<|im_end|>\\n                                           system / user / assistant
    <|im_start|>assistant\\n[<think>r</think>]content<|im_end|>\\n                    reasoning before the answer
    <|im_start|>assistant\\n[content\\n]<tool_call>\\n{"name": N, "arguments": A}\\n</tool_call><|im_end|>\\n
    <|im_start|>user\\n<tool_response>\\nresult\\n</tool_response>[\\n<tool_response>…]<|im_end|>\\n
                                                 consecutive tool messages share one user turn
    <|im_start|>assistant\\n                                                         the generation prompt

`chat_parts` yields (text, control, learn) triples: control parts are the special tokens
(`<|im_start|>`, `<tool_call>` …), inserted as ids by the encoder and never parsed from text, so
a user or a tool result that contains "<tool_call>" stays ordinary characters. `learn` marks
what SFT learns: the assistant's reasoning, content, calls and closing `<|im_end|>`; never the
system prompt, user turns, tool results or role headers. Two text parts side by side always
meet right after a "\\n" (the tokenizer keeps "\\n" its own token), so encoding parts one by one
gives the ids of the whole string.

`CHAT_TEMPLATE` is the same template in Jinja, for `transformers`' `apply_chat_template(messages,
tools=…)`; tests check that both give the same string and the same ids. A call's `arguments`
is rendered as given when it is a JSON string (tiaoyu's records keep it compact,
`json.dumps(obj, ensure_ascii=False)`), and dumped that way when it is an object.
"""

from __future__ import annotations

import json
from typing import Iterator

from tiaoyu_cli.errors import TiaoyuError

IM_START, IM_END, THINK, END_THINK = "<|im_start|>", "<|im_end|>", "<think>", "</think>"
TOOL_CALL, END_TOOL_CALL, TOOL_RESPONSE, END_TOOL_RESPONSE = (
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
TOOL_TOKENS = [TOOL_CALL, END_TOOL_CALL, TOOL_RESPONSE, END_TOOL_RESPONSE]
CHAT_ROLES = ("system", "user", "assistant", "tool")

TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
              "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_TAIL = "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
TOOLS_FORMAT = '\n{"name": <function-name>, "arguments": <args-json-object>}\n'

Part = tuple[str, bool, int]  # (text, is a control token, learned by SFT)


def _s(v: str) -> str:  # a Jinja string literal
    return json.dumps(v, ensure_ascii=False)


# One logical line per statement, joined without whitespace: `-` trims everything between tags.
CHAT_TEMPLATE = "".join([
    "{%- if tools -%}",
    "{{- '<|im_start|>system\\n' -}}",
    "{%- if messages and messages[0]['role'] == 'system' -%}{{- messages[0]['content'] + '\\n\\n' -}}{%- endif -%}",
    "{{- " + _s(TOOLS_HEAD) + " -}}",
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}",
    "{{- " + _s(TOOLS_TAIL + TOOL_CALL + END_TOOL_CALL + " XML tags:\n" + TOOL_CALL + TOOLS_FORMAT + END_TOOL_CALL
                 + IM_END + "\n") + " -}}",
    "{%- endif -%}",
    "{%- for message in messages -%}",
    "{%- if tools and loop.first and message['role'] == 'system' -%}",
    "{%- elif message['role'] == 'tool' -%}",
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}",
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' -}}",
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}",
    "{%- else -%}",
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}",
    "{%- if message['role'] == 'assistant' and message['reasoning'] is defined "
    "and message['reasoning'] is not none -%}",
    "{{- '<think>' + message['reasoning'] + '</think>' -}}",
    "{%- endif -%}",
    "{%- if message['content'] is defined and message['content'] is not none -%}"
    "{{- message['content'] -}}{%- endif -%}",
    "{%- if message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] -%}",
    "{%- for call in message['tool_calls'] -%}",
    "{%- if call['function'] is defined -%}{%- set call = call['function'] -%}{%- endif -%}",
    "{%- if message['content'] or not loop.first -%}{{- '\\n' -}}{%- endif -%}",
    "{{- '<tool_call>\\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' -}}",
    "{%- if call['arguments'] is string -%}{{- call['arguments'] -}}"
    "{%- else -%}{{- call['arguments'] | tojson -}}{%- endif -%}",
    "{{- '}\\n</tool_call>' -}}",
    "{%- endfor -%}",
    "{%- endif -%}",
    "{{- '<|im_end|>\\n' -}}",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}",
])


def arguments_text(arguments) -> str:
    """A call's arguments as the template writes them: a JSON string as given, an object dumped compactly."""
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, ensure_ascii=False)


def call_function(call: dict) -> dict:
    """{"name", "arguments"} of an OpenAI tool call ({"function": {...}}) or of a bare {"name", "arguments"}."""
    return call["function"] if isinstance(call.get("function"), dict) else call


def call_text(name: str, arguments) -> str:
    """The JSON between <tool_call>\\n and \\n</tool_call>."""
    return '{"name": "' + name + '", "arguments": ' + arguments_text(arguments) + "}"


def check_messages(messages, tools=None) -> None:
    """TiaoyuError naming the message and the field when `messages` (or `tools`) cannot be rendered."""
    if not isinstance(messages, (list, tuple)):
        raise TiaoyuError(f"chat messages must be a list, got {type(messages).__name__}")
    if tools is not None and not (isinstance(tools, (list, tuple)) and all(isinstance(t, dict) for t in tools)):
        raise TiaoyuError("tools must be a list of JSON schema objects")
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TiaoyuError(f"chat message {k} must be an object with role and content, got {type(m).__name__}")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise TiaoyuError(f"chat message {k}: unknown role {role!r} (expected one of {', '.join(CHAT_ROLES)})")
        calls = m.get("tool_calls") if role == "assistant" else None
        content = m.get("content")
        if not isinstance(content, str) and not (calls and content is None):
            raise TiaoyuError(f"chat message {k} ({role}): content must be a string, got {type(content).__name__}")
        r = m.get("reasoning")
        if r is not None and not isinstance(r, str):
            raise TiaoyuError(f"chat message {k} ({role}): reasoning must be a string, got {type(r).__name__}")
        if calls is not None:
            if not isinstance(calls, list):
                raise TiaoyuError(f"chat message {k}: tool_calls must be a list")
            for j, c in enumerate(calls):
                f = call_function(c) if isinstance(c, dict) else None
                if not (isinstance(f, dict) and isinstance(f.get("name"), str)
                        and isinstance(f.get("arguments"), (str, dict))):
                    raise TiaoyuError(f"chat message {k}: tool_calls[{j}] must be "
                                      '{"function": {"name": str, "arguments": JSON string or object}}')


def uses_tools(messages, tools=None) -> bool:
    """True when rendering needs the tool control tokens."""
    return bool(tools) or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def chat_parts(messages: list[dict], tools: list[dict] | None = None,
               add_generation_prompt: bool = False) -> Iterator[Part]:
    """The template as (text, control, learn) parts; see the module docstring."""
    def ctl(tok: str, learn: int = 0) -> Part:
        return (tok, True, learn)

    skip_first = False
    if tools:
        yield ctl(IM_START)
        head = "system\n"
        if messages and messages[0]["role"] == "system":
            head += messages[0]["content"] + "\n\n"
            skip_first = True
        schemas = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
        yield (head + TOOLS_HEAD + schemas + TOOLS_TAIL, False, 0)
        yield ctl(TOOL_CALL)
        yield ctl(END_TOOL_CALL)
        yield (" XML tags:\n", False, 0)
        yield ctl(TOOL_CALL)
        yield (TOOLS_FORMAT, False, 0)
        yield ctl(END_TOOL_CALL)
        yield ctl(IM_END)
        yield ("\n", False, 0)
    n = len(messages)
    for k, m in enumerate(messages):
        role = m["role"]
        if k == 0 and skip_first:
            continue
        if role == "tool":
            if k == 0 or messages[k - 1]["role"] != "tool":
                yield ctl(IM_START)
                yield ("user", False, 0)
            yield ("\n", False, 0)
            yield ctl(TOOL_RESPONSE)
            yield ("\n" + m["content"] + "\n", False, 0)
            yield ctl(END_TOOL_RESPONSE)
            if k == n - 1 or messages[k + 1]["role"] != "tool":
                yield ctl(IM_END)
                yield ("\n", False, 0)
            continue
        learn = 1 if role == "assistant" else 0
        yield ctl(IM_START)
        yield (role + "\n", False, 0)
        if role == "assistant" and m.get("reasoning") is not None:
            yield ctl(THINK, 1)
            yield (m["reasoning"], False, 1)
            yield ctl(END_THINK, 1)
        content = m.get("content") or ""
        calls = m.get("tool_calls") if role == "assistant" else None
        yield (content, False, learn)
        for j, c in enumerate(calls or []):
            f = call_function(c)
            if content or j:
                yield ("\n", False, 1)
            yield ctl(TOOL_CALL, 1)
            yield ("\n" + call_text(f["name"], f["arguments"]) + "\n", False, 1)
            yield ctl(END_TOOL_CALL, 1)
        yield ctl(IM_END, learn)
        yield ("\n", False, 0)
    if add_generation_prompt:
        yield ctl(IM_START)
        yield ("assistant\n", False, 0)
