"""The live progress display of a training run: a rich bar (loss, lr, tokens/s, MFU, ETA) on a terminal,
plain log lines on stderr otherwise. Data never goes to stdout."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from tiaoyu_cli.console import console


class Progress:
    """A rich progress bar with loss / lr / tokens/s / ETA (MFU on CUDA) on a terminal; plain log
    lines on stderr otherwise. Fed at sync points (`update`) and cheaply every other step (`advance`)."""

    def __init__(self, trainer, enabled: bool):
        self.t = trainer
        self.enabled = enabled
        self.bar = None
        self.info = ""
        if not enabled:
            return
        self.console = console
        if console.is_terminal:
            self.bar = RichProgress(TextColumn("[bold]{task.fields[stage]}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                                TimeRemainingColumn(), console=console, transient=False)
            self.bar.start()
            total = trainer.total_steps()
            self.task = self.bar.add_task("train", total=total if total < 10**9 else None,
                                          completed=trainer.step, stage=trainer.stage.name, info="")

    @staticmethod
    def describe(line: dict) -> str:
        s = f"loss {line['loss']:.4f}  lr {line['lr']:.2e}  {line.get('tokens_per_s', 0.0):,.0f} tok/s"
        if "mfu" in line:
            s += f"  MFU {line['mfu']:.1%}"
        extra = [k for k in line if k not in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "time_s", "mfu")]
        for k in extra[:3]:
            v = line[k]
            s += f"  {k} {v:.3g}" if isinstance(v, float) else f"  {k} {v}"
        return s

    def _eta(self) -> str:
        total = self.t.total_steps()
        if total >= 10**9 or not self.t.step or not self.t.train_time:
            return ""
        secs = self.t.train_time / self.t.step * max(0, total - self.t.step)
        return f"  eta {secs:.0f}s" if secs < 600 else f"  eta {secs / 60:.0f}min"

    def advance(self) -> None:
        if self.bar is not None:
            total = self.t.total_steps()
            self.bar.update(self.task, completed=self.t.step, total=total if total < 10**9 else None)

    def update(self, line: dict) -> None:
        if not self.enabled:
            return
        self.info = self.describe(line)
        if self.bar is not None:
            total = self.t.total_steps()
            self.bar.update(self.task, completed=self.t.step, info=self.info, total=total if total < 10**9 else None)
        elif self.t.step % self.t.cfg.log_every == 0 or self.t.step == 1 or self.t.done():
            total = self.t.total_steps()
            self.console.print(f"{self.t.stage.name} step {self.t.step}" + (f"/{total}" if total < 10**9 else "")
                               + f"  {self.info}{self._eta()}", highlight=False, markup=False, soft_wrap=True)

    def note(self, line: dict) -> None:
        if self.enabled:
            msg = "eval  " + "  ".join(f"{k} {v:.4g}" for k, v in line.items() if k not in ("step", "eval"))
            self.console.print(f"step {line['step']}  {msg}", highlight=False, markup=False, soft_wrap=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
