"""The layers only look down (DESIGN §5): every import of every module, function-local ones included,
goes to its own layer or one below; no CLI module imports another (shared options live in cli/common.py).
Inside train/ the sub-packages are layers too — engine < losses < rl < objectives < stages — no stage
module imports another stage's, and no objective imports another objective (one exception, named in
OBJECTIVE_IMPORTS)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "tiaoyu_cli"

# io/errors → data, tokenizer, model → checkpoint, device → infer → train → evals, export, serve → cli;
# inside train: engine → losses → rl → objectives → stages (train/__init__.py draws them)
LAYER = {"errors": 0, "io": 0, "console": 0, "data.jsonl": 0,
         "tokenizer": 1, "model": 1, "data": 1,
         "checkpoint": 2, "device": 2,
         "infer": 3,
         "train": 4, "train.engine": 4.0, "train.losses": 4.1, "train.rl": 4.2, "train.objectives": 4.3,
         "train.stages": 4.4,
         "evals": 5, "export": 5, "serve": 5, "cli": 6, "__main__": 7}
TRAIN_PACKAGES = {"engine", "losses", "rl", "objectives", "stages"}
# objective → objectives it may import, and why (a helper that cannot live lower without losing its meaning)
OBJECTIVE_IMPORTS = {
    "distill": {"sft": "lm_forward: white-box distillation runs chat batches through SFT's forward pass"},
}


def layer_of(module: str) -> tuple[str, int]:
    """('data', 1) for tiaoyu_cli.data.chat; the longest key of LAYER that names the module wins."""
    parts = module.split(".")[1:]
    for n in (2, 1):
        key = ".".join(parts[:n])
        if key in LAYER:
            return key, LAYER[key]
    return "", 0  # tiaoyu_cli itself


def is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PKG / rel).with_suffix(".py").is_file() or (PKG / rel / "__init__.py").is_file()


def imports(path: Path):
    """(line, [modules]) for every tiaoyu_cli import; `from package import module` names the module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tiaoyu_cli":
            subs = [f"{node.module}.{a.name}" for a in node.names]
            if node.module == "tiaoyu_cli" or all(is_module(s) for s in subs):
                yield node.lineno, subs
            else:
                yield node.lineno, [node.module]
        elif isinstance(node, ast.Import):
            yield node.lineno, [a.name for a in node.names if a.name.split(".")[0] == "tiaoyu_cli"]


def module_name(path: Path, pkg: Path = PKG) -> str:
    rel = path.relative_to(pkg.parent).with_suffix("")
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


def unit_of(module: str, package: str) -> str | None:
    """'reason' for tiaoyu_cli.train.stages.reason (and 'distill' for tiaoyu_cli.train.stages.distill.run)."""
    prefix = f"tiaoyu_cli.train.{package}."
    return module[len(prefix):].split(".")[0] if module.startswith(prefix) else None


def cross_imports(package: str, allowed: dict[str, dict[str, str]] | None = None, pkg: Path = PKG) -> list[str]:
    """Imports from one unit of train/<package> (a module, or a folder of modules) into another."""
    bad = []
    for f in sorted((pkg / "train" / package).rglob("*.py")):
        me = module_name(f, pkg)
        mine = unit_of(me, package)
        for line, targets in imports(f):
            for t in targets:
                theirs = unit_of(t, package)
                if mine and theirs and theirs != mine and theirs not in (allowed or {}).get(mine, {}):
                    bad.append(f"{f.relative_to(pkg.parent)}:{line}: {me} imports {t}")
    return bad


def test_no_stage_imports_another_stage():
    assert cross_imports("stages") == []


def test_the_check_sees_a_stage_importing_another(tmp_path):
    stages = tmp_path / "tiaoyu_cli" / "train" / "stages"
    (stages / "distill").mkdir(parents=True)
    (stages / "dpo.py").write_text("def f():\n    from tiaoyu_cli.train.stages.reward import prepare_reward\n")
    (stages / "reward.py").write_text("from tiaoyu_cli.train.objectives.reward import RewardStage\n")
    (stages / "distill" / "run.py").write_text("from tiaoyu_cli.train.stages.distill.teacher_data import read_answers\n")
    assert cross_imports("stages", pkg=tmp_path / "tiaoyu_cli") == [
        "tiaoyu_cli/train/stages/dpo.py:2: tiaoyu_cli.train.stages.dpo imports tiaoyu_cli.train.stages.reward"]


def test_no_objective_imports_another_but_the_named_exceptions():
    assert cross_imports("objectives", OBJECTIVE_IMPORTS) == []
    for mine, theirs in OBJECTIVE_IMPORTS.items():  # an exception that is no longer used goes from the list
        for t in theirs:
            src = (PKG / "train" / "objectives" / f"{mine}.py").read_text(encoding="utf-8")
            assert f"tiaoyu_cli.train.objectives.{t} import" in src, (mine, t)


def test_train_is_its_five_packages():
    """Every training module sits in a layer of train/ (nothing loose beside them)."""
    loose = [p.name for p in (PKG / "train").iterdir() if p.suffix == ".py" and p.name != "__init__.py"]
    folders = {p.name for p in (PKG / "train").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert loose == [] and folders == TRAIN_PACKAGES
    assert all(f"train.{name}" in LAYER for name in TRAIN_PACKAGES)


def test_the_check_sees_an_upward_import(tmp_path):
    # the checker itself can fail: a model module importing train, a CLI module importing another
    assert layer_of("tiaoyu_cli.model.lora")[1] < layer_of("tiaoyu_cli.train.engine.run")[1]
    assert layer_of("tiaoyu_cli.data.jsonl")[1] < layer_of("tiaoyu_cli.tokenizer.train")[1]
    order = ["engine.run", "losses.rl", "rl.layout", "objectives.sft", "stages.reason"]
    layers = [layer_of(f"tiaoyu_cli.train.{m}")[1] for m in order]
    assert layers == sorted(layers) and len(set(layers)) == len(order)
    assert layer_of("tiaoyu_cli.train.stages.reason")[1] < layer_of("tiaoyu_cli.evals.evaluate")[1]
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from tiaoyu_cli.train.engine.run import run_stage\n"
                 "from tiaoyu_cli.train.stages import reason as R\n")
    assert sorted(imports(f)) == [(2, ["tiaoyu_cli.train.engine.run"]), (3, ["tiaoyu_cli.train.stages.reason"])]
    assert unit_of("tiaoyu_cli.train.stages.distill.run", "stages") == "distill"
    assert unit_of("tiaoyu_cli.train.objectives.sft", "stages") is None


def test_no_module_over_600_lines():
    long = {str(f.relative_to(PKG.parent)): n for f in PKG.rglob("*.py")
            if (n := len(f.read_text(encoding="utf-8").splitlines())) > 600}
    assert long == {}


# inference: generate.py and slots.py get their step from the factory (infer/steps.py), the only module that
# picks an optimisation from infer/fast/; the reference stays model/transformer.py
FAST = "tiaoyu_cli.infer.fast"


def import_graph(prefix: str) -> dict[str, set[str]]:
    """module → the modules under `prefix` it imports (function-local imports too), for modules under it;
    `from tiaoyu_cli.infer import tools` counts as importing tiaoyu_cli.infer.tools."""
    graph: dict[str, set[str]] = {}
    for f in sorted(PKG.rglob("*.py")):
        me = module_name(f)
        if me != prefix and not me.startswith(prefix + "."):
            continue
        out = graph.setdefault(me, set())
        tree = ast.parse(f.read_text(encoding="utf-8"))
        type_only = {id(n) for blk in ast.walk(tree) if isinstance(blk, ast.If) and _is_type_checking(blk.test)
                     for stmt in blk.body for n in ast.walk(stmt)}  # `if TYPE_CHECKING:` imports never run
        for node in ast.walk(tree):
            names = []
            if id(node) in type_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for n in names:
                path = PKG.parent.joinpath(*n.split("."))
                if (path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()) \
                        and (n == prefix or n.startswith(prefix + ".")) and n != me:
                    out.add(n)
    return graph


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle found by a depth-first walk (each reported once, from where it was entered)."""
    found, state = [], {}  # state: 1 = on the current path, 2 = done

    def walk(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                found.append(path[path.index(t):] + [m, t])
            elif t not in state:
                walk(t, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m, [])
    return found


def test_only_the_step_factory_imports_the_fast_steps():
    bad = []
    for f in sorted(PKG.rglob("*.py")):
        me = module_name(f)
        if me == "tiaoyu_cli.infer.steps" or me == FAST or me.startswith(FAST + "."):
            continue
        for line, targets in imports(f):
            bad += [f"{f.relative_to(PKG.parent)}:{line}: {me} imports {t} (only infer/steps.py may)"
                    for t in targets if t == FAST or t.startswith(FAST + ".")]
        tree = ast.parse(f.read_text(encoding="utf-8"))  # `from tiaoyu_cli.infer import fast`
        bad += [f"{f.relative_to(PKG.parent)}:{n.lineno}: {me} imports {FAST}" for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) and n.module == "tiaoyu_cli.infer"
                and any(a.name == "fast" for a in n.names)]
    assert bad == []


def test_infer_has_no_import_cycle_and_its_packages_import_nothing():
    graph = import_graph("tiaoyu_cli.infer")
    assert FAST + ".numpy_step" in graph["tiaoyu_cli.infer.steps"]  # the graph sees the factory's imports
    assert cycles(graph) == []
    for init in (PKG / "infer" / "__init__.py", PKG / "infer" / "fast" / "__init__.py"):  # importing infer.X loads X
        tree = ast.parse(init.read_text(encoding="utf-8"))
        assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))], init


def test_the_cycle_check_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_anywhere():
    """Across the whole package, function-local imports included (type-only `if TYPE_CHECKING:` imports never
    run, so they are not edges)."""
    graph = import_graph("tiaoyu_cli")
    assert "tiaoyu_cli.infer.tool_loop" in graph["tiaoyu_cli.cli.chat"]  # imported inside a function: an edge
    assert cycles(graph) == []
