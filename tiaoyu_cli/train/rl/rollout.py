"""What PPO and GRPO share: sample answers, score them, and train on them for a few passes.

An RL stage alternates two phases inside the one Trainer loop:

    collect   take the next prompts; sample answers with the batched KV-cache generator
              (infer/generate.py); score them (a reward model, or the exact final answer of
              verifiable questions via rl/answers.py); run the policy (and the frozen
              reference) once over prompt + answer for the log-probs the update compares with;
              the subclass turns all that into training targets (advantages, returns …)
    update    `epochs` shuffled passes over that buffer in micro-batches of --batch-size
              sequences; each Trainer step consumes --grad-accum of them

`next_batch()` collects when the buffer is used up, so a Trainer step count covers both. The
buffer and the position in it are part of the checkpoint: --resume continues exactly.

Memory switches for small GPUs: --gen-batch-size generates that many prompts at a time;
--batch-size (micro-batch) bounds every forward/backward pass, including the scoring passes;
--grad-accum makes the optimizer step bigger without more memory.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.nn as nn

from tiaoyu_cli.data.preference import PromptExample
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.infer.generate import decode_response
from tiaoyu_cli.train.engine.sampler import EpochSampler
from tiaoyu_cli.train.engine.stage import BaseStage
from tiaoyu_cli.train.losses.rl import kl_k1, kl_k3, masked_mean
from tiaoyu_cli.train.rl.answers import answer_accuracy, format_ok, is_correct
from tiaoyu_cli.train.rl.layout import Rollout, derive_seed, generate_rollout, response_logps, reward_model_scores
from tiaoyu_cli.train.rl.tool_rollout import generate_agentic_rollout, last_turn

# ---- rewards -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Scores:
    reward: torch.Tensor  # [B] the reward used for training
    correct: torch.Tensor | None = None  # [B] 1/0 exact final answer (verifiable rewards)
    format_ok: torch.Tensor | None = None  # [B] 1/0 well-formed response


class VerifiableReward:
    """Reward of a response to a verifiable question:

        r = 1[final answer correct] + format_weight · 1[well formed]

    The final answer is the text after </think> when there is one (rl/answers.py);
    `require_think` makes a missing reasoning block a format failure; `prefix_ids` are tokens the
    prompt already opened the response with (e.g. <think>), prepended before decoding."""

    def __init__(self, tokenizer, format_weight: float = 0.0, require_think: bool = False,
                 prefix_ids: list[int] | None = None):
        self.tok, self.format_weight, self.require_think = tokenizer, format_weight, require_think
        self.prefix_ids = list(prefix_ids or [])

    def texts(self, responses: list[list[int]]) -> list[str]:
        return [decode_response(self.tok, self.prefix_ids + list(r)).response for r in responses]

    def parts(self, responses: list[list[int]]) -> tuple[list[str], list[str]]:
        """(text whose answer is scored, text whose format is checked) per response: here both the response."""
        texts = self.texts(responses)
        return texts, texts

    def __call__(self, examples: list[PromptExample], ro: Rollout) -> Scores:
        scored, shaped = self.parts(ro.responses)
        correct = torch.tensor([float(is_correct(t, ex.answer)) for t, ex in zip(scored, examples)])
        fmt = torch.tensor([float(format_ok(t, self.require_think)) for t in shaped])
        return Scores(correct + self.format_weight * fmt, correct, fmt)


class ToolVerifiableReward(VerifiableReward):
    """VerifiableReward on an agentic rollout, minus `call_penalty` per failed call. The answer is the last
    assistant turn (a number inside a tool result is not an answer); with a think format (`reason --rl
    --tools`) the reasoning is the first turn's <think>…</think> (opened by `prefix_ids` when the prompt
    did), so the text scored is that block followed by the final answer."""

    def __init__(self, tokenizer, format_weight: float = 0.0, call_penalty: float = 0.0, require_think: bool = False,
                 prefix_ids: list[int] | None = None):
        super().__init__(tokenizer, format_weight, require_think, prefix_ids)
        self.call_penalty = call_penalty

    def parts(self, responses: list[list[int]]) -> tuple[list[str], list[str]]:
        """One-turn answers as the plain reward reads them; after tool calls, the last turn is scored and the
        first turn's <think> block + that answer is what the format check reads."""
        scored, shaped = [], []
        for r in responses:
            last = last_turn(self.tok, r)
            if len(last) == len(r):  # one turn
                t = super().texts([r])[0]
                scored.append(t)
                shaped.append(t)
                continue
            end = self.tok.end_tool_call_id
            first = decode_response(self.tok, self.prefix_ids + (r[:r.index(end)] if end in r else list(r)))
            final = decode_response(self.tok, last)
            answer = final.answer if final.answer is not None else final.response
            think = "" if first.reasoning is None else (  # an unclosed block stays unclosed (a format failure)
                "<think>" + first.reasoning + ("</think>" if "</think>" in first.response else ""))
            scored.append(answer)
            shaped.append(think + answer)
        return scored, shaped

    def texts(self, responses: list[list[int]]) -> list[str]:
        return self.parts(responses)[1]

    def __call__(self, examples, ro: Rollout) -> Scores:
        s = super().__call__(examples, ro)
        calls = getattr(ro, "tool_calls", None)
        if calls is not None and self.call_penalty:
            bad = torch.tensor([float(sum(c.error for c in cs)) for cs in calls])
            s.reward = s.reward - self.call_penalty * bad
        return s


class ModelReward:
    """Reward of a response under a reward model: its score on the last token of prompt + response."""

    def __init__(self, model: nn.Module, batch_size: int = 16):
        self.model, self.batch_size = model, batch_size

    @torch.no_grad()
    def __call__(self, examples: list[PromptExample], ro: Rollout) -> Scores:
        out = []
        for s in range(0, ro.ids.shape[0], self.batch_size):
            out.append(reward_model_scores(self.model, ro.rows(list(range(s, min(s + self.batch_size, ro.ids.shape[0]))))))
        return Scores(torch.cat(out).float().cpu())


class FunctionReward:
    """Any Python function fn(example, response_text) -> float as a reward (e.g. for `tiaoyu reason`)."""

    def __init__(self, fn: Callable[[PromptExample, str], float], tokenizer, prefix_ids: list[int] | None = None):
        self.fn, self.decoder = fn, VerifiableReward(tokenizer, prefix_ids=prefix_ids)

    def __call__(self, examples: list[PromptExample], ro: Rollout) -> Scores:
        texts = self.decoder.texts(ro.responses)
        return Scores(torch.tensor([float(self.fn(ex, t)) for ex, t in zip(examples, texts)]))


# ---- the stage ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RolloutConfig:
    """What every RL stage that samples its own answers (PPO, GRPO) needs: rollouts, sampling, evaluation."""

    rollout_batch_size: int = 16  # prompts per rollout
    epochs: int = 1  # passes over each rollout
    format_reward: float = 0.0  # verifiable: added for a well-formed response (answers.format_ok)
    think_format: bool = False  # verifiable: a well-formed response reasons in <think>…</think> first
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    gen_batch_size: int = 0  # prompts generated together (0 = the whole rollout at once)
    eval_size: int = 100  # held-out prompts per evaluation (0 = all)
    eval_samples: int = 1  # sampled answers per held-out prompt for val_reward / val_kl

    def validate(self) -> None:
        for name in ("rollout_batch_size", "epochs", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise TiaoyuError(f"--{name.replace('_', '-')} must be at least 1")
        if self.temperature <= 0:
            raise TiaoyuError("--temperature must be > 0: the rollouts are sampled (and compared)")
        if self.gen_batch_size < 0 or self.eval_size < 0 or self.eval_samples < 1:
            raise TiaoyuError("--gen-batch-size and --eval-size must not be negative, --eval-samples at least 1")


class RolloutStage(BaseStage):
    """Base of PPOStage and GRPOStage. Subclasses set `name`, implement `make_targets(ro, scores,
    examples) -> dict of tensors` (rows = sequences) and `step`, and may add extra modules."""

    shardable = False  # each process samples its own rollouts: generation lengths differ (no --fsdp)

    samples_per_prompt = 1

    def __init__(self, prompts: list[PromptExample], val_prompts: list[PromptExample], cfg, batch_size: int,
                 reward, tokenizer, ref_model: nn.Module | None = None, seed: int = 0,
                 prompt_suffix_ids: list[int] | None = None, tools=None):
        """tools: a `ToolUse` (objectives/grpo.py) for agentic rollouts (rl/tool_rollout.py), None for one-turn answers."""
        self.prompts, self.val_prompts, self.cfg = prompts, val_prompts, cfg
        self.tools = tools
        self.batch_size, self.seed, self.reward, self.tok, self.ref_model = batch_size, seed, reward, tokenizer, ref_model
        self.prompt_suffix_ids = list(prompt_suffix_ids or [])
        n_seq = cfg.rollout_batch_size * self.samples_per_prompt
        if n_seq % batch_size:
            raise TiaoyuError(f"a rollout of {cfg.rollout_batch_size} prompts × {self.samples_per_prompt} answers = "
                              f"{n_seq} sequences does not split into micro-batches of --batch-size {batch_size}")
        self.micro_per_rollout = n_seq // batch_size * cfg.epochs
        self.steps_per_epoch = None
        self.buffer: dict[str, torch.Tensor] = {}
        self.prompt_len = 0
        self.schedule: torch.Tensor | None = None  # [n_micro, batch_size] row indices into the buffer
        self.cursor = 0
        self.rollouts = 0
        self.rollout_stats: dict[str, float] = {}

    def setup(self, trainer) -> None:
        super().setup(trainer)
        self.device = trainer.device
        if self.ref_model is not None:
            self.ref_model.to(self.device)
        if hasattr(self.reward, "model"):
            self.reward.model.to(self.device)
        # under DDP every process samples its own rollout_batch_size prompts (its slice of the epoch order) with
        # its own seed; the same number of micro-batches per rollout keeps the processes in step, and DDP
        # averages their gradients: a rollout of world × rollout_batch_size prompts per optimizer step
        self.rank = trainer.dist.rank
        self.sampler = EpochSampler(len(self.prompts), self.cfg.rollout_batch_size, self.seed, rank=self.rank,
                                    world=trainer.dist.world_size)
        ga = trainer.cfg.grad_accum
        if self.micro_per_rollout % ga:
            raise TiaoyuError(f"one rollout gives {self.micro_per_rollout} micro-batches (prompts × answers × epochs / "
                              f"--batch-size), which --grad-accum {ga} does not divide: an optimizer step would mix "
                              f"two rollouts")

    # ---- collect ------------------------------------------------------------------------------------
    def sample(self, model: nn.Module, examples: list[PromptExample], seed: int, temperature: float | None = None) -> Rollout:
        c = self.cfg
        prompts = [ex.prompt_ids + self.prompt_suffix_ids for ex in examples for _ in range(self.samples_per_prompt)]
        if self.tools is not None:  # agentic rollouts (rl/tool_rollout.py)
            return generate_agentic_rollout(model, self.tok, self.tools.toolbox, prompts, c.max_new_tokens,
                                            c.temperature if temperature is None else temperature, c.top_k, c.top_p,
                                            seed, self.tools.max_tool_calls)
        return generate_rollout(model, prompts, c.max_new_tokens, c.temperature if temperature is None else temperature,
                                c.top_k, c.top_p, seed, c.gen_batch_size, self.trainer.amp_dtype,
                                stop_ids=self.tok.stop_ids)

    @torch.no_grad()
    def forward_chunks(self, model: nn.Module, ro: Rollout, with_values: bool = False):
        """Per-token log-probs [B, R] (and values [B, R] from the stage's value head) in micro-batches."""
        lps, vals = [], []
        was = model.training
        model.eval()
        try:
            with self.trainer.autocast():
                for s in range(0, ro.ids.shape[0], self.batch_size):
                    part = ro.rows(list(range(s, min(s + self.batch_size, ro.ids.shape[0]))))
                    if with_values:
                        lp, h = response_logps(model, part, with_hidden=True)
                        vals.append(self.values(h).float())
                    else:
                        lp = response_logps(model, part)
                    lps.append(lp.float())
        finally:
            model.train(was)
        return (torch.cat(lps), torch.cat(vals)) if with_values else torch.cat(lps)

    def expand(self, examples: list[PromptExample]) -> list[PromptExample]:
        return [ex for ex in examples for _ in range(self.samples_per_prompt)]

    def gather(self, model: nn.Module) -> tuple[list[PromptExample], Rollout, Scores, dict[str, float]]:
        """The prompts of the next rollout, their sampled answers and the answers' scores (+ statistics to log,
        which win over those `collect` computes from the rollout). GRPO's dynamic sampling overrides it."""
        examples = [self.prompts[i] for i in self.sampler.next_indices()]
        ro = self.sample(model, examples, derive_seed(self.seed, "rollout", self.rollouts, *self._rank_part()))
        return examples, ro, self.reward(self.expand(examples), ro), {}

    def collect(self) -> None:
        model = self.trainer.raw_model
        examples, ro, scores, gathered = self.gather(model)
        targets, extra = self.make_targets(ro, scores, examples)
        n = ro.ids.shape[0]
        self.buffer = {"ids": ro.ids, "attention_mask": ro.attention_mask, "mask": ro.mask,
                       **{k: v.to(self.device) for k, v in targets.items()}}
        self.prompt_len = ro.prompt_len
        g = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.rollouts, *self._rank_part()) % (2 ** 62))
        order = [torch.randperm(n, generator=g) for _ in range(self.cfg.epochs)]
        self.schedule = torch.cat(order).view(-1, self.batch_size)
        self.cursor = 0
        self.rollouts += 1
        st = {"reward": float(scores.reward.mean()),
              "resp_len": float(ro.mask.sum(-1).float().mean()),
              "stop_rate": sum(ro.finished) / len(ro.finished)}
        if scores.correct is not None:
            st["accuracy"] = float(scores.correct.mean())
        st.update(gathered)
        st.update(extra)
        self.rollout_stats = st

    def _rank_part(self) -> tuple:
        """Seeds of process 0 (and of a single process) stay those of the one-process run."""
        return (self.rank,) if getattr(self, "rank", 0) else ()

    def make_targets(self, ro: Rollout, scores: Scores,
                     examples: list[PromptExample]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Training targets for the rollout (tensors with one row per sequence) and statistics to log."""
        raise NotImplementedError

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ---- update -------------------------------------------------------------------------------------
    def next_batch(self) -> tuple[Rollout, dict[str, torch.Tensor]]:
        """(sequences, their targets): the next micro-batch of the buffer (collecting a new rollout first
        when the buffer is used up)."""
        if self.schedule is None or self.cursor >= self.schedule.shape[0]:
            self.collect()
        idx = self.schedule[self.cursor].tolist()
        self.cursor += 1
        b = self.buffer
        ro = Rollout(b["ids"][idx], b["attention_mask"][idx], b["mask"][idx], self.prompt_len, [], [])
        return ro, {k: v[idx] for k, v in b.items() if k not in ("ids", "attention_mask", "mask")}

    def rollout_metrics(self) -> dict[str, float]:
        return dict(self.rollout_stats)

    # ---- evaluation --------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """On the held-out prompts: mean reward of `eval_samples` sampled answers each (fixed seed) and
        their KL to the reference (Σ_t log π − log ref per answer, averaged); for verifiable rewards
        also the accuracy of greedy answers."""
        if not self.val_prompts:
            return {}
        c = self.cfg
        ex = self.val_prompts[:c.eval_size] if c.eval_size > 0 else self.val_prompts
        res: dict[str, float] = {}
        if isinstance(self.reward, VerifiableReward) and self.tools is not None:
            old_spp, self.samples_per_prompt = self.samples_per_prompt, 1
            try:  # greedy answers with the tools (the same rollouts as training, at temperature 0)
                greedy = self.reward(ex, self.sample(model, ex, 0, temperature=0.0))
            finally:
                self.samples_per_prompt = old_spp
            res["val_accuracy"] = float(greedy.correct.mean())
            res["val_n"] = len(ex)
            res["val_format_rate"] = float(greedy.format_ok.mean())
        elif isinstance(self.reward, VerifiableReward):
            recs = [{"prompt": e.record.get("prompt"), "answer": e.answer} for e in ex]
            rep = answer_accuracy(model, self.tok, recs, batch_size=max(self.batch_size, 32),
                                  max_new_tokens=c.max_new_tokens, require_think=self.reward.require_think,
                                  prompt_suffix_ids=self.prompt_suffix_ids or None)
            res["val_accuracy"] = rep.accuracy
            res["val_n"] = rep.total
            res["val_format_rate"] = rep.format_rate
        old_spp, self.samples_per_prompt = self.samples_per_prompt, max(1, c.eval_samples)
        try:
            ro = self.sample(model, ex, derive_seed(self.seed, "eval"))
            scores = self.reward(self.expand(ex), ro)
            res["val_reward"] = float(scores.reward.mean())
            if scores.correct is not None:
                res["val_sampled_accuracy"] = float(scores.correct.mean())
            if self.ref_model is not None:
                lp = self.forward_chunks(model, ro)
                ref = self.forward_chunks(self.ref_model, ro)
                m = ro.mask.float()
                res["val_kl"] = float(((lp - ref) * m).sum(-1).mean())
        finally:
            self.samples_per_prompt = old_spp
        return res

    # ---- checkpoint state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        st: dict[str, Any] = {"sampler": self.sampler.state_dict(), "rollouts": self.rollouts, "cursor": self.cursor,
                              "prompt_len": self.prompt_len, "rollout_stats": dict(self.rollout_stats)}
        if self.schedule is not None:
            st["schedule"] = self.schedule.cpu()
            for k, v in self.buffer.items():
                st[f"buffer.{k}"] = v.detach().cpu()
        return st

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])
        self.rollouts = int(state.get("rollouts", 0))
        self.cursor = int(state.get("cursor", 0))
        self.prompt_len = int(state.get("prompt_len", 0))
        self.rollout_stats = dict(state.get("rollout_stats", {}))
        if "schedule" in state:
            self.schedule = state["schedule"].long()
            self.buffer = {k[len("buffer."):]: v.to(self.device) for k, v in state.items() if k.startswith("buffer.")}

    def info(self) -> dict:
        return {**dataclasses.asdict(self.cfg), "prompts": len(self.prompts), "val_prompts": len(self.val_prompts)}


def sequence_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(mean over sequences of Σ_t k1, mean over tokens of k3): two views of KL(π ‖ ref) on sampled answers."""
    m = mask.float()
    return float((kl_k1(logp, ref_logp) * m).sum(-1).mean()), float(masked_mean(kl_k3(logp, ref_logp), m))
