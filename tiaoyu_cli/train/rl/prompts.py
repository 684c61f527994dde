"""The prompts (and preference pairs) an RL stage trains on and the ones it holds out: how many tokens a prompt
may take, a fixed random held-out share, and reading prompt files with both."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from tiaoyu_cli.data.preference import load_prompts
from tiaoyu_cli.errors import TiaoyuError


@dataclass
class RLInputs:
    """The inputs PPO and GRPO share besides the start checkpoint and the prompts: the base of their stage
    configs (stages/ppo.py, stages/grpo.py)."""

    ref: Optional[Path] = field(default=None, metadata={
        "help": "reference checkpoint for the KL term (default: the start)"})
    val: Optional[Path] = field(default=None, metadata={
        "help": "held-out prompts (default: hold out --val-frac of data)"})
    val_frac: float = field(default=0.05, metadata={"help": "share of the prompts held out when --val is not given"})
    eval_before: bool = field(default=True, metadata={"help": "evaluate the starting model too"})
    skip_bad: bool = field(default=False, metadata={"help": "skip (and count) bad records instead of stopping"})


def prompt_room(context: int, max_new_tokens: int, prefix: int = 0, what: str = "the model's context") -> int:
    """Tokens a prompt may take so that `max_new_tokens` (and a `prefix` the prompt is given) still fit."""
    room = context - max_new_tokens - prefix
    if room < 1:
        raise TiaoyuError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in {what} of {context} tokens")
    return room


def split_holdout(items: list, frac: float, seed: int = 0) -> tuple[list, list]:
    """(train, held out): a fixed random `frac` of the items (at least one when frac > 0 and there are
    at least two items) is held out for evaluation."""
    if frac <= 0 or len(items) < 2:
        return items, []
    if frac >= 1:
        raise TiaoyuError("--val-frac must be below 1")
    n_val = max(1, int(round(len(items) * frac)))
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    held = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def load_rl_prompts(data, val, tok, room: int, *, need_answer: bool, skip_bad: bool, context_hint: str,
                    val_frac: float, seed: int) -> tuple[list, list, int]:
    """The prompts a PPO/GRPO run trains on and the ones it holds out: all of `val` when given, else a fixed
    random `val_frac` of `data` (split_holdout). Returns (train, held out, bad records of `data` skipped)."""
    stats: dict = {}
    prompts = load_prompts(data, tok, room, need_answer=need_answer, skip_bad=skip_bad, stats=stats,
                           context_hint=context_hint)
    if val is not None:
        held = load_prompts(val, tok, room, need_answer=need_answer, skip_bad=skip_bad, context_hint=context_hint)
    else:
        prompts, held = split_holdout(prompts, val_frac, seed)
    return prompts, held, stats.get("skipped", 0)
