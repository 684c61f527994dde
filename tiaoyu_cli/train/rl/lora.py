"""LoRA in the preference and RL stages (`--method lora`): the policy with its adapters switched off serves
as its own reference, and a checkpoint holds the merged model plus the PEFT adapter files."""

from __future__ import annotations

import torch.nn as nn

from tiaoyu_cli.checkpoint import write_model_folder
from tiaoyu_cli.model import lora as L
from tiaoyu_cli.model.lora import lora_modules
from tiaoyu_cli.train.engine.distributed import unwrap


class adapters_off:
    """Context manager: the LoRA layers of `model` compute their frozen base layer only (scaling 0),
    so the policy itself serves as its reference — no second copy of the model in memory."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.saved: list[tuple[nn.Module, float]] = []

    def __enter__(self):
        self.saved = [(m, m.scaling) for m in lora_modules(unwrap(self.model)).values()]
        for m, _ in self.saved:
            m.scaling = 0.0
        return self.model

    def __exit__(self, *exc):
        for m, s in self.saved:
            m.scaling = s
        return False


class LoraCheckpoint:
    """How a `--method lora` stage writes and resumes checkpoints: the merged model (an ordinary
    checkpoint every other command reads) plus the PEFT adapter files in the same folder."""

    full_model = False

    def __init__(self, lora_cfg, base_info: dict):
        self.lora_cfg, self.base_info = lora_cfg, base_info

    def save_model(self, folder, model: nn.Module, tokenizer) -> None:
        model = unwrap(model)
        write_model_folder(folder, model.config, L.merged_state_dict(model), tokenizer)
        L.save_adapter(folder, model, self.lora_cfg, self.base_info)

    def load_for_resume(self, folder, model: nn.Module) -> None:
        _, _, tensors, _ = L.read_adapter(folder)
        L.load_lora_state_dict(unwrap(model), tensors, str(folder))


def apply_lora_for_rl(model: nn.Module, opts: dict, tokenizer, base_dir) -> tuple[nn.Module, LoraCheckpoint]:
    """Wrap `model` with LoRA layers (everything else frozen). opts: rank, alpha, dropout, targets."""

    cfg = L.LoraConfig(rank=int(opts.get("rank", 8)), alpha=float(opts.get("alpha", 16.0)),
                       dropout=float(opts.get("dropout", 0.0)),
                       targets=L.parse_targets(opts.get("targets", "q,k,v,o,gate,up,down")))
    L.apply_lora(model, cfg, freeze=True)
    return model, LoraCheckpoint(cfg, L.base_info(model.config, tokenizer, base_dir))
