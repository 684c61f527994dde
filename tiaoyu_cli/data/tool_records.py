"""Tool calls in chat records: the OpenAI chat format on disk, checked and normalised.

    {"messages": [
        {"role": "user", "content": "What is 123 * 456?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "calculator", "arguments": "{\\"expression\\": \\"123*456\\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "56088"},
        {"role": "assistant", "content": "123 × 456 = 56088."}],
     "tools": [{"type": "function", "function": {"name": "calculator", "description": …, "parameters": {…}}}]}

Rules (each break is an error naming the field; prep and the chat dataset add file and line):
  * `arguments` is a JSON object, written as a JSON string; it is kept compact
    (`json.dumps(obj, ensure_ascii=False)`), the form the chat template renders and models learn.
  * every `tool` message answers a call made before it, by `tool_call_id`; a tool message with no
    call before it, or an id no earlier call has, is an error. Formats without ids (ShareGPT
    `function_call`/`observation` turns, Hermes text) get ids `call_N` and answer calls in order.
  * JSON in a record (arguments, a call's text, `tools`) is nested at most 64 levels deep
    (`io.MAX_JSON_DEPTH`, checked before parsing: deeper text is a RecordError, not a RecursionError).
  * `tools` holds OpenAI function schemas `{"type": "function", "function": {"name", "description",
    "parameters"}}` (a bare `{"name", …}` is wrapped; a JSON string of that list is read).

`RecordError` carries the field; callers turn it into their own error type.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tiaoyu_cli.io import MAX_JSON_DEPTH, check_json_nesting, loads_limited

TOOL_ROLES = {"tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool"}
CALL_ROLES = ("function_call", "tool_call", "tool_calls")  # ShareGPT turns whose value is the call JSON
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_HERMES_RESPONSE = re.compile(r"<tool_response>\s*(.*?)\s*</tool_response>", re.S)
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class RecordError(ValueError):
    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def _kind(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _loads(text: str, what: str, field: str, invalid: str) -> Any:
    """json.loads of record text, the nesting checked first: a RecordError "{what} is nested …" when too
    deep, `invalid` (formatted with e and text) when not JSON."""
    problem = check_json_nesting(text, MAX_JSON_DEPTH)
    if problem is not None:
        raise RecordError(f"{what} is {problem}", field)
    try:
        return loads_limited(text, MAX_JSON_DEPTH)
    except json.JSONDecodeError as e:
        raise RecordError(invalid.format(e=e, text=text[:80]), field) from None


def _dumps(obj: Any, what: str, field: str) -> str:
    """Compact JSON of an already-parsed object, nested at most MAX_JSON_DEPTH deep (as parsed text would be)."""
    try:
        text = json.dumps(obj, ensure_ascii=False)
    except RecursionError:
        raise RecordError(f"{what} is nested too deeply", field) from None
    except (TypeError, ValueError) as e:
        raise RecordError(f"{what} is not JSON ({e})", field) from None
    problem = check_json_nesting(text, MAX_JSON_DEPTH)
    if problem is not None:
        raise RecordError(f"{what} is {problem}", field)
    return text


def canonical_arguments(v: Any, field: str) -> str:
    """The compact JSON string of a call's arguments (a JSON string or an object)."""
    if isinstance(v, str):
        obj = _loads(v, "the arguments text", field,
                     "arguments are not valid JSON ({e.msg} at char {e.pos}): {text!r}") if v.strip() else {}
    else:
        obj = v
    if not isinstance(obj, dict):
        raise RecordError(f"arguments must be a JSON object, got {_kind(obj)}", field)
    return _dumps(obj, "the arguments object", field)


def check_name(name: Any, field: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise RecordError(f"a function name is 1-64 letters, digits, _ . or -, got {name!r}", field)
    return name


def normalise_call(c: Any, field: str, default_id: str) -> dict:
    """{"id", "type": "function", "function": {"name", "arguments": JSON string}} from an OpenAI call or a
    bare {"name", "arguments"} object."""
    if not isinstance(c, dict):
        raise RecordError(f"expected a tool call object, got {_kind(c)}", field)
    f = c.get("function") if isinstance(c.get("function"), dict) else c
    if "function" in c and not isinstance(c["function"], dict):
        raise RecordError(f"expected an object, got {_kind(c['function'])}", f"{field}.function")
    fp = f"{field}.function" if f is not c else field
    name = check_name(f.get("name"), f"{fp}.name")
    if "arguments" not in f and "parameters" in f:  # some datasets name them so
        f = dict(f, arguments=f["parameters"])
    args = canonical_arguments(f.get("arguments", {}), f"{fp}.arguments")
    cid = c.get("id", default_id)
    if not isinstance(cid, str) or not cid:
        raise RecordError(f"expected a non-empty string, got {cid!r}", f"{field}.id")
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


def normalise_calls(calls: Any, field: str, counter: list[int]) -> list[dict]:
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise RecordError(f"expected a non-empty list of tool calls, got {_kind(calls)}", field)
    out = []
    for j, c in enumerate(calls):
        counter[0] += 1
        out.append(normalise_call(c, f"{field}[{j}]", f"call_{counter[0]}"))
    return out


def calls_from_json_text(text: str, field: str, counter: list[int]) -> list[dict]:
    """A ShareGPT `function_call` turn: its value is the call (or a list of calls) as JSON."""
    obj = _loads(text, "the function call", field, "the function call is not valid JSON ({e.msg}): {text!r}")
    return normalise_calls(obj, field, counter)


def split_hermes_calls(text: str, field: str, counter: list[int]) -> tuple[str, list[dict]]:
    """Hermes/Qwen assistant text: (the text outside the <tool_call>…</tool_call> blocks, the calls)."""
    calls = []
    for j, m in enumerate(_HERMES_CALL.finditer(text)):
        obj = _loads(m.group(1), f"<tool_call> {j}", field,
                     f"<tool_call> {j} does not hold valid JSON ({{e.msg}}): {{text!r}}")
        counter[0] += 1
        calls.append(normalise_call(obj, f"{field} <tool_call> {j}", f"call_{counter[0]}"))
    rest = _HERMES_CALL.sub("", text).strip()
    return rest, calls


def split_hermes_responses(text: str) -> list[str]:
    """The results inside <tool_response>…</tool_response> blocks (the text itself when there are none)."""
    found = [m.group(1) for m in _HERMES_RESPONSE.finditer(text)]
    return found or [text]


def link_tool_messages(msgs: list[dict], field: str) -> None:
    """Check (and, where missing, assign) every tool message's `tool_call_id`, in place."""
    known: set[str] = set()
    pending: list[str] = []  # calls of the latest assistant turn not answered yet, in order
    for i, m in enumerate(msgs):
        if m["role"] == "assistant" and m.get("tool_calls"):
            ids = [c["id"] for c in m["tool_calls"]]
            if len(set(ids)) != len(ids) or known & set(ids):
                raise RecordError("tool call ids must be unique in a conversation", f"{field}[{i}].tool_calls")
            known |= set(ids)
            pending = list(ids)
        elif m["role"] == "tool":
            if not known:
                raise RecordError("a tool message with no tool call before it", f"{field}[{i}]")
            cid = m.get("tool_call_id")
            if cid is None:
                if not pending:
                    raise RecordError("more tool results than calls before them", f"{field}[{i}]")
                m["tool_call_id"] = pending.pop(0)
            elif not isinstance(cid, str) or cid not in known:
                raise RecordError(f"unknown tool_call_id {cid!r} (the calls before it are "
                                  f"{', '.join(sorted(known))})", f"{field}[{i}].tool_call_id")
            elif cid in pending:
                pending.remove(cid)


def check_tools(tools: Any, field: str = "tools") -> list[dict]:
    """OpenAI function schemas, normalised to {"type": "function", "function": {name, [description], parameters}}."""
    if isinstance(tools, str):
        tools = _loads(tools, "the text", field, "not valid JSON ({e.msg})")
    if not isinstance(tools, list):
        raise RecordError(f"expected a list of function schemas, got {_kind(tools)}", field)
    out, names = [], set()
    for k, t in enumerate(tools):
        f = f"{field}[{k}]"
        if not isinstance(t, dict):
            raise RecordError(f"expected a function schema object, got {_kind(t)}", f)
        if "function" in t or "type" in t:
            if t.get("type") != "function":
                raise RecordError(f"only function tools are supported, got type {t.get('type')!r}", f"{f}.type")
            fn, fp = t.get("function"), f"{f}.function"
            if not isinstance(fn, dict):
                raise RecordError(f"expected an object, got {_kind(fn)}", fp)
        else:
            fn, fp = t, f
        name = check_name(fn.get("name"), f"{fp}.name")
        if name in names:
            raise RecordError(f"the tool {name!r} is listed twice", f"{fp}.name")
        names.add(name)
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise RecordError(f"expected a string, got {_kind(desc)}", f"{fp}.description")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict) or params.get("type", "object") != "object" \
                or not isinstance(params.get("properties", {}), dict):
            raise RecordError("parameters must be a JSON schema of type object with a properties object",
                              f"{fp}.parameters")
        norm = {"name": name}
        if desc is not None:
            norm["description"] = desc
        norm["parameters"] = params
        norm.update({k: v for k, v in fn.items() if k not in norm})
        _dumps(norm, "the schema", fp)  # the template renders it as JSON
        out.append({"type": "function", "function": norm})
    return out


def check_openai_messages(msgs: list[dict], field: str = "messages") -> None:
    """Validate the tool parts of already-shaped chat messages (roles/contents checked by the caller):
    assistant `tool_calls` (ids, names, arguments as a JSON object string) and tool messages' ids."""
    for i, m in enumerate(msgs):
        calls = m.get("tool_calls")
        if m["role"] == "assistant" and calls is not None:
            if not isinstance(calls, list) or not calls:
                raise RecordError(f"expected a non-empty list, got {_kind(calls)}", f"{field}[{i}].tool_calls")
            for j, c in enumerate(calls):
                fj = f"{field}[{i}].tool_calls[{j}]"
                if not isinstance(c, dict) or not isinstance(c.get("function"), dict):
                    raise RecordError('expected {"id", "type": "function", "function": {"name", "arguments"}}', fj)
                if not isinstance(c.get("id"), str) or not c["id"]:
                    raise RecordError("missing id (a tool message answers a call by its id)", f"{fj}.id")
                check_name(c["function"].get("name"), f"{fj}.function.name")
                a = c["function"].get("arguments")
                if not isinstance(a, str):
                    raise RecordError(f"expected a JSON string, got {_kind(a)}", f"{fj}.function.arguments")
                canonical_arguments(a, f"{fj}.function.arguments")
        elif calls is not None:
            raise RecordError("only assistant messages make tool calls", f"{field}[{i}].tool_calls")
        if m["role"] == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise RecordError("missing: a tool message names the call it answers", f"{field}[{i}].tool_call_id")
    link_tool_messages(msgs, field)
