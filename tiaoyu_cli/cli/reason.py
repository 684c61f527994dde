"""`tiaoyu reason`: reasoning models — think-format SFT on traces, then (`--rl`) GRPO on verifiable answers."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from tiaoyu_cli.cli.common import ToolOptions, config_options, train_options
from tiaoyu_cli.console import say
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.train.engine.config import TrainConfig
from tiaoyu_cli.train.objectives.grpo import ToolUse
from tiaoyu_cli.train.stages import reason as R

RL_TOOL_HELP = {f.name: "--rl: " + f.metadata["help"] for f in dataclasses.fields(ToolOptions)}

EXAMPLES = """
Examples:

  tiaoyu reason ckpt/sft reasoning.train.jsonl -o ckpt/reason --eval-data verifiable.val.jsonl --epochs 3

  tiaoyu reason --rl ckpt/reason verifiable.train.jsonl -o ckpt/reason-rl --eval-data verifiable.val.jsonl --max-steps 100

  # reasoning with a calculator: think, call, read the result, answer (from a tool-SFT model; traces with tool_calls)
  tiaoyu reason ckpt/tools reasoning-tools.train.jsonl -o ckpt/reason-tools --eval-data reasoning-tools.val.jsonl --eval-tools calculator --max-steps 300
  tiaoyu reason --rl ckpt/reason-tools reasoning-tools.train.jsonl -o ckpt/reason-tools-rl --tools calculator --max-steps 60

  tiaoyu reason ckpt/sft reasoning.train.jsonl -o ckpt/direct --direct --epochs 3      # baseline: answers only

  # traces from a reasoning teacher (black-box distillation of reasoning):
  tiaoyu chat ckpt/teacher --temperature 0 < questions.jsonl > traces.jsonl && tiaoyu reason ckpt/sft traces.jsonl -o ckpt/reason --only-correct

  tiaoyu chat ckpt/reason-rl --prompt "What is 3 + 4 - 2?"                # thinking shown dimmed; --hide-thinking hides it
"""


def register(app: typer.Typer) -> None:
    @app.command("reason", epilog=EXAMPLES,
                 help="Train a reasoning model: think-format SFT on traces (<think>steps</think>answer), or with "
                      "--rl GRPO with verifiable rewards (answer correctness + format) on {prompt, answer} records.")
    @train_options(out="ckpt/reason", lr=5e-4, batch_size=16, warmup_steps=20, weight_decay=0.0, log_every=10)
    @config_options(ToolOptions, RL_TOOL_HELP, name="tool", panel="Tools (--rl: agentic rollouts)")
    def reason(
        ckpt: Path = typer.Argument(..., help="checkpoint to start from (sft for stage 1, the stage-1 result for --rl)"),
        data: Path = typer.Argument(..., help="traces JSONL (chat records with \"reasoning\"), or with --rl "
                                    "questions JSONL ({\"prompt\", \"answer\"})"),
        rl: bool = typer.Option(False, "--rl", help="stage 2: GRPO with verifiable rewards instead of SFT"),
        eval_data: Optional[Path] = typer.Option(None, help="held-out traces or {prompt, answer} records: answer "
                                                 "accuracy and think-format rate (and val loss for traces)"),
        eval_samples: int = typer.Option(200, help="held-out questions answered at each evaluation (0 = none)"),
        eval_max_new_tokens: int = typer.Option(96, help="most tokens per generated eval answer"),
        max_len: int = typer.Option(0, help="stage 1: most tokens per trace (0 = the model's max_seq_len)"),
        direct: bool = typer.Option(False, "--direct", help="stage 1 baseline: drop the reasoning, learn answers only"),
        only_correct: bool = typer.Option(False, "--only-correct", help="stage 1, traces from `tiaoyu chat`: keep a "
                                          "teacher's trace only if its answer matches the reference (input_answer)"),
        skip_bad: bool = typer.Option(False, "--skip-bad", help="skip (and count) bad records instead of stopping"),
        group_size: int = typer.Option(8, help="--rl: answers sampled per question (the GRPO group)"),
        rollout_batch_size: int = typer.Option(4, help="--rl: questions per rollout (× --group-size answers)"),
        max_new_tokens: int = typer.Option(64, help="--rl: most tokens per sampled answer"),
        temperature: float = typer.Option(1.0, help="--rl: sampling temperature of the rollouts"),
        beta: float = typer.Option(0.04, help="--rl: weight of the KL penalty to the starting model"),
        format_weight: float = typer.Option(0.2, help="--rl: reward for the <think>…</think>answer format "
                                            "(correctness gives 1)"),
        open_think: bool = typer.Option(False, "--open-think/--no-open-think",
                                        help="--rl: put <think> after the generation prompt (the model then only "
                                             "has to close it)"),
        eval_tools: str = typer.Option("", "--eval-tools", help="stage 1: the held-out answers may call these tools "
                                       "(e.g. calculator), for traces that think and then call"),
        *,
        tool: ToolOptions,
        train: TrainConfig,
    ) -> None:
        if eval_tools and rl:
            raise TiaoyuError("--eval-tools is for stage 1; with --rl, --tools makes the rollouts and the "
                              "held-out evaluation call tools")
        if tool.wanted and not rl:
            raise TiaoyuError("--tools is for --rl (agentic rollouts); stage 1 learns tool calls from the traces "
                              "themselves (chat records with tool_calls)")
        if rl:
            if direct:
                raise TiaoyuError("--direct is a stage-1 (SFT) baseline; it does not combine with --rl")
            grpo = R.reason_grpo_config(group_size=group_size, rollout_batch_size=rollout_batch_size, beta=beta,
                                        format_reward=format_weight, open_think=open_think,
                                        max_new_tokens=max_new_tokens, temperature=temperature, eval_size=eval_samples)
            toolbox = tool.toolbox()
            tools = (ToolUse(toolbox, tool.max_tool_calls, tool.tool_call_penalty) if toolbox is not None else None)
            o = R.ReasonRLOptions(ckpt=ckpt, data=data, eval_data=eval_data, skip_bad=skip_bad, grpo=grpo, tools=tools)
            R.run_reason_rl(o, train, log=say)
        else:
            o = R.ReasonOptions(ckpt=ckpt, data=data, eval_data=eval_data, eval_samples=eval_samples,
                                eval_max_new_tokens=eval_max_new_tokens, max_len=max_len, skip_bad=skip_bad,
                                direct=direct, only_correct=only_correct, eval_tools=eval_tools)
            R.run_think_sft(o, train, log=say)
