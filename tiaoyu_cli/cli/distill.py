"""`tiaoyu distill`: train a small student from a larger teacher (black box: its answers; white box: its logits)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from tiaoyu_cli.cli.common import train_options
from tiaoyu_cli.console import say
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.train.engine.config import TrainConfig
from tiaoyu_cli.train.stages.distill.run import DistillOptions, run_distill

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
    def distill(
        data: Optional[Path] = typer.Argument(None, help="chat/prompt JSONL (or a token folder, same as --data)"),
        teacher: str = typer.Option(..., "--teacher", help="teacher checkpoint, or an OpenAI-compatible endpoint "
                                    "http(s)://HOST:PORT/v1 (black box; API key from OPENAI_API_KEY)"),
        teacher_model: Optional[str] = typer.Option(None, "--teacher-model", help="endpoint teacher: the model to "
                                                    "ask (default: the one model the server lists)"),
        teacher_concurrency: int = typer.Option(8, help="endpoint teacher: requests in flight at once"),
        teacher_retries: int = typer.Option(5, help="endpoint teacher: retries of a request after a connection "
                                            "error, 429 or 5xx (exponential back-off with jitter)"),
        teacher_timeout: float = typer.Option(300.0, help="endpoint teacher: seconds one request may take"),
        student: Optional[Path] = typer.Option(None, "--student", help="student checkpoint to start from"),
        student_preset: Optional[str] = typer.Option(None, "--student-preset",
                                                     help="build a fresh student from a preset (tiny | small | …); "
                                                          "it takes the teacher's tokenizer, or --tokenizer's"),
        tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer (or checkpoint) folder of a "
                                                 "--student-preset student; needed behind an endpoint teacher"),
        model: Optional[List[str]] = typer.Option(None, "--model", help="override a field of the preset student, "
                                                  "KEY=VALUE (repeatable), e.g. dim=64, n_layers=2"),
        tokens: Optional[Path] = typer.Option(None, "--data", help="token folder from `tiaoyu tokenize encode`: "
                                              "white-box distillation during pretraining"),
        mode: str = typer.Option("white", help="white (teacher logits) | black (teacher answers, then SFT)"),
        alpha: float = typer.Option(0.5, help="white: weight of the CE on the data; 1 − α on the teacher term"),
        temperature: float = typer.Option(1.0, help="white: softening temperature T (the teacher term is × T²); T = 1 measured best here"),
        divergence: str = typer.Option("forward", help="white: forward KL(teacher‖student) | reverse | jsd"),
        cache_topk: int = typer.Option(0, help="white, chat data: run the teacher once and keep its top-k logits "
                                               "(safetensors in -o) for every epoch; 0 = run it every step"),
        keep_teacher_data: Optional[Path] = typer.Option(None, help="black: the teacher's answers, appended to this "
                                                         "JSONL as they come (chat records; default: inside -o); "
                                                         "a rerun asks only for prompts without an answer"),
        val: Optional[Path] = typer.Option(None, help="held-out chat JSONL: loss on its answers and answer accuracy"),
        eval_samples: int = typer.Option(200, help="questions of --val answered by generation at each evaluation"),
        seq_len: int = typer.Option(0, help="tokens per sequence (0 = the student's max_seq_len)"),
        max_new_tokens: int = typer.Option(256, help="black: most tokens per teacher answer"),
        gen_batch_size: int = typer.Option(32, help="black, checkpoint teacher: prompts it answers together"),
        gen_temperature: float = typer.Option(0.0, help="black: teacher sampling temperature (0 = greedy)"),
        skip_bad: bool = typer.Option(False, "--skip-bad", help="skip (and count) bad records instead of stopping"),
        *,
        train: TrainConfig,
    ) -> None:
        if data is not None and tokens is not None:
            raise TiaoyuError("give the data once: a JSONL file as the argument, or a token folder with --data")
        src = tokens if tokens is not None else data
        if src is None:
            raise TiaoyuError("no data: give a chat/prompt JSONL file, or --data tokens/ for token shards")
        opts = DistillOptions(
            teacher=teacher, student=student, student_preset=student_preset, model_overrides=model or [],
            data=src, mode=mode, alpha=alpha, temperature=temperature, divergence=divergence, cache_topk=cache_topk,
            keep_teacher_data=keep_teacher_data, val=val, eval_samples=eval_samples, seq_len=seq_len, max_new_tokens=max_new_tokens,
            gen_batch_size=gen_batch_size, gen_temperature=gen_temperature, skip_bad=skip_bad, tokenizer=tokenizer,
            teacher_model=teacher_model, teacher_concurrency=teacher_concurrency, teacher_retries=teacher_retries,
            teacher_timeout=teacher_timeout)
        res = run_distill(opts, train, log=say)
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
