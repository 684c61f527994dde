"""Two more parameter-efficient fine-tuning methods (seed 004): soft prompts and bottleneck adapters.

Soft prompt (prompt tuning, Lester et al. 2021): N trainable vectors P [N, d] are put in front of
every input's token embeddings; the whole model stays frozen. Only N·d numbers learn.

    x = [P ; embed(tokens)] → transformer → drop the first N outputs

Bottleneck adapter (Houlsby et al. 2019): a small residual MLP after the attention output
projection and after the FFN's down projection of every block; the rest stays frozen.

    y = W x;   y ← y + U · gelu(D · y)      D: [m, d] (down), U: [d, m] (up, zero init: starts as identity)

Trainable: 2·d·m per wrapped layer. Neither method folds into the weights, so a checkpoint trained
with them holds the unchanged base in model.safetensors plus the extra weights beside it:
    sft_extras.safetensors     prompt_embeddings [N, d]               (PEFT's PROMPT_TUNING tensor name)
                               or <layer>.adapter_down/up.weight
    sft_extras.json            {"peft_type": "PROMPT_TUNING" | "BOTTLENECK", …}

(Not named adapter_config.json: transformers would then try to load the folder as a PEFT adapter.)

`tiaoyu chat` applies them (`apply_checkpoint_extras`); other stages read model.safetensors only,
so continue training from a `--method full` or `--method lora` (merged) checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.io import load_tensors, read_json
from tiaoyu_cli.model.lora import _set_module

EXTRAS_WEIGHTS = "sft_extras.safetensors"
EXTRAS_CONFIG = "sft_extras.json"
ADAPTER_LAYERS = ("o_proj", "down_proj", "w2")  # attention output, FFN output (MoE: every expert's w2)


# ---- soft prompt ---------------------------------------------------------------------------------

class SoftPrompt(nn.Module):
    """N trainable prompt vectors, initialised from the embeddings of random vocabulary tokens."""

    def __init__(self, n_tokens: int, dim: int, init_from: torch.Tensor | None = None, seed: int = 0):
        super().__init__()
        if n_tokens < 1:
            raise TiaoyuError(f"--virtual-tokens must be at least 1, got {n_tokens}")
        w = torch.zeros(n_tokens, dim)
        if init_from is not None:
            g = torch.Generator().manual_seed(seed)
            lo = 8 if init_from.shape[0] > 8 else 0  # skip the special tokens
            idx = torch.randint(lo, init_from.shape[0], (n_tokens,), generator=g)
            w.copy_(init_from.detach().float().cpu()[idx])
        else:
            nn.init.normal_(w, std=0.02)
        self.prompt_embeddings = nn.Parameter(w)

    @property
    def n_tokens(self) -> int:
        return self.prompt_embeddings.shape[0]

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.prompt_embeddings[None].expand(batch_size, -1, -1)  # [B, N, d]


def grow_kv_cache(cache, extra: int) -> None:
    """Give a KV cache `extra` more columns (the soft prompt's positions)."""
    pad = lambda t: torch.cat([t, t.new_zeros(*t.shape[:-2], extra, t.shape[-1])], dim=-2)  # noqa: E731
    cache.k, cache.v = pad(cache.k), pad(cache.v)
    cache.key_mask = torch.cat([cache.key_mask, cache.key_mask.new_ones(cache.key_mask.shape[0], extra)], dim=1)
    cache.max_len += extra


class SoftPromptModel(nn.Module):
    """A model with a soft prompt in front of every input — for generation and evaluation.

    Same call as `Transformer.forward`; the outputs cover the real tokens only. With a KV cache, the
    prefill call (empty cache) puts the prompt in the cache (growing it by N columns) and later
    calls only add tokens after it."""

    def __init__(self, model: nn.Module, prompt: SoftPrompt):
        super().__init__()
        self.inner, self.prompt = model, prompt

    @property
    def config(self):
        return self.inner.config

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(self, input_ids, attention_mask=None, kv_cache=None, last_only=False, compute_logits=True,
                input_embeds_prefix=None):
        if kv_cache is not None and kv_cache.length > 0:  # decoding after the prefill: the prompt is cached
            return self.inner(input_ids, attention_mask=attention_mask, kv_cache=kv_cache, last_only=last_only,
                              compute_logits=compute_logits, input_embeds_prefix=input_embeds_prefix)
        if input_embeds_prefix is not None:
            raise ValueError("SoftPromptModel already supplies the prefix")
        B = input_ids.shape[0]
        n = self.prompt.n_tokens
        if kv_cache is not None:
            grow_kv_cache(kv_cache, n)
        out = self.inner(input_ids, attention_mask=attention_mask, kv_cache=kv_cache, last_only=last_only,
                         compute_logits=compute_logits, input_embeds_prefix=self.prompt(B))
        return strip_prefix(out, n, last_only)


def strip_prefix(out, n: int, last_only: bool = False):
    """Drop the first n positions (the soft prompt) from a ModelOutput."""

    return dataclasses.replace(
        out,
        logits=out.logits if (out.logits is None or last_only) else out.logits[:, n:],
        hidden=out.hidden[:, n:],
        scores=None if out.scores is None else out.scores[:, n:],
    )


# ---- bottleneck adapters -------------------------------------------------------------------------

class BottleneckLinear(nn.Module):
    """y = x Wᵀ; y + U·gelu(D·y). Keeps the wrapped layer's `weight` under its own name."""

    def __init__(self, base: nn.Linear, bottleneck: int):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        dev, dt = base.weight.device, base.weight.dtype
        self.adapter_down = nn.Linear(self.out_features, bottleneck, bias=False, device=dev, dtype=dt)
        self.adapter_up = nn.Linear(bottleneck, self.out_features, bias=False, device=dev, dtype=dt)
        nn.init.normal_(self.adapter_down.weight, std=0.02)
        nn.init.zeros_(self.adapter_up.weight)  # starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y + self.adapter_up(F.gelu(self.adapter_down(y)))


def apply_bottleneck(model: nn.Module, bottleneck: int, freeze: bool = True) -> list[str]:
    """Wrap the attention output and FFN output projections of every block (in place)."""
    if bottleneck < 1:
        raise TiaoyuError(f"--adapter-dim must be at least 1, got {bottleneck}")

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] in ADAPTER_LAYERS]
    if not names:
        raise TiaoyuError("the model has no o_proj/down_proj layers to put adapters on")
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for n in names:
        _set_module(model, n, BottleneckLinear(model.get_submodule(n), bottleneck).train(model.training))
    for m in model.modules():
        if isinstance(m, BottleneckLinear):
            m.adapter_down.weight.requires_grad_(True)
            m.adapter_up.weight.requires_grad_(True)
    return names


def bottleneck_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if ".adapter_down." in k or ".adapter_up." in k}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without adapter or LoRA tensors (the checkpoint's model.safetensors)."""
    return {k: v for k, v in model.state_dict().items()
            if not any(s in k for s in (".adapter_down.", ".adapter_up.", ".lora_A.", ".lora_B."))}


# ---- saving and loading the extras of a checkpoint ------------------------------------------------

def save_extras(folder: str | os.PathLike, kind: str, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Write sft_extras.safetensors + sft_extras.json into `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / EXTRAS_WEIGHTS),
              metadata={"format": "pt"})
    (folder / EXTRAS_CONFIG).write_text(json.dumps({"peft_type": kind, **config}, indent=2) + "\n", encoding="utf-8")


def prompt_config(prompt: SoftPrompt, model_cfg, base_dir=None) -> dict:
    return {"task_type": "CAUSAL_LM", "num_virtual_tokens": prompt.n_tokens, "token_dim": model_cfg.dim,
            "num_transformer_submodules": 1, "num_attention_heads": model_cfg.n_heads,
            "num_layers": model_cfg.n_layers, "prompt_tuning_init": "RANDOM", "inference_mode": True,
            "base_model_name_or_path": str(base_dir) if base_dir else None}


def apply_checkpoint_extras(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """A checkpoint trained with `--method prompt` or `--method adapter` keeps those weights beside
    model.safetensors (sft_extras.*): put them back on `model` and return the model to use.
    Checkpoints without them come back unchanged."""

    folder = Path(folder)
    if not (folder / EXTRAS_CONFIG).exists():
        return model
    cfg = read_json(folder / EXTRAS_CONFIG)
    kind = cfg.get("peft_type")
    tensors = load_tensors(folder / EXTRAS_WEIGHTS)
    return attach_extras(model, kind, cfg, tensors, str(folder))


def attach_extras(model: nn.Module, kind: str, cfg: dict, tensors: dict[str, torch.Tensor], where: str) -> nn.Module:
    if kind == "PROMPT_TUNING":
        w = tensors.get("prompt_embeddings")
        if w is None or w.ndim != 2 or w.shape[1] != model.config.dim:
            shape = None if w is None else tuple(w.shape)
            raise TiaoyuError(f"{where}: prompt_embeddings of shape {shape} do not fit a model of width {model.config.dim}")
        prompt = SoftPrompt(w.shape[0], w.shape[1])
        with torch.no_grad():
            prompt.prompt_embeddings.copy_(w)
        dev = next(model.parameters()).device
        return SoftPromptModel(model, prompt.to(dev)).eval()
    if kind == "BOTTLENECK":
        dim = int(cfg.get("bottleneck", 0) or 0)
        apply_bottleneck(model, dim)
        own = model.state_dict()
        for k, v in tensors.items():
            if k not in own or own[k].shape != v.shape:
                raise TiaoyuError(f"{where}: adapter tensor {k} {tuple(v.shape)} does not fit this model")
        model.load_state_dict(tensors, strict=False)
        return model
    raise TiaoyuError(f"{where}: unknown adapter type {kind!r}")
