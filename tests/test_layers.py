"""The layers only look down (DESIGN §5): every import of every module, function-local ones included,
goes to its own layer or one below; no CLI module imports another (shared options live in cli/common.py)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "tiaoyu_cli"

# io/errors → data, tokenizer, model → checkpoint, device → infer → train → evals, export, serve → cli
LAYER = {"errors": 0, "io": 0, "console": 0, "data.jsonl": 0,
         "tokenizer": 1, "model": 1, "data": 1,
         "checkpoint": 2, "device": 2,
         "infer": 3, "train": 4, "evals": 5, "export": 5, "serve": 5, "cli": 6, "__main__": 7}


def layer_of(module: str) -> tuple[str, int]:
    """('data', 1) for tiaoyu_cli.data.chat; the longest key of LAYER that names the module wins."""
    parts = module.split(".")[1:]
    for n in (2, 1):
        key = ".".join(parts[:n])
        if key in LAYER:
            return key, LAYER[key]
    return "", 0  # tiaoyu_cli itself


def imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tiaoyu_cli":
            if node.module == "tiaoyu_cli":
                yield node.lineno, [f"tiaoyu_cli.{a.name}" for a in node.names]
            else:
                yield node.lineno, [node.module]
        elif isinstance(node, ast.Import):
            yield node.lineno, [a.name for a in node.names if a.name.split(".")[0] == "tiaoyu_cli"]


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def violations() -> list[str]:
    bad = []
    for f in sorted(PKG.rglob("*.py")):
        me = module_name(f)
        my_key, my_layer = layer_of(me)
        for line, targets in imports(f):
            for t in targets:
                key, lay = layer_of(t)
                where = f"{f.relative_to(PKG.parent)}:{line}"
                if lay > my_layer:
                    bad.append(f"{where}: {me} (layer {my_key}) imports {t} (layer {key}, above)")
                is_cli = me.startswith("tiaoyu_cli.cli.") and me != "tiaoyu_cli.cli.main"
                if is_cli and t.startswith("tiaoyu_cli.cli.") and t != "tiaoyu_cli.cli.common":
                    bad.append(f"{where}: CLI module {me} imports another CLI module {t}")
    return bad


def test_every_import_looks_down():
    assert violations() == []


def test_the_check_sees_an_upward_import(tmp_path):
    # the checker itself can fail: a model module importing train, a CLI module importing another
    assert layer_of("tiaoyu_cli.model.lora")[1] < layer_of("tiaoyu_cli.train.run")[1]
    assert layer_of("tiaoyu_cli.data.jsonl")[1] < layer_of("tiaoyu_cli.tokenizer.train")[1]
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from tiaoyu_cli.train.run import run_stage\n")
    assert list(imports(f)) == [(2, ["tiaoyu_cli.train.run"])]


def test_no_module_over_600_lines():
    long = {str(f.relative_to(PKG.parent)): n for f in PKG.rglob("*.py")
            if (n := len(f.read_text(encoding="utf-8").splitlines())) > 600}
    assert long == {}
