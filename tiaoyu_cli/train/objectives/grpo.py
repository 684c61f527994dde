"""GRPO: sample a group of answers per question, reward the ones better than their group.

    tiaoyu rlhf grpo ckpt/sft questions.jsonl -o ckpt/grpo --group-size 8 --beta 0.04 --max-steps 100

Group Relative Policy Optimisation (Shao et al. 2024, DeepSeekMath) needs no value model: for
every prompt it samples G answers, scores each (verifiable reward: 1 for the exact final answer,
plus `format_reward` for a well-formed response), and uses the answer's standing in its own group
as the advantage of all its tokens,

    A_i = (r_i − mean(r_group)) / (std(r_group) + ε)

then maximises the clipped objective with an optional KL pull (k3 estimator, weight β) to the
frozen reference (the start checkpoint):

    J = mean_i (1/|o_i|) Σ_t [ min(ρ_t A_i, clip(ρ_t, 1−ε, 1+ε) A_i) − β k3_t ],   ρ_t = π/π_old

A group whose answers all score the same has advantage 0 and teaches nothing; the share of
such groups is logged (`flat_groups`); `--dynamic-sampling N` (DAPO) replaces them with informative groups
of new questions, up to N more rounds per rollout (`gather`). `tiaoyu reason --rl` reuses `GRPOStage` with
`think_format=True` (reasoning in <think>…</think> before the answer).

Reuse from Python:

    from tiaoyu_cli.train.objectives.grpo import GRPOConfig, GRPOStage
    stage = GRPOStage(prompts, val_prompts, GRPOConfig(group_size=8, beta=0.04, think_format=True),
                      batch_size=16, tokenizer=tok, ref_model=ref)          # prompts: load_prompts(..., need_answer=True)
    Trainer(policy, stage, TrainConfig(...), tokenizer=tok).fit()
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from tiaoyu_cli.data.preference import PromptExample, prompt_messages
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.infer.generate import open_think_ids
from tiaoyu_cli.train.engine.stage import StepOutput
from tiaoyu_cli.train.losses.rl import group_advantages, grpo_loss
from tiaoyu_cli.train.rl.layout import Rollout, concat_rollouts, derive_seed, response_logps
from tiaoyu_cli.train.rl.rollout import (RolloutConfig, RolloutStage, Scores, ToolVerifiableReward, VerifiableReward,
                                         sequence_kl)


@dataclass
class GRPOConfig(RolloutConfig):
    group_size: int = 8  # G: answers sampled per prompt
    rollout_batch_size: int = 4  # prompts per rollout (→ rollout_batch_size × G sequences)
    beta: float = 0.04  # weight of the k3 KL to the reference (0 = no reference model at all)
    clip: float = 0.2  # ε of the clipped ratio
    scale_rewards: bool = True  # divide by the group's std (False: Dr. GRPO)
    open_think: bool = False  # start every answer with <think> (the prompt ends with it)
    max_new_tokens: int = 64
    dynamic_sampling: int = 0  # DAPO: up to this many more rounds of questions to replace groups that all scored the same

    def validate(self) -> None:
        super().validate()
        if self.group_size < 2:
            raise TiaoyuError("--group-size must be at least 2 (advantages compare answers within a group)")
        if self.beta < 0 or not 0 < self.clip < 1:
            raise TiaoyuError("--beta must be ≥ 0 and --clip in (0, 1)")
        if self.dynamic_sampling < 0:
            raise TiaoyuError(f"--dynamic-sampling must be ≥ 0 (rounds of extra questions), got {self.dynamic_sampling}")


class GRPOStage(RolloutStage):
    name = "grpo"

    def __init__(self, prompts: list[PromptExample], val_prompts: list[PromptExample], cfg: GRPOConfig,
                 batch_size: int, tokenizer, ref_model: nn.Module | None = None, reward=None, seed: int = 0,
                 tools: ToolUse | None = None, name: str | None = None):
        """reward: a callable (examples, rollout) -> Scores; default: verifiable answers (+ format), read
        from the last turn with `tools`. name: the stage's name in logs and checkpoints (`reason --rl`)."""
        cfg.validate()
        if cfg.beta > 0 and ref_model is None:
            raise TiaoyuError("GRPO with --beta > 0 needs a reference model")
        if name is not None:
            self.name = name
        self.samples_per_prompt = cfg.group_size
        suffix = open_think_ids(tokenizer) if cfg.open_think else []
        if tools is not None:
            tools.validate(tokenizer)
            if getattr(tokenizer, "backend", None) == "hf" and tools.context is not None:
                room = tools.context - cfg.max_new_tokens - len(suffix)
                for examples in (prompts, val_prompts):
                    schemas_in_prompts(examples, tokenizer, tools.toolbox.schemas(), room)
        if reward is None:
            if any(p.answer is None for p in prompts):
                raise TiaoyuError("verifiable rewards need an answer for every prompt")
            reward = (VerifiableReward(tokenizer, cfg.format_reward, cfg.think_format, prefix_ids=suffix)
                      if tools is None else
                      ToolVerifiableReward(tokenizer, cfg.format_reward, tools.call_penalty, cfg.think_format,
                                           prefix_ids=suffix))
        super().__init__(prompts, val_prompts, cfg, batch_size, reward, tokenizer, ref_model, seed, suffix,
                         tools=tools)

    def gather(self, model: nn.Module):
        """With `dynamic_sampling` (DAPO, Yu et al. 2025): groups whose answers all scored the same give no
        gradient, yet AdamW takes a full-size step on whatever the other groups say — a step from a few
        informative groups is mostly noise. So while fewer than `rollout_batch_size` groups are informative,
        sample up to `dynamic_sampling` more rounds of new questions and keep their informative groups; the
        rollout is the first `rollout_batch_size` informative groups (then flat ones of the first round, if the
        rounds ran out). Logged: `accuracy`/`reward` over everything sampled, `sampled_flat` and `rounds`."""
        examples, ro, scores, st = super().gather(model)
        if self.cfg.dynamic_sampling <= 0:
            return examples, ro, scores, st
        G, n = self.cfg.group_size, len(examples)
        parts = [(examples, ro, scores)]
        informative = [_informative(scores.reward, G)]
        while sum(int(i.sum()) for i in informative) < n and len(parts) <= self.cfg.dynamic_sampling:
            ex = [self.prompts[i] for i in self.sampler.next_indices()]
            r = self.sample(model, ex, derive_seed(self.seed, "rollout", self.rollouts, "more", len(parts),
                                                   *self._rank_part()))
            sc = self.reward(self.expand(ex), r)
            parts.append((ex, r, sc))
            informative.append(_informative(sc.reward, G))
        chosen = [(k, g) for k, inf in enumerate(informative) for g in range(len(inf)) if inf[g]][:n]
        chosen += [(0, g) for g in range(n) if not informative[0][g]][:n - len(chosen)]
        chosen.sort()
        pieces, kept_ex, kept_sc = [], [], []
        for k, (ex, r, sc) in enumerate(parts):
            groups = [g for kk, g in chosen if kk == k]
            if groups:
                idx = [g * G + j for g in groups for j in range(G)]
                pieces.append(r.rows(idx))
                kept_ex += [ex[g] for g in groups]
                kept_sc.append((sc, torch.tensor(idx, device=sc.reward.device)))
        pad = getattr(getattr(model, "config", None), "pad_token_id", 0) or 0

        def cat(name):
            return None if getattr(scores, name) is None else torch.cat([getattr(sc, name)[i] for sc, i in kept_sc])

        kept = Scores(cat("reward"), cat("correct"), cat("format_ok"))
        every = [sc for _, _, sc in parts]
        reward = torch.cat([sc.reward for sc in every])
        st = {"reward": float(reward.mean()), "rounds": float(len(parts)),
              "sampled_flat": 1.0 - sum(int(i.sum()) for i in informative) / (n * len(parts))}
        if every[0].correct is not None:
            st["accuracy"] = float(torch.cat([sc.correct for sc in every]).mean())
        return kept_ex, concat_rollouts(pieces, pad), kept, st

    def make_targets(self, ro: Rollout, scores: Scores, examples):
        G = self.cfg.group_size
        adv = group_advantages(scores.reward, G, scale=self.cfg.scale_rewards)
        old = self.forward_chunks(self.trainer.raw_model, ro)
        targets = {"old_logp": old, "adv": adv}
        r = scores.reward.view(-1, G)
        stats = {"flat_groups": float((r.max(1).values == r.min(1).values).float().mean()),
                 "reward_std": float(r.std(1).mean()), "adv_abs": float(adv.abs().mean())}
        if self.ref_model is not None:
            ref = self.forward_chunks(self.ref_model, ro)
            targets["ref_logp"] = ref
            stats["kl"], stats["kl_k3"] = sequence_kl(old, ref, ro.mask)
        return targets, stats

    def step(self, model: nn.Module, batch) -> StepOutput:
        ro, t = batch
        logp = response_logps(model, ro)
        loss, st = grpo_loss(logp, t["old_logp"], t["adv"], ro.mask, self.cfg.clip, self.cfg.beta, t.get("ref_logp"))
        metrics = {"clipfrac": st["clipfrac"], **self.rollout_metrics()}
        return StepOutput(loss, metrics, tokens=int(ro.attention_mask.sum()))


def _informative(reward, G: int):
    """[groups] True where a group's answers did not all score the same."""
    r = reward.view(-1, G)
    return r.max(1).values != r.min(1).values


@dataclass
class ToolUse:
    """Agentic rollouts (`--tools`), given to a GRPO stage when it is built: generation pauses at </tool_call>,
    the call runs, its result joins the sequence (masked out of the loss and the KL); the verifiable reward
    reads the final turn (and, in the think format, the first turn's reasoning), minus `call_penalty` per
    failed call. An open model's prompts get the tools' schemas where its template puts them (such models
    learned their tools from them); `context` (the model's) bounds those prompts."""

    toolbox: object  # infer.tools.Toolbox
    max_tool_calls: int = 5
    call_penalty: float = 0.0
    context: int | None = None

    def validate(self, tok) -> None:
        tok.require_tool_tokens()
        if self.max_tool_calls < 0:
            raise TiaoyuError(f"--max-tool-calls must be >= 0, got {self.max_tool_calls}")
        if self.call_penalty < 0:
            raise TiaoyuError("--tool-call-penalty must not be negative")


def schemas_in_prompts(examples: list, tok, schemas: list[dict], room: int) -> None:
    """Re-render each example's prompt with the tools' schemas (in place); a prompt that no longer leaves room
    for the answer is an error naming its line."""
    for ex in examples:
        msgs = prompt_messages(ex.record.get("prompt"), line=ex.line)
        if tok.encode_chat(msgs, add_generation_prompt=True)[0] != ex.prompt_ids:
            raise TiaoyuError(f"line {ex.line}: the prompt's ids are not its messages' (cannot add the tools' schemas)")
        ids = tok.encode_chat(msgs, add_generation_prompt=True, tools=schemas or None)[0]
        if len(ids) > room:
            raise TiaoyuError(f"line {ex.line}: field 'prompt': with the tools' schemas it is {len(ids)} tokens; "
                              f"at most {room} fit with --max-new-tokens")
        ex.prompt_ids = ids
