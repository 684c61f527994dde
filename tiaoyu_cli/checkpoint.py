"""Checkpoint folders (DESIGN §4).

    run/step-000500/  config.json, model.safetensors, tokenizer.model, tokenizer_config.json,
                      generation_config.json, train_state.safetensors, trainer.json
    run/latest -> step-000500          (the newest complete checkpoint)
    run/metrics.jsonl

Every save goes to a temp folder that is fsynced and renamed, so a crash mid-save leaves the
previous checkpoint intact. Only safetensors and JSON are read — never pickle.

A Hugging Face model folder is read as it is (DESIGN §4): its config.json (model/config.py reads
the open families), its weights in `model.safetensors` or in shards `model-0000K-of-0000N.safetensors`
listed by `model.safetensors.index.json`, in bf16, fp16 or fp32 (cast to fp32 unless asked), and its
tokenizer (`tokenizer.json`, tokenizer/hf.py, or `tokenizer.model`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.io import atomic_dir, atomic_write_text, fsync_dir, load_tensors, read_json  # noqa: F401 (used as ckpt_io.*)
from tiaoyu_cli.model import ModelConfig, Transformer
from tiaoyu_cli.tokenizer import open_tokenizer

STEP_RE = re.compile(r"^step-(\d+)$")
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded weights: {"weight_map": {tensor name: shard file}}


def has_weights(folder: Path) -> bool:
    """True when `folder` holds model weights: model.safetensors, or a shard index."""
    return (folder / WEIGHTS).exists() or (folder / WEIGHTS_INDEX).exists()


def step_dirs(run: Path) -> list[Path]:
    out = [p for p in run.iterdir() if p.is_dir() and STEP_RE.match(p.name)
           and (has_weights(p) or (p / "adapter_model.safetensors").exists())]  # LoRA runs: adapters
    return sorted(out, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from: a step folder, any folder with config.json + model.safetensors (or sharded
    weights and their index: e.g. an HF model folder or a merged model), or a run folder (its `latest`,
    else its newest step)."""
    p = Path(path)
    if not p.exists():
        raise TiaoyuError(f"{p}: no such checkpoint folder")
    if not p.is_dir():
        raise TiaoyuError(f"{p}: is a file; a checkpoint is a folder with config.json and model.safetensors")
    if has_weights(p) or (p / "config.json").exists():
        if not (p / "config.json").exists():
            raise TiaoyuError(f"{p}: checkpoint is missing config.json")
        if not has_weights(p):
            raise TiaoyuError(f"{p}: checkpoint is missing model.safetensors (or {WEIGHTS_INDEX} and its shards)")
        return p
    latest = p / "latest"
    if latest.exists() and has_weights(latest):
        return latest.resolve()
    steps = step_dirs(p)
    if steps:
        return steps[-1]
    raise TiaoyuError(f"{p}: not a checkpoint (no config.json/model.safetensors, no latest, no step-* folders)")


def load_config(ckpt: str | os.PathLike) -> ModelConfig:
    return ModelConfig.from_hf_dict(read_json(resolve_checkpoint(ckpt) / "config.json"))


def load_model(ckpt: str | os.PathLike, device: str | torch.device = "cpu", config_overrides: dict | None = None,
               strict: bool = True, dtype: torch.dtype | None = torch.float32) -> tuple[Transformer, Path]:
    """Build the model from config.json and load its weights (cast to `dtype`; None keeps the file's).
    Returns (model, checkpoint folder)."""
    d = resolve_checkpoint(ckpt)
    cfg = load_config(d)
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    if cfg.family:  # an open folder is written back in the dtype its weights are stored in
        cfg = cfg.replace(save_dtype=stored_dtype(d) or cfg.save_dtype)
    model = Transformer(cfg)
    sd = load_model_tensors(d, dtype)
    if dtype is None:  # the file's dtype: the model takes it before the weights go in
        model.to(next(iter(sd.values())).dtype if sd else torch.float32)
    load_weights(model, sd, weights_source(d), strict=strict)
    return model.to(device), d


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def stored_dtype(folder: str | os.PathLike) -> str:
    """The dtype of a folder's floating weights as stored ("float32", "bfloat16", "float16"; "" when unknown),
    read from the first weight file's header."""


    folder = Path(folder)
    if (folder / WEIGHTS).exists():
        first = folder / WEIGHTS
    else:
        wm = (read_json(folder / WEIGHTS_INDEX) or {}).get("weight_map") if (folder / WEIGHTS_INDEX).exists() else None
        if not isinstance(wm, dict) or not wm:
            return ""
        first = folder / sorted(set(wm.values()))[0]
    try:
        with open(first, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return ""
    for name, meta in header.items():
        if name != "__metadata__" and isinstance(meta, dict) and meta.get("dtype") in _SAFETENSORS_DTYPES:
            return _SAFETENSORS_DTYPES[meta["dtype"]]
    return ""


def weights_source(folder: Path) -> Path:
    """The file that names a folder's weights in messages: model.safetensors or the shard index."""
    return folder / WEIGHTS if (folder / WEIGHTS).exists() else folder / WEIGHTS_INDEX


def load_model_tensors(folder: str | os.PathLike, dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    """The weights of a model folder: model.safetensors, or every shard its index lists. Floating tensors
    are cast to `dtype` (None: as stored); rotary tables some old files carry are left out (computed here)."""
    folder = Path(folder)
    if (folder / WEIGHTS).exists():
        sd = load_tensors(folder / WEIGHTS)
    elif (folder / WEIGHTS_INDEX).exists():
        index = read_json(folder / WEIGHTS_INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise TiaoyuError(f"{folder / WEIGHTS_INDEX}: no weight_map (tensor name → shard file)")
        shards = sorted(set(weight_map.values()))
        missing = [f for f in shards if not (folder / f).is_file()]
        if missing:
            raise TiaoyuError(f"{folder}: shard(s) {', '.join(missing)} listed in {WEIGHTS_INDEX} are missing")
        sd = {}
        for f in shards:
            part = load_tensors(folder / f)
            if dtype is not None:  # one shard at a time: the whole model is never held twice
                part = _cast(part, dtype)
            sd.update(part)
        absent = sorted(set(weight_map) - set(sd))
        if absent:
            raise TiaoyuError(f"{folder / WEIGHTS_INDEX} lists {absent[:3]} but no shard holds them")
    else:
        raise TiaoyuError(f"{folder}: no model.safetensors and no {WEIGHTS_INDEX}")
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    return _cast(sd, dtype) if dtype is not None else sd


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v for k, v in sd.items()}


def load_weights(model: Transformer, sd: dict[str, torch.Tensor], source, strict: bool = True,
                 may_miss: tuple[str, ...] = (), hint: str = "") -> None:
    """The one way weights go into a model: a tied head's copy is dropped, every tensor must fit its
    parameter's shape, and (strict) the names must match both ways but for `may_miss` (e.g. a new head)."""
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd) - set(may_miss))
    unexpected = sorted(set(sd) - set(own))
    if strict and (missing or unexpected):
        raise TiaoyuError(
            f"{source} does not match config.json: "
            + (f"missing {missing[:4]}{'…' if len(missing) > 4 else ''} " if missing else "")
            + (f"unexpected {unexpected[:4]}{'…' if len(unexpected) > 4 else ''}" if unexpected else "")
        )
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise TiaoyuError(f"{source}: tensor {k} has shape {tuple(v.shape)}, the model "
                              f"{tuple(own[k].shape)}{hint}")
    model.load_state_dict(sd, strict=False)


def load_tokenizer(ckpt: str | os.PathLike):
    """The checkpoint's tokenizer: tokenizer.json (an open model's) or tokenizer.model (tiaoyu's own)."""
    return open_tokenizer(resolve_checkpoint(ckpt))


def load_trainer_info(ckpt: str | os.PathLike) -> dict:
    p = resolve_checkpoint(ckpt) / "trainer.json"
    return read_json(p) if p.exists() else {}


def generation_config(cfg: ModelConfig, tokenizer=None) -> dict[str, Any]:
    """generation_config.json: the one an open model's tokenizer came with (as its folder had it; also for a
    tiaoyu-architecture model on that tokenizer, e.g. a distilled student), else an open family's ids, else
    the ids of an open tokenizer by role, else tiaoyu's sampling defaults with </s> and <|im_end|> as end ids."""
    own = getattr(tokenizer, "generation_config", None)
    if own:
        return dict(own)
    if cfg.family:
        d = cfg.hf_config
        return {k: d[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if d.get(k) is not None}
    if getattr(tokenizer, "backend", None) == "hf":
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": sorted(tokenizer.stop_ids) or tokenizer.eos_id,
               "pad_token_id": tokenizer.pad_id}
        return {k: v for k, v in ids.items() if v is not None and v != []}
    return {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": [cfg.eos_token_id, 5],  # </s> and <|im_end|>
        "pad_token_id": cfg.pad_token_id,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_new_tokens": 256,
    }


def save_model_files(folder: Path, model: Transformer, tokenizer, extra_tensors: dict[str, torch.Tensor] | None = None) -> None:
    """config.json, model.safetensors, tokenizer files, generation_config.json into `folder` (not atomic
    on its own: call inside `atomic_dir`)."""
    write_model_folder(folder, model.config, {**model.state_dict(), **(extra_tensors or {})}, tokenizer)


DEFAULT_MAX_SHARD_SIZE = "2GB"
SHARD_SIZE_ENV = "TIAOYU_MAX_SHARD_SIZE"  # weights above this size are written in shards
_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12, "KIB": 2 ** 10, "MIB": 2 ** 20,
          "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_size(text: str | int) -> int:
    """Bytes from "2GB", "500MB", "1.5GiB" or a plain number of bytes (decimal units as transformers reads them)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise TiaoyuError(f"shard size {text!r}: expected a size such as 2GB, 500MB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def max_shard_bytes() -> int:
    """The largest weights file a folder is written with: ${TIAOYU_MAX_SHARD_SIZE} or 2GB."""
    return parse_size(os.environ.get(SHARD_SIZE_ENV) or DEFAULT_MAX_SHARD_SIZE)


def output_dtype(cfg: ModelConfig) -> torch.dtype:
    """The dtype a model's floating weights are written in: an open family's `save_dtype` (its source's, or
    --dtype's), fp32 for tiaoyu's own."""
    return getattr(torch, cfg.save_dtype) if cfg.family and cfg.save_dtype else torch.float32


def master_weights(model: torch.nn.Module, full_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The fp32 values of the trained parameters when the model folder is written in a narrower dtype (an open
    bf16/fp16 folder), as `master.NAME` tensors: kept in train_state so that --resume continues from the weights
    training had, exactly. `full_state`: the gathered state of a sharded (FSDP) model."""
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig) or output_dtype(cfg) == torch.float32:
        return {}
    return {f"master.{n}": (full_state[n] if full_state is not None else p.detach())
            for n, p in model.named_parameters() if p.requires_grad}


def write_model_folder(folder: Path, cfg: ModelConfig, state_dict: dict[str, torch.Tensor], tokenizer,
                       max_shard_size: int | str | None = None) -> None:
    """The one writer of a model folder: config.json (HF keys), the weights (these tensors in `output_dtype`; a
    tied head's copy left out) as model.safetensors, or above `max_shard_size` (default: max_shard_bytes) as
    model-0000K-of-0000N.safetensors + model.safetensors.index.json as transformers writes them,
    generation_config.json, tokenizer files. An open family's folder keeps its config.json (model/config.py),
    dtype, generation_config.json and tokenizer files: transformers loads it as the class it came from."""
    folder = Path(folder)
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
    dtype = output_dtype(cfg)
    sd = {k: v.detach().to("cpu", dtype=dtype if v.is_floating_point() else v.dtype).contiguous()
          for k, v in state_dict.items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    write_weights(folder, sd, max_shard_bytes() if max_shard_size is None else parse_size(max_shard_size))
    (folder / "generation_config.json").write_text(json.dumps(generation_config(cfg, tokenizer), indent=2),
                                                   encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save(folder)


def write_weights(folder: Path, sd: dict[str, torch.Tensor], max_bytes: int) -> list[str]:
    """`sd` as model.safetensors, or in shards of at most `max_bytes` each (a tensor larger than that gets a shard
    of its own) with the index transformers reads. Returns the files written."""
    sizes = {k: v.numel() * v.element_size() for k, v in sd.items()}
    total = sum(sizes.values())
    if total <= max_bytes:
        save_file(sd, str(folder / WEIGHTS), metadata={"format": "pt"})
        return [WEIGHTS]
    groups: list[list[str]] = [[]]
    size = 0
    for k in sd:
        if groups[-1] and size + sizes[k] > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += sizes[k]
    n = len(groups)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for name, keys in zip(names, groups):
        save_file({k: sd[k] for k in keys}, str(folder / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": {k: name for name, keys in zip(names, groups) for k in keys}}
    (folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
    return names + [WEIGHTS_INDEX]


def save_checkpoint(run: str | os.PathLike, step: int, model: Transformer, tokenizer,
                    train_state: dict[str, torch.Tensor] | None = None, info: dict | None = None,
                    keep: int = 0, extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write run/step-NNNNNN atomically, point run/latest at it, prune to the newest `keep` (0 = all)."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    final = run / f"step-{step:06d}"
    with atomic_dir(final) as tmp:
        save_model_files(tmp, model, tokenizer, extra_tensors)
        if train_state:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in train_state.items()},
                      str(tmp / "train_state.safetensors"))
        (tmp / "trainer.json").write_text(json.dumps(info or {}, indent=2, ensure_ascii=False, default=str),
                                          encoding="utf-8")
    set_latest(run, final.name)
    if keep > 0:
        for old in step_dirs(run)[:-keep]:
            if old.name != final.name:
                shutil.rmtree(old, ignore_errors=True)
    return final


def set_latest(run: Path, name: str) -> None:
    tmp = run / f".latest.{os.getpid()}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(name, tmp)
    os.replace(tmp, run / "latest")
    fsync_dir(run)


# ---- optimizer state <-> flat tensors (safetensors holds only tensors) ------------------------------

def optimizer_to_tensors(opt: torch.optim.Optimizer, prefix: str = "optim",
                         state_dict: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state (or `state_dict`, e.g. one gathered from FSDP shards) as flat tensors + JSON meta."""
    sd = state_dict if state_dict is not None else opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                           prefix: str = "optim") -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if not key.startswith(prefix + "."):
            continue
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
