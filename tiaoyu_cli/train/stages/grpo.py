"""`tiaoyu rlhf grpo`: a group of answers per question, each rewarded by its standing in its group.

    tiaoyu rlhf grpo ckpt/sft questions.jsonl -o ckpt/grpo --group-size 8 --beta 0.04 --max-steps 100

Load the policy (and the frozen reference when β > 0), read the questions (holding out --val-frac of them
when no --val file is given), and hand a `GRPOStage` (objectives/grpo.py) to the one run path; with --tools
the rollouts call tools (rl/tool_rollout.py).
"""

from __future__ import annotations

from tiaoyu_cli.infer.generate import open_think_ids
from tiaoyu_cli.train.engine.run import Plan, run_stage
from tiaoyu_cli.train.objectives.grpo import GRPOConfig, GRPOStage, ToolUse
from tiaoyu_cli.train.rl.models import load_policy, load_reference
from tiaoyu_cli.train.rl.prompts import load_rl_prompts, prompt_room


def prepare_grpo(start, data, train, cfg: GRPOConfig, val=None, ref=None, val_frac: float = 0.05,
                 skip_bad: bool = False, eval_before: bool = True, toolbox=None, max_tool_calls: int = 5,
                 tool_call_penalty: float = 0.0) -> Plan:
    """Load policy (and reference when β > 0), read the questions. With a `toolbox` (`--tools`) the rollouts
    call tools (rl/tool_rollout.py)."""
    cfg.validate()
    model, folder, tok = load_policy(start, "GRPO")
    room = prompt_room(model.config.max_seq_len, cfg.max_new_tokens, len(open_think_ids(tok)) if cfg.open_think else 0)
    hint = f" in the context of {model.config.max_seq_len} tokens with --max-new-tokens {cfg.max_new_tokens}"
    prompts, held, skipped = load_rl_prompts(data, val, tok, room, need_answer=True, skip_bad=skip_bad,
                                             context_hint=hint, val_frac=val_frac, seed=train.seed)
    ref_model = load_reference(ref or folder, tok) if cfg.beta > 0 else None
    line = (f"grpo: {len(prompts)} questions, {len(held)} held out"
        + (f", {skipped} bad records skipped" if skipped else "")
        + f"; {cfg.rollout_batch_size} prompts × {cfg.group_size} answers per rollout, β {cfg.beta}"
        + (f", reference {ref or folder}" if ref_model is not None else ""))
    tools = ToolUse(toolbox, max_tool_calls, tool_call_penalty, model.config.max_seq_len) if toolbox else None
    stage = GRPOStage(prompts, held, cfg, batch_size=train.batch_size, tokenizer=tok, ref_model=ref_model,
                      seed=train.seed, tools=tools)
    return Plan(model, stage, tok, parent=str(folder), lines=[line], eval_before=bool(held) and eval_before)


def run_grpo(start, data, train, cfg: GRPOConfig, val=None, ref=None, val_frac: float = 0.05,
             skip_bad: bool = False, eval_before: bool = True, log=print, toolbox=None, max_tool_calls: int = 5,
             tool_call_penalty: float = 0.0) -> dict:
    """`tiaoyu rlhf grpo`: train; returns the final metrics plus `before`."""
    return run_stage("grpo", train, lambda: prepare_grpo(start, data, train, cfg, val, ref, val_frac, skip_bad,
                                                       eval_before, toolbox, max_tool_calls, tool_call_penalty),
                     log=log)
