"""What the stages on preference pairs (reward, DPO) share: a stage base that visits the training pairs in
shuffled passes (the sampler is the whole data state of a checkpoint) and keeps the held-out pairs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from tiaoyu_cli.data.preference import PairExample, collate_pairs, load_pairs
from tiaoyu_cli.train.engine.sampler import EpochSampler
from tiaoyu_cli.train.engine.stage import BaseStage
from tiaoyu_cli.train.rl.prompts import split_holdout


@dataclass(kw_only=True)
class PairInputs:
    """The inputs the stages on preference pairs share besides the start checkpoint: the base of their stage
    configs (stages/reward.py, stages/dpo.py)."""

    data: Path = field(metadata={"help": "preference JSONL: {prompt, chosen, rejected}"})
    val: Optional[Path] = field(default=None, metadata={
        "help": "held-out preference JSONL (default: hold out --val-frac of data)"})
    skip_bad: bool = field(default=False, metadata={"negatable": False, "help": "skip (and count) bad records instead of stopping"})


def load_pair_split(inputs: PairInputs, tok, max_len: int, val_frac: float, seed: int) -> tuple[list, list, int]:
    """(training pairs, held-out pairs, bad records skipped): all of --val when given, else a fixed random
    `val_frac` of the data (split_holdout)."""
    stats: dict = {}
    pairs = load_pairs(inputs.data, tok, max_len, inputs.skip_bad, stats)
    if inputs.val is not None:
        held = load_pairs(inputs.val, tok, max_len, inputs.skip_bad)
    else:
        pairs, held = split_holdout(pairs, val_frac, seed)
    return pairs, held, stats.get("skipped", 0)


class PairStage(BaseStage):
    """What the stages on preference pairs (reward, dpo) share: shuffled passes over the training pairs
    (the sampler is the whole data state of a checkpoint), held-out pairs, the config in trainer.json."""

    def __init__(self, train: list[PairExample], val: list[PairExample], cfg, batch_size: int, seed: int = 0):
        self.train, self.val, self.cfg = train, val, cfg
        self.batch_size, self.seed = batch_size, seed
        self.steps_per_epoch = max(1, len(train) // batch_size)

    def setup(self, trainer) -> None:
        super().setup(trainer)
        self.device = trainer.device
        self.sampler = EpochSampler(len(self.train), self.batch_size, self.seed, rank=trainer.dist.rank,
                                    world=trainer.dist.world_size)

    def next_batch(self) -> dict[str, torch.Tensor]:
        pairs = [self.train[i] for i in self.sampler.next_indices()]
        return collate_pairs(pairs, device=self.device)

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])

    def info(self) -> dict:
        return {**dataclasses.asdict(self.cfg), "train_pairs": len(self.train), "val_pairs": len(self.val)}
