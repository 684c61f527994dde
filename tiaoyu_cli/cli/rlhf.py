"""`tiaoyu rlhf`: preference alignment and RL fine-tuning — reward model, DPO, PPO, GRPO, scoring."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from tiaoyu_cli.cli.common import ToolOptions, config_options, train_options
from tiaoyu_cli.console import say
from tiaoyu_cli.data.jsonl import iter_jsonl, write_jsonl
from tiaoyu_cli.device import autocast, resolve_device, resolve_dtype
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.model.lora import LoraConfig
from tiaoyu_cli.train.engine.config import TrainConfig
from tiaoyu_cli.train.objectives.dpo import DPOConfig
from tiaoyu_cli.train.objectives.grpo import GRPOConfig
from tiaoyu_cli.train.objectives.ppo import PPOConfig
from tiaoyu_cli.train.objectives.reward import RewardConfig, score_records
from tiaoyu_cli.train.rl.models import load_reward_model
from tiaoyu_cli.train.stages.dpo import DPORunOptions, run_dpo
from tiaoyu_cli.train.stages.grpo import run_grpo
from tiaoyu_cli.train.stages.ppo import run_ppo
from tiaoyu_cli.train.stages.reward import run_reward


@dataclasses.dataclass
class RLInputs:
    """The inputs PPO and GRPO share besides the start checkpoint and the prompts."""

    ref: Optional[Path] = dataclasses.field(default=None, metadata={
        "help": "reference checkpoint for the KL term (default: the start)"})
    val: Optional[Path] = dataclasses.field(default=None, metadata={
        "help": "held-out prompts (default: hold out --val-frac of data)"})
    val_frac: float = dataclasses.field(default=0.05, metadata={
        "help": "share of the prompts held out when --val is not given"})
    eval_before: bool = dataclasses.field(default=True, metadata={"help": "evaluate the starting model too"})
    skip_bad: bool = dataclasses.field(default=False, metadata={
        "help": "skip (and count) bad records instead of stopping"})

EXAMPLES = """
Examples:

  tiaoyu rlhf reward ckpt/sft prefs.jsonl -o ckpt/rm --epochs 1

  tiaoyu rlhf score ckpt/rm pairs.jsonl > scored.jsonl          # {"prompt","response"} → + "reward"

  tiaoyu rlhf dpo ckpt/sft prefs.jsonl -o ckpt/dpo --beta 0.1 --epochs 1

  tiaoyu rlhf dpo ckpt/sft prefs.jsonl -o ckpt/dpo-lora --method lora --rank 8 --lr 5e-4 --epochs 1

  tiaoyu rlhf ppo ckpt/sft prompts.jsonl --reward ckpt/rm -o ckpt/ppo --max-steps 200

  tiaoyu rlhf ppo ckpt/sft questions.jsonl --reward verifiable -o ckpt/ppo-v --max-steps 200

  tiaoyu rlhf grpo ckpt/sft questions.jsonl -o ckpt/grpo --group-size 8 --beta 0.04 --max-steps 100
"""

_LORA = LoraConfig()
_RL_PANEL = "Rollouts"
_ROLLOUT_HELP = {
    "rollout_batch_size": "prompts per rollout", "gen_batch_size": "prompts generated together (0 = a whole "
    "rollout; lower it to save memory)", "max_new_tokens": "most tokens per sampled answer",
    "temperature": "sampling temperature of the rollouts", "top_k": "top-k sampling (0 = off)",
    "top_p": "nucleus sampling (1 = off)", "eval_size": "held-out prompts per evaluation (0 = all)",
    "eval_samples": "sampled answers per held-out prompt for the mean reward",
    "format_reward": "verifiable: bonus for a well-formed response",
    "think_format": "verifiable: well-formed means reasoning in <think>…</think> first",
}
PAIR_HELP = {
    "beta": "β: how strongly the policy is held to the reference",
    "label_smoothing": "cDPO: assumed probability that a label is flipped",
    "precompute_ref": "reference log-probs once up front (yes), every step (no), or yes when the run sees the data "
                      "at least once (auto)",
    "val_frac": "share of the pairs held out when --val is not given",
    "max_len": "longest prompt + response in tokens (0 = the model's context)",
    "margin": "required reward gap r_chosen − r_rejected",
}
GRPO_HELP = {**_ROLLOUT_HELP,
             "group_size": "G: answers sampled per question", "rollout_batch_size": "questions per rollout (× G sequences)",
             "epochs": "passes over each rollout (μ)", "beta": "weight of the k3 KL to the reference (0 = no reference "
             "model)", "clip": "ε: clip range of the ratio", "scale_rewards": "divide advantages by the group's std "
             "(off: Dr. GRPO)", "open_think": "start every answer with <think>"}
PPO_HELP = {**_ROLLOUT_HELP,
            "reward": "reward model checkpoint (from `tiaoyu rlhf reward`), or 'verifiable' to score the exact final answer",
            "epochs": "passes over each rollout", "kl_coef": "β of the per-token KL penalty to the reference",
            "clip": "ε: clip range of the policy ratio", "vf_clip": "clip range of the value change",
            "vf_coef": "weight of the value loss", "gamma": "discount γ", "lam": "GAE λ",
            "reward_norm": "normalise scores by a running mean/std",
            "reward_clip": "clip normalised scores to ±this (0 = off)"}

rlhf_app = typer.Typer(help="Preference alignment and RL: reward model, DPO, PPO, GRPO (and scoring with a reward model).",
                       no_args_is_help=True, epilog=EXAMPLES, rich_markup_mode="rich")


@rlhf_app.command("reward", epilog=EXAMPLES,
                  help="Train a reward model (the checkpoint + a one-output score head) on preference pairs with "
                       "the pairwise loss −log σ(r_chosen − r_rejected − margin).")
@train_options(out="ckpt/rm", lr=1e-4, batch_size=16, warmup_steps=10, eval_every=0, save_every=0, log_every=10)
@config_options(RewardConfig, PAIR_HELP)
def reward_cmd(
    start: Path = typer.Argument(..., help="checkpoint to start from (usually the SFT model)"),
    data: Path = typer.Argument(..., help="preference JSONL: {prompt, chosen, rejected}"),
    val: Optional[Path] = typer.Option(None, help="held-out preference JSONL (default: hold out --val-frac of data)"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="skip (and count) bad records instead of stopping"),
    *,
    cfg: RewardConfig,
    train: TrainConfig,
) -> None:
    run_reward(start, data, train, cfg, val=val, skip_bad=skip_bad, log=say)


@rlhf_app.command("score", epilog=EXAMPLES,
                  help="Score responses with a reward model: {prompt, response} → + reward (preference records get "
                       "reward_chosen and reward_rejected). Writes JSONL to stdout or -o.")
def score_cmd(
    rm: Path = typer.Argument(..., help="reward model checkpoint (from `tiaoyu rlhf reward`)"),
    data: Path = typer.Argument(..., help="JSONL with prompt and response (or chosen/rejected); - for stdin"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="output JSONL (default: stdout)"),
    batch_size: int = typer.Option(32, help="sequences per forward pass"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | mps"),
    dtype: str = typer.Option("auto", help="auto | bf16 | fp32 (auto = bf16 autocast where the hardware is fast at it)"),
) -> None:
    import torch


    if batch_size <= 0:
        raise TiaoyuError("--batch-size must be positive")
    dev = resolve_device(device)
    model, tok = load_reward_model(rm, device=dev)
    records = list(iter_jsonl(str(data)))
    amp = resolve_dtype(dtype, dev)
    with torch.no_grad():
        scored = score_records(model, tok, records, batch_size, dev, str(data), autocast=lambda: autocast(dev, amp))
    n = write_jsonl(str(out) if out else None, scored)
    say(f"scored {n} records" + (f" → {out}" if out else ""))


@rlhf_app.command("dpo", epilog=EXAMPLES,
                  help="Direct Preference Optimisation against a frozen reference: "
                       "−log σ(β[(log π_c − log ref_c) − (log π_r − log ref_r)]).")
@train_options(out="ckpt/dpo", lr=5e-5, batch_size=16, warmup_steps=10, eval_every=0, save_every=0, log_every=10)
@config_options(DPOConfig, PAIR_HELP, skip=("eval_batch_size",))
def dpo_cmd(
    start: Path = typer.Argument(..., help="policy checkpoint to start from (usually the SFT model)"),
    data: Path = typer.Argument(..., help="preference JSONL: {prompt, chosen, rejected}"),
    ref: Optional[Path] = typer.Option(None, help="reference checkpoint (default: the start checkpoint)"),
    val: Optional[Path] = typer.Option(None, help="held-out preference JSONL (default: hold out --val-frac of data)"),
    method: str = typer.Option("full", help="full (all weights) | lora (adapters; the reference is the same "
                                            "model with adapters off)"),
    rank: int = typer.Option(_LORA.rank, help="--method lora: rank r"),
    alpha: float = typer.Option(_LORA.alpha, help="--method lora: scale α (update = α/r · B·A)"),
    lora_dropout: float = typer.Option(_LORA.dropout, help="--method lora: dropout on the LoRA input"),
    targets: str = typer.Option(",".join(_LORA.targets), help="--method lora: layers to adapt"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="skip (and count) bad records instead of stopping"),
    *,
    cfg: DPOConfig,
    train: TrainConfig,
) -> None:
    lora = {"rank": rank, "alpha": alpha, "dropout": lora_dropout, "targets": targets}
    opts = DPORunOptions(start=str(start), data=str(data), val=str(val) if val else None,
                         ref=str(ref) if ref else None, method=method, lora=lora, skip_bad=skip_bad)
    run_dpo(opts, train, cfg, log=say)


@rlhf_app.command("ppo", epilog=EXAMPLES,
                  help="PPO: sample answers, score them (reward model or exact final answer), per-token KL penalty "
                       "to the reference, value head + GAE, clipped policy and value losses, several epochs per rollout.")
@train_options(out="ckpt/ppo", lr=1e-5, batch_size=8, warmup_steps=0, eval_every=0, save_every=0, log_every=5,
               schedule="constant", grad_clip=1.0)
@config_options(PPOConfig, PPO_HELP, rename={"epochs": "ppo_epochs"}, panel=_RL_PANEL, skip=("whiten_advantages",),
                required=("reward",))
@config_options(RLInputs, name="inputs")
def ppo_cmd(
    start: Path = typer.Argument(..., help="policy checkpoint to start from (usually the SFT model)"),
    data: Path = typer.Argument(..., help="prompts JSONL: {prompt} (with --reward verifiable: {prompt, answer})"),
    *,
    cfg: PPOConfig,
    inputs: RLInputs,
    train: TrainConfig,
) -> None:
    run_ppo(start, data, train, cfg, val=inputs.val, ref=inputs.ref, val_frac=inputs.val_frac,
            skip_bad=inputs.skip_bad, eval_before=inputs.eval_before, log=say)


@rlhf_app.command("grpo", epilog=EXAMPLES,
                  help="GRPO on verifiable questions: G answers per prompt, group-normalised advantages, clipped "
                       "ratio, optional k3 KL to the reference; no value model.")
@train_options(out="ckpt/grpo", lr=1e-5, batch_size=16, warmup_steps=0, eval_every=0, save_every=0, log_every=5,
               schedule="constant", grad_clip=1.0)
@config_options(GRPOConfig, GRPO_HELP, rename={"epochs": "grpo_epochs"}, panel=_RL_PANEL)
@config_options(RLInputs, name="inputs")
@config_options(ToolOptions, name="tool", panel="Tools (agentic rollouts)")
def grpo_cmd(
    start: Path = typer.Argument(..., help="policy checkpoint to start from (usually the SFT model)"),
    data: Path = typer.Argument(..., help="verifiable questions JSONL: {prompt, answer}"),
    *,
    cfg: GRPOConfig,
    inputs: RLInputs,
    tool: ToolOptions,
    train: TrainConfig,
) -> None:
    run_grpo(start, data, train, cfg, val=inputs.val, ref=inputs.ref, val_frac=inputs.val_frac,
             skip_bad=inputs.skip_bad, eval_before=inputs.eval_before, log=say, toolbox=tool.toolbox(), max_tool_calls=tool.max_tool_calls,
             tool_call_penalty=tool.tool_call_penalty)


def register(app: typer.Typer) -> None:
    app.add_typer(rlhf_app, name="rlhf")

