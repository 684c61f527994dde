"""`--report-to tensorboard,wandb`: the metrics lines of metrics.jsonl, also sent to the metric loggers
people already use (the `report_to` convention of transformers; default none).

Every line the Trainer appends to metrics.jsonl goes, unchanged, to each logger: every numeric key
becomes a scalar at the line's step (the global optimizer step), tagged `train/<key>` on training lines
and `eval/<key>` on evaluation lines (`"eval": true`), e.g. train/loss, train/lr, train/grad_norm,
train/tokens_per_s, train/reward, eval/val_loss, eval/answer_acc, eval/val_accuracy. So what TensorBoard or
W&B shows is exactly what metrics.jsonl holds.

- tensorboard: event files in <run>/tb (torch.utils.tensorboard.SummaryWriter). A resumed run adds a new
  event file to the same folder, starting with a purge marker at the resumed step + 1, so TensorBoard drops
  whatever the interrupted process had logged past its last checkpoint, as metrics.jsonl does.
- wandb: one W&B run, in whatever mode the environment sets (WANDB_MODE=offline needs no network or
  login); project from WANDB_PROJECT (default "tiaoyu"), name = the run folder's name, config = the train
  config and the stage config (as trainer.json records them); files under WANDB_DIR, else the run folder.
  Its id is kept in <run>/wandb-run-id, so --resume continues the same W&B run. Steps are logged as the
  metric train/global_step (W&B's own step counter would refuse a resumed run's repeated steps).

Only the main process (rank 0) logs. A missing package is an error when the options are checked,
before anything is loaded or trained. This module imports neither torch nor the loggers at import time.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
import string
from pathlib import Path
from typing import Any

from tiaoyu_cli.errors import TiaoyuError

REPORTERS = ("tensorboard", "wandb")
TB_DIR = "tb"
WANDB_ID_FILE = "wandb-run-id"


def parse_report_to(value: str | None) -> list[str]:
    """'none' / '' → []; 'tensorboard,wandb' → both; 'all' → every one whose package is installed."""
    names = [s.strip().lower() for s in str(value or "").split(",") if s.strip()]
    if names in ([], ["none"]):
        return []
    if names == ["all"]:
        return [n for n in REPORTERS if _importable(n)]
    bad = [n for n in names if n not in REPORTERS]
    if bad:
        raise TiaoyuError(f"--report-to {value}: unknown {', '.join(repr(b) for b in bad)}; choose none, all, or "
                          f"{' and/or '.join(REPORTERS)} (comma-separated)")
    return list(dict.fromkeys(names))


def _importable(package: str) -> bool:
    try:
        importlib.import_module(package)
    except ImportError:
        return False
    return True


def check_report_to(value: str | None) -> list[str]:
    """The loggers asked for, each importable, or a clear error naming the package to install."""
    names = parse_report_to(value)
    for n in names:
        if not _importable(n):
            raise TiaoyuError(f"--report-to {n} needs the {n} package: pip install 'tiaoyu[{n}]'")
    return names


def scalars(line: dict) -> tuple[int, dict[str, float]]:
    """(step, {tag: value}) of one metrics line: every numeric key but the step, prefixed train/ or eval/."""
    prefix = "eval/" if line.get("eval") else "train/"
    out = {prefix + k: float(v) for k, v in line.items()
           if k not in ("step", "eval") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return int(line.get("step", 0)), out


def _plain(x: Any) -> Any:
    """JSON-safe copy (paths and other objects as text), as trainer.json stores it."""
    return json.loads(json.dumps(x, default=str))


class TensorBoardReporter:
    def __init__(self, run: Path, resumed_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        purge = resumed_step + 1 if resumed_step is not None else None
        self.writer = SummaryWriter(log_dir=str(run / TB_DIR), purge_step=purge)

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, global_step=step)
        self.writer.flush()  # a live TensorBoard sees each line as it is written

    def close(self, ok: bool) -> None:
        self.writer.close()


class WandbReporter:
    def __init__(self, run: Path, resumed_step: int | None, config: dict):
        import wandb

        id_file = run / WANDB_ID_FILE
        run_id = id_file.read_text(encoding="utf-8").strip() if resumed_step is not None and id_file.exists() else ""
        if not run_id:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        kwargs: dict[str, Any] = {"project": os.environ.get("WANDB_PROJECT") or "tiaoyu",
                                  "name": run.resolve().name, "id": run_id, "resume": "allow",
                                  "config": _plain(config)}
        if not os.environ.get("WANDB_DIR"):
            kwargs["dir"] = str(run)
        try:
            self.run = wandb.init(**kwargs)
        except Exception as e:  # wandb raises its own error types (no login, no network in online mode, …)
            raise TiaoyuError(f"--report-to wandb: could not start a W&B run ({type(e).__name__}: {e}); log in "
                              f"with `wandb login`, or set WANDB_MODE=offline to log without an account") from None
        id_file.write_text(run_id + "\n", encoding="utf-8")
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step", step_sync=True)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log({**values, "train/global_step": step})

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class Reporters:
    """The loggers of one run (rank 0); `log(line)` takes each metrics.jsonl line."""

    def __init__(self, names: list[str], run: Path, resumed_step: int | None, config: dict):
        self.items: list[Any] = []
        try:
            for n in names:
                if n == "tensorboard":
                    self.items.append(TensorBoardReporter(run, resumed_step))
                elif n == "wandb":
                    self.items.append(WandbReporter(run, resumed_step, config))
        except BaseException:
            self.close(False)
            raise

    def log(self, line: dict) -> None:
        if not self.items:
            return
        step, values = scalars(line)
        for r in self.items:
            r.log(step, values)

    def close(self, ok: bool = True) -> None:
        items, self.items = self.items, []
        for r in items:
            r.close(ok)
