"""`tiaoyu distill`: train a small student from a larger teacher (black box: its answers; white box: its logits)."""

from __future__ import annotations

import typer

from tiaoyu_cli.cli.common import config_options, train_options
from tiaoyu_cli.console import say
from tiaoyu_cli.train.engine.config import TrainConfig
from tiaoyu_cli.train.stages.distill import run as distill

EXAMPLES = """
Examples:

  tiaoyu distill --teacher ckpt/sft --student-preset tiny --model dim=64 --model n_layers=2 chat.jsonl -o ckpt/student --mode white --max-steps 500

  tiaoyu distill --teacher ckpt/sft --student ckpt/small prompts.jsonl -o ckpt/student --mode black --keep-teacher-data teacher.jsonl --epochs 2

  OPENAI_API_KEY=… tiaoyu distill --teacher http://localhost:8000/v1 --teacher-model big --student-preset tiny --tokenizer tok/ prompts.jsonl -o ckpt/student --mode black --keep-teacher-data teacher.jsonl

  tiaoyu distill --teacher ckpt/base --student-preset tiny --model dim=64 --data tokens/ -o ckpt/small-base --max-steps 2000   # during pretraining

  tiaoyu distill --teacher ckpt/sft --student ckpt/small chat.jsonl -o ckpt/student --cache-topk 32 --epochs 4 --divergence jsd

  # black box by hand, the same two halves:
  tiaoyu chat ckpt/sft --temperature 0 < prompts.jsonl > teacher.jsonl && tiaoyu sft ckpt/small teacher.jsonl -o ckpt/student
"""


def register(app: typer.Typer) -> None:
    @app.command("distill", epilog=EXAMPLES,
                 help="Knowledge distillation: a student learns from a teacher's answers (--mode black) or its "
                      "next-token distributions (--mode white, on chat records or token shards).")
    @train_options(out="ckpt/student", lr=1e-3, batch_size=16, warmup_steps=20, eval_every=0, save_every=0,
                   log_every=10)
    @config_options(distill.Config, distill.DISTILL_HELP, rename={"tokens": "data"}, args=("data",))
    def distill_cmd(*, cfg: distill.Config, train: TrainConfig) -> None:
        res = distill.run(cfg, train, log=say)
        before = res.get("before") or {}
        msg = "student"
        if "val_loss" in res:
            msg += f": val loss {before['val_loss']:.4f} → {res['val_loss']:.4f}" if "val_loss" in before \
                else f": val loss {res['val_loss']:.4f}"
        if "teacher_val_loss" in res:
            msg += f" (teacher {res['teacher_val_loss']:.4f}"
            if "val_loss" in before and before["val_loss"] > res["teacher_val_loss"]:
                closed = (before["val_loss"] - res["val_loss"]) / (before["val_loss"] - res["teacher_val_loss"])
                msg += f"; {closed:.0%} of the gap closed"
            msg += ")"
        if msg != "student":
            say(msg)
