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


# ---- FSDP2 (--fsdp) ------------------------------------------------------------------------------------


def shard_model(model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None) -> None:
    """fully_shard every transformer block, then the rest (embeddings, final norm, head) at the root. On a
    GPU with bf16 the shards compute in bf16 and reduce gradients in fp32; fp32 master weights stay."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()
    if device.type == "cuda" and amp_dtype == torch.bfloat16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def _full(v):
    from torch.distributed.tensor import DTensor

    return v.full_tensor() if isinstance(v, DTensor) else v


def local(x: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (e.g. the global grad norm of sharded gradients) as a plain tensor."""
    return _full(x)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state dict, optimizer state dict) with every shard gathered into full CPU tensors: the files of
    a sharded run are those of an unsharded one. A collective — every rank calls it."""
    msd = {k: _full(v).detach().cpu() for k, v in model.state_dict().items()}
    osd = optimizer.state_dict()
    state = {pid: {k: (_full(v).detach().cpu() if torch.is_tensor(v) else v) for k, v in st.items()}
             for pid, st in osd["state"].items()}
    return msd, {"state": state, "param_groups": osd["param_groups"]}


def plain_copy(model: nn.Module, full_sd: dict) -> nn.Module:
    """An unsharded model of the same config holding `full_sd` (what a stage's save_model writes)."""
    plain = type(model)(model.config)
    plain.load_state_dict(full_sd)
    return plain


def load_full_model_state(model: nn.Module, full_sd: dict) -> None:
    """Full tensors (a checkpoint) into a sharded model: each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, full_sd, options=StateDictOptions(full_state_dict=True, strict=False))


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After loading full tensors into the optimizer of a sharded model: cut each to its parameter's shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            st = optimizer.state.get(p, {})
            for k, v in list(st.items()):
                if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.shape:
                    st[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
