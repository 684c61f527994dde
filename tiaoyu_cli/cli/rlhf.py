"""`tiaoyu rlhf`: preference alignment and RL fine-tuning — reward model, DPO, PPO, GRPO, scoring."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tiaoyu_cli.cli.common import train_options
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.train.config import TrainConfig

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

rlhf_app = typer.Typer(help="Preference alignment and RL: reward model, DPO, PPO, GRPO (and scoring with a reward model).",
                       no_args_is_help=True, epilog=EXAMPLES, rich_markup_mode="rich")


def _say(msg: str) -> None:
    from tiaoyu_cli.cli.console import console

    console.print(msg, markup=False, highlight=False, soft_wrap=True)


def _done(res: dict, keys: list[str], out: str) -> None:
    before = res.get("before") or {}
    parts = []
    for k in keys:
        if k in res:
            name = k.removeprefix("val_")
            parts.append(f"{name} {before[k]:.4g} → {res[k]:.4g}" if k in before else f"{name} {res[k]:.4g}")
    _say(f"done: step {res.get('step')}" + (", held-out " + ", ".join(parts) if parts else "") + f" → {out}/latest")


@rlhf_app.command("reward", epilog=EXAMPLES,
                  help="Train a reward model (the checkpoint + a one-output score head) on preference pairs with "
                       "the pairwise loss −log σ(r_chosen − r_rejected − margin).")
@train_options(out="ckpt/rm", lr=1e-4, batch_size=16, warmup_steps=10, eval_every=0, save_every=0, log_every=10)
def reward_cmd(
    start: Path = typer.Argument(..., help="checkpoint to start from (usually the SFT model)"),
    data: Path = typer.Argument(..., help="preference JSONL: {prompt, chosen, rejected}"),
    val: Optional[Path] = typer.Option(None, help="held-out preference JSONL (default: hold out --val-frac of data)"),
    val_frac: float = typer.Option(0.05, help="share of the pairs held out when --val is not given"),
    margin: float = typer.Option(0.0, help="required reward gap r_chosen − r_rejected"),
    max_len: int = typer.Option(0, help="longest prompt + response in tokens (0 = the model's context)"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="skip (and count) bad records instead of stopping"),
    *,
    train: TrainConfig,
) -> None:
    from tiaoyu_cli.train.reward import RewardConfig, run_reward

    cfg = RewardConfig(margin=margin, max_len=max_len, val_frac=val_frac)
    res = run_reward(start, data, train, cfg, val=val, skip_bad=skip_bad, log=_say)
    _done(res, ["val_accuracy", "val_margin"], train.out)


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

    from tiaoyu_cli.data.jsonl import iter_jsonl, write_jsonl
    from tiaoyu_cli.device import autocast, resolve_device, resolve_dtype
    from tiaoyu_cli.train.reward import score_records
    from tiaoyu_cli.train.rl_common import load_reward_model

    if batch_size <= 0:
        raise TiaoyuError("--batch-size must be positive")
    dev = resolve_device(device)
    model, tok = load_reward_model(rm, device=dev)
    records = list(iter_jsonl(str(data)))
    amp = resolve_dtype(dtype, dev)
    with torch.no_grad():
        scored = score_records(model, tok, records, batch_size, dev, str(data), autocast=lambda: autocast(dev, amp))
    n = write_jsonl(str(out) if out else None, scored)
    _say(f"scored {n} records" + (f" → {out}" if out else ""))


@rlhf_app.command("dpo", epilog=EXAMPLES,
                  help="Direct Preference Optimisation against a frozen reference: "
                       "−log σ(β[(log π_c − log ref_c) − (log π_r − log ref_r)]).")
@train_options(out="ckpt/dpo", lr=5e-5, batch_size=16, warmup_steps=10, eval_every=0, save_every=0, log_every=10)
def dpo_cmd(
    start: Path = typer.Argument(..., help="policy checkpoint to start from (usually the SFT model)"),
    data: Path = typer.Argument(..., help="preference JSONL: {prompt, chosen, rejected}"),
    ref: Optional[Path] = typer.Option(None, help="reference checkpoint (default: the start checkpoint)"),
    beta: float = typer.Option(0.1, help="β: how strongly the policy is held to the reference"),
    label_smoothing: float = typer.Option(0.0, help="cDPO: assumed probability that a label is flipped"),
    precompute_ref: str = typer.Option("auto", help="reference log-probs once up front (yes), every step (no), "
                                                    "or yes when the run sees the data at least once (auto)"),
    val: Optional[Path] = typer.Option(None, help="held-out preference JSONL (default: hold out --val-frac of data)"),
    val_frac: float = typer.Option(0.05, help="share of the pairs held out when --val is not given"),
    max_len: int = typer.Option(0, help="longest prompt + response in tokens (0 = the model's context)"),
    method: str = typer.Option("full", help="full (all weights) | lora (adapters; the reference is the same "
                                            "model with adapters off)"),
    rank: int = typer.Option(8, help="--method lora: rank r"),
    alpha: float = typer.Option(16.0, help="--method lora: scale α (update = α/r · B·A)"),
    lora_dropout: float = typer.Option(0.0, help="--method lora: dropout on the LoRA input"),
    targets: str = typer.Option("q,k,v,o,gate,up,down", help="--method lora: layers to adapt"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="skip (and count) bad records instead of stopping"),
    *,
    train: TrainConfig,
) -> None:
    from tiaoyu_cli.train.dpo import DPOConfig, DPORunOptions, run_dpo

    cfg = DPOConfig(beta=beta, label_smoothing=label_smoothing, max_len=max_len, val_frac=val_frac,
                    precompute_ref=precompute_ref)
    lora = {"rank": rank, "alpha": alpha, "dropout": lora_dropout, "targets": targets}
    opts = DPORunOptions(start=str(start), data=str(data), val=str(val) if val else None,
                         ref=str(ref) if ref else None, method=method, lora=lora, skip_bad=skip_bad)
    res = run_dpo(opts, train, cfg, log=_say)
    if method == "lora":  # like `tiaoyu lora`: the final adapter also at the top of the run folder
        from tiaoyu_cli.cli.lora import publish_final_adapter

        publish_final_adapter(Path(train.out))
    _done(res, ["val_pref_accuracy", "val_logp_margin", "val_reward_margin", "val_reward_accuracy"], train.out)


_RL_PANEL = "Rollouts"


@rlhf_app.command("ppo", epilog=EXAMPLES,
                  help="PPO: sample answers, score them (reward model or exact final answer), per-token KL penalty "
                       "to the reference, value head + GAE, clipped policy and value losses, several epochs per rollout.")
@train_options(out="ckpt/ppo", lr=1e-5, batch_size=8, warmup_steps=0, eval_every=0, save_every=0, log_every=5,
               schedule="constant", grad_clip=1.0)
def ppo_cmd(
    start: Path = typer.Argument(..., help="policy checkpoint to start from (usually the SFT model)"),
    data: Path = typer.Argument(..., help="prompts JSONL: {prompt} (with --reward verifiable: {prompt, answer})"),
    reward: str = typer.Option(..., "--reward", help="reward model checkpoint (from `tiaoyu rlhf reward`), or "
                                                     "'verifiable' to score the exact final answer"),
    ref: Optional[Path] = typer.Option(None, help="reference checkpoint for the KL penalty (default: the start)"),
    val: Optional[Path] = typer.Option(None, help="held-out prompts (default: hold out --val-frac of data)"),
    val_frac: float = typer.Option(0.05, help="share of the prompts held out when --val is not given"),
    rollout_batch_size: int = typer.Option(16, help="prompts per rollout", rich_help_panel=_RL_PANEL),
    gen_batch_size: int = typer.Option(0, help="prompts generated together (0 = a whole rollout; lower it to save "
                                               "memory)", rich_help_panel=_RL_PANEL),
    ppo_epochs: int = typer.Option(2, help="passes over each rollout", rich_help_panel=_RL_PANEL),
    max_new_tokens: int = typer.Option(32, help="most tokens per sampled answer", rich_help_panel=_RL_PANEL),
    temperature: float = typer.Option(1.0, help="sampling temperature of the rollouts", rich_help_panel=_RL_PANEL),
    top_k: int = typer.Option(0, help="top-k sampling (0 = off)", rich_help_panel=_RL_PANEL),
    top_p: float = typer.Option(1.0, help="nucleus sampling (1 = off)", rich_help_panel=_RL_PANEL),
    kl_coef: float = typer.Option(0.05, help="β of the per-token KL penalty to the reference"),
    clip: float = typer.Option(0.2, help="ε: clip range of the policy ratio"),
    vf_clip: float = typer.Option(0.2, help="clip range of the value change"),
    vf_coef: float = typer.Option(0.1, help="weight of the value loss"),
    gamma: float = typer.Option(1.0, help="discount γ"),
    lam: float = typer.Option(0.95, help="GAE λ"),
    reward_norm: bool = typer.Option(True, "--reward-norm/--no-reward-norm", help="normalise scores by a running "
                                                                                  "mean/std"),
    reward_clip: float = typer.Option(5.0, help="clip normalised scores to ±this (0 = off)"),
    format_reward: float = typer.Option(0.0, help="verifiable: bonus for a well-formed response"),
    think_format: bool = typer.Option(False, "--think-format/--no-think-format",
                                      help="verifiable: well-formed means reasoning in <think>…</think> first"),
    eval_size: int = typer.Option(100, help="held-out prompts per evaluation (0 = all)"),
    eval_samples: int = typer.Option(1, help="sampled answers per held-out prompt for the mean reward"),
    eval_before: bool = typer.Option(True, "--eval-before/--no-eval-before", help="evaluate the starting model too"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="skip (and count) bad records instead of stopping"),
    *,
    train: TrainConfig,
) -> None:
    from tiaoyu_cli.train.ppo import PPOConfig, run_ppo

    cfg = PPOConfig(reward=reward, rollout_batch_size=rollout_batch_size, epochs=ppo_epochs, kl_coef=kl_coef,
                    clip=clip, vf_clip=vf_clip, vf_coef=vf_coef, gamma=gamma, lam=lam, reward_norm=reward_norm,
                    reward_clip=reward_clip, format_reward=format_reward, think_format=think_format,
                    max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    gen_batch_size=gen_batch_size, eval_size=eval_size, eval_samples=eval_samples)
    res = run_ppo(start, data, train, cfg, val=val, ref=ref, val_frac=val_frac, skip_bad=skip_bad,
                  eval_before=eval_before, log=_say)
    _done(res, ["val_accuracy", "val_reward", "val_kl"], train.out)


@rlhf_app.command("grpo", epilog=EXAMPLES,
                  help="GRPO on verifiable questions: G answers per prompt, group-normalised advantages, clipped "
                       "ratio, optional k3 KL to the reference; no value model.")
@train_options(out="ckpt/grpo", lr=1e-5, batch_size=16, warmup_steps=0, eval_every=0, save_every=0, log_every=5,
               schedule="constant", grad_clip=1.0)
def grpo_cmd(
    start: Path = typer.Argument(..., help="policy checkpoint to start from (usually the SFT model)"),
    data: Path = typer.Argument(..., help="verifiable questions JSONL: {prompt, answer}"),
    ref: Optional[Path] = typer.Option(None, help="reference checkpoint for the KL term (default: the start)"),
    val: Optional[Path] = typer.Option(None, help="held-out questions (default: hold out --val-frac of data)"),
    val_frac: float = typer.Option(0.05, help="share of the questions held out when --val is not given"),
    group_size: int = typer.Option(8, help="G: answers sampled per question", rich_help_panel=_RL_PANEL),
    rollout_batch_size: int = typer.Option(4, help="questions per rollout (× G sequences)", rich_help_panel=_RL_PANEL),
    gen_batch_size: int = typer.Option(0, help="prompts generated together (0 = a whole rollout; lower it to save "
                                               "memory)", rich_help_panel=_RL_PANEL),
    grpo_epochs: int = typer.Option(1, help="passes over each rollout (μ)", rich_help_panel=_RL_PANEL),
    max_new_tokens: int = typer.Option(64, help="most tokens per sampled answer", rich_help_panel=_RL_PANEL),
    temperature: float = typer.Option(1.0, help="sampling temperature of the rollouts", rich_help_panel=_RL_PANEL),
    top_k: int = typer.Option(0, help="top-k sampling (0 = off)", rich_help_panel=_RL_PANEL),
    top_p: float = typer.Option(1.0, help="nucleus sampling (1 = off)", rich_help_panel=_RL_PANEL),
    beta: float = typer.Option(0.04, help="weight of the k3 KL to the reference (0 = no reference model)"),
    clip: float = typer.Option(0.2, help="ε: clip range of the ratio"),
    scale_rewards: bool = typer.Option(True, "--scale-rewards/--no-scale-rewards",
                                       help="divide advantages by the group's std (off: Dr. GRPO)"),
    format_reward: float = typer.Option(0.0, help="bonus for a well-formed response"),
    think_format: bool = typer.Option(False, "--think-format/--no-think-format",
                                      help="well-formed means reasoning in <think>…</think> before the answer"),
    open_think: bool = typer.Option(False, "--open-think/--no-open-think", help="start every answer with <think>"),
    eval_size: int = typer.Option(100, help="held-out questions per evaluation (0 = all)"),
    eval_samples: int = typer.Option(1, help="sampled answers per held-out question for the mean reward"),
    eval_before: bool = typer.Option(True, "--eval-before/--no-eval-before", help="evaluate the starting model too"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="skip (and count) bad records instead of stopping"),
    tools: Optional[str] = typer.Option(None, "--tools", help="agentic rollouts: tools the policy may call "
                                        "(e.g. calculator); tool results are masked out of the loss and KL"),
    tools_module: Optional[Path] = typer.Option(None, "--tools-module", help="a Python file of tool functions"),
    max_tool_calls: int = typer.Option(5, "--max-tool-calls", help="most tool calls per sampled answer"),
    tool_call_penalty: float = typer.Option(0.0, help="reward minus this per call that came back as an error"),
    *,
    train: TrainConfig,
) -> None:
    from tiaoyu_cli.infer.tools import Toolbox
    from tiaoyu_cli.train.grpo import GRPOConfig, run_grpo

    cfg = GRPOConfig(group_size=group_size, rollout_batch_size=rollout_batch_size, epochs=grpo_epochs, beta=beta,
                     clip=clip, scale_rewards=scale_rewards, format_reward=format_reward, think_format=think_format,
                     open_think=open_think, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                     top_p=top_p, gen_batch_size=gen_batch_size, eval_size=eval_size, eval_samples=eval_samples)
    toolbox = Toolbox.from_names(tools, tools_module) if tools or tools_module else None
    res = run_grpo(start, data, train, cfg, val=val, ref=ref, val_frac=val_frac, skip_bad=skip_bad,
                   eval_before=eval_before, log=_say, toolbox=toolbox, max_tool_calls=max_tool_calls,
                   tool_call_penalty=tool_call_penalty)
    _done(res, ["val_accuracy", "val_reward", "val_kl"], train.out)


def register(app: typer.Typer) -> None:
    app.add_typer(rlhf_app, name="rlhf")

