"""The one training loop every stage uses.

A stage (pretraining, SFT, DPO, PPO, …) supplies *what* to compute — `next_batch()` and
`step(model, batch) -> StepOutput(loss, metrics, tokens)` — and the `Trainer` owns *how*:
device and bf16 autocast, gradient accumulation, clipping, the LR schedule, logging
(metrics.jsonl + a live line on stderr), evaluation, atomic checkpoints, exact resume,
SIGINT/SIGTERM handling, NaN detection and DDP under torchrun. Nothing of the loop is copied
into a stage.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.nn as nn

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.train import checkpoint as ckpt_io
from tiaoyu_cli.train import distributed as D
from tiaoyu_cli.train.device import autocast, resolve_device, resolve_dtype
from tiaoyu_cli.train.optim import build_optimizer, lr_at


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
    device: str = "auto"
    dtype: str = "auto"  # auto | bf16 | fp32
    compile: bool = False
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    save_every: int = 0  # 0 = only at the end
    keep: int = 2  # step folders to keep (0 = all)
    resume: bool = False

    def validate(self) -> None:
        if not (self.max_steps or self.max_tokens or self.max_time or self.epochs):
            raise TiaoyuError("no training budget: give --max-steps, --max-tokens, --max-time or --epochs")
        for name in ("batch_size", "grad_accum", "log_every"):
            if getattr(self, name) <= 0:
                raise TiaoyuError(f"--{name.replace('_', '-')} must be positive")
        if self.lr <= 0:
            raise TiaoyuError("--lr must be positive")
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise TiaoyuError(f"--schedule {self.schedule!r}: choose cosine, wsd or constant")


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar to minimise (mean over the micro-batch)
    metrics: dict[str, float] = field(default_factory=dict)  # logged, averaged over the log interval
    tokens: int = 0  # tokens processed in this micro-batch (for tokens/s and --max-tokens)


class Stage(Protocol):
    """What a stage supplies to the loop. Optional hooks have defaults in `BaseStage`."""

    name: str

    def setup(self, trainer: "Trainer") -> None: ...
    def next_batch(self) -> Any: ...
    def step(self, model: nn.Module, batch: Any) -> StepOutput: ...
    def evaluate(self, model: nn.Module) -> dict[str, float]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class BaseStage:
    """Defaults for the optional parts of a stage."""

    name = "stage"
    steps_per_epoch: int | None = None  # for --epochs
    tokens_per_step: int | None = None  # per micro-batch per process, for --max-tokens schedules

    def setup(self, trainer: "Trainer") -> None:
        self.trainer = trainer

    def extra_modules(self) -> dict[str, nn.Module]:
        """Trainable modules outside the model (e.g. a PPO value head): optimised, saved in train_state."""
        return {}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Data position etc. Tensor values go to train_state.safetensors, the rest to trainer.json."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def save_model(self, folder: Path, model: nn.Module, tokenizer) -> None:
        """Write the model files of a checkpoint (default: full model; LoRA writes an adapter)."""
        ckpt_io.save_model_files(folder, model, tokenizer)

    def load_for_resume(self, folder: Path, model: nn.Module) -> None:
        """Load weights saved by `save_model` back into the model before resuming."""
        sd = ckpt_io.load_tensors(folder / "model.safetensors")
        model.load_state_dict(sd, strict=False)

    def info(self) -> dict[str, Any]:
        """Stage options, recorded in trainer.json."""
        cfg = getattr(self, "cfg", None)
        return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {}


class TrainingInterrupted(TiaoyuError):
    exit_code = 130


class Trainer:
    def __init__(self, model: nn.Module, stage: BaseStage, cfg: TrainConfig, tokenizer=None,
                 parent: str | None = None, log: Callable[[str], None] | None = None):
        cfg.validate()
        self.cfg, self.stage, self.tokenizer, self.parent = cfg, stage, tokenizer, parent
        self.dist = D.setup(cfg.device)
        self.device = resolve_device(cfg.device, self.dist.local_rank)
        self.amp_dtype = resolve_dtype(cfg.dtype, self.device)
        self.out = Path(cfg.out)
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        torch.manual_seed(cfg.seed)
        self.raw_model = model.to(self.device)
        self.step = 0
        self.tokens_seen = 0
        self.train_time = 0.0
        self._stop_signal: int | None = None
        self.last_eval: dict[str, float] = {}
        self.history: list[dict] = []  # metrics lines of this process (tests and the demo read them)
        stage.setup(self)
        self.extras = nn.ModuleDict({k: m.to(self.device) for k, m in stage.extra_modules().items()})
        params = nn.ModuleDict({"model": self.raw_model, **({"extra": self.extras} if len(self.extras) else {})})
        if not any(p.requires_grad for p in params.parameters()):
            raise TiaoyuError("nothing to train: every parameter is frozen")
        self.optimizer = build_optimizer(params, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), self.device)
        self.model: nn.Module = self.raw_model
        if cfg.compile:
            self.model = torch.compile(self.model)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(self.model, device_ids=ids)

    # ---- budget and schedule ---------------------------------------------------------------
    def autocast(self):
        return autocast(self.device, self.amp_dtype)

    def tokens_per_optimizer_step(self) -> int | None:
        t = self.stage.tokens_per_step
        return t * self.cfg.grad_accum * self.dist.world_size if t else None

    def total_steps(self) -> int:
        c = self.cfg
        cands = []
        if c.max_steps:
            cands.append(c.max_steps)
        if c.max_tokens:
            tps = self.tokens_per_optimizer_step()
            if tps:
                cands.append(math.ceil(c.max_tokens / tps))
        if c.epochs and self.stage.steps_per_epoch:
            cands.append(max(1, math.ceil(c.epochs * self.stage.steps_per_epoch / (c.grad_accum * self.dist.world_size))))
        if c.max_time and self.step > 0 and self.train_time > 0:
            cands.append(max(self.step + 1, int(self.step * c.max_time / self.train_time)))
        return min(cands) if cands else 10**9

    def done(self) -> bool:
        c = self.cfg
        if c.max_steps and self.step >= c.max_steps:
            return True
        if c.max_tokens and self.tokens_seen >= c.max_tokens:
            return True
        if c.max_time and self.train_time >= c.max_time:
            return True
        if c.epochs and self.stage.steps_per_epoch and self.step >= self.total_steps():
            return True
        return False

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        c = self.cfg
        if c.resume:
            self._resume()
        elif self.dist.is_main and self.out.exists() and any(ckpt_io.step_dirs(self.out)):
            raise TiaoyuError(f"{self.out} already holds checkpoints: pass --resume to continue, or choose another -o")
        self._check_writable()
        old_handlers = self._install_signal_handlers()
        progress = _Progress(self, enabled=self.dist.is_main)
        try:
            self.raw_model.train()
            while not self.done():
                t0 = time.perf_counter()
                lr = lr_at(self.step, self.total_steps(), c.lr, c.warmup_steps, c.schedule, c.min_lr_ratio)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                loss_sum, metrics, tokens = self._accumulate()
                grad_norm = self._clip_and_step()
                self.step += 1
                self.tokens_seen += tokens
                self.train_time += time.perf_counter() - t0
                line = {"step": self.step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                        "tokens": self.tokens_seen, "tokens_per_s": tokens / max(1e-9, time.perf_counter() - t0),
                        **metrics}
                if not math.isfinite(loss_sum):
                    raise TiaoyuError(
                        f"loss became {loss_sum} at step {self.step}; stopping without saving. The last good "
                        f"checkpoint is kept in {self.out} (if any). Try a lower --lr or --grad-clip.")
                progress.update(line)
                if self.step % c.log_every == 0 or self.step == 1:
                    self._log_metrics(line)
                stop = self._agree_stop()
                if c.eval_every and self.step % c.eval_every == 0 and not self.done():
                    self._evaluate(progress)
                if stop:
                    path = self.save()
                    raise TrainingInterrupted(
                        f"interrupted at step {self.step}; checkpoint saved to {path}; continue with --resume")
                if c.save_every and self.step % c.save_every == 0 and not self.done():
                    self.save()
            progress.close()
            self._evaluate(None)
            self.save()
            return {"step": self.step, "tokens": self.tokens_seen, **self.last_eval}
        finally:
            progress.close()
            self._restore_signal_handlers(old_handlers)

    def _accumulate(self) -> tuple[float, dict[str, float], int]:
        c = self.cfg
        total_loss = torch.zeros((), device=self.device)
        sums: dict[str, float] = {}
        tokens = 0
        for micro in range(c.grad_accum):
            batch = self.stage.next_batch()
            sync = micro == c.grad_accum - 1
            ctx = self.model.no_sync() if (self.dist.enabled and not sync) else _null()
            with ctx:
                with self.autocast():
                    out = self.stage.step(self.model, batch)
                loss = out.loss.float()
                (loss / c.grad_accum).backward()
            total_loss += loss.detach() / c.grad_accum
            tokens += out.tokens
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / c.grad_accum
        loss_val = float(D.all_reduce_mean(total_loss, self.dist))
        if self.dist.enabled:
            if sums:
                keys = sorted(sums)
                vec = D.all_reduce_mean(torch.tensor([sums[k] for k in keys], device=self.device), self.dist)
                sums = dict(zip(keys, vec.tolist()))
            tokens *= self.dist.world_size
        return loss_val, sums, tokens

    def _clip_and_step(self) -> float:
        if self.dist.enabled and len(self.extras):  # extra modules sit outside DDP: average their grads here
            for p in self.extras.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG if self.device.type == "cuda" else torch.distributed.ReduceOp.SUM)
                    if self.device.type != "cuda":
                        p.grad /= self.dist.world_size
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @torch.no_grad()
    def _evaluate(self, progress) -> None:
        if self.dist.is_main:
            self.raw_model.eval()
            for m in self.extras.values():
                m.eval()
            with self.autocast():
                res = self.stage.evaluate(self.raw_model)
            self.raw_model.train()
            for m in self.extras.values():
                m.train()
            if res:
                self.last_eval = {k: float(v) for k, v in res.items()}
                line = {"step": self.step, "eval": True, **self.last_eval}
                self._log_metrics(line)
                if progress is not None:
                    progress.note(line)
                else:
                    self.log("eval  " + "  ".join(f"{k} {v:.4g}" for k, v in self.last_eval.items()))
        D.barrier(self.dist)

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self) -> Path | None:
        path = None
        if self.dist.is_main:
            state = self._train_state()
            tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
            info = {
                "stage": self.stage.name,
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "train_time_s": round(self.train_time, 3),
                "command": " ".join(sys.argv),
                "parent": self.parent,
                "train_config": dataclasses.asdict(self.cfg),
                "stage_config": self.stage.info(),
                "eval": self.last_eval,
                "state": {k: v for k, v in state.items() if not torch.is_tensor(v)},
                "world_size": self.dist.world_size,
            }
            path = self._save_folder(tensors, info)
        D.barrier(self.dist)
        return path

    def _save_folder(self, tensors: dict, info: dict) -> Path:
        run = self.out
        run.mkdir(parents=True, exist_ok=True)
        final = run / f"step-{self.step:06d}"
        from tiaoyu_cli.io import atomic_dir
        from safetensors.torch import save_file

        with atomic_dir(final) as tmp:
            self.stage.save_model(tmp, self.raw_model, self.tokenizer)
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "train_state.safetensors"))
            (tmp / "trainer.json").write_text(json.dumps(info, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
        ckpt_io.set_latest(run, final.name)
        if self.cfg.keep > 0:
            import shutil

            for old in ckpt_io.step_dirs(run)[:-self.cfg.keep]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def _train_state(self) -> dict[str, Any]:
        tensors, meta = ckpt_io.optimizer_to_tensors(self.optimizer)
        state: dict[str, Any] = dict(tensors)
        state["optim_meta"] = meta
        state["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            state["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        for name, p in self.extras.state_dict().items():
            state[f"extra.{name}"] = p
        for k, v in self.stage.state_dict().items():
            state[f"stage.{k}"] = v
        return state

    def _resume(self) -> None:
        if not self.out.exists():
            raise TiaoyuError(f"--resume: {self.out} does not exist (start without --resume)")
        folder = ckpt_io.resolve_checkpoint(self.out)
        info = ckpt_io.read_json(folder / "trainer.json")
        if info.get("stage") != self.stage.name:
            raise TiaoyuError(f"--resume: {folder} was written by stage {info.get('stage')!r}, not {self.stage.name!r}")
        ts_path = folder / "train_state.safetensors"
        if not ts_path.exists():
            raise TiaoyuError(f"--resume: {folder} has no train_state.safetensors")
        tensors = ckpt_io.load_tensors(ts_path)
        self.stage.load_for_resume(folder, self.raw_model)
        st = info.get("state", {})
        ckpt_io.optimizer_from_tensors(self.optimizer, {k: v.to(self.device) if k.startswith("optim.") else v
                                                        for k, v in tensors.items()}, st["optim_meta"])
        torch.set_rng_state(tensors["rng.torch"])
        if self.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
        if extra:
            self.extras.load_state_dict(extra)
        stage_state = {k[len("stage."):]: v for k, v in st.items() if k.startswith("stage.")}
        stage_state.update({k[len("stage."):]: v for k, v in tensors.items() if k.startswith("stage.")})
        self.stage.load_state_dict(stage_state)
        self.step = int(info["step"])
        self.tokens_seen = int(info.get("tokens_seen", 0))
        self.train_time = float(info.get("train_time_s", 0.0))
        self.last_eval = info.get("eval", {})
        if self.dist.is_main:
            self._truncate_metrics(self.step)
            self.log(f"resumed from {folder} at step {self.step}")

    def _check_writable(self) -> None:
        if not self.dist.is_main:
            return
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise TiaoyuError(f"-o {self.out}: cannot write there ({e.strerror})") from None

    # ---- metrics -----------------------------------------------------------------------------
    def _log_metrics(self, line: dict) -> None:
        line = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in line.items()}
        self.history.append(line)
        if self.dist.is_main:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        p = self.out / "metrics.jsonl"
        if not p.exists():
            return
        keep = []
        for raw in p.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(raw).get("step", 0) <= step:
                    keep.append(raw)
            except json.JSONDecodeError:
                continue
        ckpt_io.atomic_write_text(p, "".join(k + "\n" for k in keep))

    # ---- signals -----------------------------------------------------------------------------
    def _install_signal_handlers(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            return None
        old = {}

        def handler(signum, frame):
            if self._stop_signal is not None:  # second Ctrl-C: give up immediately
                raise KeyboardInterrupt
            self._stop_signal = signum
            self.log(f"received signal {signum}: saving a checkpoint after this step…")

        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, handler)
        return old

    @staticmethod
    def _restore_signal_handlers(old) -> None:
        if old:
            for s, h in old.items():
                signal.signal(s, h)

    def _agree_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_signal is not None else 0.0], device=self.device)
        if self.dist.enabled:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


class _Progress:
    """A rich progress bar with loss / lr / tokens/s / ETA on a terminal; plain log lines otherwise."""

    def __init__(self, trainer: Trainer, enabled: bool):
        self.t = trainer
        self.enabled = enabled
        self.bar = None
        self.last_print = 0.0
        self.ema_tps = None
        if not enabled:
            return
        from tiaoyu_cli.cli.console import console

        self.console = console
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]{task.fields[stage]}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                console=console, transient=False)
            self.bar.start()
            total = trainer.total_steps()
            self.task = self.bar.add_task("train", total=total if total < 10**9 else None,
                                          completed=trainer.step, stage=trainer.stage.name, info="")

    def _info(self, line: dict) -> str:
        tps = line.get("tokens_per_s", 0.0)
        self.ema_tps = tps if self.ema_tps is None else 0.9 * self.ema_tps + 0.1 * tps
        s = f"loss {line['loss']:.4f}  lr {line['lr']:.2e}  {self.ema_tps:,.0f} tok/s"
        mfu = self._mfu()
        if mfu is not None:
            s += f"  MFU {mfu:.1%}"
        extra = [k for k in line if k not in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s")]
        for k in extra[:3]:
            v = line[k]
            s += f"  {k} {v:.3g}" if isinstance(v, float) else f"  {k} {v}"
        return s

    def _mfu(self) -> float | None:
        t = self.t
        if t.device.type != "cuda" or not self.ema_tps:
            return None
        from tiaoyu_cli.train.flops import flops_per_token, peak_flops

        peak = peak_flops(t.device)
        if not peak:
            return None
        return self.ema_tps * flops_per_token(t.raw_model.config, getattr(t.stage, "seq_len", 256)) / (peak * t.dist.world_size)

    def update(self, line: dict) -> None:
        if not self.enabled:
            return
        info = self._info(line)
        if self.bar is not None:
            total = self.t.total_steps()
            self.bar.update(self.task, completed=self.t.step, info=info, total=total if total < 10**9 else None)
        elif self.t.step % self.t.cfg.log_every == 0 or self.t.step == 1:
            total = self.t.total_steps()
            eta = ""
            if total < 10**9 and self.t.step:
                eta = f"  eta {self.t.train_time / self.t.step * (total - self.t.step):.0f}s"
            self.console.print(f"{self.t.stage.name} step {self.t.step}" + (f"/{total}" if total < 10**9 else "")
                               + f"  {info}{eta}", highlight=False, markup=False)

    def note(self, line: dict) -> None:
        if self.enabled:
            msg = "eval  " + "  ".join(f"{k} {v:.4g}" for k, v in line.items() if k not in ("step", "eval"))
            self.console.print(f"step {line['step']}  {msg}", highlight=False, markup=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
