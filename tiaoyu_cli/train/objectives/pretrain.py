"""The pretraining objective: next-token prediction on windows of token shards (`PretrainStage`).

Loss = mean cross-entropy of predicting token t+1 from tokens ≤ t (`losses.lm`, fused with the LM head
when the model allows it), plus the MoE load-balancing loss when the model has experts. Windows of
seq_len+1 tokens are drawn from the memory-mapped shards — uniformly at random (default) or
sequentially — by a generator that is part of the checkpoint (`engine.sampler.WindowSampler`), so a
resumed run sees exactly the batches the uninterrupted run would have seen. Under DDP every rank draws
the same global batch indices and takes its own slice of them. The run (`tiaoyu pretrain`) is
stages/pretrain.py; distillation during pretraining rides on this stage too.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.train.engine.sampler import WindowSampler
from tiaoyu_cli.train.engine.stage import BaseStage, StepOutput
from tiaoyu_cli.train.losses.lm import cross_entropy, linear_cross_entropy


@dataclass
class PretrainConfig:
    seq_len: int = 256
    sampling: str = "random"  # random | sequential
    eval_batches: int = 16


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

    def _sharded(self) -> bool:
        return bool(getattr(getattr(self, "trainer", None), "fsdp", False))

    def step(self, model: nn.Module, batch: torch.Tensor) -> StepOutput:
        x, y = batch[:, :-1], batch[:, 1:]
        # the fused head + loss reads the head weight outside the model's forward: not with FSDP's shards
        head = None if self._sharded() else getattr(self.trainer.raw_model, "output_weight", None)
        if head is not None:  # hidden states only; the head runs inside the fused loss
            out = model(x, compute_logits=False)
            loss = linear_cross_entropy(out.hidden, head, y)
        else:
            out = model(x)
            loss = cross_entropy(out.logits, y)
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
            head = None if self._sharded() else getattr(model, "output_weight", None)
            if head is not None:
                loss = linear_cross_entropy(model(b[:, :-1], compute_logits=False).hidden, head, b[:, 1:])
            else:
                loss = cross_entropy(model(b[:, :-1]).logits, b[:, 1:])
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
        return {**dataclasses.asdict(self.cfg), "train_tokens": self.train_shards.num_tokens,
                "fingerprint": self.train_shards.fingerprint}
