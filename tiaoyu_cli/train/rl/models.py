"""The models an RL or preference stage loads besides the one it trains, with the checks users need: the
policy (a language model, not a classifier), a frozen reference, a frozen reward model (a one-output
`score` head) — each checked against the policy's tokenizer."""

from __future__ import annotations

import os

import torch.nn as nn

from tiaoyu_cli.checkpoint import load_config, load_model, load_tokenizer
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.tokenizer.core import check_same_tokenizer


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: a reference or reward model."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_policy(start, stage: str):
    """(model, folder, tokenizer) of the language model an RL stage trains; a reward model or classifier
    (a score head) is refused."""
    model, folder = load_model(start)
    if model.config.num_labels:
        raise TiaoyuError(f"{folder} has a score head (a reward model or classifier): {stage} trains a language model")
    return model, folder, load_tokenizer(folder)


def load_reference(path: str | os.PathLike, policy_tok, device="cpu", what: str = "reference") -> nn.Module:
    """A frozen copy of a checkpoint (the DPO/PPO/GRPO reference), checked against the policy's tokenizer."""

    check_same_tokenizer(policy_tok, load_tokenizer(path), f"{what} {path}")
    model, _ = load_model(path, device=device)
    return freeze(model)


def load_reward_model(path: str | os.PathLike, policy_tok=None, device="cpu") -> tuple[nn.Module, object]:
    """A frozen reward model (a checkpoint with a `score` head of one output). Returns (model, tokenizer)."""

    cfg = load_config(path)
    if cfg.num_labels != 1:
        what = "no reward head" if cfg.num_labels == 0 else f"a classification head with {cfg.num_labels} labels"
        raise TiaoyuError(f"{path} is not a reward model: it has {what}, not a `score` head with one output "
                          f"(train one with `tiaoyu rlhf reward`)")
    tok = load_tokenizer(path)
    check_same_tokenizer(policy_tok, tok, f"reward model {path}")
    model, _ = load_model(path, device=device)
    return freeze(model), tok
