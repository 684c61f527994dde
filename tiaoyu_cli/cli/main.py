"""`tiaoyu` entry point: one typer app, one thin module per subcommand.

Each module in COMMANDS lives at tiaoyu_cli/cli/<name>.py and defines `register(app)`, which adds
its command (or sub-app) to the root app. A subcommand is listed here only once it is real.
"""

from __future__ import annotations

import importlib
import sys

import typer

from tiaoyu_cli.errors import TiaoyuError

COMMANDS: list[str] = [
    "synth",
    "prep",
    "tokenize",
    "pretrain",
    "chat",
    "eval",
    "export",
    "serve",
    "sft",
    "lora",
    "distill",
    "rlhf",
    "reason",
    "report",
    "index",
    "tools",
]

OVERVIEW = """tiaoyu trains a small language model through its whole life, one subcommand per stage:

  raw files ──prep──▶ data.jsonl ──tokenize train──▶ tok/ ──tokenize encode──▶ tokens/
  tokens/ ──pretrain──▶ ckpt/base ──sft──▶ ckpt/sft ──rlhf | lora | distill | reason──▶ ckpt/…
  any checkpoint ──chat | serve | eval | export

Next: `make demo` (in a checkout) runs every stage on the bundled data, or start by hand with
  tiaoyu synth data/
`tiaoyu --help` lists the commands; `tiaoyu COMMAND --help` shows a command's options and examples.
"""

EXAMPLES = """
Examples:

  tiaoyu synth data/                                          # the bundled synthetic corpus

  tiaoyu tokenize train data/text.train.jsonl -o tok/ --vocab-size 1024

  tiaoyu tokenize encode data/text.train.jsonl --tokenizer tok/ -o tokens/

  tiaoyu pretrain tokens/ -o ckpt/base --preset tiny --max-steps 1500

  tiaoyu sft ckpt/base data/chat.train.jsonl -o ckpt/sft --eval-data data/chat.val.jsonl --max-steps 600

  tiaoyu chat ckpt/sft
"""

# what makes the checkpoint a command reads: named when that checkpoint is missing
_MAKES_CHECKPOINT = {
    "chat": "`tiaoyu pretrain` (then `tiaoyu sft` for a chat model)",
    "rlhf": "`tiaoyu sft`",
    "reason": "`tiaoyu sft`",
}
_MAKES_BY_OPTION = {"--reward": "`tiaoyu rlhf reward`", "--ref": "`tiaoyu sft`"}


def with_hint(args: list[str], message: str) -> str:
    """`message`, plus the command that makes the missing input when the error is a missing checkpoint
    (checkpoint.resolve_checkpoint's messages): `… — run `tiaoyu pretrain` first`."""
    if not args or not (": not a checkpoint (" in message or message.endswith(": no such checkpoint folder")):
        return message
    path = message.split(": ", 1)[0]
    maker = _MAKES_CHECKPOINT.get(args[0], "`tiaoyu pretrain`")
    if args[:2] == ["rlhf", "score"]:
        maker = _MAKES_BY_OPTION["--reward"]
    for opt, value in zip(args, args[1:]):
        if value == path and opt in _MAKES_BY_OPTION:
            maker = _MAKES_BY_OPTION[opt]
    return f"{message} — run {maker} first"


def build_app(names: list[str] | None = None) -> typer.Typer:
    """The root app with the subcommands `names` (default: all). `tiaoyu prep …` registers only `prep`,
    so a command never pays for importing the others (torch alone takes ~2 s to import)."""
    root = typer.Typer(
        name="tiaoyu",
        help="Train a small language model through its whole life: prep → tokenize → pretrain → sft → "
        "rlhf / lora / distill / reason → chat. Every stage reads and writes JSONL and safetensors.",
        epilog=EXAMPLES,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode="rich",
    )

    @root.callback(invoke_without_command=True)
    def _root(ctx: typer.Context) -> None:
        """Train a small language model through its whole life."""
        if ctx.invoked_subcommand is None:
            typer.echo(OVERVIEW, nl=False)

    for name in COMMANDS if names is None else names:
        importlib.import_module(f"tiaoyu_cli.cli.{name.replace('-', '_')}").register(root)
    return root


_full_app: typer.Typer | None = None


def __getattr__(name: str):
    """`app`: the root app with every subcommand, built on first use (for typer's CliRunner)."""
    global _full_app
    if name == "app":
        if _full_app is None:
            _full_app = build_app()
        return _full_app
    raise AttributeError(name)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:  # the pipeline and the next command to run, without importing every command
        sys.stdout.write(OVERVIEW)
        sys.exit(0)
    wanted = [args[0]] if args and args[0] in COMMANDS else None  # root --help and typos: all commands
    try:
        build_app(wanted)(args=args, prog_name="tiaoyu")
    except TiaoyuError as e:
        from rich.markup import escape

        from tiaoyu_cli.console import console

        console.print(f"[bold red]error:[/] {escape(with_hint(args, str(e)))}", soft_wrap=True)
        sys.exit(e.exit_code)
    except BrokenPipeError:
        # downstream closed the pipe (e.g. `| head`): not an error for a Unix filter
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
