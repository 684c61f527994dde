"""Reward model: learn a scalar score from preference pairs.

    tiaoyu rlhf reward ckpt/sft prefs.jsonl -o ckpt/rm --epochs 1
    tiaoyu rlhf score ckpt/rm pairs.jsonl > scored.jsonl

The reward model is the policy's own network with a `score` head (a Linear(d, 1), the HF
LlamaForSequenceClassification name, `num_labels = 1` in config.json) whose output at the last
token of prompt + response is the reward r(x, y). Trained on pairs with the Bradley–Terry loss

    L = −log σ(r(x, y_chosen) − r(x, y_rejected) − margin)

so only differences of rewards are learnt (the scale is arbitrary; PPO normalises it). It
reports pairwise accuracy — how often r(chosen) > r(rejected) — on held-out pairs.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from tiaoyu_cli.checkpoint import (load_config, load_model_tensors, load_weights, resolve_checkpoint,
                                  weights_source)
from tiaoyu_cli.data.preference import (
    PairExample,
    collate_pairs,
    encode_response,
    pad_right,
    prompt_messages,
    response_messages,
)
from tiaoyu_cli.errors import DataError, TiaoyuError
from tiaoyu_cli.model import Transformer
from tiaoyu_cli.model.heads import last_token_scores
from tiaoyu_cli.train.engine.stage import StepOutput
from tiaoyu_cli.train.losses.rl import reward_pairwise_loss
from tiaoyu_cli.train.rl.pairs import PairStage


@dataclass
class RewardConfig:
    margin: float = 0.0  # required gap r_chosen − r_rejected (0 = plain Bradley–Terry)
    max_len: int = 0  # longest prompt + response in tokens (0 = the model's context)
    val_frac: float = 0.05  # share of the training pairs held out when no --val file is given
    eval_batch_size: int = 32


def reward_model_from(ckpt: str | os.PathLike, device="cpu") -> tuple[nn.Module, Any]:
    """The policy checkpoint with a fresh one-output `score` head (or an existing reward model as is).
    Returns (model, checkpoint folder). Seed torch first: the new head's init depends on it."""

    folder = resolve_checkpoint(ckpt)
    cfg = load_config(folder)
    fresh = cfg.num_labels != 1
    cfg = cfg.replace(num_labels=1, id2label={"0": "reward"})
    model = Transformer(cfg)
    sd = load_model_tensors(folder)
    if fresh:
        sd.pop("score.weight", None)
        nn.init.zeros_(model.score.weight)  # every response starts at reward 0
    load_weights(model, sd, weights_source(folder), may_miss=("score.weight",) if fresh else ())
    return model.to(device), folder


def pair_rewards(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen [B], r_rejected [B]) for a batch from `collate_pairs` (chosen rows first)."""
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"], compute_logits=False)
    r = last_token_scores(out.scores.float(), batch["attention_mask"])
    B = r.shape[0] // 2
    return r[:B], r[B:]


class RewardStage(PairStage):
    name = "reward"

    def setup(self, trainer) -> None:
        if trainer.raw_model.config.num_labels != 1:
            raise TiaoyuError("the reward stage needs a model with a one-output score head (see reward_model_from)")
        super().setup(trainer)

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        rc, rr = pair_rewards(model, batch)
        loss = reward_pairwise_loss(rc, rr, self.cfg.margin)
        d = (rc - rr).detach()
        metrics = {"accuracy": (d > 0).float().mean(), "margin": d.mean(),
                   "reward_chosen": rc.detach().mean(), "reward_rejected": rr.detach().mean()}
        return StepOutput(loss, metrics, tokens=int(batch["attention_mask"].sum()))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.val:
            return {}
        return evaluate_pairs(model, self.val, self.cfg.eval_batch_size, self.device, self.cfg.margin)


@torch.no_grad()
def evaluate_pairs(model: nn.Module, pairs: list[PairExample], batch_size: int, device, margin: float = 0.0) -> dict:
    """val_accuracy (share of pairs with r_chosen > r_rejected; ties count half), val_loss, val_margin (mean r_c − r_r)."""
    was = model.training
    model.eval()
    diffs, losses = [], []
    for i in range(0, len(pairs), batch_size):
        part = pairs[i:i + batch_size]
        rc, rr = pair_rewards(model, collate_pairs(part, device=device))
        diffs.append(rc - rr)
        losses.append(reward_pairwise_loss(rc, rr, margin) * len(part))
    model.train(was)
    d = torch.cat(diffs)
    acc = (d > 0).float().mean() + 0.5 * (d == 0).float().mean()  # a tie counts as half right
    return {"val_accuracy": float(acc), "val_loss": float(sum(losses) / len(pairs)),
            "val_margin": float(d.mean()), "val_n": len(pairs)}


# ---- scoring -------------------------------------------------------------------------------------------


@torch.no_grad()
def score_records(model: nn.Module, tokenizer, records: list[tuple[int, dict]], batch_size: int = 32,
                  device="cpu", path: str = "", autocast=None) -> list[dict]:
    """Add "reward" to {"prompt", "response"} records (or "reward_chosen"/"reward_rejected" to preference
    records). records: (line, record) pairs. Returns the records with the scores added."""

    ctx = autocast or contextlib.nullcontext
    max_len = model.config.max_seq_len
    seqs: list[list[int]] = []
    where: list[tuple[int, str]] = []  # (record index, output field)
    for k, (line, rec) in enumerate(records):
        prompt = prompt_messages(rec.get("prompt"), path, line)
        fields = [("response", "reward")] if "response" in rec else [("chosen", "reward_chosen"),
                                                                       ("rejected", "reward_rejected")]
        if "response" not in rec and not ("chosen" in rec and "rejected" in rec):
            raise DataError("missing (give response, or chosen and rejected)", path, line, "response")
        for src, dst in fields:
            ids, _, _ = encode_response(tokenizer, prompt, response_messages(rec.get(src), prompt, path, line, src))
            if len(ids) > max_len:
                raise DataError(f"prompt + {src} is {len(ids)} tokens, more than the model's context of {max_len}",
                                path, line, src)
            seqs.append(ids)
            where.append((k, dst))
    out = [dict(rec) for _, rec in records]
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths together: less padding
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, att = pad_right([seqs[i] for i in idx], device=device)
        with ctx():
            sc = model(ids, attention_mask=att, compute_logits=False).scores
        r = last_token_scores(sc.float(), att).tolist()
        for i, v in zip(idx, r):
            k, dst = where[i]
            out[k][dst] = round(float(v), 6)
    return out
