"""Device and precision choice: `--device auto|cpu|cuda|mps`, `--dtype auto|bf16|fp32`.

bf16 autocast (fp32 master weights) is used where the hardware runs it fast: CUDA with bf16
support, and CPUs with AVX512-BF16 or AMX. Elsewhere fp32.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from tiaoyu_cli.errors import TiaoyuError


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TiaoyuError("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise TiaoyuError("--device mps: Apple MPS is not available on this machine (use --device cpu or auto)")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise TiaoyuError(f"--device {name!r}: choose auto, cpu, cuda or mps")


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for `--dtype` on `device` (torch.float32 means no autocast)."""
    name = (name or "auto").lower()
    if name in ("fp32", "float32"):
        return torch.float32
    if name in ("bf16", "bfloat16"):
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise TiaoyuError("--dtype bf16: this GPU does not support bfloat16 (use --dtype fp32)")
        return torch.bfloat16
    if name != "auto":
        raise TiaoyuError(f"--dtype {name!r}: choose auto, bf16 or fp32")
    if os.environ.get("TIAOYU_FORCE_FP32"):
        return torch.float32
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


_TORCH_DEFAULT_THREADS = torch.get_num_threads()
_pinned = False
_auto: int | None = None  # the count default_threads set last
# below this many FLOPs per typical operator (one d×d projection of a micro-batch) an OpenMP
# parallel region costs more than it saves: such work runs on one thread
SMALL_OP_FLOPS = 1e7


def pin_threads(n: int) -> None:
    """The user's thread count (`--threads N`): kept, never replaced by `default_threads`."""
    global _pinned
    torch.set_num_threads(n)
    _pinned = True


def threads_chosen() -> bool:
    """True when someone chose torch's CPU threads: OMP_NUM_THREADS, `--threads`, or torch.set_num_threads."""
    n = torch.get_num_threads()
    return _pinned or "OMP_NUM_THREADS" in os.environ or n not in (_TORCH_DEFAULT_THREADS, _auto)


def pick_threads(op_flops: float, cores: int | None = None, load: float | None = None) -> int:
    """The fastest CPU thread count for operators of `op_flops` FLOPs on this machine.

    One thread when the work per operator is small (the fork/join of a parallel region costs more
    than it saves) or when other processes keep the cores busy: every operator is an OpenMP parallel
    region, and when one of its threads waits for a core the others wait at the barrier (on a busy
    2-core machine tiny pretraining runs several times slower on two threads than on one). Otherwise the cores nobody else is using (cores − load average, at least one).
    """
    cores = cores or os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (OSError, AttributeError):
            load = 0.0
    if op_flops < SMALL_OP_FLOPS or cores == 1:
        return 1
    return max(1, min(cores, _TORCH_DEFAULT_THREADS, int(cores - load + 0.5)))


def default_threads(op_flops: float) -> int | None:
    """Set torch's CPU threads to `pick_threads(op_flops)` unless the user chose; returns the count set."""
    global _auto
    if threads_chosen():
        return None
    _auto = pick_threads(op_flops)
    torch.set_num_threads(_auto)
    return _auto


def busy_cpu_note() -> str | None:
    """A hint when torch will run several threads on a CPU that other processes keep busy.

    Every operator is an OpenMP parallel region; when one of its threads waits for a core, the
    others wait at the barrier, and a training step of a small model can run many times slower than on
    one thread. Returns None when that is not the case.
    """
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return None
    cores = os.cpu_count() or 1
    threads = torch.get_num_threads()
    if threads > 1 and load >= cores:
        return (f"note: the CPU is busy (load {load:.1f} on {cores} cores) and torch uses {threads} threads; "
                f"if training is slow, try OMP_NUM_THREADS=1 (or --threads 1)")
    return None

