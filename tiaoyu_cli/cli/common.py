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
from pathlib import Path
from typing import Any, Callable

import typer

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.train.config import TrainConfig

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
    "dtype": "auto | bf16 | fp32 (auto = bf16 autocast where the hardware is fast at it)",
    "compile": "torch.compile the model",
    "seed": "random seed",
    "log_every": "log every N steps",
    "eval_every": "evaluate every N steps (0 = at the end)",
    "save_every": "checkpoint every N steps (0 = at the end)",
    "keep": "checkpoints to keep (0 = all)",
    "resume": "continue the run in -o exactly where it stopped",
}

_PANEL = "Training loop"


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
            opt = typer.Option(default, *decls, help=TRAIN_HELP.get(fld.name, ""), rich_help_panel=_PANEL,
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
            for fld in dataclasses.fields(TrainConfig):
                key = f"train__{fld.name}"
                val = kwargs.pop(key)
                if fld.name in file_cfg and _is_default(ctx, key):
                    val = file_cfg[fld.name]
                train_vals[fld.name] = val
            for name in list(kwargs):  # stage options from the file where not given as flags
                if name in file_cfg and _is_default(ctx, name):
                    kwargs[name] = file_cfg[name]
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
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TiaoyuError(f"--config {p}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TiaoyuError(f"--config {p}: expected an object of option: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def parse_overrides(items: list[str] | None, what: str = "--model") -> dict[str, Any]:
    """["dim=256", "position=learned", "tie_embeddings=false"] → typed dict (JSON literals where they parse)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise TiaoyuError(f"{what} {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = {"true": True, "false": False}.get(v.lower(), v)
    return out
