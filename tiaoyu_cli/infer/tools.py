"""Tools a model may call: a registry of callables with OpenAI function schemas, and running one call.

    box = Toolbox.from_names(["calculator"], module="my_tools.py")
    box.schemas()                                  # what the chat template renders in <tools></tools>
    call = box.run_text('{"name": "calculator", "arguments": {"expression": "2+3"}}')
    call.name, call.arguments, call.result         # "calculator", '{"expression": "2+3"}', "5"

A tool is any Python callable plus its schema: `tool_from_callable(fn)` reads the schema from the
function's type hints and docstring (first paragraph = description, an `Args:` section or
`:param x:` lines = parameter descriptions); `tool_from_callable(fn, schema=...)` takes a given one.
`register_builtin(name, factory)` adds a tool `--tools NAME` can name (the retrieval issue's
`search(query: str) -> str` plugs in this way). `--tools-module FILE` loads every public function
defined in FILE (or the list `TOOLS` when FILE defines one). Loading it runs the file's top-level code,
and its functions run in this process with arguments the model chose: use only a file you trust, and
write its functions for hostile arguments.

Nothing the model writes can crash or stall the caller: a call that is not JSON, is longer than
`MAX_CALL_CHARS` or nested deeper than `MAX_CALL_DEPTH`, names no known tool, has missing, unknown or
mistyped arguments, whose tool raises, or that runs past the toolbox's time limit (`timeout`,
`--tool-timeout`) becomes an error *result* ("error: …") that the model reads in its next turn.

The time limit: every call runs on the toolbox's daemon worker thread (one, reused) and the caller
waits at most `timeout` seconds. Python cannot stop a thread, so a call past the limit keeps running
in the background on its worker, which is then abandoned (it ends after that call; a daemon thread does
not keep the process alive) and the next call gets a new one; while `MAX_RUNAWAY` such calls of one
toolbox are still running, its further calls are refused (an error result) rather than started.
"""

from __future__ import annotations

import contextvars
import importlib.util
import inspect
import json
import os
import queue
import re
import sys
import threading
import types
import typing
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.infer.calculator import calculator
from tiaoyu_cli.infer.retrieval import SEARCH_SCHEMA
from tiaoyu_cli.io import MAX_JSON_DEPTH, check_json_nesting, loads_limited

MAX_RESULT_CHARS = 4000
MAX_CALL_CHARS = 100_000  # a tool call's JSON text
MAX_CALL_DEPTH = MAX_JSON_DEPTH  # brackets nested in it
DEFAULT_TIMEOUT = 10.0  # seconds one tool call may run (--tool-timeout)
MAX_RUNAWAY = 4  # calls past their time limit still running, after which a toolbox starts no more


@dataclass
class Tool:
    name: str
    fn: Callable[..., Any]
    schema: dict  # {"type": "function", "function": {"name", "description", "parameters"}}

    @property
    def parameters(self) -> dict:
        return self.schema["function"].get("parameters", {"type": "object", "properties": {}})


@dataclass
class ToolCall:
    """One call the model made and what came back."""

    name: str
    arguments: str  # compact JSON object (what the template renders); the raw text when it did not parse
    result: str
    error: bool = False
    id: str = ""

    def to_dict(self) -> dict:
        try:
            args: Any = loads_limited(self.arguments, MAX_CALL_DEPTH, MAX_CALL_CHARS)
        except ValueError:
            args = self.arguments
        return {"name": self.name, "arguments": args, "result": self.result, **({"error": True} if self.error else {})}


# ---- schemas from Python functions ------------------------------------------------------------------

_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}


def _json_type(hint: Any, where: str) -> dict:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint in _SIMPLE:
        return {"type": _SIMPLE[hint]}
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _json_type(rest[0], where)
    if origin is typing.Literal and args and all(isinstance(a, (str, int)) for a in args):
        return {"type": "string" if isinstance(args[0], str) else "integer", "enum": list(args)}
    if origin in (list, tuple) and len(args) >= 1:
        return {"type": "array", "items": _json_type(args[0], where)}
    if origin is dict:
        return {"type": "object"}
    raise TiaoyuError(f"{where}: type {hint!r} has no JSON schema (use str, int, float, bool, list[...], dict, "
                      "Literal[...] or Optional of these)")


def _doc_parts(doc: str) -> tuple[str, dict[str, str]]:
    """(description, {param: description}) of a Google-style or reST docstring."""
    doc = inspect.cleandoc(doc or "")
    params: dict[str, str] = {}
    for m in re.finditer(r"^\s*:param\s+(?:\w+\s+)?(\w+):\s*(.+)$", doc, re.M):
        params[m.group(1)] = m.group(2).strip()
    sec = re.search(r"^(Args|Arguments|Parameters):\s*$(.*?)(?=^\S|\Z)", doc, re.M | re.S)
    if sec:
        for m in re.finditer(r"^\s+(\w+)\s*(?:\([^)]*\))?\s*:\s*(.+)$", sec.group(2), re.M):
            params[m.group(1)] = m.group(2).strip()
    head = re.split(r"\n\s*\n|^\s*(?:Args|Arguments|Parameters|Returns|Raises):|^\s*:param", doc, maxsplit=1,
                    flags=re.M)[0]
    return " ".join(head.split()), params


def schema_from_callable(fn: Callable, name: str | None = None, where: str | None = None) -> dict:
    """The OpenAI function schema of a typed, documented function."""
    name = name or fn.__name__
    where = where or f"tool {name!r}"
    desc, pdocs = _doc_parts(fn.__doc__ or "")
    if not desc:
        raise TiaoyuError(f"{where}: the function needs a docstring (its first line describes the tool to the model)")
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:  # an unresolvable annotation
        raise TiaoyuError(f"{where}: cannot read its type hints ({e})") from None
    props: dict[str, dict] = {}
    required: list[str] = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name not in hints:
            raise TiaoyuError(f"{where}: parameter {p.name!r} needs a type hint")
        prop = _json_type(hints[p.name], f"{where}, parameter {p.name!r}")
        if p.name in pdocs:
            prop["description"] = pdocs[p.name]
        props[p.name] = prop
        if p.default is p.empty:
            required.append(p.name)
    return {"type": "function", "function": {"name": name, "description": desc,
                                             "parameters": {"type": "object", "properties": props,
                                                            "required": required}}}


def tool_from_callable(fn: Callable, name: str | None = None, schema: dict | None = None) -> Tool:
    """A Tool from a callable: its schema given, or read from its type hints and docstring."""
    if schema is None:
        schema = schema_from_callable(fn, name)
    elif "function" not in schema:
        schema = {"type": "function", "function": schema}
    return Tool(schema["function"]["name"], fn, schema)


# ---- built-in tools --------------------------------------------------------------------------------------

def _no_index(query: str) -> str:
    return "error: no documents to search (start the model with --retrieve DOCS.jsonl or --retrieve index/)"


_BUILTINS: dict[str, Callable[[], Tool]] = {
    "calculator": lambda: tool_from_callable(calculator),
    # the search tool's schema is fixed; what it searches is set by use_search (--retrieve)
    "search": lambda: tool_from_callable(_no_index, schema=SEARCH_SCHEMA),
}


def use_search(search: Callable[[str], str]) -> None:
    """`--tools search --retrieve SRC`: the search tool answers from `search(query)` (infer/retrieval.make_search)."""
    register_builtin("search", lambda: tool_from_callable(search, schema=SEARCH_SCHEMA))


def register_builtin(name: str, factory: Callable[[], Tool]) -> None:
    """Make `--tools NAME` available: `factory()` builds the Tool when asked for (e.g. loads an index)."""
    _BUILTINS[name] = factory


def builtin_names() -> list[str]:
    return sorted(_BUILTINS)


def load_tools_module(path: str | os.PathLike) -> list[Tool]:
    """Tools from a Python file: its list `TOOLS` (callables or Tools), else every public function defined there."""
    p = Path(path)
    if not p.is_file():
        raise TiaoyuError(f"--tools-module {p}: no such file")
    mod_name = "tiaoyu_user_tools_" + re.sub(r"\W", "_", p.stem)
    spec = importlib.util.spec_from_file_location(mod_name, p)
    if spec is None or spec.loader is None:
        raise TiaoyuError(f"--tools-module {p}: not a Python file")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as e:
        raise TiaoyuError(f"--tools-module {p}: importing it failed: {type(e).__name__}: {e}") from None
    items = getattr(mod, "TOOLS", None)
    if items is None:
        items = [v for k, v in vars(mod).items() if inspect.isfunction(v) and not k.startswith("_")
                 and v.__module__ == mod_name]
    tools = []
    for v in items:
        if isinstance(v, Tool):
            tools.append(v)
        elif callable(v):
            tools.append(Tool(v.__name__, v, schema_from_callable(v, where=f"{p}: function {v.__name__!r}")))
        else:
            raise TiaoyuError(f"{p}: TOOLS holds {v!r}, which is not a function")
    if not tools:
        raise TiaoyuError(f"--tools-module {p}: defines no public functions")
    return tools


def check_timeout(timeout: float | None) -> float | None:
    if timeout is not None and not (isinstance(timeout, (int, float)) and 0 < timeout < float("inf")):
        raise TiaoyuError(f"--tool-timeout must be a number of seconds > 0, got {timeout!r}")
    return None if timeout is None else float(timeout)


class Toolbox:
    """The tools of one session, by name. `timeout`: seconds each call may run (None: no limit)."""

    def __init__(self, tools: list[Tool] | None = None, timeout: float | None = DEFAULT_TIMEOUT):
        self.tools: dict[str, Tool] = {}
        self.timeout = check_timeout(timeout)
        self._runaway: list[threading.Thread] = []  # workers abandoned with a call past its time limit
        self._worker: _Worker | None = None
        self._lock = threading.Lock()  # one call at a time: a queued call's wait must not count another's time
        for t in tools or []:
            self.add(t)

    def add(self, tool: Tool) -> None:
        if tool.name in self.tools:
            raise TiaoyuError(f"two tools are named {tool.name!r}")
        self.tools[tool.name] = tool

    @classmethod
    def from_names(cls, names: list[str] | str | None = None, module: str | os.PathLike | None = None,
                   timeout: float | None = DEFAULT_TIMEOUT) -> "Toolbox":
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        box = cls(timeout=timeout)
        for n in names or []:
            if n not in _BUILTINS:
                raise TiaoyuError(f"--tools: unknown tool {n!r} (built in: {', '.join(builtin_names())}; "
                                  "your own: --tools-module FILE)")
            box.add(_BUILTINS[n]())
        if module is not None:
            for t in load_tools_module(module):
                box.add(t)
        return box

    def __len__(self) -> int:
        return len(self.tools)

    def __bool__(self) -> bool:
        return bool(self.tools)

    def schemas(self) -> list[dict]:
        return [t.schema for t in self.tools.values()]

    def run(self, name: str, arguments: dict) -> tuple[str, bool]:
        """(result text, is an error). Never raises for anything the model wrote or the tool did."""
        tool = self.tools.get(name)
        if tool is None:
            return f"error: unknown tool {name!r} (tools: {', '.join(self.tools) or 'none'})", True
        problem = check_arguments(tool.parameters, arguments)
        if problem:
            return f"error: {problem}", True
        if self.timeout is None:
            return _call(tool, arguments)
        with self._lock:
            self._runaway = [t for t in self._runaway if t.is_alive()]
            if len(self._runaway) >= MAX_RUNAWAY:
                return (f"error: {len(self._runaway)} earlier tool calls ran past the {self.timeout:g} s limit and "
                        "are still running; no new call is started", True)
            if self._worker is None:
                self._worker = _Worker()
                weakref.finalize(self, self._worker.jobs.put, None)  # the idle worker ends with its toolbox
            box: list[tuple[str, bool]] = []
            done = threading.Event()
            grad = _grad_mode()
            ctx = contextvars.copy_context()

            def job() -> None:
                try:
                    ctx.run(_call_into, box, tool, arguments, grad)
                finally:
                    done.set()

            self._worker.jobs.put(job)
            if not done.wait(self.timeout):
                self._runaway.append(self._worker.thread)
                self._worker.jobs.put(None)  # it ends once the late call returns
                self._worker = None
                return f"error: the tool call took longer than {self.timeout:g} s", True
            return box[0] if box else ("error: the tool call failed", True)

    def run_text(self, text: str, call_id: str = "") -> ToolCall:
        """Parse the JSON between <tool_call> and </tool_call> and run it."""
        try:
            name, args = parse_call(text)
        except ValueError as e:
            return ToolCall(_guess_name(text), text.strip(), f"error: {e}", True, call_id)
        result, err = self.run(name, args)
        return ToolCall(name, json.dumps(args, ensure_ascii=False), result, err, call_id)


class _Worker:
    """A daemon thread running a toolbox's calls one after another (None on its queue ends it)."""

    def __init__(self):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="tiaoyu tool worker")
        self.thread.start()

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            job()


def _grad_mode() -> bool | None:
    """torch's grad mode is per thread: a worker starts with the caller's (None: torch not loaded)."""
    torch = sys.modules.get("torch")
    return None if torch is None else torch.is_grad_enabled()


def _call_into(box: list, tool: Tool, arguments: dict, grad: bool | None) -> None:
    if grad is not None:
        sys.modules["torch"].set_grad_enabled(grad)
    box.append(_call(tool, arguments))


def _call(tool: Tool, arguments: dict) -> tuple[str, bool]:
    """Run one call and turn whatever comes back, or goes wrong, into (text, is an error)."""
    try:
        out = tool.fn(**arguments)
        text = out if isinstance(out, str) else json.dumps(out, ensure_ascii=False, default=str)
    except RecursionError:
        return "error: RecursionError: the tool recursed too deeply (or returned too deeply nested data)", True
    except BaseException as e:  # the tool's own failure (even SystemExit) is the model's information, not our crash
        try:
            return f"error: {type(e).__name__}: {e}"[:MAX_RESULT_CHARS], True
        except Exception:
            return f"error: {type(e).__name__}", True
    if len(text) > MAX_RESULT_CHARS:
        text = text[:MAX_RESULT_CHARS] + " …(cut)"
    return text, text.startswith("error:")


_JSON_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
               "object": (dict,), "array": (list,)}


def check_arguments(params: dict, args: dict) -> str | None:
    """What is wrong with `args` for a JSON schema of type object (None when nothing)."""
    props = params.get("properties", {}) or {}
    missing = [k for k in params.get("required", []) if k not in args]
    if missing:
        return f"missing argument(s) {', '.join(missing)}"
    unknown = [k for k in args if props and k not in props]
    if unknown:
        return f"unknown argument(s) {', '.join(unknown)} (expected {', '.join(props)})"
    for k, v in args.items():
        want = (props.get(k) or {}).get("type")
        ok = _JSON_TYPES.get(want)
        if ok and (not isinstance(v, ok) or (isinstance(v, bool) and want != "boolean")):
            return f"argument {k!r} must be of type {want}, got {type(v).__name__}"
    return None


def parse_call(text: str) -> tuple[str, dict]:
    """(name, arguments) of a call's JSON text; ValueError saying what is wrong (also for text longer than
    MAX_CALL_CHARS or nested deeper than MAX_CALL_DEPTH, checked before parsing)."""
    if not isinstance(text, str):
        raise ValueError("the tool call is not text")
    problem = check_json_nesting(text, MAX_CALL_DEPTH, MAX_CALL_CHARS)
    if problem is not None:
        raise ValueError(f"the tool call is {problem}")
    try:
        obj = loads_limited(text, MAX_CALL_DEPTH, MAX_CALL_CHARS)
    except json.JSONDecodeError as e:
        raise ValueError(f"the tool call is not valid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError('a tool call is {"name": <function-name>, "arguments": {…}}')
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = loads_limited(args, MAX_CALL_DEPTH, MAX_CALL_CHARS) if args.strip() else {}
        except json.JSONDecodeError:
            raise ValueError("the arguments are not valid JSON") from None
    if not isinstance(args, dict):
        raise ValueError("the arguments must be a JSON object")
    return obj["name"], args


def _guess_name(text: str) -> str:
    m = re.search(r'"name"\s*:\s*"([^"]{1,64})"', text)
    return m.group(1) if m else ""


_TRUST = ("Loading it runs its top-level code, and its functions run in this process with arguments the model "
          "chooses (under --tool-timeout): use only a file you trust")


@dataclass
class ToolOptions:
    """The tool flags of every command whose model may call tools (chat, rlhf grpo, reason --rl)."""

    tools: Optional[str] = field(default=None, metadata={
        "help": "tools the model may call, comma-separated (`tiaoyu tools` lists them), e.g. calculator"})
    tools_module: Optional[Path] = field(default=None, metadata={
        "help": "a Python file whose typed, documented functions are tools. " + _TRUST})
    max_tool_calls: int = field(default=5, metadata={"help": "most tool calls per answer"})
    tool_timeout: float = field(default=10.0, metadata={
        "help": "seconds each tool call may run; past that the model reads an error"})
    tool_call_penalty: float = field(default=0.0, metadata={
        "help": "RL: reward minus this per call that came back as an error"})

    @property
    def wanted(self) -> bool:
        return bool(self.tools or self.tools_module)

    def toolbox(self):
        """The Toolbox these flags name, or None when they name no tool."""
        return Toolbox.from_names(self.tools, self.tools_module, timeout=self.tool_timeout) if self.wanted else None
