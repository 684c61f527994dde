"""The one training loop every stage uses.

A stage (pretraining, SFT, DPO, PPO, …) supplies *what* to compute — `next_batch()` and
`step(model, batch) -> StepOutput(loss, metrics, tokens)` — and the `Trainer` owns *how*:
device and bf16 autocast, gradient accumulation, clipping, the LR schedule, logging
(metrics.jsonl + a live line on stderr; --report-to feeds the same lines to TensorBoard and/or
W&B), evaluation, atomic checkpoints, exact resume, SIGINT/SIGTERM handling, NaN detection and
DDP under torchrun. Nothing of the loop is copied into a stage.

One optimizer step:

    for each of grad_accum micro-batches:  loss = stage.step(model, batch).loss   (under autocast)
                                           (loss / grad_accum).backward()         (DDP syncs on the last)
    clip the global grad norm → optimizer step (AdamW, or Muon + AdamW) → zero grads → step += 1

The loop never waits for the device between steps: losses, grad norms and metrics stay device
tensors until a *sync point* (a log, eval or save step, the last step, an interrupt), where they
are read at once, averaged across processes and checked for NaN/inf. A checkpoint is only
written at a sync point, so a non-finite loss is always caught before it could be saved.

Under DDP the processes agree every step, over a small CPU (gloo) collective, on whether to stop
(a signal reached any of them) and on the training time (so `--max-time` and its LR schedule are
the same everywhere). Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from safetensors import SafetensorError

from tiaoyu_cli import checkpoint as ckpt_io
from tiaoyu_cli.device import autocast, busy_cpu_note, default_threads, resolve_device, resolve_dtype
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.io import atomic_dir
from tiaoyu_cli.model.config import ModelConfig
from tiaoyu_cli.train.engine import distributed as D
from tiaoyu_cli.train.engine.config import TrainConfig  # noqa: F401  (re-exported: stages import it from here)
from tiaoyu_cli.train.engine.flops import flops_per_token, peak_flops
from tiaoyu_cli.train.engine.optim import build_optimizer, lr_at
from tiaoyu_cli.train.engine.outdir import check_output, check_writable
from tiaoyu_cli.train.engine.progress import Progress
from tiaoyu_cli.train.engine.report_to import Reporters, parse_report_to
from tiaoyu_cli.train.engine.stage import BaseStage


class TrainingInterrupted(TiaoyuError):
    """SIGINT/SIGTERM: a checkpoint was saved (or, on a second signal, deliberately not).
    Exit status 128 + the signal number, as a shell reports a process killed by it."""

    exit_code = 130

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


def check_fsdp(cfg: TrainConfig, model: nn.Module, stage: BaseStage, extras=None) -> None:
    """--fsdp shards a plain transformer trained in full, with AdamW, by the same forward passes on every
    process: anything else is refused here (the launcher calls this too, so the error shows once)."""
    extras = stage.extra_modules() if extras is None else extras
    if (len(extras) or not isinstance(getattr(model, "config", None), ModelConfig)
            or not stage.saver.full_model or not stage.shardable):
        raise TiaoyuError(f"--fsdp shards a plain transformer trained in full by the same forward passes on "
                          f"every process; stage {stage.name} trains added weights (adapters, a soft prompt, a "
                          f"value head) or samples rollouts per process: run it without --fsdp")
    if cfg.optim != "adamw":
        raise TiaoyuError(f"--fsdp runs with --optim adamw: {cfg.optim}'s update needs whole matrices, FSDP "
                          f"keeps a shard of each")


SAVE_DTYPE = {"bf16": "bfloat16", "fp32": "float32"}  # --dtype → the dtype an open model folder is written in


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
        if self.device.type == "cpu" and self.dist.is_main:
            mcfg = getattr(model, "config", None)  # threads for this model size and machine, unless chosen
            if mcfg is not None and getattr(stage, "tokens_per_step", None):
                default_threads(2.0 * stage.tokens_per_step * mcfg.dim * mcfg.dim)
            note = busy_cpu_note()
            if note:
                self.log(note)
        torch.manual_seed(cfg.seed)
        self.raw_model = model.to(self.device)
        mcfg = getattr(model, "config", None)
        if isinstance(mcfg, ModelConfig) and mcfg.family and cfg.dtype in SAVE_DTYPE:
            mcfg.save_dtype = SAVE_DTYPE[cfg.dtype]  # an open folder is written in the dtype --dtype names
        self.step = 0
        self.tokens_seen = 0
        self.train_time = 0.0
        self._stop_signal: int | None = None
        self._stop_time = 0.0
        self._stop_noted = False
        self.last_eval: dict[str, float] = {}
        # the starting model's held-out metrics, measured by the stage before fit(): written to
        # metrics.jsonl as the step-0 eval line, so every run's curve starts at its "before"
        self.before: dict[str, float] = {}
        self.last_line: dict[str, Any] = {}  # the newest metrics line (read by the live display)
        self.history: list[dict] = []  # metrics lines of this process (tests and the demo read them)
        self._reporters = Reporters([], self.out, None, {})  # --report-to: opened by fit() on rank 0
        self._ctrl = D.control_group(self.dist)
        stage.setup(self)
        self.extras = nn.ModuleDict({k: m.to(self.device) for k, m in stage.extra_modules().items()})
        # FSDP2 (--fsdp, several processes): each block's parameters, gradients and optimizer state sharded
        # over the processes; checkpoints hold the gathered full tensors, the same files as without it
        self.fsdp = bool(cfg.fsdp and self.dist.enabled)
        if cfg.fsdp:
            check_fsdp(cfg, self.raw_model, stage, self.extras)
        if self.fsdp:
            D.shard_model(self.raw_model, self.device, self.amp_dtype)
        params = nn.ModuleDict({"model": self.raw_model, **({"extra": self.extras} if len(self.extras) else {})})
        if not any(p.requires_grad for p in params.parameters()):
            raise TiaoyuError("nothing to train: every parameter is frozen")
        self.optimizer = build_optimizer(params, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), self.device,
                                         cfg.optim)
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.model: nn.Module = self.raw_model
        if cfg.compile:
            self.model = torch.compile(self.model)
        if self.dist.enabled and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            mcfg = getattr(self.raw_model, "config", None)
            unused = bool(stage.find_unused_parameters or getattr(mcfg, "is_moe", False))
            self.model = DDP(self.model, device_ids=ids, find_unused_parameters=unused)

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
        self._prepare_output()
        self._reporters = self._open_reporters()
        ok = False
        try:
            res = self._fit()
            ok = True
            return res
        finally:
            self._reporters.close(ok)

    def _fit(self) -> dict[str, Any]:
        c = self.cfg
        if self.before and not c.resume and self.step == 0:
            self._log_metrics({"step": 0, "eval": True, **{k: float(v) for k, v in self.before.items()}})
        old_handlers = self._install_signal_handlers()
        progress = Progress(self, enabled=self.dist.is_main)
        pending: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []  # (step, loss, grad norm) since the last sync
        window_tokens, window_time = 0, 0.0
        try:
            self.raw_model.train()
            while not self.done():
                t0 = time.perf_counter()
                lr = lr_at(self.step, self.total_steps(), c.lr, c.warmup_steps, c.schedule, c.min_lr_ratio)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                log_step = (self.step + 1) % c.log_every == 0 or self.step == 0
                loss, metrics, tokens = self._accumulate()
                norm = self._clip_and_step(need_norm=log_step)
                self.step += 1
                self.tokens_seen += tokens
                dt = time.perf_counter() - t0
                self.train_time += dt
                window_tokens, window_time = window_tokens + tokens, window_time + dt
                pending.append((self.step, loss, norm))
                stop = self._agree_stop()  # DDP: also makes train_time (so done() and the LR) agree
                if stop and not self._stop_noted and self.dist.is_main:
                    self._stop_noted = True
                    name = signal.Signals(self._stop_signal).name if self._stop_signal else "a signal"
                    self.log(f"received {name}: saving a checkpoint at step {self.step}…")
                last = self.done()
                eval_now = bool(c.eval_every) and self.step % c.eval_every == 0 and not last
                save_now = bool(c.save_every) and self.step % c.save_every == 0 and not last
                if log_step or eval_now or save_now or stop or last:
                    line = self._sync(pending, metrics, lr, window_tokens, window_time)
                    pending, window_tokens, window_time = [], 0, 0.0
                    if log_step or last:
                        self._log_metrics(line)
                    progress.update(line)
                else:
                    progress.advance()
                if eval_now:
                    self._evaluate(progress)
                if stop:
                    path = self.save()
                    code = 128 + int(self._stop_signal or 2)
                    if not self.dist.is_main:  # rank 0 tells the user; the others just leave
                        raise SystemExit(code)
                    raise TrainingInterrupted(
                        f"interrupted at step {self.step}: checkpoint saved to {path}; continue with "
                        f"--resume (same -o)", exit_code=code)
                if save_now:
                    self.save()
            progress.close()
            self._evaluate(None)
            self.save()
            return {"step": self.step, "tokens": self.tokens_seen, **self.last_eval}
        finally:
            progress.close()
            self._restore_signal_handlers(old_handlers)

    def _accumulate(self) -> tuple[torch.Tensor, dict[str, Any], int]:
        """grad_accum forward/backward passes; returns the mean loss (a device tensor, this process),
        the micro-batch-averaged metrics (tensors or floats) and the tokens of all processes."""
        c = self.cfg
        total_loss: torch.Tensor | None = None
        sums: dict[str, Any] = {}
        tokens = 0
        for micro in range(c.grad_accum):
            batch = self.stage.next_batch()
            sync = micro == c.grad_accum - 1
            ctx = self.model.no_sync() if (self.dist.enabled and not sync and not self.fsdp) else contextlib.nullcontext()
            with ctx:
                with self.autocast():
                    out = self.stage.step(self.model, batch)
                loss = out.loss.float()
                (loss / c.grad_accum).backward()
            part = loss.detach() / c.grad_accum
            total_loss = part if total_loss is None else total_loss + part
            tokens += out.tokens
            for k, v in out.metrics.items():
                v = v.detach().float() if torch.is_tensor(v) else float(v)
                sums[k] = sums.get(k, 0.0) + v / c.grad_accum
        if self.dist.enabled:
            tokens *= self.dist.world_size
        return total_loss, sums, tokens

    def _clip_and_step(self, need_norm: bool = True) -> torch.Tensor | None:
        """Average extra-module grads across processes, clip, step, zero. Returns the pre-clip global
        grad norm as a device tensor (None when there is no clipping and nobody asked for it)."""
        if self.dist.enabled and len(self.extras):  # extra modules sit outside DDP: average their grads here
            for p in self.extras.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
                    p.grad /= self.dist.world_size
        norm = None
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self._params, self.cfg.grad_clip)
        elif need_norm:
            grads = [p.grad for p in self._params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # the weights changed in place without bumping tensor versions: caches built from them (the fused
        # decode weights of infer/generate.py, used by RL rollouts) must know
        self.raw_model.weights_version = getattr(self.raw_model, "weights_version", 0) + 1
        return D.local(norm) if self.fsdp and norm is not None else norm

    def _sync(self, pending: list, metrics: dict[str, Any], lr: float, tokens: int, seconds: float) -> dict:
        """Read the pending losses (one wait for the device), average them across processes, stop on
        NaN/inf, and build the metrics line of the current step."""
        steps = [s for s, _, _ in pending]
        losses = torch.stack([l for _, l, _ in pending]).float()
        have = [n for _, _, n in pending if n is not None]
        read = iter(torch.stack(have).float().cpu().tolist()) if have else iter(())
        norm_vals = [next(read) if n is not None else None for _, _, n in pending]
        mkeys = sorted(metrics)
        mvals = [metrics[k] if torch.is_tensor(metrics[k]) else torch.tensor(float(metrics[k]))
                 for k in mkeys]
        vec = torch.cat([losses.to(self.device)] + [v.reshape(1).float().to(self.device) for v in mvals])
        vec = D.all_reduce_mean(vec, self.dist).cpu()
        loss_vals = vec[:len(steps)].tolist()
        metric_vals = dict(zip(mkeys, vec[len(steps):].tolist()))
        for s, lv, nv in zip(steps, loss_vals, norm_vals):
            if not math.isfinite(lv) or (nv is not None and not math.isfinite(nv)):
                what = f"loss became {lv}" if not math.isfinite(lv) else f"gradient norm became {nv}"
                latest = ckpt_io.step_dirs(self.out) if self.out.is_dir() else []
                kept = f"the last good checkpoint is {latest[-1]}" if latest else "no checkpoint had been saved yet"
                raise TiaoyuError(f"{what} at step {s}: stopped without saving; {kept}. "
                                  f"Try a lower --lr, --grad-clip 1.0, or --dtype fp32.")
        line = {"step": self.step, "loss": loss_vals[-1], "lr": lr}
        if norm_vals[-1] is not None:
            line["grad_norm"] = norm_vals[-1]
        line["tokens"] = self.tokens_seen
        line["tokens_per_s"] = tokens / max(seconds, 1e-9)
        line["time_s"] = self.train_time
        mfu = self.mfu(line["tokens_per_s"])
        if mfu is not None:
            line["mfu"] = mfu
        line.update(metric_vals)
        self.last_line = line
        return line

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation on CUDA (training FLOPs/s over the GPUs' bf16 peak), else None."""
        if self.device.type != "cuda" or not tokens_per_s:
            return None

        mcfg = getattr(self.raw_model, "config", None)
        peak = peak_flops(self.device)
        if mcfg is None or not peak:
            return None
        seq = getattr(self.stage, "seq_len", None) or mcfg.max_seq_len
        return tokens_per_s * flops_per_token(mcfg, seq) / (peak * self.dist.world_size)

    @torch.no_grad()
    def evaluate_start(self) -> dict[str, float]:
        """The stage's held-out metrics of the starting model (eval mode, autocast), kept as `before`:
        fit() writes them as the step-0 eval line. Stages call it before fit() on a fresh run."""
        self.raw_model.eval()
        try:
            with self.autocast():
                self.before = self.stage.evaluate(self.raw_model)
        finally:
            self.raw_model.train()
        return self.before

    @torch.no_grad()
    def _evaluate(self, progress) -> None:
        if self.dist.is_main or self.fsdp:  # FSDP: every rank takes part in the forward passes
            self.raw_model.eval()
            for m in self.extras.values():
                m.eval()
            with self.autocast():
                res = self.stage.evaluate(self.raw_model)
            self.raw_model.train()
            for m in self.extras.values():
                m.train()
            if res and self.dist.is_main:
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
        """Write out/step-NNNNNN atomically (rank 0), point `latest` at it, prune to --keep."""
        path, error = None, None
        full = D.full_state(self.raw_model, self.optimizer) if self.fsdp else None  # a collective: every rank
        if self.dist.is_main:
            state = self._train_state(full)
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
            model = D.plain_copy(self.raw_model, full[0]) if full else self.raw_model
            tensors.update(ckpt_io.master_weights(self.raw_model, full[0] if full else None))
            try:
                path = self._save_folder(tensors, info, model)
            except TiaoyuError as e:
                error = e
        if not D.all_ok(error is None, self.dist, self._ctrl):
            raise error or TiaoyuError("rank 0 could not write a checkpoint (see its message); stopping")
        return path

    def _save_folder(self, tensors: dict, info: dict, model: nn.Module) -> Path:
        from safetensors.torch import save_file  # looked up at call time (tests simulate a full disk here)

        run = self.out
        final = run / f"step-{self.step:06d}"
        try:
            run.mkdir(parents=True, exist_ok=True)
            with atomic_dir(final) as tmp:
                self.stage.save_model(tmp, model, self.tokenizer)
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                          str(tmp / "train_state.safetensors"))
                (tmp / "trainer.json").write_text(json.dumps(info, indent=2, ensure_ascii=False, default=str),
                                                  encoding="utf-8")
            ckpt_io.set_latest(run, final.name)
        except (OSError, SafetensorError) as e:
            prev = [p for p in ckpt_io.step_dirs(run) if p.name != final.name] if run.is_dir() else []
            kept = f"the previous checkpoint {prev[-1]} is intact" if prev else "no earlier checkpoint exists"
            why = getattr(e, "strerror", None) or str(e)
            raise TiaoyuError(f"could not write checkpoint {final} ({why}); {kept}; free space and continue "
                              f"with --resume") from None
        if self.cfg.keep > 0:
            for old in ckpt_io.step_dirs(run)[:-self.cfg.keep]:
                if old.name != final.name:
                    shutil.rmtree(old, ignore_errors=True)
        return final

    def _train_state(self, full: tuple | None = None) -> dict[str, Any]:
        tensors, meta = ckpt_io.optimizer_to_tensors(self.optimizer, state_dict=full[1] if full else None)
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

    def _prepare_output(self) -> None:
        """Resume, or check that -o is free and writable; every process agrees before training starts."""
        error = None
        try:
            check_output(self.out, self.cfg.resume)
            if self.cfg.resume:
                self._resume()
            if self.dist.is_main:
                check_writable(self.out)
                self._remove_stale_temp()
        except TiaoyuError as e:
            error = e
        if not D.all_ok(error is None, self.dist, self._ctrl):
            raise error or TiaoyuError("another process of this run failed to start (see its message)")

    def _remove_stale_temp(self) -> None:
        """Temp folders of a save that was killed half-way (never counted as checkpoints) go."""
        for p in self.out.glob(".step-*"):
            if p.name.endswith((".tmp", ".old")) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
        for p in self.out.glob(".latest.*.tmp"):
            p.unlink(missing_ok=True)

    def _resume(self) -> None:
        folder = ckpt_io.resolve_checkpoint(self.out)
        info = ckpt_io.read_json(folder / "trainer.json")
        if info.get("stage") != self.stage.name:
            raise TiaoyuError(f"--resume: {folder} was written by stage {info.get('stage')!r}, not {self.stage.name!r}")
        saved_optim = info.get("train_config", {}).get("optim", "adamw")
        if saved_optim != self.cfg.optim:
            raise TiaoyuError(f"--resume: {folder} was trained with --optim {saved_optim}; resume with --optim {saved_optim}")
        ts_path = folder / "train_state.safetensors"
        if not ts_path.exists():
            raise TiaoyuError(f"--resume: {folder} has no train_state.safetensors")
        tensors = ckpt_io.load_tensors(ts_path)
        master = {k[len("master."):]: v for k, v in tensors.items() if k.startswith("master.")}
        if self.fsdp:
            D.load_full_model_state(self.raw_model, {**ckpt_io.load_model_tensors(folder, None), **master})
        else:
            self.stage.load_for_resume(folder, self.raw_model)
            if master:  # the fp32 weights behind a bf16/fp16 model folder
                params = dict(self.raw_model.named_parameters())
                with torch.no_grad():
                    for n, v in master.items():
                        if n in params:
                            params[n].copy_(v)
        st = info.get("state", {})
        try:
            ckpt_io.optimizer_from_tensors(self.optimizer, {k: v.to(self.device) if k.startswith("optim.") else v
                                                            for k, v in tensors.items()}, st["optim_meta"])
            if self.fsdp:  # full tensors from the file → this rank's shards
                D.shard_optimizer_state(self.optimizer)
            torch.set_rng_state(tensors["rng.torch"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise TiaoyuError(f"--resume: {folder} does not match this run's model or options ({e})") from None
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

    # ---- metrics -----------------------------------------------------------------------------
    def _open_reporters(self) -> Reporters:
        """--report-to's loggers (rank 0 only), after _prepare_output: a resumed run continues its logs."""
        names = parse_report_to(self.cfg.report_to) if self.dist.is_main else []
        if not names:
            return Reporters([], self.out, None, {})
        config = {"stage": self.stage.name, "parent": self.parent, "train_config": dataclasses.asdict(self.cfg),
                  "stage_config": self.stage.info()}
        return Reporters(names, self.out, self.step if self.cfg.resume else None, config)

    def _log_metrics(self, line: dict) -> None:
        line = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in line.items()}
        self.history.append(line)
        if self.dist.is_main:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
            self._reporters.log(line)  # the same line to TensorBoard / W&B (--report-to)

    def _truncate_metrics(self, step: int) -> None:
        p = self.out / "metrics.jsonl"
        if not p.exists():
            return
        keep = []
        for raw in p.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(raw).get("step", 0) <= step:
                    keep.append(raw)
            except (json.JSONDecodeError, RecursionError, AttributeError):
                continue
        ckpt_io.atomic_write_text(p, "".join(k + "\n" for k in keep))

    # ---- signals -----------------------------------------------------------------------------
    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return None
        old = {}

        def handler(signum, frame):
            now = time.monotonic()
            if self._stop_signal is not None:
                # a second signal a moment later is the user insisting: stop now, without saving.
                # (One that follows within a second is the same interrupt delivered twice.)
                if now - self._stop_time > 1.0:
                    raise TrainingInterrupted(f"interrupted twice at step {self.step}: stopped without saving; "
                                              f"continue from the last checkpoint with --resume",
                                              exit_code=128 + signum)
                return
            self._stop_signal, self._stop_time = signum, now  # acted on after the current step

        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, handler)
        return old

    @staticmethod
    def _restore_signal_handlers(old) -> None:
        if old:
            for s, h in old.items():
                signal.signal(s, h)

    def _agree_stop(self) -> bool:
        """Whether to stop after this step (a signal reached any process). Under DDP the processes
        also adopt the largest training time, so time budgets and schedules stay identical."""
        if not self.dist.enabled:
            return self._stop_signal is not None
        flag = torch.tensor([float(self._stop_signal or 0), self.train_time], dtype=torch.float64)
        D.all_reduce_max_(flag, self.dist, self._ctrl)
        if self._stop_signal is None and flag[0] > 0:
            self._stop_signal = int(flag[0])
        self.train_time = float(flag[1])
        return flag[0].item() > 0
