"""`tiaoyu tools`: the tools a model can call — built in, or from your own Python module.

    tiaoyu tools                                  # names and descriptions
    tiaoyu tools --json                           # their OpenAI schemas, exactly what the template renders
    tiaoyu tools --tools-module my_tools.py       # add your typed, documented functions
    tiaoyu tools --run '{"name": "calculator", "arguments": {"expression": "123*456"}}'
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

EXAMPLES = """
Examples:

  tiaoyu tools --json

  tiaoyu tools --tools-module my_tools.py --json

  tiaoyu tools --run '{"name": "calculator", "arguments": {"expression": "(2+3)*4"}}'

  tiaoyu chat ckpt/sft --tools calculator --prompt "What is 123 * 456?"
"""


def register(app: typer.Typer) -> None:
    @app.command("tools", epilog=EXAMPLES, help="List the tools models can call (--json: their OpenAI schemas).")
    def tools(
        names: Optional[str] = typer.Option(None, "--tools", help="only these built-in tools, comma-separated "
                                            "(default: all built in)"),
        tools_module: Optional[Path] = typer.Option(None, "--tools-module",
                                                    help="a Python file whose typed, documented functions are tools. "
                                                    "Loading it runs its top-level code, and its functions run in "
                                                    "this process with the arguments of the call (under "
                                                    "--tool-timeout): use only a file you trust"),
        as_json: bool = typer.Option(False, "--json", help="print the OpenAI function schemas as a JSON list"),
        run: Optional[str] = typer.Option(None, "--run", help='run one call: {"name": …, "arguments": {…}}'),
        tool_timeout: float = typer.Option(10.0, "--tool-timeout", help="--run: seconds the call may run before it "
                                           "returns an error"),
    ) -> None:
        from tiaoyu_cli.infer.tools import Toolbox, builtin_names

        box = Toolbox.from_names(names if names is not None else builtin_names(), tools_module, timeout=tool_timeout)
        if run is not None:
            call = box.run_text(run)
            sys.stdout.write(json.dumps(call.to_dict(), ensure_ascii=False) + "\n")
            if call.error:
                raise typer.Exit(1)
            return
        if as_json:
            sys.stdout.write(json.dumps(box.schemas(), ensure_ascii=False, indent=2) + "\n")
            return
        from tiaoyu_cli.console import console

        for t in box.tools.values():
            f = t.schema["function"]
            params = ", ".join(f"{k}: {v.get('type', '?')}" for k, v in t.parameters.get("properties", {}).items())
            console.print(f"[bold]{t.name}[/]({params})  {f.get('description', '')}", highlight=False)
