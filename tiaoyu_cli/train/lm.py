"""Pretraining: next-token prediction on token shards.

    tiaoyu pretrain tokens/ -o ckpt/base --preset tiny --max-steps 2000

Loss = mean cross-entropy of predicting token t+1 from tokens ≤ t (plus the MoE load-balancing
loss when the model has experts). Windows of seq_len+1 tokens are drawn from the memory-mapped
shards — uniformly at random (default) or sequentially — by a generator that is part of the
checkpoint, so a resumed run sees exactly the batches the uninterrupted run would have seen.
Under DDP every rank draws the same global batch indices and takes its own slice of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.train.trainer import BaseStage, StepOutput


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """L = −(1/N) Σ_t log softmax(logits_t)[y_t] over the N positions whose target ≠ ignore_index."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)


class _LinearCrossEntropy(torch.autograd.Function):
    """The LM head and the cross-entropy in one step, a chunk of rows at a time.

    For rows h_i (hidden states) and head W: z_i = W h_i, L = (1/n) Σ_i [logsumexp(z_i) − z_i[y_i]].
    Its gradient is known in closed form, dL/dz_i = (softmax(z_i) − onehot(y_i)) / n, so each chunk's
    logits become that gradient in place and are folded into dL/dh_i = W^T dz_i and dL/dW += dz_i h_i^T
    right away. The full N×V logits (and the log-softmax, and the zero-filled gradient of the
    usual path) never exist: on a CPU the chunk stays in cache, on a GPU memory stays small.
    The matmuls run in `dtype` (bf16 under autocast), the softmax in fp32.
    """

    @staticmethod
    def forward(ctx, h, w, targets, ignore_index: int, chunk: int, dtype, need_grad: bool):
        valid = targets != ignore_index
        n = valid.sum().clamp(min=1).to(torch.float32)
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(dtype), w.to(dtype)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_grad else None
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=h.device) if need_grad else None
            for s in range(0, h.shape[0], chunk):
                e = min(h.shape[0], s + chunk)
                z = torch.mm(hc[s:e], wc.t()).float()  # [c, V] logits of this chunk
                lse = torch.logsumexp(z, dim=-1)
                ok = valid[s:e]
                y = targets[s:e].clamp(min=0)[:, None]
                total += ((lse - z.gather(1, y).squeeze(1)) * ok).sum()
                if need_grad:
                    dz = z.sub_(lse[:, None]).exp_()  # softmax, in place
                    dz.scatter_add_(1, y, -ok.to(dz.dtype)[:, None])  # − onehot(y) on counted rows
                    if not bool(ok.all()):
                        dz.mul_(ok[:, None])
                    dz = dz.to(dtype)
                    grad_h[s:e] = torch.mm(dz, wc)
                    grad_w.add_(torch.mm(dz.t(), hc[s:e]))
        ctx.save_for_backward(grad_h, grad_w, n)
        ctx.w_dtype = w.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, n = ctx.saved_tensors
        scale = grad_out / n
        return grad_h * scale.to(grad_h.dtype), (grad_w * scale).to(ctx.w_dtype), None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, chunk: int | None = None) -> torch.Tensor:
    """L = −(1/N) Σ_t log softmax(W h_t)[y_t] over the N positions whose target ≠ ignore_index —
    `lm_loss(F.linear(hidden, weight), targets)` computed without materialising the logits.

    hidden: [..., d], weight: [V, d] (the LM head), targets: [...]. Under autocast the matmuls run
    in the autocast dtype, the softmax and the loss in fp32.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    if chunk is None:  # CPU: a few MB of logits per chunk stay in cache; GPU: big chunks, few kernels
        vocab = weight.shape[0]
        chunk = 256 if dev == "cpu" else max(1024, (1 << 25) // vocab)
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(h, weight, y, ignore_index, chunk, dtype, need_grad)


@dataclass
class PretrainConfig:
    seq_len: int = 256
    sampling: str = "random"  # random | sequential
    eval_batches: int = 16


class WindowSampler:
    """Draws global batches of windows [start, start+seq_len+1) from a token stream of length n."""

    def __init__(self, n_tokens: int, seq_len: int, global_batch: int, mode: str, seed: int):
        if n_tokens < seq_len + 2:
            raise TiaoyuError(f"the token shards hold {n_tokens} tokens, fewer than one window of "
                              f"--seq-len {seq_len} + 1; use a smaller --seq-len or more data")
        self.n, self.seq_len, self.global_batch, self.mode = n_tokens, seq_len, global_batch, mode
        self.gen = torch.Generator().manual_seed(seed)
        self.cursor = 0  # windows drawn so far (sequential mode)

    def next_starts(self) -> list[int]:
        hi = self.n - self.seq_len - 1
        if self.mode == "random":
            return torch.randint(0, hi + 1, (self.global_batch,), generator=self.gen).tolist()
        n_windows = max(1, hi // self.seq_len)
        starts = [((self.cursor + i) % n_windows) * self.seq_len for i in range(self.global_batch)]
        self.cursor += self.global_batch
        return starts


class PretrainStage(BaseStage):
    name = "pretrain"

    def __init__(self, train, val, cfg: PretrainConfig, batch_size: int, seed: int = 0):
        if cfg.sampling not in ("random", "sequential"):
            raise TiaoyuError(f"--sampling {cfg.sampling!r}: choose random or sequential")
        self.train_shards, self.val_shards, self.cfg = train, val, cfg
        self.seq_len = cfg.seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.tokens_per_step = batch_size * cfg.seq_len

    def setup(self, trainer) -> None:
        super().setup(trainer)
        d = trainer.dist
        self.rank, self.world = d.rank, d.world_size
        self.device = trainer.device
        mcfg = trainer.raw_model.config
        if self.seq_len > mcfg.max_seq_len:
            raise TiaoyuError(f"--seq-len {self.seq_len} exceeds the model's max_seq_len {mcfg.max_seq_len}")
        if self.train_shards.vocab_size > mcfg.vocab_size:
            raise TiaoyuError(f"the shards use a vocabulary of {self.train_shards.vocab_size}, the model only {mcfg.vocab_size}")
        self.sampler = WindowSampler(self.train_shards.num_tokens, self.seq_len, self.batch_size * self.world,
                                     self.cfg.sampling, self.seed)
        self._bpb_ratio = None

    def _windows(self, shards, starts: list[int]) -> torch.Tensor:
        """[len(starts), seq_len+1] int64 windows of the token stream (copied out of the memory map)."""
        n = self.seq_len + 1
        arrays = shards.arrays()
        if len(arrays) == 1:  # one shard: a single gather
            idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(n, dtype=np.int64)
            arr = arrays[0][idx].astype(np.int64)
        else:
            arr = np.empty((len(starts), n), dtype=np.int64)
            for i, s in enumerate(starts):
                arr[i] = shards.get(s, n)
        return torch.from_numpy(arr)

    def next_batch(self) -> torch.Tensor:
        starts = self.sampler.next_starts()
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        batch = self._windows(self.train_shards, mine)
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    def step(self, model: nn.Module, batch: torch.Tensor) -> StepOutput:
        x, y = batch[:, :-1], batch[:, 1:]
        head = getattr(self.trainer.raw_model, "output_weight", None)
        if head is not None:  # hidden states only; the head runs inside the fused loss
            out = model(x, compute_logits=False)
            loss = linear_cross_entropy(out.hidden, head, y)
        else:
            out = model(x)
            loss = lm_loss(out.logits, y)
        metrics = {}
        if out.aux_loss is not None:  # tensors: the Trainer reads them only at log steps
            metrics["aux_loss"] = out.aux_loss.detach()
            metrics["lm_loss"] = loss.detach()
            loss = loss + out.aux_loss
        return StepOutput(loss, metrics, tokens=y.numel())

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        shards = self.val_shards
        if shards is None or shards.num_tokens < self.seq_len + 2:
            return {}
        n_win = max(1, (shards.num_tokens - 1) // self.seq_len)
        # evenly spread windows, as many as eval_batches global batches (so the set does not depend on
        # how the global batch is split across processes)
        total = min(n_win, self.cfg.eval_batches * self.batch_size * self.world)
        step = max(1, n_win // total)
        starts = [i * step * self.seq_len for i in range(total)]
        starts = [min(s, shards.num_tokens - self.seq_len - 1) for s in starts]
        loss_sum, count = 0.0, 0
        for i in range(0, len(starts), self.batch_size):
            b = self._windows(shards, starts[i:i + self.batch_size]).to(self.device)
            head = getattr(model, "output_weight", None)
            if head is not None:
                loss = linear_cross_entropy(model(b[:, :-1], compute_logits=False).hidden, head, b[:, 1:])
            else:
                loss = lm_loss(model(b[:, :-1]).logits, b[:, 1:])
            loss_sum += float(loss) * b[:, 1:].numel()
            count += b[:, 1:].numel()
        val_loss = loss_sum / count
        res = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
        ratio = self._bytes_per_token(shards, starts)
        if ratio:
            res["val_bpb"] = val_loss / math.log(2) / ratio
        return res

    def _bytes_per_token(self, shards, starts) -> float | None:
        """UTF-8 bytes per token on the eval windows (bits per byte = nats/ln2 / bytes-per-token)."""
        if self._bpb_ratio is None:
            tok = self.trainer.tokenizer
            if tok is None:
                return None
            n_tok, n_bytes = 0, 0
            for s in starts[:64]:
                ids = [int(t) for t in shards.get(s + 1, self.seq_len)]
                n_tok += len(ids)
                n_bytes += len(tok.decode(ids, skip_special=True).encode("utf-8"))
            self._bpb_ratio = n_bytes / max(1, n_tok)
        return self._bpb_ratio

    def state_dict(self) -> dict:
        return {"sampler_rng": self.sampler.gen.get_state(), "sampler_cursor": self.sampler.cursor}

    def load_state_dict(self, state: dict) -> None:
        if "sampler_rng" in state:
            self.sampler.gen.set_state(state["sampler_rng"])
        self.sampler.cursor = int(state.get("sampler_cursor", 0))

    def info(self) -> dict:
        import dataclasses

        return {**dataclasses.asdict(self.cfg), "train_tokens": self.train_shards.num_tokens,
                "fingerprint": self.train_shards.fingerprint}
