"""One run path for every training stage.

A stage's command builds a `Plan` (model, stage, tokenizer, what to print) in a `prepare()` function
and hands it to `run_stage`, which owns everything around the loop, once, for every stage:

    budget default → option and -o checks → device/precision → --nproc launch (DDP) → run-folder lock
    → seeding → prepare() → Trainer → the starting model's eval (step-0 line) → fit → summary
    → Ctrl-C/SIGTERM as a checkpoint and an exit code, OS errors as one clear line, DDP clean-up.

So `tiaoyu rlhf dpo --nproc 2` runs exactly like `tiaoyu pretrain --nproc 2`, and a stage module only
says what trains.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from torch import nn

from tiaoyu_cli.device import resolve_device, resolve_dtype
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.train.engine import distributed as D
from tiaoyu_cli.train.engine.config import TrainConfig
from tiaoyu_cli.train.engine.outdir import check_output, check_writable
from tiaoyu_cli.train.engine.stage import BaseStage
from tiaoyu_cli.train.engine.trainer import Trainer, TrainingInterrupted, check_fsdp

try:  # POSIX advisory locks; where missing (Windows) runs are simply not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


@dataclass
class Plan:
    """What a stage's prepare() built: the run_stage() call does the rest."""

    model: nn.Module
    stage: BaseStage
    tokenizer: Any
    parent: str | None = None
    lines: list[str] = field(default_factory=list)  # what will train, printed once (rank 0)
    eval_before: bool = True  # evaluate the starting model (held-out data exists)
    # keys of the start eval that are not the trained model's own "before" (e.g. the teacher's figures)
    before_drop_prefix: str | None = None


def has_budget(train: TrainConfig) -> bool:
    return bool(train.max_steps or train.max_tokens or train.max_time or train.epochs)


def run_stage(name: str, train: TrainConfig, prepare: Callable[[], Plan], *, default_epochs: float = 0.0,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one training stage. `prepare()` reads the inputs and builds model + stage (it may raise
    TiaoyuError for bad input; with --nproc it runs once in the launcher first, so bad input fails
    there, once). Returns the final metrics plus "before" (the starting model's eval)."""
    if not has_budget(train) and default_epochs:
        train.epochs = default_epochs
        log(f"no budget given (--max-steps/--max-tokens/--max-time/--epochs): training {default_epochs:g} epoch")
    train.validate()
    check_output(train.out, train.resume)
    device = resolve_device(train.device, int(os.environ.get("LOCAL_RANK", "0")))
    resolve_dtype(train.dtype, device)
    if (train.nproc > 1 or train.nnodes > 1) and "RANK" not in os.environ:
        torch.manual_seed(train.seed)
        plan = prepare()  # every input check, once, before any process starts
        if train.fsdp:
            check_fsdp(train, plan.model, plan.stage)
        if train.node_rank == 0:
            check_writable(train.out)
        launch_processes(train)
    created = not Path(train.out).exists()  # a run that fails before its first save leaves no empty -o behind
    lock = RunLock(Path(train.out)) if int(os.environ.get("RANK", "0")) == 0 else None
    trainer = None
    try:
        if lock is not None:
            lock.acquire()
        torch.manual_seed(train.seed)  # before anything random is built (new weights, LoRA, heads)
        plan = prepare()
        trainer = Trainer(plan.model, plan.stage, train, tokenizer=plan.tokenizer, parent=plan.parent, log=log)
        main = trainer.dist.is_main
        if main:
            for line in plan.lines:
                log(line)
        before: dict[str, float] = {}
        if (main or trainer.fsdp) and plan.eval_before and not train.resume:  # FSDP: every rank computes
            before = trainer.evaluate_start()
            if plan.before_drop_prefix:
                before = {k: v for k, v in before.items() if not k.startswith(plan.before_drop_prefix)}
                trainer.before = before
            if isinstance(getattr(plan.stage, "extra_info", None), dict):  # recorded in trainer.json's stage_config
                plan.stage.extra_info["eval_before"] = before
            if before and main:
                log("before: " + "  ".join(f"{k} {v:.4g}" for k, v in before.items()))
        res = trainer.fit()
        if main:
            log(summary(name, res, before, train.out))
        return {**res, "before": before}
    except KeyboardInterrupt:
        raise TrainingInterrupted("interrupted before training started; nothing was saved") from None
    except (OSError, SafetensorError) as e:
        raise TiaoyuError(f"-o {train.out}: {describe_os_error(e)}; {last_good(Path(train.out))}") from None
    finally:
        if trainer is not None:
            D.cleanup(trainer.dist)
        if lock is not None:
            lock.release()
            remove_if_empty(Path(train.out), created)


def summary(name: str, res: dict, before: dict, out: str) -> str:
    parts = [f"{k} {before[k]:.4g} → {v:.4g}" if k in before else f"{k} {v:.4g}"
             for k, v in res.items() if k not in ("step", "tokens") and isinstance(v, (int, float))]
    return (f"done: step {res['step']}, {res.get('tokens', 0):,} tokens" + (": " + ", ".join(parts) if parts else "")
            + f" → {out}/latest")


def describe_os_error(e: BaseException) -> str:
    if isinstance(e, OSError):
        what = e.strerror or str(e)
        return f"{what} ({e.filename})" if e.filename else what
    return str(e)


def last_good(run: Path) -> str:
    from tiaoyu_cli.checkpoint import step_dirs

    steps = step_dirs(run) if run.is_dir() else []
    if not steps:
        return "no checkpoint was written"
    return f"the last good checkpoint {steps[-1]} is kept; free space and continue with --resume"


def remove_if_empty(run: Path, created: bool) -> None:
    """The -o folder this run created, when nothing was written into it (the run failed at its start)."""
    if created and run.is_dir() and not any(run.iterdir()):
        run.rmdir()


# ---- one run per folder ------------------------------------------------------------------------------


class RunLock:
    """An exclusive lock on the run folder itself (flock on its directory: no file is left behind) held
    while a run trains. The OS releases it when the holder exits, however it dies, so a killed run
    never leaves its folder locked."""

    def __init__(self, run: Path):
        self.run, self.fd = run, None

    def acquire(self) -> None:
        if fcntl is None:
            return
        try:
            self.run.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.run, os.O_RDONLY)
        except OSError as e:
            raise TiaoyuError(f"-o {self.run}: cannot write there ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise TiaoyuError(f"-o {self.run} is in use by another running tiaoyu process; wait for it to finish "
                              f"or choose another -o") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


# ---- --nproc: N local processes, set up as torchrun would ----------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port")


def launch_processes(train: TrainConfig) -> None:
    """`--nproc N [--nnodes M --node-rank R --master-addr A --master-port P]`: run this same command as N
    local processes, set up exactly as torchrun would (RANK = R·N + local rank, LOCAL_RANK, WORLD_SIZE = M·N,
    MASTER_ADDR/PORT; env:// rendezvous), then exit with their status. Only global rank 0 writes files.

    Ctrl-C / SIGTERM reach every process once (they save a checkpoint together and exit); if one
    process fails, the others get SIGTERM and, should they hang in a collective, SIGKILL.
    """
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a in LAUNCH_FLAGS:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in LAUNCH_FLAGS)):
            argv.append(a)
    nproc = max(1, train.nproc)
    port = train.master_port or _free_port()
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    procs = []
    for local in range(nproc):
        rank = train.node_rank * nproc + local
        env = {**os.environ, "MASTER_ADDR": train.master_addr, "MASTER_PORT": str(port), "RANK": str(rank),
               "LOCAL_RANK": str(local), "WORLD_SIZE": str(train.nnodes * nproc), "LOCAL_WORLD_SIZE": str(nproc),
               "GROUP_RANK": str(train.node_rank)}
        env.setdefault("OMP_NUM_THREADS", threads)
        # own session: a terminal's Ctrl-C reaches only this launcher, which passes it on once
        procs.append(subprocess.Popen([sys.executable, "-m", "tiaoyu_cli", *argv], env=env, start_new_session=True))
    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        failed_at = None
        while any(p.poll() is None for p in procs):
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = time.monotonic()
            if failed_at is not None:
                waited = time.monotonic() - failed_at
                for p in procs:
                    if p.poll() is None and waited > 20:
                        p.kill()
                    elif p.poll() is None and waited > 10:
                        p.terminate()
            time.sleep(0.05)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    codes = [p.returncode if p.returncode >= 0 else 128 - p.returncode for p in procs]
    raise SystemExit(codes[0] or next((c for c in codes if c), 0))
