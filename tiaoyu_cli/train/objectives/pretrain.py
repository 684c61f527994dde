"""Pretraining: next-token prediction on token shards.

    tiaoyu pretrain tokens/ -o ckpt/base --preset tiny --max-steps 2000

Loss = mean cross-entropy of predicting token t+1 from tokens ≤ t (plus the MoE load-balancing
loss when the model has experts). Windows of seq_len+1 tokens are drawn from the memory-mapped
shards — uniformly at random (default) or sequentially — by a generator that is part of the
checkpoint, so a resumed run sees exactly the batches the uninterrupted run would have seen.
Under DDP every rank draws the same global batch indices and takes its own slice of them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from tiaoyu_cli.checkpoint import load_config, load_model, load_tokenizer, load_trainer_info, resolve_checkpoint
from tiaoyu_cli.data.shards import check_fingerprint, open_tokens
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.model import Transformer
from tiaoyu_cli.model import preset as make_preset
from tiaoyu_cli.model.transformer import cross_entropy
from tiaoyu_cli.tokenizer import model_token_ids, open_tokenizer
from tiaoyu_cli.train.config import TrainConfig
from tiaoyu_cli.train.run import Plan, run_stage
from tiaoyu_cli.train.stage import BaseStage, StepOutput


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
    `cross_entropy(F.linear(hidden, weight), targets)` computed without materialising the logits.

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


# ---- the run -------------------------------------------------------------------------------------------


@dataclass
class PretrainRun:
    """What `tiaoyu pretrain` trains on and from (the loop's options are the TrainConfig)."""

    tokens: str
    preset: str = "tiny"
    model: dict | None = None  # model config overrides (--model KEY=VALUE)
    init: str | None = None  # continue from this checkpoint (ours, or a Hugging Face model folder)
    tokenizer: str | None = None  # default: the one recorded with the shards (ours, or an open model's folder)
    seq_len: int = 0  # 0 = the model's max_seq_len
    sampling: str = "random"
    eval_batches: int = 16


# an open model's context (32k, 128k tokens) is far more than a window of continued pretraining needs by default
OPEN_DEFAULT_SEQ_LEN = 2048


def find_tokenizer(tokens: Path, given: str | None):
    """The tokenizer that made the shards: --tokenizer, else the path meta.json records, else one beside them
    (tiaoyu's own, or an open model's tokenizer.json folder)."""
    if given is not None:
        return open_tokenizer(given)
    for meta_path in (tokens / "meta.json", tokens.parent / "meta.json"):
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            for key in ("tokenizer_path", "tokenizer", "tokenizer_dir"):
                cand = meta.get(key)
                if isinstance(cand, str) and Path(cand).exists():
                    return open_tokenizer(cand)
    if (tokens / "tokenizer.model").exists() or (tokens / "tokenizer.json").exists():
        return open_tokenizer(tokens)
    raise TiaoyuError(f"cannot tell which tokenizer made {tokens}: pass --tokenizer tok/")


def prepare_pretrain(o: PretrainRun, train: TrainConfig) -> Plan:
    """Open the shards, build (or load) the model and tokenizer, check that they fit together."""
    tokens = Path(o.tokens)
    train_sh, val_sh = open_tokens(tokens)
    for shards in (train_sh, val_sh):  # map every shard now: a truncated file fails here, not mid-run
        if shards is not None:
            shards.arrays()
    sl = o.seq_len
    if train.resume:  # the run's own architecture and tokenizer, whatever --preset says
        ckpt = resolve_checkpoint(train.out)
        net = Transformer(load_config(ckpt))
        tok = load_tokenizer(ckpt)
        if not sl:
            sl = int((load_trainer_info(ckpt).get("stage_config") or {}).get("seq_len") or 0)
    elif o.init is not None:
        net, init_dir = load_model(o.init, config_overrides=o.model or None)
        tok = load_tokenizer(init_dir)
        if o.tokenizer is not None and open_tokenizer(o.tokenizer).fingerprint != tok.fingerprint:
            raise TiaoyuError(f"--tokenizer {o.tokenizer} is not the tokenizer of --init {init_dir}: continued "
                              "pretraining keeps the model's own tokenizer (leave --tokenizer out)")
    else:  # a new model of a preset size on the tokenizer's vocabulary (tiaoyu's own or an open model's)
        tok = find_tokenizer(tokens, o.tokenizer)
        cfg = make_preset(o.preset, **{"vocab_size": tok.vocab_size, **model_token_ids(tok), **(o.model or {})})
        net = Transformer(cfg)
    check_fingerprint(train_sh, tok)
    if not sl and net.config.family:
        sl = min(net.config.max_seq_len, OPEN_DEFAULT_SEQ_LEN)
    sl = sl or net.config.max_seq_len
    if sl > net.config.max_seq_len:
        raise TiaoyuError(f"--seq-len {sl} exceeds the model's max_seq_len {net.config.max_seq_len} "
                          f"(positions it was built for); use --seq-len ≤ {net.config.max_seq_len}"
                          + ("" if o.init or train.resume else f" or --model max_seq_len={sl}"))
    if train_sh.vocab_size > net.config.vocab_size:
        raise TiaoyuError(f"the shards use a vocabulary of {train_sh.vocab_size}, the model only {net.config.vocab_size}")
    if train_sh.num_tokens < sl + 2:
        raise TiaoyuError(f"{tokens} holds {train_sh.num_tokens} training tokens, fewer than one window of "
                          f"--seq-len {sl} + 1; use a smaller --seq-len or more data")
    stage = PretrainStage(train_sh, val_sh, PretrainConfig(seq_len=sl, sampling=o.sampling, eval_batches=o.eval_batches),
                          batch_size=train.batch_size, seed=train.seed)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    line = (f"pretrain: {net.num_parameters() / 1e6:.2f}M parameters, {train_sh.num_tokens:,} training tokens, "
            f"seq_len {sl}, {world} process(es), {train.batch_size * train.grad_accum * world * sl:,} tokens per step")
    return Plan(net, stage, tok, parent=str(o.init) if o.init else None, lines=[line], eval_before=False)


def run_pretrain(o: PretrainRun, train: TrainConfig, log=print) -> dict:
    """`tiaoyu pretrain`: next-token prediction on token shards, through the one run path."""
    return run_stage("pretrain", train, lambda: prepare_pretrain(o, train), log=log)
