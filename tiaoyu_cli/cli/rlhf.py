"""`tiaoyu rlhf`: preference alignment and RL fine-tuning — reward model, DPO, PPO, GRPO, scoring."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tiaoyu_cli.cli.common import config_options, train_options
from tiaoyu_cli.console import say
from tiaoyu_cli.data.jsonl import iter_jsonl, write_jsonl
from tiaoyu_cli.device import autocast, resolve_device, resolve_dtype
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.train.engine.config import TrainConfig
from tiaoyu_cli.train.objectives.reward import score_records
from tiaoyu_cli.train.rl.models import load_reward_model
from tiaoyu_cli.train.stages import dpo, grpo, ppo, reward


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
             "(off: Dr. GRPO)", "open_think": "start every answer with <think>",
             "dynamic_sampling": "DAPO: up to this many more rounds of questions per rollout to replace groups whose "
             "answers all scored the same (0 = off)"}
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
@config_options(reward.Config, PAIR_HELP, args=("start", "data"))
def reward_cmd(*, cfg: reward.Config, train: TrainConfig) -> None:
    reward.run(cfg, train, log=say)


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
@config_options(dpo.Config, PAIR_HELP, skip=("eval_batch_size",), args=("start", "data"))
def dpo_cmd(*, cfg: dpo.Config, train: TrainConfig) -> None:
    dpo.run(cfg, train, log=say)


@rlhf_app.command("ppo", epilog=EXAMPLES,
                  help="PPO: sample answers, score them (reward model or exact final answer), per-token KL penalty "
                       "to the reference, value head + GAE, clipped policy and value losses, several epochs per rollout.")
@train_options(out="ckpt/ppo", lr=1e-5, batch_size=8, warmup_steps=0, eval_every=0, save_every=0, log_every=5,
               schedule="constant", grad_clip=1.0)
@config_options(ppo.Config, PPO_HELP, rename={"epochs": "ppo_epochs"}, panels={"ppo": _RL_PANEL},
                skip=("whiten_advantages",), required=("reward",), args=("start", "data"))
def ppo_cmd(*, cfg: ppo.Config, train: TrainConfig) -> None:
    ppo.run(cfg, train, log=say)


@rlhf_app.command("grpo", epilog=EXAMPLES,
                  help="GRPO on verifiable questions: G answers per prompt, group-normalised advantages, clipped "
                       "ratio, optional k3 KL to the reference; no value model.")
@train_options(out="ckpt/grpo", lr=1e-5, batch_size=16, warmup_steps=0, eval_every=0, save_every=0, log_every=5,
               schedule="constant", grad_clip=1.0)
@config_options(grpo.Config, GRPO_HELP, rename={"epochs": "grpo_epochs"}, args=("start", "data"),
                panels={"grpo": _RL_PANEL, "tool": "Tools (agentic rollouts)"})
def grpo_cmd(*, cfg: grpo.Config, train: TrainConfig) -> None:
    grpo.run(cfg, train, log=say)


def register(app: typer.Typer) -> None:
    app.add_typer(rlhf_app, name="rlhf")

