"""Optimizers (AdamW, or Muon on the hidden matrices + AdamW on the rest) and learning-rate schedules."""

from __future__ import annotations

import math
from typing import Any

import torch

OPTIMIZERS = ("adamw", "muon")
# the hidden weight matrices of the blocks (attention and feed-forward projections, MoE experts):
# what Muon orthogonalizes. Embeddings, the head, norms, routers, LoRA factors and extra heads stay on AdamW.
_MUON_SUFFIXES = ("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight")


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    return p.ndim == 2 and ".layers." in name and name.endswith(_MUON_SUFFIXES) and "lora_" not in name


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    device: torch.device, optim: str = "adamw") -> torch.optim.Optimizer | MuonAdamW:
    """AdamW with no decay on norms, biases and embeddings (1-D tensors and `embed_*`); the fused
    kernel (one pass over all parameters) on CUDA and CPU where this torch has it.

    `optim="muon"`: torch.optim.Muon on the blocks' 2-D hidden matrices, AdamW on the rest (as nanochat
    and modded-nanogpt do). Muon's step is scaled by 0.2·√max(rows, cols) ("match_rms_adamw", Moonshot's
    rule) so its update has AdamW's RMS and both share `lr` and the schedule.
    """
    if optim not in OPTIMIZERS:
        raise ValueError(f"optimizer {optim!r}: choose {' or '.join(OPTIMIZERS)}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon_params = [p for n, p in named if optim == "muon" and is_muon_param(n, p)]
    taken = {id(p) for p in muon_params}
    decay, no_decay = [], []
    for name, p in named:
        if id(p) not in taken:
            (no_decay if p.ndim < 2 or "embed" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    adamw = _adamw([g for g in groups if g["params"]], lr, betas, device)
    if not muon_params:
        return adamw
    muon = torch.optim.Muon(muon_params, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
    return MuonAdamW(muon, adamw)


def _adamw(groups: list[dict], lr: float, betas: tuple[float, float], device: torch.device) -> torch.optim.AdamW:
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
        except (RuntimeError, ValueError, TypeError):  # an older torch without the fused kernel here
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


class MuonAdamW:
    """Muon and AdamW stepped together, seen by the loop as one optimizer.

    `param_groups` lists Muon's groups, then AdamW's (the loop sets each group's lr). `state_dict()`
    numbers the parameters the same way (Muon's first, AdamW's after them), so it has the shape of a
    single torch optimizer's and `--resume` saves and restores it like one.
    """

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        self._n_muon = sum(len(g["params"]) for g in muon.param_groups)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.muon.param_groups + self.adamw.param_groups

    @torch.no_grad()
    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        m, a, n = self.muon.state_dict(), self.adamw.state_dict(), self._n_muon
        state = dict(m["state"])
        state.update({pid + n: st for pid, st in a["state"].items()})
        groups = ([{**g, "optimizer": "muon"} for g in m["param_groups"]]
                  + [{**g, "params": [pid + n for pid in g["params"]], "optimizer": "adamw"} for g in a["param_groups"]])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        n, groups = self._n_muon, sd["param_groups"]
        kinds = [g.get("optimizer") for g in groups]
        if kinds != ["muon"] * len(self.muon.param_groups) + ["adamw"] * len(self.adamw.param_groups):
            raise ValueError(f"the saved optimizer has groups {kinds}, this run uses Muon + AdamW")
        plain = [{k: v for k, v in g.items() if k != "optimizer"} for g in groups]
        mg = [g for g, kind in zip(plain, kinds) if kind == "muon"]
        ag = [{**g, "params": [pid - n for pid in g["params"]]} for g, kind in zip(plain, kinds) if kind == "adamw"]
        for g in mg:  # JSON turns the Newton–Schulz coefficients into a list
            g["ns_coefficients"] = tuple(g["ns_coefficients"])
        state = {int(k): v for k, v in sd["state"].items()}
        self.muon.load_state_dict({"state": {k: v for k, v in state.items() if k < n}, "param_groups": mg})
        self.adamw.load_state_dict({"state": {k - n: v for k, v in state.items() if k >= n}, "param_groups": ag})


def lr_at(step: int, total: int, base_lr: float, warmup: int, schedule: str = "cosine", min_ratio: float = 0.1,
          decay_frac: float = 0.2) -> float:
    """Learning rate at optimizer step `step` (0-based) of `total`.

    - linear warmup over `warmup` steps, then
    - cosine: half-cosine from base_lr down to min_ratio·base_lr at `total`;
    - wsd (warmup-stable-decay): constant, then linear decay to min_ratio over the last `decay_frac` of steps;
    - constant.
    """
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return base_lr
    min_lr = base_lr * min_ratio
    if schedule == "wsd":
        decay_start = int(total * (1 - decay_frac))
        if step < decay_start:
            return base_lr
        t = min(1.0, (step - decay_start) / max(1, total - decay_start))
        return base_lr + (min_lr - base_lr) * t
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * t))
