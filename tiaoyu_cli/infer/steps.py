"""The decode step factory: which implementation runs a model's forward pass during generation.

`Transformer.forward` (model/transformer.py) is the reference. The two steps here run it as it is:

    ForwardStep     the prompt, then one token per step, through `model(…, kv_cache=cache)`
    RecomputeStep   no cache: every step runs the whole sequence again (`use_cache=False`; slow, it proves
                    that the cache changes nothing)

The steps in infer/fast/ are optimisations of the same computation, each tested against it (its
docstring lists the tests): `NumpyStep` for small fp32 models on CPU, `OneTokenStep` for other models
the stock block runs (LoRA, MoE, autocast, GPUs). `make_step` picks one; anything it does not know
(qk-norm, sliding-window or foreign models, `fast=False`) gets `ForwardStep`.

Every step has the same interface, so the generation loop has one path:

    step = make_step(model, batch, max_len, device)
    logits = step.prefill(ids, mask)     # [B, T] left-padded prompts → logits [B, V] of the last column
    logits = step(next_tokens)           # [B] → [B, V]
    step.select(keep)                    # rows that finished leave the batch

(tests/test_steps.py: the choice, and every step's logits against `Transformer.forward`.)

The serve slots (continuous batching, infer/slots.py) get theirs from `make_slot_step`:
`prefill_rows(prompts, first)` → [k, V] and `slot_step(tokens, lengths, width)` → [n, V].
"""

from __future__ import annotations

import torch

from tiaoyu_cli.infer.fast.numpy_step import NumpyStep
from tiaoyu_cli.infer.fast.torch_step import OneTokenStep, SlotStep
from tiaoyu_cli.model.kv_cache import KVCache


class ForwardStep:
    """The reference with a cache: `Transformer.forward` on the prompt, then on one token per step."""

    name = "forward"

    def __init__(self, model, cache: KVCache):
        self.model, self.cache = model, cache

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(ids, attention_mask=mask, kv_cache=self.cache, last_only=True).logits[:, -1]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens[:, None], kv_cache=self.cache, last_only=True).logits[:, -1]

    def select(self, keep: torch.Tensor) -> None:
        self.cache.select(keep)


class RecomputeStep:
    """The reference without a cache: every step runs `Transformer.forward` over the whole sequence."""

    name = "recompute"

    def __init__(self, model):
        self.model = model
        self.ids = self.mask = None  # [B, T] the sequences so far and their mask (left padding)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.ids, self.mask = ids, mask
        return self.model(ids, attention_mask=mask, last_only=True).logits[:, -1]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        return self.model(self.ids, attention_mask=self.mask, last_only=True).logits[:, -1]

    def select(self, keep: torch.Tensor) -> None:
        self.ids, self.mask = self.ids[keep], self.mask[keep]


def make_step(model, batch: int, max_len: int, device: torch.device, use_cache: bool = True, fast: bool = True):
    """The step that generates `batch` rows of at most `max_len` tokens (prompt included) with `model`.

    Call it where generation runs (under `torch.inference_mode()` and the autocast in use): the cache
    takes the autocast dtype, and the numpy step runs only without autocast. `use_cache=False` gives
    `RecomputeStep`, `fast=False` `ForwardStep`; else `NumpyStep` where `NumpyStep.prepare` takes the
    model, `OneTokenStep` where it supports it, `ForwardStep` otherwise.
    """
    if not use_cache:
        return RecomputeStep(model)
    cache = KVCache.for_model(model, batch, max_len)
    if not fast:
        return ForwardStep(model, cache)
    prepared = NumpyStep.prepare(model, device, not torch.is_autocast_enabled(device.type), batch)
    if prepared is not None:  # small fp32 models on CPU: the numpy step, prompt included
        return NumpyStep(model, cache, prepared=prepared)
    if OneTokenStep.supports(model):
        return OneTokenStep(model, cache)
    return ForwardStep(model, cache)


def supports_slots(model) -> bool:
    """Whether continuous batching can run `model` (the stock tiaoyu Transformer: a step of its own per row)."""
    return OneTokenStep.supports(model)


def make_slot_step(model, cache: KVCache):
    """The step of a slot cache (infer/slots.py, rows 0 … n−1 each at its own length; capacity = the cache's
    rows): `NumpyStep` where `NumpyStep.prepare` takes the model for that many rows, else `SlotStep`."""
    device = cache.k.device
    prepared = NumpyStep.prepare(model, device, not torch.is_autocast_enabled(device.type), cache.k.shape[1])
    if prepared is not None:
        return NumpyStep(model, cache, prepared=prepared)
    return SlotStep(model, cache)
