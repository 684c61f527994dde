"""Help that helps: `tiaoyu` alone shows the pipeline and the next command, every `--help` ends with
examples the CLI accepts, and an error about a missing input names the command that makes it."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from cli_lines import check_text, root_command, run_main
from typer.core import TyperGroup


def all_commands():
    def walk(cmd, path):
        yield path, cmd
        if isinstance(cmd, TyperGroup):
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])

    return list(walk(root_command(), []))


# ---- no arguments ------------------------------------------------------------------------------------------------

def test_no_arguments_prints_the_pipeline_and_the_next_command(capsys):
    code, out, err = run_main([], capsys)
    assert code == 0 and err == ""
    lines = out.strip().splitlines()
    assert len(lines) <= 10
    pipeline = [ln for ln in lines if "──" in ln]
    assert 2 <= len(pipeline) <= 5
    for stage in ("prep", "tokenize", "pretrain", "sft", "rlhf", "lora", "distill", "reason", "chat"):
        assert stage in " ".join(pipeline), stage
    assert "make demo" in out and "tiaoyu synth data/" in out
    assert "--help" in out


def test_no_arguments_through_the_app_too():
    """The typer app itself (what CliRunner and `python -m tiaoyu_cli` use) prints the same, exit 0."""
    from tiaoyu_cli.cli.main import OVERVIEW, app

    r = CliRunner().invoke(app, [])
    assert r.exit_code == 0 and r.output == OVERVIEW


# ---- examples at the end of every --help -------------------------------------------------------------------------

def test_every_help_ends_with_examples():
    from tiaoyu_cli.cli.main import app

    commands = all_commands()
    assert len(commands) >= 25
    for path, cmd in commands:
        assert cmd.epilog and "Examples:" in cmd.epilog, f"tiaoyu {' '.join(path)}: no examples"
        out = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "400", "TERM": "dumb"}).output
        lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
        heads = [i for i, ln in enumerate(lines) if ln.startswith("Examples")]
        assert heads, path
        examples = lines[heads[-1] + 1:]  # the help ends with them: no option panel after
        assert examples and not any("│" in ln or "╰" in ln for ln in examples), (path, examples)
        assert any(re.search(r"\btiaoyu(_cli)? ", ln) for ln in examples), (path, examples)


def test_help_examples_are_accepted_by_the_cli():
    bad = []
    for path, cmd in all_commands():
        bad += [(" ".join(path), line, err) for line, err in check_text(cmd.epilog or "")]
    assert not bad, "\n".join(map(str, bad))


# ---- a missing input names the command that makes it ---------------------------------------------------------------

def test_pretrain_without_token_shards_says_tokenize_encode(tmp_path, capsys):
    (tmp_path / "tokens").mkdir()
    for folder in (tmp_path / "tokens", tmp_path / "missing"):
        code, _, err = run_main(["pretrain", folder, "-o", tmp_path / "out", "--max-steps", "1"], capsys)
        assert code == 2 and "run `tiaoyu tokenize encode` first" in err, err
        assert "Traceback" not in err


@pytest.mark.parametrize("cmd, maker", [
    (["sft", "{ckpt}", "{data}", "-o", "{out}", "--max-steps", "1"], "`tiaoyu pretrain`"),
    (["chat", "{ckpt}", "--prompt", "hi"], "`tiaoyu pretrain`"),
    (["rlhf", "dpo", "{ckpt}", "{data}", "-o", "{out}", "--max-steps", "1"], "`tiaoyu sft`"),
    (["rlhf", "score", "{ckpt}", "{data}"], "`tiaoyu rlhf reward`"),
])
def test_a_missing_checkpoint_names_the_command_that_makes_it(cmd, maker, tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    (tmp_path / "empty").mkdir()
    for ckpt in (tmp_path / "empty", tmp_path / "missing"):  # a folder without a checkpoint, and no folder
        args = [a.format(ckpt=ckpt, data=data, out=tmp_path / "out") for a in cmd]
        code, _, err = run_main(args, capsys)
        flat = " ".join(err.split())
        assert code == 2 and f"run {maker}" in flat and "first" in flat, flat


def test_tokenize_encode_without_a_tokenizer_says_tokenize_train(tmp_path, capsys):
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "hello"}\n')
    (tmp_path / "tok").mkdir()
    for tok in (tmp_path / "tok", tmp_path / "missing"):
        code, _, err = run_main(["tokenize", "encode", data, "--tokenizer", tok, "-o", tmp_path / "tokens"], capsys)
        assert code == 2 and "`tiaoyu tokenize train`" in " ".join(err.split()), err


def test_the_hint_only_follows_missing_checkpoints():
    from tiaoyu_cli.cli.main import with_hint

    assert with_hint(["sft"], "x.jsonl: no such file") == "x.jsonl: no such file"
    assert with_hint(["rlhf", "ppo", "p", "d", "--reward", "rm"], "rm: no such checkpoint folder").endswith(
        "run `tiaoyu rlhf reward` first")
