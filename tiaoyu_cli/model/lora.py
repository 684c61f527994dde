"""LoRA: low-rank adapters on a frozen model (Hu et al. 2021; seed 000's "W + AB").

A linear layer y = W x is replaced by

    y = W x + (α / r) · B A dropout(x)          W: [out, in] frozen
                                                 A: [r, in]   trainable, Kaiming-uniform init
                                                 B: [out, r]  trainable, zero init

so the model computes exactly what it did before training (B = 0) and only r·(in + out) numbers
per wrapped layer learn instead of in·out. After training the update folds into the weight —
`merge_lora`: W' = W + (α/r)·B·A — and the merged model is an ordinary checkpoint.

Targets are named like PEFT's `target_modules`; the short names map to the Llama layer names
(and Mixtral's expert layers):

    q k v o         → self_attn.q_proj / k_proj / v_proj / o_proj
    gate up down    → mlp.gate_proj / up_proj / down_proj   (MoE experts: w1 / w3 / w2)

Saved in the PEFT layout, so `peft.PeftModel.from_pretrained(hf_model, "adapter/")` loads it:

    adapter_model.safetensors   base_model.model.<module>.lora_A.weight  [r, in]
                                base_model.model.<module>.lora_B.weight  [out, r]
    adapter_config.json         {"peft_type": "LORA", "r", "lora_alpha", "target_modules", "lora_dropout",
                                 "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path", …}
    tiaoyu_base.json            which base it belongs to: tokenizer fingerprint, architecture hash
                                (and the base weights' hash), so an adapter for another base is an error
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.io import load_tensors, read_json

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
BASE_INFO = "tiaoyu_base.json"
PEFT_PREFIX = "base_model.model."

# short name → the layer names it means (dense Llama name first, Mixtral expert name second)
TARGET_ALIASES: dict[str, tuple[str, ...]] = {
    "q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("o_proj",),
    "gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2"),
}
LAYER_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> None:
        if self.rank < 1:
            raise TiaoyuError(f"--rank must be at least 1, got {self.rank}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise TiaoyuError(f"--alpha must be a positive number, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise TiaoyuError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        resolve_targets(self.targets)


def parse_targets(spec: str | list[str]) -> list[str]:
    """"q,k,v" or ["q", "k", "v"] → ["q", "k", "v"] (validated)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [s.strip() for s in items if s.strip()]
    resolve_targets(items)
    return items


def resolve_targets(targets: list[str]) -> list[str]:
    """Short or full names → the layer names to wrap (order kept, no duplicates)."""
    if not targets:
        raise TiaoyuError("--targets: name at least one layer (q,k,v,o,gate,up,down)")
    out: list[str] = []
    for t in targets:
        names = TARGET_ALIASES.get(t) or ((t,) if t in LAYER_NAMES else None)
        if names is None:
            raise TiaoyuError(f"--targets: unknown layer {t!r}; choose from q,k,v,o,gate,up,down "
                              f"(or the full names {', '.join(LAYER_NAMES)})")
        out += [n for n in names if n not in out]
    return out


class LoRALinear(nn.Module):
    """y = x Wᵀ (+ b) + (α/r) · dropout(x) Aᵀ Bᵀ. Holds the wrapped layer's own `weight` parameter
    (same tensor, same state-dict name), so the base weights keep their checkpoint names."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init for A
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the wrapped layer starts out unchanged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """(α/r)·B·A: [out, in], what merging adds to W."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding W + (α/r)·B·A."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight + self.delta_weight().to(self.weight.dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.rank}, alpha={self.alpha}"


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, cfg: LoraConfig, freeze: bool = True) -> list[str]:
    """Wrap every targeted nn.Linear of `model` in a LoRALinear (in place). With `freeze`, every other
    parameter stops training. Returns the wrapped module names."""
    cfg.validate()
    if lora_modules(model):
        raise TiaoyuError("the model already carries LoRA layers; merge them first (tiaoyu lora merge)")
    layer_names = set(resolve_targets(cfg.targets))
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.rpartition(".")[2] in layer_names]
    if not names:
        raise TiaoyuError(f"--targets {','.join(cfg.targets)}: the model has no such layers "
                          f"(its linear layers end in {sorted({n.rpartition('.')[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)})})")
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for n in names:  # the new layers follow the model's train/eval mode (their dropout too)
        _set_module(model, n, LoRALinear(model.get_submodule(n), cfg.rank, cfg.alpha, cfg.dropout).train(model.training))
    for m in lora_modules(model).values():
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)
    return names


def lora_parameter_count(model: nn.Module) -> int:
    """Σ over wrapped layers of r·(in + out) — the trainable parameters LoRA adds."""
    return sum(m.rank * (m.in_features + m.out_features) for m in lora_modules(model).values())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its weight (W ← W + (α/r)·B·A) and put plain nn.Linear layers back."""
    for n, m in list(lora_modules(model).items()):
        _set_module(model, n, m.merged())
    return model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict a merged copy of `model` would have, without changing `model`."""
    mods = lora_modules(model)
    sd = {}
    for k, v in model.state_dict().items():
        if ".lora_A." in k or ".lora_B." in k:
            continue
        owner = k.rpartition(".")[0]
        if k.endswith(".weight") and owner in mods:
            v = v + mods[owner].delta_weight().detach().to(v.dtype)
        sd[k] = v
    return sd


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights under PEFT's names: base_model.model.<module>.lora_A.weight / lora_B.weight."""
    sd = {}
    for n, m in lora_modules(model).items():
        sd[f"{PEFT_PREFIX}{n}.lora_A.weight"] = m.lora_A.weight.detach().to("cpu").contiguous()
        sd[f"{PEFT_PREFIX}{n}.lora_B.weight"] = m.lora_B.weight.detach().to("cpu").contiguous()
    return sd


def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], where: str = "adapter") -> None:
    """Load PEFT-named LoRA weights into the LoRA layers of `model` (shapes checked; every layer filled)."""
    mods = lora_modules(model)
    seen = set()
    for key, t in sd.items():
        k = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        k = k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        for part in (".lora_A.weight", ".lora_B.weight"):
            if k.endswith(part):
                n = k[: -len(part)]
                if n not in mods:
                    raise TiaoyuError(f"{where}: weight {key} is for layer {n}, which this base model does not have "
                                      f"(an adapter for another base model?)")
                target = getattr(mods[n], part.split(".")[1]).weight
                if tuple(t.shape) != tuple(target.shape):
                    raise TiaoyuError(f"{where}: {key} has shape {tuple(t.shape)} but this base model needs "
                                      f"{tuple(target.shape)} (an adapter for another base model?)")
                with torch.no_grad():
                    target.copy_(t.to(target.dtype))
                seen.add((n, part))
                break
        else:
            raise TiaoyuError(f"{where}: unexpected tensor {key} (not a LoRA A/B weight)")
    missing = [f"{n}{p}" for n in mods for p in (".lora_A.weight", ".lora_B.weight") if (n, p) not in seen]
    if missing:
        raise TiaoyuError(f"{where}: missing {len(missing)} LoRA weight(s), e.g. {missing[0]}")


# ---- which base an adapter belongs to ----------------------------------------------------------

ARCH_KEYS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "n_experts", "n_shared_experts",
             "position", "tie_embeddings", "num_labels")


def config_hash(model_cfg) -> str:
    """16 hex chars identifying the architecture (the fields that decide tensor shapes and meaning)."""
    d = {k: getattr(model_cfg, k) for k in ARCH_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def weights_hash(folder: str | os.PathLike) -> str | None:
    """16 hex chars of sha256 over a checkpoint folder's weights: model.safetensors, or the shard index and
    every shard it lists, in order (None when there are none)."""
    folder = Path(folder)
    files = [folder / "model.safetensors"]
    if not files[0].is_file():
        index = folder / "model.safetensors.index.json"
        if not index.is_file():
            return None
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        files = [index] + [folder / s for s in shards]
    h = hashlib.sha256()
    for p in files:
        if not p.is_file():
            return None
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def base_info(model_cfg, tokenizer, base_dir: str | os.PathLike | None) -> dict:
    return {
        "tokenizer_fingerprint": getattr(tokenizer, "fingerprint", None),
        "config_hash": config_hash(model_cfg),
        "weights_sha256_16": weights_hash(base_dir) if base_dir else None,
        "base_model": str(base_dir) if base_dir else None,
        "architecture": {k: getattr(model_cfg, k) for k in ARCH_KEYS},
    }


def check_base(info: dict, model_cfg, tokenizer, base_dir: str | os.PathLike | None, where: str) -> list[str]:
    """Raise when the adapter was made for another base (tokenizer or architecture); return warnings
    (same architecture and tokenizer, other weights — e.g. an adapter of ckpt/base applied to ckpt/sft)."""
    fp = getattr(tokenizer, "fingerprint", None)
    want_fp = info.get("tokenizer_fingerprint")
    if want_fp and fp and want_fp != fp:
        raise TiaoyuError(f"{where} was trained on a base with tokenizer {want_fp}, but {base_dir or 'this base'} "
                          f"uses tokenizer {fp}: an adapter only fits the base model it was trained on")
    want_cfg = info.get("config_hash")
    if want_cfg and want_cfg != config_hash(model_cfg):
        arch = info.get("architecture") or {}
        diff = [f"{k} {arch.get(k)} ≠ {getattr(model_cfg, k)}" for k in ARCH_KEYS if k in arch and arch[k] != getattr(model_cfg, k)]
        raise TiaoyuError(f"{where} was trained on another architecture than {base_dir or 'this base'}"
                          + (f" ({', '.join(diff[:3])})" if diff else "") + ": an adapter only fits its own base model")
    warnings = []
    want_w = info.get("weights_sha256_16")
    if want_w and base_dir and weights_hash(base_dir) not in (None, want_w):
        warnings.append(f"{where} was trained on {info.get('base_model') or 'another checkpoint'}; "
                        f"{base_dir} has the same architecture and tokenizer but other weights")
    return warnings


# ---- adapter folders -------------------------------------------------------------------------------

def resolve_adapter_dir(path: str | os.PathLike) -> Path:
    """An adapter folder from: a folder with adapter_config.json, or a run folder (its latest, else newest step)."""
    p = Path(path)
    if not p.exists():
        raise TiaoyuError(f"{p}: no such adapter folder")
    if not p.is_dir():
        raise TiaoyuError(f"{p}: is a file; an adapter is a folder with {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    if (p / ADAPTER_CONFIG).exists():
        return p
    latest = p / "latest"
    if (latest / ADAPTER_CONFIG).exists():
        return latest.resolve()

    steps = sorted((q for q in p.iterdir() if q.is_dir() and re.match(r"^step-\d+$", q.name)
                    and (q / ADAPTER_CONFIG).exists()), key=lambda q: int(q.name[5:]))
    if steps:
        return steps[-1]
    raise TiaoyuError(f"{p}: not an adapter folder (no {ADAPTER_CONFIG}, no latest/ or step-*/ holding one)")


def read_adapter(path: str | os.PathLike) -> tuple[Path, dict, dict[str, torch.Tensor], dict]:
    """(folder, adapter_config, tensors, base info) of an adapter folder."""

    d = resolve_adapter_dir(path)
    cfg = read_json(d / ADAPTER_CONFIG)
    if not (d / ADAPTER_WEIGHTS).exists():
        raise TiaoyuError(f"{d}: adapter is missing {ADAPTER_WEIGHTS}")
    tensors = load_tensors(d / ADAPTER_WEIGHTS)
    info = read_json(d / BASE_INFO) if (d / BASE_INFO).exists() else {}
    return d, cfg, tensors, info


def peft_config(cfg: LoraConfig, base_dir: str | os.PathLike | None, wrapped: list[str] | None = None) -> dict:
    """adapter_config.json; `target_modules` lists the layer names actually wrapped (when known)."""
    names = resolve_targets(cfg.targets)
    if wrapped:
        present = {n.rpartition(".")[2] for n in wrapped}
        names = [n for n in names if n in present]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": names,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
        "base_model_name_or_path": str(base_dir) if base_dir else None,
    }


def config_from_peft(d: dict, where: str) -> LoraConfig:
    if d.get("peft_type") != "LORA":
        raise TiaoyuError(f"{where}: peft_type {d.get('peft_type')!r} is not a LoRA adapter")
    for unsupported in ("use_dora", "use_rslora"):
        if d.get(unsupported):
            raise TiaoyuError(f"{where}: {unsupported} adapters are not supported")
    if d.get("bias", "none") != "none":
        raise TiaoyuError(f"{where}: bias {d.get('bias')!r} is not supported (only \"none\")")
    if d.get("rank_pattern") or d.get("alpha_pattern"):
        raise TiaoyuError(f"{where}: per-layer rank_pattern/alpha_pattern is not supported")
    try:
        targets = d["target_modules"]
        if isinstance(targets, str):
            raise TiaoyuError(f"{where}: target_modules as a regular expression is not supported; list layer names")
        return LoraConfig(rank=int(d["r"]), alpha=float(d["lora_alpha"]), dropout=float(d.get("lora_dropout", 0.0)),
                          targets=[str(t) for t in targets])
    except (KeyError, TypeError, ValueError) as e:
        raise TiaoyuError(f"{where}: invalid {ADAPTER_CONFIG} ({e})") from None


def save_adapter(folder: str | os.PathLike, model: nn.Module, cfg: LoraConfig, info: dict) -> None:
    """Write adapter_model.safetensors, adapter_config.json and tiaoyu_base.json into `folder`
    (not atomic on its own: call inside `atomic_dir`, or write to a fresh folder)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(lora_state_dict(model), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    pcfg = peft_config(cfg, info.get("base_model"), list(lora_modules(model)))
    (folder / ADAPTER_CONFIG).write_text(json.dumps(pcfg, indent=2) + "\n", encoding="utf-8")
    (folder / BASE_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load_adapter(model: nn.Module, path: str | os.PathLike, tokenizer=None,
                 base_dir: str | os.PathLike | None = None) -> tuple[LoraConfig, list[str]]:
    """Apply the LoRA adapter at `path` to `model` (in place). Checks that it belongs to this base.
    Returns (its config, warnings)."""
    d, pcfg, tensors, info = read_adapter(path)
    where = str(d)
    cfg = config_from_peft(pcfg, where)
    warnings = check_base(info, model.config, tokenizer, base_dir, where) if info else []
    apply_lora(model, cfg, freeze=True)
    load_lora_state_dict(model, tensors, where)
    return cfg, warnings
