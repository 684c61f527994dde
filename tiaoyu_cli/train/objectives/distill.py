"""Knowledge distillation: a small student learns from a larger teacher.

    tiaoyu distill --teacher ckpt/big --student-preset tiny chat.jsonl -o ckpt/student --mode white
    tiaoyu distill --teacher ckpt/big --student ckpt/small prompts.jsonl -o ckpt/student --mode black
    tiaoyu distill --teacher ckpt/big --student-preset tiny --data tokens/ -o ckpt/student   # during pretraining

Two ways (seed 000, 知识蒸馏):

* **Black box** — the student sees only the teacher's *answers*. The teacher (a checkpoint, through
  the batched generation of `tiaoyu chat`, or an OpenAI-compatible endpoint) answers every prompt, the
  answers become chat records (kept in `--keep-teacher-data FILE`), and the student is fine-tuned on
  them with the SFT stage. Black-box distillation *is* SFT on teacher-written data; stages/distill/teacher_data.py
  is the first half, the SFT stage the second.
* **White box** — the student sees the teacher's *distribution over the next token* at every
  position. `DistillStage` runs the teacher (frozen, `torch.inference_mode`, bf16 autocast on CUDA)
  on the same batch as the student and minimises

      total = α · CE(student, data) + (1 − α) · T² · D(teacher_T ‖ student_T)

  over the response tokens of chat records (the chat dataset's assistant mask) or over every
  token of pretraining windows (`--data tokens/`). `D` is the forward KL (default), the reverse KL
  or the Jensen–Shannon divergence (`kd_loss`). White box needs the same vocabulary on both sides:
  teacher and student must share the tokenizer (same fingerprint).

`--cache-topk K` runs the teacher once over the whole (finite) chat dataset, keeps its K largest
logits and their token ids per response token in a safetensors file, and then trains many epochs
without running the teacher again. The loss is then taken on that support only (`topk_kd_loss`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from tiaoyu_cli.data.chat import collate
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.io import _umask
from tiaoyu_cli.train.engine.stage import BaseStage, StepOutput
from tiaoyu_cli.train.losses.kd import DIVERGENCES, distill_loss
from tiaoyu_cli.train.objectives.sft import lm_forward

# ---- white box: the stage ---------------------------------------------------------------------------

@dataclass
class DistillConfig:
    alpha: float = 0.5  # weight of the CE on the data; 1 − α goes to the teacher term
    temperature: float = 1.0  # softens both distributions in the teacher term
    divergence: str = "forward"  # forward | reverse | jsd
    cache_topk: int = 0  # > 0: run the teacher once, keep its top-k logits per response token

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise TiaoyuError(f"--alpha {self.alpha}: must be between 0 and 1")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise TiaoyuError(f"--temperature {self.temperature}: must be a positive number")
        if self.divergence not in DIVERGENCES:
            raise TiaoyuError(f"--divergence {self.divergence!r}: choose forward, reverse or jsd")
        if self.cache_topk < 0:
            raise TiaoyuError("--cache-topk must not be negative")


def forward_batch(model: nn.Module, batch: Any):
    """(model output, targets) for a batch of the stages distillation rides on: pretraining windows
    (a [B, T+1] tensor; every next token is a target) or collated chat batches (a dict whose labels
    are already shifted, −100 outside the assistant's tokens; packed rows are handled by the SFT forward)."""
    if torch.is_tensor(batch):
        return model(batch[:, :-1]), batch[:, 1:]

    return lm_forward(model, batch), batch["labels"]


class TopKCache:
    """The teacher's k largest logits (float16) and their token ids (int32) at every response token of
    every training row, run once and stored in safetensors:

        values [N, k], indices [N, k]   N = response tokens of all rows, row after row
        offsets [R + 1]                 row r owns entries offsets[r] : offsets[r+1]

    Rows are found again by their token ids (identical rows have identical teacher outputs, so
    duplicates are harmless). The metadata (k, data digest, teacher identity) decides whether a
    cache file on disk still fits the run; otherwise it is rebuilt.
    """

    def __init__(self, values: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor, rows: list):
        self.values, self.indices, self.offsets = values, indices, offsets
        self.k = int(values.shape[-1])
        self.slot = {tuple(r.ids): i for i, r in enumerate(rows)}

    @staticmethod
    def digest(rows: list) -> str:
        h = hashlib.sha256()
        for r in rows:
            h.update(np.asarray(r.ids, dtype=np.int32).tobytes())
            h.update(np.asarray(r.loss_mask, dtype=np.int8).tobytes())
            h.update(b"|")
        return h.hexdigest()[:16]

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: nn.Module, rows: list, k: int, vocab: int, batch_size: int, device, autocast) -> "TopKCache":
        vals, idxs, counts = [], [], []
        for i in range(0, len(rows), batch_size):
            batch = {key: v.to(device) for key, v in collate(rows[i:i + batch_size]).items()}
            with torch.inference_mode(), autocast():
                out, labels = forward_batch(teacher, batch)
                z = out.logits[..., :vocab].float()
            mask = labels != -100
            for b in range(z.shape[0]):
                top = z[b][mask[b]].topk(k, dim=-1)
                vals.append(top.values.to(torch.float16).cpu())
                idxs.append(top.indices.to(torch.int32).cpu())
                counts.append(int(mask[b].sum()))
        offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
        return cls(torch.cat(vals), torch.cat(idxs), offsets, rows)

    def save(self, path: Path, meta: dict) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"values": self.values.contiguous(), "indices": self.indices.contiguous(), "offsets": self.offsets},
                  str(tmp), metadata={k: str(v) for k, v in meta.items()})

        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)  # atomic: a crash leaves no half-written cache

    @classmethod
    def load(cls, path: Path, rows: list, meta: dict) -> "TopKCache | None":
        """The cache at `path` if its metadata matches `meta`, else None."""
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}) != {k: str(v) for k, v in meta.items()}:
                    return None
                t = {name: f.get_tensor(name) for name in ("values", "indices", "offsets")}
        except Exception:  # unreadable or foreign file: rebuild it
            return None
        if t["offsets"].numel() != len(rows) + 1:
            return None
        return cls(t["values"], t["indices"], t["offsets"], rows)

    def lookup(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) [B, T, k] for a collated batch (zeros where the label is −100)."""
        labels = batch["labels"]
        B, T = labels.shape
        mask = (labels != -100).cpu()
        lengths = batch["attention_mask"].sum(-1).tolist()
        ids = batch["input_ids"].cpu().tolist()
        vals = torch.zeros(B, T, self.k, dtype=torch.float16)
        idxs = torch.zeros(B, T, self.k, dtype=torch.int64)
        for b in range(B):
            key = tuple(ids[b][:lengths[b]])
            r = self.slot.get(key)
            if r is None:
                raise TiaoyuError("--cache-topk: a training row is missing from the teacher cache (data changed?); "
                                  "delete the cache file in -o to rebuild it")
            lo, hi = int(self.offsets[r]), int(self.offsets[r + 1])
            if hi - lo != int(mask[b].sum()):
                raise TiaoyuError("--cache-topk: the teacher cache does not match this row's response tokens; "
                                  "delete the cache file in -o to rebuild it")
            vals[b][mask[b]] = self.values[lo:hi]
            idxs[b][mask[b]] = self.indices[lo:hi].long()
        dev = labels.device
        return vals.to(dev, non_blocking=True), idxs.to(dev, non_blocking=True)


class DistillStage(BaseStage):
    """White-box distillation on top of a data stage — `PretrainStage` for token shards, `SFTStage` for chat
    records. The data stage supplies batches, evaluation and the data position (exact resume); this stage
    adds the frozen teacher and replaces the loss by `distill_loss`."""

    name = "distill"

    def __init__(self, data_stage: BaseStage, teacher: nn.Module, cfg: DistillConfig, vocab_size: int,
                 cache_path: Path | None = None, teacher_id: str = ""):
        cfg.validate()
        self.data, self.teacher, self.cfg = data_stage, teacher, cfg
        self.vocab = int(vocab_size)  # the tokens both models know (the shared tokenizer's size)
        self.cache_path, self.teacher_id = cache_path, teacher_id
        self.cache: TopKCache | None = None
        self.teacher_eval: dict[str, float] | None = None
        self.seq_len = getattr(data_stage, "seq_len", None)
        self.steps_per_epoch = data_stage.steps_per_epoch
        self.tokens_per_step = data_stage.tokens_per_step
        self.find_unused_parameters = data_stage.find_unused_parameters
        if cfg.cache_topk and not hasattr(data_stage, "rows"):
            raise TiaoyuError("--cache-topk needs a finite chat dataset (token shards draw new windows every step)")

    def setup(self, trainer) -> None:
        super().setup(trainer)
        self.data.setup(trainer)
        device = trainer.device
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        # on CUDA the frozen teacher is kept in bf16 (half the memory); elsewhere its fp32 weights run under
        # the trainer's autocast
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
        self.teacher.to(device=device, dtype=dtype)
        tv, sv = self.teacher.config.vocab_size, trainer.raw_model.config.vocab_size
        if self.vocab > min(tv, sv):
            raise TiaoyuError(f"the tokenizer has {self.vocab} tokens but the teacher has {tv} and the student {sv} "
                              f"output logits")
        if self.cfg.cache_topk:
            self._prepare_cache(trainer)

    def _prepare_cache(self, trainer) -> None:
        rows = self.data.rows
        k = min(self.cfg.cache_topk, self.vocab)
        meta = {"k": k, "data": TopKCache.digest(rows), "teacher": self.teacher_id, "vocab": self.vocab}
        cache = TopKCache.load(self.cache_path, rows, meta) if self.cache_path else None
        if cache is None:
            trainer.log(f"teacher: caching its top-{k} logits for {len(rows):,} rows …")
            cache = TopKCache.build(self.teacher, rows, k, self.vocab, 32, trainer.device, trainer.autocast)
            if self.cache_path and trainer.dist.is_main:
                cache.save(self.cache_path, meta)
                mb = self.cache_path.stat().st_size / 1e6
                trainer.log(f"teacher: {cache.values.shape[0]:,} response tokens × top-{k} → {self.cache_path} "
                            f"({mb:.1f} MB)")
        else:
            trainer.log(f"teacher: reusing the top-{k} cache {self.cache_path}")
        self.cache = cache

    def next_batch(self):
        return self.data.next_batch()

    def teacher_logits(self, batch) -> torch.Tensor:
        """The teacher's logits over the shared vocabulary, as an ordinary tensor (no autograd history)."""
        with torch.inference_mode():
            z = forward_batch(self.teacher, batch)[0].logits[..., :self.vocab]
        return z.clone()  # an inference tensor cannot enter autograd; its clone (made outside the mode) can

    def step(self, model: nn.Module, batch) -> StepOutput:
        out, targets = forward_batch(model, batch)
        student = out.logits[..., :self.vocab]
        teacher, topk = None, None
        if self.cfg.alpha < 1.0:
            if self.cache is not None:
                topk = self.cache.lookup(batch)
            else:
                teacher = self.teacher_logits(batch)
        total, ce, kd = distill_loss(student, teacher, targets, self.cfg.alpha, self.cfg.temperature,
                                     self.cfg.divergence, teacher_topk=topk)
        metrics: dict = {"ce": ce.detach(), "kd": kd.detach()}
        if out.aux_loss is not None:
            metrics["aux_loss"] = out.aux_loss.detach()
            total = total + out.aux_loss
        ids = batch if torch.is_tensor(batch) else batch["input_ids"]
        return StepOutput(total, metrics, tokens=ids.numel())

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if self.teacher_eval is None:  # the teacher's own held-out figures, once: the target to approach
            self.teacher_eval = {f"teacher_{k}": v for k, v in self.data.evaluate(self.teacher).items()
                                 if k in ("val_loss", "answer_acc")}
        res = dict(self.data.evaluate(model))
        res.update(self.teacher_eval)
        return res

    def state_dict(self) -> dict:
        return self.data.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.data.load_state_dict(state)

    def info(self) -> dict:
        return {**dataclasses.asdict(self.cfg), "teacher": self.teacher_id, "data": self.data.info()}
