"""DPO: raise the log-ratio of chosen over rejected against a frozen reference.

    tiaoyu rlhf dpo ckpt/sft prefs.jsonl -o ckpt/dpo --beta 0.1 --epochs 1
    tiaoyu rlhf dpo ckpt/sft prefs.jsonl -o ckpt/dpo-lora --method lora --rank 8

Direct Preference Optimisation (Rafailov et al. 2023) needs no reward model and no sampling:
with h = (log π(y_c|x) − log ref(y_c|x)) − (log π(y_r|x) − log ref(y_r|x)),

    L = −log σ(β h)            (cDPO label smoothing ε: −(1−ε) log σ(βh) − ε log σ(−βh))

where log π(y|x) sums the log-probs of the response tokens only. The reference is the start
checkpoint (or --ref), frozen. Its log-probs never change, so when the run sees the dataset at
least once they are computed once, up front, and the reference model is freed (less memory,
one forward pass per pair instead of two); with LoRA the reference is the same network with the
adapters switched off, so no second copy is needed at all.

Logged: the implicit rewards β(log π − log ref) of chosen and rejected, their margin, the
accuracy (margin > 0; on held-out pairs a tie counts half, so the start scores 0.5), and the mean
summed log-probs of chosen and rejected. Evaluation on held-out pairs adds the policy's own
preference: pref_accuracy = share of pairs with log π(chosen) > log π(rejected), and
logp_margin = mean(log π(chosen) − log π(rejected)).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from tiaoyu_cli.data.preference import PairExample, collate_pairs
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.train.engine.stage import StepOutput
from tiaoyu_cli.train.losses.rl import dpo_loss, sequence_logps
from tiaoyu_cli.train.rl.pairs import PairStage


@dataclass
class DPOConfig:
    beta: float = 0.1  # strength of the pull towards the reference (higher: stay closer)
    label_smoothing: float = 0.0  # cDPO: assumed probability that a pair's label is flipped
    max_len: int = 0  # longest prompt + response in tokens (0 = the model's context)
    val_frac: float = 0.05  # share of the pairs held out when no --val file is given
    precompute_ref: str = "auto"  # auto | yes | no: reference log-probs once up front, or every step
    eval_batch_size: int = 32

    def validate(self) -> None:
        if self.beta <= 0:
            raise TiaoyuError("--beta must be positive")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise TiaoyuError("--label-smoothing must be in [0, 0.5)")
        if self.precompute_ref not in ("auto", "yes", "no"):
            raise TiaoyuError("--precompute-ref: choose auto, yes or no")


def pair_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(chosen|prompt) [B], log π(rejected|prompt) [B]), response tokens summed."""
    ids = batch["input_ids"]
    out = model(ids[:, :-1], attention_mask=batch["attention_mask"][:, :-1])
    lp = sequence_logps(out.logits, ids[:, 1:], batch["labels_mask"])
    B = lp.shape[0] // 2
    return lp[:B], lp[B:]


class DPOStage(PairStage):
    name = "dpo"

    def __init__(self, train: list[PairExample], val: list[PairExample], cfg: DPOConfig, batch_size: int,
                 ref_model: nn.Module | None = None, ref_context: Callable[[], contextlib.AbstractContextManager] | None = None,
                 seed: int = 0, saver=None):
        """ref_model: the frozen reference; or ref_context: a context manager under which the policy
        itself computes the reference (LoRA adapters disabled). saver: how checkpoints are written (LoRA:
        `rl.lora.LoraCheckpoint`; default the full model)."""
        cfg.validate()
        if (ref_model is None) == (ref_context is None):
            raise TiaoyuError("DPO needs exactly one reference: a frozen model or the adapter-free policy")
        super().__init__(train, val, cfg, batch_size, seed)
        self.ref_model, self.ref_context = ref_model, ref_context
        if saver is not None:
            self.saver = saver
        self.ref_train: torch.Tensor | None = None  # [N, 2] precomputed (chosen, rejected) reference log-probs
        self.ref_val: torch.Tensor | None = None

    # ---- reference -----------------------------------------------------------------------------------
    def _ref_logps(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            if self.ref_model is not None:
                return pair_logps(self.ref_model, batch)
            model = self.trainer.raw_model
            was = model.training
            model.eval()
            try:
                with self.ref_context():
                    return pair_logps(model, batch)
            finally:
                model.train(was)

    def _precompute(self, pairs: list[PairExample]) -> torch.Tensor:
        out = []
        with self.trainer.autocast():
            for i in range(0, len(pairs), self.cfg.eval_batch_size):
                c, r = self._ref_logps(collate_pairs(pairs[i:i + self.cfg.eval_batch_size], device=self.device))
                out.append(torch.stack([c, r], dim=1).float())
        return torch.cat(out)

    def setup(self, trainer) -> None:
        super().setup(trainer)
        if self.ref_model is not None:
            self.ref_model.to(self.device)
        mode = self.cfg.precompute_ref
        if mode == "auto":  # worth it when the run visits every pair at least once on average
            seen = trainer.total_steps() * self.batch_size * trainer.cfg.grad_accum * trainer.dist.world_size
            mode = "yes" if seen >= len(self.train) else "no"
        self.precomputed = mode == "yes"
        if trainer.dist.is_main:
            trainer.log("reference log-probs " + ("precomputed once" if self.precomputed else "computed every step"))
        if self.val:
            self.ref_val = self._precompute(self.val)
        if self.precomputed:
            self.ref_train = self._precompute(self.train)
            if self.ref_model is not None:
                self.ref_model = None  # not needed any more: free its memory
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    # ---- training ------------------------------------------------------------------------------------
    def next_batch(self):
        idx = self.sampler.next_indices()
        batch = collate_pairs([self.train[i] for i in idx], device=self.device)
        batch["index"] = torch.tensor(idx, device=self.device)
        return batch

    def step(self, model: nn.Module, batch) -> StepOutput:
        pc, pr = pair_logps(model, batch)
        if self.precomputed:
            ref = self.ref_train[batch["index"]]
            rc, rr = ref[:, 0], ref[:, 1]
        else:
            rc, rr = self._ref_logps(batch)
        loss, ch, rj = dpo_loss(pc, pr, rc, rr, self.cfg.beta, self.cfg.label_smoothing)
        m = ch - rj
        metrics = {"reward_chosen": ch.mean(), "reward_rejected": rj.mean(), "reward_margin": m.mean(),
                   "reward_accuracy": (m > 0).float().mean(), "logps_chosen": pc.detach().mean(),
                   "logps_rejected": pr.detach().mean()}
        return StepOutput(loss, metrics, tokens=int(batch["attention_mask"].sum()))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.val:
            return {}
        return evaluate_dpo(model, self.val, self.ref_val, self.cfg, self.device)



@torch.no_grad()
def evaluate_dpo(model: nn.Module, pairs: list[PairExample], ref: torch.Tensor | None, cfg: DPOConfig,
                 device) -> dict[str, float]:
    """Held-out metrics: pref_accuracy / logp_margin (the policy alone) and, given the reference
    log-probs [N, 2], the DPO loss, reward margin and reward accuracy."""
    was = model.training
    model.eval()
    pcs, prs = [], []
    for i in range(0, len(pairs), cfg.eval_batch_size):
        c, r = pair_logps(model, collate_pairs(pairs[i:i + cfg.eval_batch_size], device=device))
        pcs.append(c.float())
        prs.append(r.float())
    model.train(was)
    pc, pr = torch.cat(pcs), torch.cat(prs)
    res = {"val_pref_accuracy": float((pc > pr).float().mean()), "val_logp_margin": float((pc - pr).mean()),
           "val_logps_chosen": float(pc.mean()), "val_logps_rejected": float(pr.mean())}
    if ref is not None:
        ref = ref.to(pc.device)
        loss, ch, rj = dpo_loss(pc, pr, ref[:, 0], ref[:, 1], cfg.beta, cfg.label_smoothing)
        m = ch - rj
        res.update({"val_loss": float(loss), "val_reward_margin": float(m.mean()),
                    "val_reward_accuracy": float((m > 0).float().mean() + 0.5 * (m == 0).float().mean()),
                    "val_n": len(m)})
    return res
