"""Knowledge distillation: a small student learns from a larger teacher.

    tiaoyu distill --teacher ckpt/big --student-preset tiny chat.jsonl -o ckpt/student --mode white
    tiaoyu distill --teacher ckpt/big --student ckpt/small prompts.jsonl -o ckpt/student --mode black
    tiaoyu distill --teacher ckpt/big --student-preset tiny --data tokens/ -o ckpt/student   # during pretraining

Two ways (seed 000, 知识蒸馏):

* **Black box** — the student sees only the teacher's *answers*. The teacher answers every prompt
  (batched KV-cache generation, the code path of `tiaoyu chat` reading JSONL), the answers become
  chat records (kept with `--keep-teacher-data FILE`), and the student is fine-tuned on them with
  the SFT stage. Black-box distillation *is* SFT on teacher-written data; `teacher_answers` below
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

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.train.trainer import BaseStage, StepOutput, TrainConfig

DIVERGENCES = ("forward", "reverse", "jsd")


# ---- pure losses ------------------------------------------------------------------------------------

def divergence(log_p: torch.Tensor, log_q: torch.Tensor, kind: str = "forward") -> torch.Tensor:
    """Per-position divergence between two distributions given as log-probabilities over the last axis.

        forward  KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)        mean-seeking: q must cover all of p
        reverse  KL(q ‖ p) = Σ_v q_v (log q_v − log p_v)        mode-seeking: q may drop p's small modes
        jsd      ½ KL(p ‖ m) + ½ KL(q ‖ m),  m = ½ (p + q)      symmetric, bounded by log 2

    p is the teacher, q the student. Returns a tensor of the leading shape (last axis summed out).
    Terms with probability 0 contribute 0 (0 · log 0 = 0).
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"divergence {kind!r}: choose forward, reverse or jsd")
    p, q = log_p.exp(), log_q.exp()
    if kind == "forward":
        return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
    if kind == "reverse":
        return torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(-1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    kl_pm = torch.where(p > 0, p * (log_p - log_m), torch.zeros_like(p)).sum(-1)
    kl_qm = torch.where(q > 0, q * (log_q - log_m), torch.zeros_like(q)).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Σ_t mask_t · values_t / Σ_t mask_t (0 when nothing is masked in)."""
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp(min=1.0)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
            temperature: float = 1.0, divergence_kind: str = "forward") -> torch.Tensor:
    """Distillation term over the positions where mask = 1:

        p_t = softmax(z_teacher,t / T),  q_t = softmax(z_student,t / T)
        L_KD = T² · Σ_t mask_t · D(p_t ‖ q_t) / Σ_t mask_t

    Logits are [..., V] (e.g. [B, T, V]), mask [...] (1 = a response token, 0 = prompt/padding).
    The T² factor (Hinton et al., 2015) keeps the gradient scale of the soft term independent of
    T: softening by T shrinks the gradients by about 1/T², so multiplying by T² lets α mean the same
    thing at every temperature. D is `divergence(…, divergence_kind)`. Computed in fp32.
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    t = float(temperature)
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    return (t * t) * _masked_mean(divergence(log_p, log_q, divergence_kind), mask)


def topk_kd_loss(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                 mask: torch.Tensor | None = None, temperature: float = 1.0,
                 divergence_kind: str = "forward") -> torch.Tensor:
    """`kd_loss` on the teacher's top-k support S_t (cached logits: values and token ids [..., k]).

        p̃_t = softmax(z_teacher,t[S_t] / T)        the teacher renormalised on its k best tokens
        q̃_t = softmax(z_student,t[S_t] / T)        the student renormalised on the same k tokens
        L = T² · Σ_t mask_t · D(p̃_t ‖ q̃_t) / Σ_t mask_t

    Both sides are renormalised on S_t, so the same formula works for all three divergences (a
    reverse KL against a teacher that is zero outside S_t would be infinite). With k = V it is
    exactly `kd_loss`. What it does not see is how much mass the student puts *outside* S_t; the
    CE term (α > 0) on the data token — almost always inside the teacher's top k — keeps that small.
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    t = float(temperature)
    s = student_logits.float().gather(-1, teacher_indices.long())
    log_p = F.log_softmax(teacher_values.float() / t, dim=-1)
    log_q = F.log_softmax(s / t, dim=-1)
    return (t * t) * _masked_mean(divergence(log_p, log_q, divergence_kind), mask)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor,
                 alpha: float = 0.5, temperature: float = 2.0, divergence_kind: str = "forward",
                 ignore_index: int = -100, teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """total = α · CE(z_student, y) + (1 − α) · L_KD, over positions whose target y ≠ ignore_index.

    CE is the ordinary next-token cross-entropy on the data (hard labels, temperature 1); L_KD is
    `kd_loss` (full teacher logits) or `topk_kd_loss` (teacher_topk = (values, indices)). Returns
    (total, ce, kd). α = 1 is plain SFT/pretraining; α = 0 learns from the teacher alone.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("alpha must be in [0, 1]")
    mask = targets != ignore_index
    V = student_logits.shape[-1]
    ce = F.cross_entropy(student_logits.float().reshape(-1, V), targets.reshape(-1), ignore_index=ignore_index)
    if not bool(mask.any()):
        ce = student_logits.float().sum() * 0.0  # no response token in the batch: a zero with a gradient path
    if alpha == 1.0:
        return ce, ce, torch.zeros_like(ce)
    if teacher_topk is not None:
        kd = topk_kd_loss(student_logits, teacher_topk[0], teacher_topk[1], mask, temperature, divergence_kind)
    else:
        kd = kd_loss(student_logits, teacher_logits, mask, temperature, divergence_kind)
    return alpha * ce + (1.0 - alpha) * kd, ce, kd


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


def check_same_tokenizer(teacher_tok, student_tok) -> None:
    """White box compares distributions token by token: both sides must use the same vocabulary."""
    if teacher_tok.fingerprint != student_tok.fingerprint:
        raise TiaoyuError(
            f"the teacher and the student use different tokenizers (fingerprints {teacher_tok.fingerprint} vs "
            f"{student_tok.fingerprint}): white-box distillation compares their next-token distributions, which "
            f"needs one shared vocabulary. Use --mode black (the student learns from the teacher's text), or build "
            f"the student with --student-preset (it takes the teacher's tokenizer)")


def forward_batch(model: nn.Module, batch: Any):
    """(model output, targets) for a batch of the stages distillation rides on: pretraining windows
    (a [B, T+1] tensor; every next token is a target) or collated chat batches (a dict whose labels
    are already shifted, −100 outside the assistant's tokens; packed rows are handled by the SFT forward)."""
    if torch.is_tensor(batch):
        return model(batch[:, :-1]), batch[:, 1:]
    from tiaoyu_cli.train.sft import lm_forward

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
        import hashlib

        h = hashlib.sha256()
        for r in rows:
            h.update(np.asarray(r.ids, dtype=np.int32).tobytes())
            h.update(np.asarray(r.loss_mask, dtype=np.int8).tobytes())
            h.update(b"|")
        return h.hexdigest()[:16]

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: nn.Module, rows: list, k: int, vocab: int, batch_size: int, device, autocast) -> "TopKCache":
        from tiaoyu_cli.data.chat import collate

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
        import os

        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"values": self.values.contiguous(), "indices": self.indices.contiguous(), "offsets": self.offsets},
                  str(tmp), metadata={k: str(v) for k, v in meta.items()})
        from tiaoyu_cli.io import _umask

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
        import dataclasses

        return {**dataclasses.asdict(self.cfg), "teacher": self.teacher_id, "data": self.data.info()}


# ---- black box: the teacher answers -----------------------------------------------------------------

@dataclass
class TeacherAnswerStats:
    prompts: int = 0
    answered: int = 0
    empty: int = 0  # the teacher gave no answer (nothing, or a <think> it never closed)
    bad: int = 0  # records without a usable prompt (--skip-bad)

    def summary(self) -> str:
        s = f"{self.answered:,} of {self.prompts:,} prompts answered"
        if self.empty:
            s += f", {self.empty:,} empty answers skipped"
        if self.bad:
            s += f", {self.bad:,} bad records skipped"
        return s


def teacher_answers(cm, path: Path, max_new_tokens: int = 256, temperature: float = 0.0, batch_size: int = 32,
                    seed: int = 0, skip_bad: bool = False, stats: TeacherAnswerStats | None = None) -> list[dict]:
    """Black box, first half: the teacher (a `ChatModel`) answers every prompt of a JSONL file —
    `{"prompt": str | messages}`, `{"messages": [...]}` (a trailing assistant turn is answered anew) —
    through the batched KV-cache generation of `tiaoyu chat`. Returns chat records
    `{"messages": prompt + [{"role": "assistant", "content": answer, ["reasoning": …]}]}`, the SFT data
    of the second half. A reasoning teacher's <think> part is kept as the "reasoning" field."""
    from tiaoyu_cli.data.jsonl import iter_jsonl
    from tiaoyu_cli.errors import DataError
    from tiaoyu_cli.infer.sampling import SamplingParams
    from tiaoyu_cli.infer.session import GenerationOptions, answer_records, record_messages

    st = stats if stats is not None else TeacherAnswerStats()
    name = str(path)
    jstats: dict = {}
    good, convs = [], []
    for line, rec in iter_jsonl(path, skip_bad=skip_bad, stats=jstats):
        try:
            conv = record_messages(rec, name, line, cm.tokenizer)
        except DataError:
            if not skip_bad:
                raise
            st.bad += 1
            continue
        conv = [{"role": "user", "content": conv}] if isinstance(conv, str) else conv
        good.append((line, {"messages": conv}))  # only the prompt: the answer fields come from the teacher
        convs.append(conv)
    st.bad += int(jstats.get("bad", 0))
    st.prompts = len(good) + st.bad
    if not good:
        raise TiaoyuError(f"{name}: no prompts for the teacher to answer")
    options = GenerationOptions(max_new_tokens=max_new_tokens, sampling=SamplingParams(temperature=temperature),
                                seed=seed)
    out = []
    for conv, ans in zip(convs, answer_records(cm, good, options, batch_size=batch_size, name=name)):
        reasoning = ans.get("reasoning")
        content = ans["answer"] if reasoning is not None else ans["response"]
        if not content.strip():
            st.empty += 1
            continue
        msg = {"role": "assistant", "content": content.strip()}
        if reasoning is not None:
            msg["reasoning"] = reasoning.strip()
        out.append({"messages": conv + [msg]})
        st.answered += 1
    if not out:
        raise TiaoyuError(f"{name}: the teacher gave no usable answer to any prompt (is it a chat model? "
                          f"try a larger --max-new-tokens)")
    return out


# ---- a whole run: what `tiaoyu distill` calls -------------------------------------------------------

@dataclass
class DistillOptions:
    teacher: Path
    data: Path  # chat/prompt JSONL, or a token folder (white box during pretraining)
    student: Path | None = None
    student_preset: str | None = None
    model_overrides: list[str] = field(default_factory=list)
    mode: str = "white"  # white | black
    alpha: float = 0.5
    temperature: float = 1.0
    divergence: str = "forward"
    cache_topk: int = 0
    keep_teacher_data: Path | None = None
    val: Path | None = None
    eval_samples: int = 200
    seq_len: int = 0
    max_new_tokens: int = 256
    gen_batch_size: int = 32
    gen_temperature: float = 0.0
    skip_bad: bool = False

    def kd_config(self) -> DistillConfig:
        return DistillConfig(alpha=self.alpha, temperature=self.temperature, divergence=self.divergence,
                             cache_topk=self.cache_topk)


def is_token_folder(path: Path) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "train").is_dir() or (p / "meta.json").exists())


def build_student(opts: DistillOptions, teacher_tok, teacher_cfg, train: TrainConfig):
    """(student model, its tokenizer, parent path or None). A preset student takes the teacher's tokenizer
    and context length; `--resume` rebuilds the architecture the run started with."""
    from tiaoyu_cli.cli.common import parse_overrides
    from tiaoyu_cli.model import Transformer, preset
    from tiaoyu_cli.checkpoint import load_config, load_model, load_tokenizer, resolve_checkpoint

    if (opts.student is None) == (opts.student_preset is None):
        raise TiaoyuError("give the student once: --student CKPT (an existing model) or --student-preset NAME "
                          "(a fresh one with the teacher's tokenizer)")
    overrides = parse_overrides(opts.model_overrides)
    if overrides and opts.student is not None:
        raise TiaoyuError("--model overrides shape a --student-preset student; an existing --student keeps its "
                          "architecture")
    if train.resume:
        ckpt = resolve_checkpoint(train.out)
        return Transformer(load_config(ckpt)), load_tokenizer(ckpt), str(opts.student) if opts.student else None
    if opts.student is not None:
        net, folder = load_model(opts.student)
        return net, load_tokenizer(folder), str(folder)
    cfg = preset(opts.student_preset, **{"vocab_size": teacher_tok.vocab_size, "bos_token_id": teacher_tok.bos_id,
                                         "eos_token_id": teacher_tok.eos_id, "pad_token_id": teacher_tok.pad_id,
                                         "max_seq_len": teacher_cfg.max_seq_len, **overrides})
    return Transformer(cfg), teacher_tok, None


def teacher_identity(folder: Path) -> str:
    """Path, size and mtime of the teacher's weights: enough to tell a cache made from other weights."""
    w = Path(folder) / "model.safetensors"
    st = w.stat()
    return f"{w.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def run_distill(opts: DistillOptions, train: TrainConfig, log=print) -> dict:
    """Load teacher and student, check them, and train: white box (DistillStage over chat records or token
    shards) or black box (the teacher answers, then the SFT stage trains the student on the answers)."""
    from tiaoyu_cli.train import distributed as D
    from tiaoyu_cli.checkpoint import load_model, load_tokenizer
    from tiaoyu_cli.train.trainer import Trainer, TrainingInterrupted, check_output

    if opts.mode not in ("white", "black"):
        raise TiaoyuError(f"--mode {opts.mode!r}: choose white or black")
    if opts.mode == "white":
        opts.kd_config().validate()
    elif opts.cache_topk:
        raise TiaoyuError("--cache-topk caches teacher logits: it belongs to --mode white")
    if opts.max_new_tokens < 1 or opts.gen_batch_size < 1 or opts.seq_len < 0 or opts.eval_samples < 0:
        raise TiaoyuError("--max-new-tokens and --gen-batch-size must be positive, --seq-len and --eval-samples "
                          "not negative")
    if not (train.max_steps or train.max_tokens or train.max_time or train.epochs):
        train.epochs = 1.0
        log("no budget given (--max-steps/--max-tokens/--max-time/--epochs): training 1 epoch")
    train.validate()
    check_output(train.out, train.resume)
    data = Path(opts.data)
    if not data.exists():
        raise TiaoyuError(f"{data}: no such file or folder")
    tokens = is_token_folder(data)
    if data.is_dir() and not tokens:
        raise TiaoyuError(f"{data}: a folder, but not a token folder from `tiaoyu tokenize encode`")
    if tokens and opts.mode == "black":
        raise TiaoyuError(f"{data} is a token folder: black-box distillation needs prompts for the teacher to "
                          f"answer (a chat or prompt JSONL); token shards work with --mode white")
    if tokens and opts.cache_topk:
        raise TiaoyuError("--cache-topk needs a finite chat dataset; with token shards every step draws new "
                          "windows, so the teacher runs every step")
    teacher, tdir = load_model(opts.teacher)
    ttok = load_tokenizer(tdir)
    torch.manual_seed(train.seed)  # before the student is built: its init weights depend on it
    student, stok, parent = build_student(opts, ttok, teacher.config, train)
    if opts.mode == "white":
        check_same_tokenizer(ttok, stok)
    seq_len = opts.seq_len or student.config.max_seq_len
    if seq_len > student.config.max_seq_len:
        raise TiaoyuError(f"--seq-len {seq_len} exceeds the student's max_seq_len {student.config.max_seq_len}")
    if opts.mode == "white" and seq_len > teacher.config.max_seq_len:
        raise TiaoyuError(f"--seq-len {seq_len} exceeds the teacher's max_seq_len {teacher.config.max_seq_len}")
    log(f"distill ({opts.mode} box): teacher {tdir} ({teacher.num_parameters() / 1e6:.2f}M) → student "
        f"{student.num_parameters() / 1e6:.2f}M parameters" + (f" from {parent}" if parent else " (new)"))
    if tokens:
        stage = token_stage(data, teacher, stok, opts, train, seq_len)
    elif opts.mode == "white":
        stage = chat_stage(data, stok, opts, train, seq_len, log, name="distill-inner")
        stage = DistillStage(stage, teacher, opts.kd_config(), vocab_size=stok.vocab_size,
                             cache_path=Path(train.out) / "teacher-topk.safetensors", teacher_id=teacher_identity(tdir))
    else:
        records = black_box_data(teacher, ttok, tdir, data, opts, train, log)
        del teacher
        stage = chat_stage(records, stok, opts, train, seq_len, log, name="distill")
    trainer = None
    try:
        trainer = Trainer(student, stage, train, tokenizer=stok, parent=parent or str(tdir), log=log)
        before = {}
        if trainer.dist.is_main and not train.resume and (opts.val is not None or tokens):
            before = {k: v for k, v in trainer.evaluate_start().items() if not k.startswith("teacher_")}
            trainer.before = before  # the teacher's own figures are not the student's starting point
            if before:
                log("before: " + "  ".join(f"{k} {v:.4g}" for k, v in before.items()))
        res = trainer.fit()
        return {**res, "before": before}
    except KeyboardInterrupt:
        raise TrainingInterrupted("interrupted before training started; nothing was saved") from None
    finally:
        if trainer is not None:
            D.cleanup(trainer.dist)


def token_stage(data: Path, teacher: nn.Module, tok, opts: DistillOptions, train: TrainConfig, seq_len: int):
    """White box during pretraining: PretrainStage windows, every token a distillation target."""
    from tiaoyu_cli.data.shards import check_fingerprint, open_tokens
    from tiaoyu_cli.train.lm import PretrainConfig, PretrainStage

    train_sh, val_sh = open_tokens(data)
    check_fingerprint(train_sh, tok)
    if train_sh.num_tokens < seq_len + 2:
        raise TiaoyuError(f"{data} holds {train_sh.num_tokens} training tokens, fewer than one window of "
                          f"--seq-len {seq_len} + 1")
    inner = PretrainStage(train_sh, val_sh, PretrainConfig(seq_len=seq_len), batch_size=train.batch_size,
                          seed=train.seed)
    return DistillStage(inner, teacher, opts.kd_config(), vocab_size=tok.vocab_size)


def chat_stage(source, tok, opts: DistillOptions, train: TrainConfig, seq_len: int, log, name: str):
    """The SFT stage over chat records (a JSONL path or a list of records), with --val for evaluation."""
    from tiaoyu_cli.data.chat import ChatDataset
    from tiaoyu_cli.train.sft import SFTConfig, SFTStage

    ds = ChatDataset(source, tok, seq_len, skip_bad=opts.skip_bad,
                     name=None if isinstance(source, (str, Path)) else "teacher answers")
    log(f"data: {ds.stats.summary()}")
    eval_ds, eval_records = None, []
    if opts.val is not None:
        eval_ds = ChatDataset(opts.val, tok, seq_len, skip_bad=opts.skip_bad)
        eval_records = [{"messages": m} for m in eval_ds.messages if m[-1]["role"] == "assistant"]
    cfg = SFTConfig(max_len=seq_len, eval_samples=opts.eval_samples if eval_records else 0)
    return SFTStage(ds.examples, cfg, train.batch_size, seed=train.seed, eval_data=eval_ds, eval_records=eval_records,
                    name=name, info={"data": str(opts.data), "val": str(opts.val) if opts.val else None,
                                     "data_stats": vars(ds.stats)})


def black_box_data(teacher: nn.Module, ttok, tdir: Path, data: Path, opts: DistillOptions, train: TrainConfig,
                   log) -> list[dict]:
    """The teacher's answers as chat records, written to --keep-teacher-data (default -o/teacher.jsonl).
    A resumed run reads them back instead of asking the teacher again (exact resume needs the same data)."""
    from tiaoyu_cli.data.jsonl import read_jsonl, write_jsonl
    from tiaoyu_cli.infer.session import ChatModel
    from tiaoyu_cli.checkpoint import load_trainer_info
    from tiaoyu_cli.device import resolve_device

    keep = Path(opts.keep_teacher_data) if opts.keep_teacher_data else Path(train.out) / "teacher.jsonl"
    if train.resume and keep.exists():
        log(f"teacher: reusing its answers in {keep}")
        return read_jsonl(keep)
    stage = load_trainer_info(tdir).get("stage")
    if stage == "pretrain":
        log(f"warning: the teacher {tdir} is a pretrained base model (stage pretrain); it never learned to answer "
            f"in the chat template")
    device = resolve_device(train.device)
    teacher.to(device).eval()
    cm = ChatModel(teacher, ttok, tdir, stage if isinstance(stage, str) else None, "chat")
    st = TeacherAnswerStats()
    import time

    t0 = time.perf_counter()
    records = teacher_answers(cm, data, opts.max_new_tokens, opts.gen_temperature, opts.gen_batch_size,
                              seed=train.seed, skip_bad=opts.skip_bad, stats=st)
    write_jsonl(keep, records)
    log(f"teacher: {st.summary()} in {time.perf_counter() - t0:.0f}s → {keep}")
    return records
