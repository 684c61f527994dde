"""`tiaoyu rlhf grpo`: a group of answers per question, each rewarded by its standing in its group.

    tiaoyu rlhf grpo ckpt/sft questions.jsonl -o ckpt/grpo --group-size 8 --beta 0.04 --max-steps 100

Load the policy (and the frozen reference when β > 0), read the questions (holding out --val-frac of them
when no --val file is given), and hand a `GRPOStage` (objectives/grpo.py) to the one run path; with --tools
the rollouts call tools (rl/tool_rollout.py).

From Python: `grpo.run(grpo.Config(start=…, data=…, grpo=GRPOConfig(beta=0.0)), TrainConfig(out=…))`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tiaoyu_cli.infer.generate import open_think_ids
from tiaoyu_cli.infer.tools import ToolOptions
from tiaoyu_cli.train.engine.config import TrainConfig
from tiaoyu_cli.train.engine.run import Plan, run_stage
from tiaoyu_cli.train.objectives.grpo import GRPOConfig, GRPOStage, ToolUse
from tiaoyu_cli.train.rl.models import load_policy, load_reference
from tiaoyu_cli.train.rl.prompts import RLInputs, load_rl_prompts, prompt_room


@dataclass(kw_only=True)
class Config(RLInputs):
    """Everything `tiaoyu rlhf grpo` takes besides the loop's TrainConfig (ref, val, val_frac, eval_before and
    skip_bad come from RLInputs)."""

    start: Path = field(metadata={"help": "policy checkpoint to start from (usually the SFT model)"})
    data: Path = field(metadata={"help": "verifiable questions JSONL: {prompt, answer}"})
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    tool: ToolOptions = field(default_factory=ToolOptions)


def prepare(cfg: Config, train: TrainConfig) -> Plan:
    """Load policy (and reference when β > 0), read the questions. With tools (`--tools`) the rollouts call
    them (rl/tool_rollout.py)."""
    g = cfg.grpo
    g.validate()
    toolbox = cfg.tool.toolbox()  # first: a misspelt tool is named before any data is read
    model, folder, tok = load_policy(cfg.start, "GRPO")
    room = prompt_room(model.config.max_seq_len, g.max_new_tokens, len(open_think_ids(tok)) if g.open_think else 0)
    hint = f" in the context of {model.config.max_seq_len} tokens with --max-new-tokens {g.max_new_tokens}"
    prompts, held, skipped = load_rl_prompts(cfg.data, cfg.val, tok, room, need_answer=True, skip_bad=cfg.skip_bad,
                                             context_hint=hint, val_frac=cfg.val_frac, seed=train.seed)
    ref_model = load_reference(cfg.ref or folder, tok) if g.beta > 0 else None
    line = (f"grpo: {len(prompts)} questions, {len(held)} held out"
        + (f", {skipped} bad records skipped" if skipped else "")
        + f"; {g.rollout_batch_size} prompts × {g.group_size} answers per rollout, β {g.beta}"
        + (f", reference {cfg.ref or folder}" if ref_model is not None else ""))
    tools = (ToolUse(toolbox, cfg.tool.max_tool_calls, cfg.tool.tool_call_penalty, model.config.max_seq_len)
             if toolbox else None)
    stage = GRPOStage(prompts, held, g, batch_size=train.batch_size, tokenizer=tok, ref_model=ref_model,
                      seed=train.seed, tools=tools)
    return Plan(model, stage, tok, parent=str(folder), lines=[line], eval_before=bool(held) and cfg.eval_before)


def run(cfg: Config, train: TrainConfig, log=print) -> dict:
    """`tiaoyu rlhf grpo`: train; returns the final metrics plus `before`."""
    return run_stage("grpo", train, lambda: prepare(cfg, train), log=log)
