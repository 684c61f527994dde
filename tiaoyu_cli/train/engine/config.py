"""The training loop's options as a plain dataclass (no torch import: the CLI builds its flags from it)."""

from __future__ import annotations

import math

from dataclasses import dataclass

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.train.engine.report_to import check_report_to


@dataclass
class TrainConfig:
    """Options of the loop itself (each stage has its own dataclass for its objective and data)."""

    out: str = "ckpt"
    max_steps: int = 0  # budget: optimizer steps (0 = unset)
    max_tokens: int = 0  # budget: training tokens (0 = unset)
    max_time: float = 0.0  # budget: seconds of training (0 = unset)
    epochs: float = 0.0  # budget for finite datasets (stage.steps_per_epoch), 0 = unset
    batch_size: int = 16  # micro-batch size per process
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | wsd | constant
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    optim: str = "adamw"  # adamw | muon (Muon on the blocks' hidden matrices, AdamW on the rest)
    device: str = "auto"
    dtype: str = "auto"  # auto | bf16 | fp32
    compile: bool = False
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    save_every: int = 0  # 0 = only at the end
    keep: int = 2  # step folders to keep (0 = all)
    resume: bool = False
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the processes (FSDP2)
    # processes: --nproc N on this machine (DDP, as torchrun --nproc_per_node N); --nnodes > 1 for several
    # machines, each started with its --node-rank and the same --master-addr/--master-port
    nproc: int = 0
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0 = a free port (one node only)
    # metric loggers fed the lines of metrics.jsonl: none | tensorboard | wandb, comma-separated (or all)
    report_to: str = "none"

    def validate(self) -> None:
        if not (self.max_steps or self.max_tokens or self.max_time or self.epochs):
            raise TiaoyuError("no training budget: give --max-steps, --max-tokens, --max-time or --epochs")
        for name in ("max_steps", "max_tokens", "max_time", "epochs", "eval_every", "save_every", "keep",
                     "warmup_steps", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise TiaoyuError(f"--{name.replace('_', '-')} must not be negative")
        for name in ("batch_size", "grad_accum", "log_every"):
            if getattr(self, name) <= 0:
                raise TiaoyuError(f"--{name.replace('_', '-')} must be positive")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TiaoyuError("--lr must be a positive number")
        if not 0 <= self.min_lr_ratio <= 1:
            raise TiaoyuError("--min-lr-ratio must be between 0 and 1")
        if self.nproc < 0 or self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise TiaoyuError("--nproc must not be negative, --nnodes at least 1, --node-rank in [0, --nnodes)")
        if self.nnodes > 1 and not 0 < self.master_port < 65536:
            raise TiaoyuError("--nnodes > 1: give every node the same --master-addr and --master-port (the "
                              "address and a free port of node 0)")
        if self.optim not in ("adamw", "muon"):
            raise TiaoyuError(f"--optim {self.optim!r}: choose adamw or muon")
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise TiaoyuError(f"--schedule {self.schedule!r}: choose cosine, wsd or constant")
        check_report_to(self.report_to)  # a missing logger package fails here, before anything loads
