"""Options shared by every training subcommand, generated from the typed configs.

`@train_options(lr=3e-4, max_steps=300)` adds one `--flag` per `TrainConfig` field (with that
stage's defaults) to a typer command and hands the command a ready `TrainConfig` as `train=`.
`--config FILE.json` (or .yaml when PyYAML is installed) supplies values for the train config and
the stage's own options; flags given on the command line win over the file.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import typing
from pathlib import Path
from typing import Any, Callable

import typer
from typer.core import TyperGroup

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.train.engine.config import TrainConfig

TRAIN_HELP = {
    "out": "output run folder (checkpoints step-N/, latest, metrics.jsonl)",
    "max_steps": "budget: optimizer steps",
    "max_tokens": "budget: training tokens",
    "max_time": "budget: seconds of training",
    "epochs": "budget: passes over a finite dataset",
    "batch_size": "micro-batch size per process",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate",
    "min_lr_ratio": "final LR as a fraction of the peak",
    "warmup_steps": "linear warmup steps",
    "schedule": "LR schedule: cosine | wsd | constant",
    "weight_decay": "AdamW weight decay (matrices only)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the global grad norm (0 = off)",
    "optim": "adamw | muon (torch.optim.Muon on the blocks' 2-D hidden matrices, AdamW on the rest)",
    "device": "auto | cpu | cuda | mps",
    "dtype": "auto | bf16 | fp32 (auto = bf16 autocast where the hardware is fast at it); an open model's folder "
             "is written in this dtype (auto: the dtype its weights came in)",
    "compile": "torch.compile the model",
    "seed": "random seed",
    "log_every": "log every N steps",
    "eval_every": "evaluate every N steps (0 = at the end)",
    "save_every": "checkpoint every N steps (0 = at the end)",
    "keep": "checkpoints to keep (0 = all)",
    "resume": "continue the run in -o exactly where it stopped",
    "fsdp": "FSDP2: shard parameters, gradients and optimizer state over the processes (checkpoints unchanged)",
    "nproc": "run N processes on this machine (DDP), as torchrun --nproc_per_node N would",
    "nnodes": "machines taking part (each runs the same command with its --node-rank)",
    "node_rank": "this machine's index among --nnodes (0 = the one at --master-addr)",
    "master_addr": "address of node 0 (with --nnodes > 1)",
    "master_port": "a free port on node 0 (with --nnodes > 1; 0 = pick one, one node only)",
    "report_to": "also send metrics.jsonl's lines to: none | tensorboard (event files in -o/tb) | wandb "
                 "(WANDB_MODE, WANDB_PROJECT apply), comma-separated, or all installed",
}
_LAUNCH = {"nproc", "nnodes", "node_rank", "master_addr", "master_port", "fsdp"}

_PANEL = "Training loop"

# the objective's config of chat fine-tuning (sft, lora: train.stages.finetune.Config.sft, objectives/sft.py)
CHAT_HELP = {
    "eval_samples": "questions of --eval-data answered at each evaluation (0 = none)",
    "eval_max_new_tokens": "most tokens per generated eval answer",
    "eval_tools": "tools the eval answers may call, e.g. calculator (answer accuracy with tools)",
    "tool_schemas": "render the tools' schemas in tool prompts (eval answers; recorded for chat and serve). "
                    "Default: as the training records do (the bundled tool data leaves them out)",
    "max_len": "most tokens per record (0 = the model's max_seq_len)",
    "overflow": "longer records: truncate | skip",
    "pack": "pack several records per row (no attention across records)",
    "method": "full | lora | adapter | prompt",
    "virtual_tokens": "--method prompt: soft-prompt length",
    "adapter_dim": "--method adapter: bottleneck width",
    "lora_rank": "--method lora: rank r of the low-rank pair B·A",
    "lora_alpha": "--method lora: scale α (update = α/r · B·A)",
    "lora_dropout": "--method lora: dropout on the LoRA input",
    "lora_targets": "--method lora: layers to adapt, q,k,v,o,gate,up,down (MoE: w1/w3/w2)",
    "replay_ratio": "share of the loss from replayed pretraining windows",
}
CHAT_RENAME = {"lora_rank": "rank", "lora_alpha": "alpha", "lora_targets": "targets", "train_parts": "train"}
CHAT_SKIP = ("sft.train", "replay_seq_len", "eval_batch_size", "base_val_windows", "adapter_only")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def train_options(**defaults: Any) -> Callable:
    """Decorate a typer command `f(..., train: TrainConfig, config_file: dict)`."""

    def deco(f: Callable) -> Callable:
        sig = inspect.signature(f)
        own = [p for p in sig.parameters.values() if p.name not in ("train", "config_file")]
        extra = []
        for fld in dataclasses.fields(TrainConfig):
            default = defaults.get(fld.name, fld.default)
            decls = [_flag(fld.name)] + (["-o"] if fld.name == "out" else [])
            if fld.type in ("bool", bool):
                decls = [f"{_flag(fld.name)}/--no-{fld.name.replace('_', '-')}"]
            panel = "Processes" if fld.name in _LAUNCH else _PANEL
            opt = typer.Option(default, *decls, help=TRAIN_HELP.get(fld.name, ""), rich_help_panel=panel,
                               show_default=True)
            ann = {"int": int, "float": float, "str": str, "bool": bool}.get(str(fld.type), type(default))
            extra.append(inspect.Parameter(f"train__{fld.name}", inspect.Parameter.KEYWORD_ONLY, default=opt,
                                           annotation=ann))
        cfg_opt = typer.Option(None, "--config", help="JSON (or YAML) file of options; command-line flags win",
                               rich_help_panel=_PANEL)
        extra.append(inspect.Parameter("config_path", inspect.Parameter.KEYWORD_ONLY, default=cfg_opt,
                                       annotation=Path | None))
        extra.append(inspect.Parameter("_ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))

        @functools.wraps(f)
        def wrapper(**kwargs: Any) -> Any:
            ctx = kwargs.pop("_ctx")
            file_cfg = load_config_file(kwargs.pop("config_path", None))
            train_vals = {}
            train_file = file_cfg.get("train_config") or file_cfg
            for fld in dataclasses.fields(TrainConfig):
                key = f"train__{fld.name}"
                val = kwargs.pop(key)
                if fld.name in train_file and _is_default(ctx, key):
                    val = train_file[fld.name]
                train_vals[fld.name] = val
            stage_file = file_cfg.get("stage_config") or {}  # a trainer.json given as --config
            for name in list(kwargs):  # stage options from the file where not given as flags
                key = name.rsplit("__", 1)[-1]  # a nested field's own name
                src = stage_file if key in stage_file and name.startswith("cfg__") else file_cfg
                if key in src and _is_default(ctx, name):
                    kwargs[name] = src[key]
            train = TrainConfig(**train_vals)
            params = inspect.signature(f).parameters
            if "config_file" in params:
                kwargs["config_file"] = file_cfg
            return f(train=train, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=own + extra)
        return wrapper

    return deco


def _is_default(ctx: typer.Context, name: str) -> bool:
    src = ctx.get_parameter_source(name)
    return src is None or getattr(src, "name", "") in ("DEFAULT", "DEFAULT_MAP")


def load_config_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    p = Path(path)
    if not p.exists():
        raise TiaoyuError(f"--config {p}: no such file")
    text = p.read_text(encoding="utf-8")
    if p.suffix in (".yaml", ".yml"):
        try:
            import yaml  # optional
        except ImportError:
            raise TiaoyuError(f"--config {p}: YAML needs PyYAML (pip install pyyaml), or use a .json file") from None
        try:
            data = yaml.safe_load(text)
        except RecursionError:
            raise TiaoyuError(f"--config {p}: nested too deeply") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TiaoyuError(f"--config {p}: invalid JSON ({e})") from None
        except RecursionError:
            raise TiaoyuError(f"--config {p}: nested too deeply") from None
    if not isinstance(data, dict):
        raise TiaoyuError(f"--config {p}: expected an object of option: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def config_options(cls: type, help: dict[str, str] | None = None, rename: dict[str, str] | None = None,
                   panel: str | None = None, skip: tuple[str, ...] = (), required: tuple[str, ...] = (),
                   args: tuple[str, ...] = (), name: str = "cfg", panels: dict[str, str] | None = None) -> Callable:
    """Decorate a typer command `f(..., cfg: cls)`: the command's arguments and flags are generated from the
    dataclass, and the command gets the built object as `cfg=` (or `name=`: a command may take several).

    Each field is one `--flag`, its default and type taken from the dataclass (one default per option), its help
    from `help` or else the field's `metadata["help"]`. A field whose type is itself a dataclass (a stage's
    objective config, its tool options) contributes one flag per field of its own, with the defaults of the
    outer field's default object, and `panels` may give those flags their own help panel. `args` are fields
    taken as the command's positional arguments, in that order. The keys of `help`, `rename` (another flag
    name, e.g. GRPO's epochs → --grpo-epochs, as --epochs is the loop's budget), `skip` (left at the default)
    and `required` (no default) are field names, or dotted paths (`grpo.eval_samples`) where a name repeats."""
    rename, help, panels = rename or {}, help or {}, panels or {}
    leaves = list(_leaves(cls, None, (), skip, args))
    flags: dict[str, tuple[str, ...]] = {}
    for path, *_ in leaves:
        flag = _flag(_pick(rename, path, path[-1]))
        if flag in flags:
            raise TypeError(f"{cls.__name__}: {'.'.join(path)} and {'.'.join(flags[flag])} would both be {flag}")
        flags[flag] = path

    def deco(f: Callable) -> Callable:
        sig = inspect.signature(f)
        own = [p for p in sig.parameters.values() if p.name != name]
        hints = typing.get_type_hints(cls)
        positional = [p for p in own if p.kind != inspect.Parameter.KEYWORD_ONLY]
        for a in args:
            fld = next(fld for fld in dataclasses.fields(cls) if fld.name == a)
            default = _field_default(fld)
            arg = typer.Argument(default, help=_pick(help, (a,), fld.metadata.get("help", "")))
            positional.append(inspect.Parameter(a, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=arg,
                                                annotation=hints[a]))
        extra = []
        for path, fld, hint, default in leaves:
            flag = _flag(_pick(rename, path, path[-1]))
            if _pick({k: True for k in required}, path, False):
                default = ...
            negatable = hint in (bool, typing.Optional[bool]) and fld.metadata.get("negatable", True)
            decls = [f"{flag}/--no-{flag[2:]}"] if negatable else [flag]
            text = _pick(help, path, fld.metadata.get("help", ""))
            where = panels.get(path[0], panel) if len(path) > 1 else panel
            opt = typer.Option(default, *decls, help=text, rich_help_panel=where, show_default=True)
            extra.append(inspect.Parameter(_param(name, path), inspect.Parameter.KEYWORD_ONLY, default=opt,
                                           annotation=hint))
        keyword = [p for p in own if p.kind == inspect.Parameter.KEYWORD_ONLY]

        @functools.wraps(f)
        def wrapper(**kwargs: Any) -> Any:
            vals = {path: kwargs.pop(_param(name, path)) for path, *_ in leaves}
            vals.update({(a,): kwargs.pop(a) for a in args})
            return f(**{name: _build(cls, None, (), vals)}, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=positional + extra + keyword)
        return wrapper

    return deco


def _param(name: str, path: tuple[str, ...]) -> str:
    return "__".join((name, *path))


def _pick(table: dict, path: tuple[str, ...], default: Any) -> Any:
    """table's entry for the dotted path, else for the field name, else default."""
    dotted = ".".join(path)
    return table[dotted] if dotted in table else table.get(path[-1], default)


def _field_default(fld: dataclasses.Field) -> Any:
    if fld.default is not dataclasses.MISSING:
        return fld.default
    if fld.default_factory is not dataclasses.MISSING:
        return fld.default_factory()
    return ...


def _leaves(cls: type, base: Any, prefix: tuple[str, ...], skip: tuple[str, ...], args: tuple[str, ...]):
    """(path, field, type, default) of every flag of `cls`; a dataclass-typed field gives its own fields, their
    defaults read from `base` (the outer field's default object)."""
    hints = typing.get_type_hints(cls)
    wanted = {k: True for k in skip}
    for fld in dataclasses.fields(cls):
        path = (*prefix, fld.name)
        if _pick(wanted, path, False) or (not prefix and fld.name in args):
            continue
        default = getattr(base, fld.name) if base is not None else _field_default(fld)
        if dataclasses.is_dataclass(hints[fld.name]):
            yield from _leaves(hints[fld.name], default, path, skip, args)
        else:
            yield path, fld, hints[fld.name], default


def _build(cls: type, base: Any, prefix: tuple[str, ...], vals: dict[tuple[str, ...], Any]) -> Any:
    """cls (or a copy of `base`) with the values given for its paths; a nested config starts from its field's
    default object, so the fields it has no flag for keep that object's values."""
    hints = typing.get_type_hints(cls)
    kw = {}
    for fld in dataclasses.fields(cls):
        path = (*prefix, fld.name)
        if path in vals:
            kw[fld.name] = vals[path]
        elif dataclasses.is_dataclass(hints[fld.name]) and any(p[:len(path)] == path for p in vals):
            inner = getattr(base, fld.name) if base is not None else _field_default(fld)
            kw[fld.name] = _build(hints[fld.name], inner, path, vals)
    return dataclasses.replace(base, **kw) if base is not None else cls(**kw)


class DefaultCommandGroup(TyperGroup):
    """A command group whose first argument may be a subcommand or, when it is not one, the arguments of
    its default command (`tiaoyu eval CKPT DATA` = `tiaoyu eval run CKPT DATA`)."""

    default_command = ""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


def defaulting_to(command: str) -> type[DefaultCommandGroup]:
    """The group class for typer.Typer(cls=…) whose default subcommand is `command`."""
    return type(f"DefaultTo{command.title()}", (DefaultCommandGroup,), {"default_command": command})


def sub_app(name: str, help: str, default: str | None = None, **kw: Any) -> typer.Typer:
    """The command group `tiaoyu NAME …` (its help when called bare). With `default`, the first argument may
    also be that subcommand's own arguments: `tiaoyu eval CKPT DATA` = `tiaoyu eval run CKPT DATA`."""
    if default is not None:
        kw["cls"] = defaulting_to(default)
    return typer.Typer(name=name, help=help, no_args_is_help=True, add_completion=False, rich_markup_mode="rich", **kw)
