"""Process-group setup for torchrun (DDP). The same code runs 2 CPU processes on gloo in tests.

Besides the default group (NCCL on GPUs, gloo on CPU) a run has a *control* group on gloo for
tiny CPU-side agreements (stop on a signal, the training clock, "did every process start/save
fine?"): reading a CPU tensor never makes the host wait for the GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_name: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda:")
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local)


def control_group(info: DistInfo):
    """A gloo group for CPU-side agreement; None (= the default group) when that is gloo already."""
    if not info.enabled:
        return None
    if dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def all_reduce_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        x = x.detach().clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= info.world_size
    return x


def all_reduce_max_(x: torch.Tensor, info: DistInfo, group=None) -> torch.Tensor:
    """In place: the element-wise maximum over processes (x is a CPU tensor for the control group)."""
    if info.enabled:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def all_ok(ok: bool, info: DistInfo, group=None) -> bool:
    """True when `ok` holds on every process (a barrier that also carries one bit)."""
    if not info.enabled:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leave the process group together: a process that tears gloo down while its peer is still
    inside a collective can make that peer abort."""
    if info.enabled and dist.is_initialized():
        try:
            dist.barrier()
        except RuntimeError:  # a peer is gone already (it failed): just leave
            pass
        dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / torch.compile wrappers."""
    inner = getattr(model, "module", model)
    return getattr(inner, "_orig_mod", inner)
