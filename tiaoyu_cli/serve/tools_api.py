"""OpenAI function calling on `/v1/chat/completions`: `tools`, `tool_choice`, `tool_calls` back, `tool` messages in.

Request
    tools         OpenAI function schemas; rendered in the system turn (tokenizer/template.py). A schema
                  that is not one is a 400 naming the field.
    tool_choice   "auto" (default with tools): the model decides; "none": no tools in the prompt, the model
                  answers; "required": the answer starts with <tool_call>; {"type": "function",
                  "function": {"name": N}}: the answer starts with <tool_call>\\n{"name": "N", "arguments":
                  so the model only writes the arguments.
    messages      may hold assistant messages with `tool_calls` and `role: "tool"` messages answering them
                  by `tool_call_id` (an unknown id or a tool message with no call before it: 400).

Response
    The server does not run tools: it returns the calls the model wrote. Tokens between the control
    tokens <tool_call> and </tool_call> never reach `content`; each call becomes
    `{"id": "call_…", "type": "function", "function": {"name", "arguments": JSON string}}` in
    `message.tool_calls` and the finish reason is "tool_calls". Streaming sends, per call, a delta with its
    index, id, type and name (arguments "") and then a delta with the arguments, as the OpenAI API does.
    A call whose JSON does not parse is returned as text in `content`.

The engine side is one hook: `_Running` hands every token to `CallCollector.push` first (serve/server.py).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from tiaoyu_cli.data.tool_records import RecordError, check_openai_messages, check_tools
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.infer.session import build_prompt
from tiaoyu_cli.infer.tools import parse_call


class RequestError(ValueError):
    """A bad request (answered 400 naming `param`)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class ToolJob:
    """What a job with tools needs: the forced start of the answer (tool_choice), as text and ids."""

    forced_text: str | None = None  # the call text the prompt already holds (a named tool_choice)
    forced_ids: tuple[int, ...] = ()  # appended to the prompt


def tool_message(m: dict, i: int) -> dict:
    """A request's `tool` message or assistant message with `tool_calls`, normalised (RequestError if bad)."""
    where = f"messages[{i}]"
    content = m.get("content")
    if content is not None and not isinstance(content, str):
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            content = "".join(str(p.get("text", "")) for p in content)
        else:
            raise RequestError(f"{where}: content must be a string", "messages")
    if m.get("role") == "tool":
        return {"role": "tool", "tool_call_id": m.get("tool_call_id"), "content": content or ""}
    calls = m.get("tool_calls")
    if not isinstance(calls, list):
        raise RequestError(f"{where}.tool_calls must be a list", "messages")
    norm = []
    for j, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict):
            raise RequestError(f"{where}.tool_calls[{j}] must be {{\"id\", \"type\": \"function\", \"function\": "
                               "{\"name\", \"arguments\"}}", "messages")
        norm.append({"id": c.get("id"), "type": "function",
                     "function": {"name": f.get("name"), "arguments": f.get("arguments")}})
    return {"role": "assistant", "content": content or "", "tool_calls": norm}


def check_messages(msgs: list[dict]) -> None:
    if any(m["role"] == "tool" or m.get("tool_calls") for m in msgs):
        try:
            check_openai_messages(msgs)
        except RecordError as e:
            raise RequestError(f"{e.field}: {e}", "messages") from None


def parse_request(body: dict) -> tuple[list[dict] | None, object]:
    """(tool schemas or None, tool_choice) of a request; RequestError naming the field when bad."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise RequestError("tool_choice needs tools", "tool_choice")
        return None, "none"
    try:
        schemas = check_tools(tools, "tools")
    except RecordError as e:
        raise RequestError(f"invalid 'tools': {e.field}: {e}", "tools") from None
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        f = choice.get("function")
        name = f.get("name") if isinstance(f, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise RequestError('tool_choice must be "auto", "none", "required" or {"type": "function", '
                               '"function": {"name": …}}', "tool_choice")
        if name not in {s["function"]["name"] for s in schemas}:
            raise RequestError(f"tool_choice names {name!r}, which is not in tools", "tool_choice")
    elif choice not in ("auto", "none", "required"):
        raise RequestError('tool_choice must be "auto", "none", "required" or a named function', "tool_choice")
    return schemas, choice


def chat_prompt(tok, mode: str, msgs: list[dict], schemas: list[dict] | None, choice,
                render_schemas: bool = True) -> tuple[list[int], ToolJob | None]:
    """The prompt ids of a chat request and its ToolJob (None when the answer is not parsed for calls).
    `render_schemas=False` (serve --no-tool-schemas) leaves the <tools> block out of the prompt."""
    uses = schemas is not None or any(m["role"] == "tool" or m.get("tool_calls") for m in msgs)
    if not uses:
        return build_prompt(tok, mode, msgs, None), None
    if mode != "chat":
        raise RequestError("tools need a chat checkpoint (this server continues plain text)", "tools")
    try:
        tok.require_tool_tokens()
        render = schemas if choice != "none" and render_schemas else None
        ids = tok.encode_chat(msgs, add_generation_prompt=True, tools=render)[0]
    except TiaoyuError as e:
        raise RequestError(str(e), "tools" if schemas else "messages") from None
    if choice == "none" or schemas is None:
        return ids, None
    if choice == "required":
        return ids + [tok.tool_call_id], ToolJob("", (tok.tool_call_id,))
    if isinstance(choice, dict):
        text = '\n{"name": "' + choice["function"]["name"] + '", "arguments": '
        forced = (tok.tool_call_id, *tok.encode(text))
        return ids + list(forced), ToolJob(text, forced)
    return ids, ToolJob()


class CallCollector:
    """Per running job: keeps the tokens of each <tool_call>…</tool_call> out of the text and sends
    ("tool_call", json text) events."""

    def __init__(self, tj: ToolJob, tokenizer):
        self.tok = tokenizer
        self.in_call = tj.forced_text is not None
        self.prefix = (tj.forced_text or "") if self.in_call else ""
        self.buf: list[int] = []

    def push(self, token: int, running) -> bool:
        """True when the token belongs to a call (the caller does nothing more with it)."""
        tok = self.tok
        if token == tok.tool_call_id and not self.in_call:
            for p in running.decoder.flush():  # the text before the call goes out first
                running._emit([p])
            self.in_call, self.prefix, self.buf = True, "", []
            return True
        if not self.in_call:
            return False
        if token == tok.end_tool_call_id:
            running.job.put(("tool_call", (self.prefix + tok.decode(self.buf)).strip()))
            self.in_call, self.prefix, self.buf = False, "", []
        else:
            self.buf.append(token)
        return True


def call_object(text: str) -> dict | None:
    """An OpenAI tool_calls entry from the JSON text of one <tool_call>, or None when it is not a well-formed call."""
    try:
        name, args = parse_call(text)
    except ValueError:
        return None
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
