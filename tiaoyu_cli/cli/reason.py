"""`tiaoyu reason`: reasoning models — think-format SFT on traces, then (`--rl`) GRPO on verifiable answers."""

from __future__ import annotations

import dataclasses
import typer

from tiaoyu_cli.cli.common import config_options, train_options
from tiaoyu_cli.infer.tools import ToolOptions
from tiaoyu_cli.console import say
from tiaoyu_cli.train.engine.config import TrainConfig
from tiaoyu_cli.train.objectives.grpo import GRPOConfig
from tiaoyu_cli.train.stages import reason as R

RL_TOOL_HELP = {f.name: "--rl: " + f.metadata["help"] for f in dataclasses.fields(ToolOptions)}
RL_HELP = {  # the GRPO config of --rl (objectives/grpo.py)
    "group_size": "--rl: answers sampled per question (the GRPO group)",
    "rollout_batch_size": "--rl: questions per rollout (× --group-size answers)",
    "max_new_tokens": "--rl: most tokens per sampled answer",
    "temperature": "--rl: sampling temperature of the rollouts",
    "beta": "--rl: weight of the KL penalty to the starting model",
    "format_reward": "--rl: reward for the <think>…</think>answer format (correctness gives 1)",
    "open_think": "--rl: put <think> after the generation prompt (the model then only has to close it)",
}
RL_SKIP = tuple(f"grpo.{f.name}" for f in dataclasses.fields(GRPOConfig) if f.name not in RL_HELP)

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
    @config_options(R.Config, {**RL_HELP, **RL_TOOL_HELP}, rename={"format_reward": "format_weight"}, args=("ckpt", "data"),
                    skip=RL_SKIP, panels={"tool": "Tools (--rl: agentic rollouts)"})
    def reason(*, cfg: R.Config, train: TrainConfig) -> None:
        R.run(cfg, train, log=say)
