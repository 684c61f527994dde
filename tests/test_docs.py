"""The docs describe what the CLI really accepts: every `tiaoyu …` line in a code block of README.md and
docs/*.md parses with the CLI's own parser (nothing runs), every relative link and image exists, and the
README stays short (the rest lives in docs/)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cli_lines import check_text, logical_lines, tiaoyu_invocations

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"", "bash", "sh", "shell", "console", "zsh"}
FENCE = re.compile(r"^(```|~~~)([^\n`]*)\n(.*?)^\1[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_SRC = re.compile(r"""<(?:img|a)\b[^>]*?\b(?:src|href)=["']([^"']+)["']""", re.I)


def name(p: Path) -> str:
    return str(p.relative_to(ROOT))


def shell_blocks(text: str) -> list[str]:
    return [m.group(3) for m in FENCE.finditer(text) if m.group(2).strip().lower() in SHELL]


def without_code(text: str) -> str:
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def test_there_are_docs():
    assert (ROOT / "docs").is_dir() and len(PAGES) >= 15


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_every_tiaoyu_line_parses(page):
    text = page.read_text(encoding="utf-8")
    bad = []
    for block in shell_blocks(text):
        bad += check_text(block)
    assert not bad, "\n".join(f"{name(page)}: {line}\n    {err}" for line, err in bad)


def test_the_checker_reads_the_code_blocks():
    """The parse test sees the commands (a checker that finds nothing passes trivially)."""
    n = sum(len(tiaoyu_invocations(line)) for page in PAGES
            for block in shell_blocks(page.read_text(encoding="utf-8")) for line in logical_lines(block))
    assert n >= 100


def test_the_checker_fails_what_the_cli_refuses():
    assert check_text("tiaoyu pretrain tokens/ -o ckpt/base --no-such-option 3")
    assert check_text("tiaoyu frobnicate data/")
    assert check_text("tiaoyu rlhf frobnicate a b")
    assert check_text("tiaoyu sft ckpt/base chat.jsonl -o out --max-steps")  # an option without its value
    assert check_text("tiaoyu sft ckpt/base chat.jsonl -o out --max-steps many")
    assert check_text("zcat x.gz | tiaoyu prep - --bogus | tiaoyu tokenize train - -o tok/")
    assert check_text("tiaoyu pretrain tokens/ -o ckpt/base \\\n    --bogus 1")
    assert not check_text("tiaoyu chat ckpt/sft --temperature 0 < prompts.jsonl > out.jsonl 2>&1 | head  # ok")
    assert not check_text("tiaoyu eval ckpt/base data.jsonl")  # the default subcommand
    assert not check_text("tiaoyu lora merge ckpt/base")  # a missing argument is fine


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_relative_links_and_images_exist(page):
    text = without_code(page.read_text(encoding="utf-8"))
    targets = LINK.findall(text) + HTML_SRC.findall(text)
    missing = []
    for target in targets:
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith(("#", "//")):
            continue  # a URL, mailto:, or an anchor in the same page
        path = target.split("#", 1)[0].split("?", 1)[0]
        if path and not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{name(page)}: missing {missing}"


def test_readme_is_short():
    size = (ROOT / "README.md").stat().st_size
    assert size <= 20_000, f"README.md is {size:,} bytes; move detail into docs/"


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    for page in PAGES[1:]:
        if page.name != "README.md":
            assert f"({page.name}" in index or f"(docs/{page.name}" in readme, f"{name(page)} is linked from nowhere"
