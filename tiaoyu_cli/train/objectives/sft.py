"""Supervised fine-tuning: learn to answer in the chat template, loss on the assistant's tokens only.

    tiaoyu sft ckpt/base chat.train.jsonl -o ckpt/sft --eval-data chat.val.jsonl --epochs 3
    tiaoyu lora ckpt/base chat.train.jsonl -o adapter/ --rank 8 --alpha 16

Objective (`cross_entropy` on the assistant labels): mean cross-entropy of the assistant tokens given everything before them,

    L = −(1/N) Σ_{t: labels_t ≠ −100} log softmax(logits_t)[labels_t]

with labels from `tiaoyu_cli.data.chat.collate` (every assistant turn of a multi-turn record is
learned; system prompt, user turns and role headers are not).

What is trained (seed 004's strategies), chosen by two options:

    --train full|ffn|attn|head|embeddings (comma list)  which existing weights learn; the rest is frozen
    --method full      those weights, nothing added
    --method lora      low-rank adapters on frozen weights (model/lora.py); sft saves them merged
    --method adapter   bottleneck adapters after attention and FFN (model/adapters.py)
    --method prompt    a soft prompt of --virtual-tokens vectors before every input (model/adapters.py)

Forgetting (seed 002): `--replay tokens/ --replay-ratio ρ` adds ⌈ρ·batch⌉ pretraining windows to
every micro-batch and trains on (1 − ρ)·L_sft + ρ·L_replay; evaluation reports the loss on the
pretraining val split (`base_val_loss`) so forgetting shows in the metrics, with or without replay.

Evaluation (`evaluate`): `val_loss` (assistant tokens of --eval-data), `answer_acc` (greedy answers to
its first --eval-samples questions, scored by `rl/answers.py`), `base_val_loss`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from tiaoyu_cli.checkpoint import load_model_tensors, load_tensors, load_weights, write_model_folder
from tiaoyu_cli.data.chat import ChatDataset, Example, PackedRow, collate, is_packed
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.infer.tools import Toolbox
from tiaoyu_cli.model import adapters as A
from tiaoyu_cli.model import lora as L
from tiaoyu_cli.model.adapters import SoftPromptModel, strip_prefix
from tiaoyu_cli.model.lora import load_lora_state_dict, lora_state_dict
from tiaoyu_cli.model.transformer import ModelOutput
from tiaoyu_cli.train.engine.distributed import unwrap
from tiaoyu_cli.train.engine.sampler import WindowSampler
from tiaoyu_cli.train.engine.sampler import EpochSampler
from tiaoyu_cli.train.engine.stage import BaseStage, StepOutput
from tiaoyu_cli.train.losses.lm import cross_entropy
from tiaoyu_cli.train.rl.answers import answer_accuracy, tool_answer_accuracy

TRAIN_PARTS = ("full", "ffn", "attn", "head", "embeddings")
METHODS = ("full", "prompt", "adapter", "lora")



@dataclass
class SFTConfig:
    max_len: int = 0  # tokens per record (0 = the model's max_seq_len)
    overflow: str = "truncate"  # truncate | skip
    pack: bool = False
    train: str = "full"  # full | ffn | attn | head | embeddings, comma-separated
    method: str = "full"  # full | prompt | adapter | lora
    virtual_tokens: int = 20  # --method prompt
    adapter_dim: int = 16  # --method adapter: bottleneck width
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = "q,k,v,o,gate,up,down"
    replay_ratio: float = 0.0  # share of the loss from pretraining windows (needs replay shards)
    replay_seq_len: int = 0  # tokens per replay window (0 = max_len)
    eval_samples: int = 200  # questions answered by generation at each evaluation (0 = none)
    eval_max_new_tokens: int = 32
    eval_tools: str = ""  # tools the eval answers may call (e.g. "calculator"): answer_acc with the tools
    tool_schemas: bool | None = None  # the tools' schemas in tool prompts (None: as the training records do);
    # recorded in trainer.json, where chat and serve read their default
    eval_batch_size: int = 64
    base_val_windows: int = 32  # pretraining val windows for base_val_loss

    def validate(self) -> None:
        if self.overflow not in ("truncate", "skip"):
            raise TiaoyuError(f"--overflow {self.overflow!r}: choose truncate or skip")
        parse_train_parts(self.train)
        if self.method not in METHODS:
            raise TiaoyuError(f"--method {self.method!r}: choose {', '.join(METHODS)}")
        if not 0.0 <= self.replay_ratio < 1.0:
            raise TiaoyuError(f"--replay-ratio must be in [0, 1), got {self.replay_ratio}")
        if self.pack and self.method == "prompt":
            raise TiaoyuError("--pack does not combine with --method prompt (each record needs its own soft prompt)")
        for name in ("eval_samples", "max_len", "replay_seq_len"):
            if getattr(self, name) < 0:
                raise TiaoyuError(f"--{name.replace('_', '-')} must not be negative")
        if self.eval_max_new_tokens < 1 or self.eval_batch_size < 1 or self.base_val_windows < 1:
            raise TiaoyuError("--eval-max-new-tokens, --eval-batch-size and --base-val-windows must be positive")
        if self.eval_tools:  # unknown names: a clear error now, not at the first evaluation
            try:
                Toolbox.from_names(self.eval_tools)
            except TiaoyuError as e:
                raise TiaoyuError(f"--eval-{str(e).removeprefix('--')}") from None


# ---- which parameters train ------------------------------------------------------------------------

def parse_train_parts(spec: str) -> list[str]:
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise TiaoyuError("--train: name at least one part (full, ffn, attn, head, embeddings)")
    for p in parts:
        if p not in TRAIN_PARTS:
            raise TiaoyuError(f"--train {p!r}: choose from {', '.join(TRAIN_PARTS)} (comma-separated)")
    return parts


def part_of(name: str, tied: bool) -> set[str]:
    """The --train parts a parameter name belongs to (Llama/Mixtral names)."""
    out = set()
    if ".self_attn." in name:
        out.add("attn")
    if ".mlp." in name or ".block_sparse_moe." in name:
        out.add("ffn")
    if name.startswith(("model.embed_tokens.", "model.embed_positions.")):
        out.add("embeddings")
        if tied:
            out.add("head")  # a tied head *is* the embedding matrix
    if name.startswith(("lm_head.", "model.norm.", "score.")):
        out.add("head")
    return out


def select_trainable(model: nn.Module, spec: str) -> list[str]:
    """Freeze every parameter outside the named parts (`full` = all). Returns the trainable names.
    A classifier's `score` head is always trained (it starts random)."""
    parts = set(parse_train_parts(spec))
    tied = bool(getattr(getattr(model, "config", None), "tie_embeddings", False))
    names = []
    for n, p in model.named_parameters():
        on = "full" in parts or bool(part_of(n, tied) & parts) or n.startswith("score.")
        p.requires_grad_(on)
        if on:
            names.append(n)
    if not names:
        raise TiaoyuError(f"--train {spec}: selects no parameters of this model")
    return names


def count_parameters(*modules: nn.Module) -> tuple[int, int]:
    """(trainable, total) over the given modules (shared tensors counted once)."""
    seen, trainable, total = set(), 0, 0
    for m in modules:
        for p in m.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def describe_trainable(trainable: int, total: int) -> str:
    return f"trainable {trainable:,} of {total:,} parameters ({100.0 * trainable / max(1, total):.2f}%)"


# ---- the forward pass for chat batches ----------------------------------------------------------------

def lm_forward(model: nn.Module, batch: dict[str, torch.Tensor], prompt: nn.Module | None = None) -> ModelOutput:
    """Logits for a collated chat batch, aligned with batch["labels"].

    Unpacked rows are right-padded; causal attention means no real token ever sees the padding after
    it, so no attention mask is needed (and the fast causal kernel runs). Packed rows pass their
    position and record ids: the model attends block-diagonally. A soft prompt (`prompt`) is put in front and its outputs dropped."""
    if is_packed(batch):
        if prompt is not None:
            raise TiaoyuError("packed batches do not combine with a soft prompt")
        return model(batch["input_ids"], position_ids=batch["position_ids"], seq_ids=batch["seq_ids"])
    if prompt is None:
        return model(batch["input_ids"])

    B = batch["input_ids"].shape[0]
    out = model(batch["input_ids"], input_embeds_prefix=prompt(B))
    return strip_prefix(out, prompt.n_tokens)


# ---- sampling ------------------------------------------------------------------------------------------

def window_batch(shards, starts: Sequence[int], length: int) -> torch.Tensor:
    """[len(starts), length] int64 windows of a token stream."""
    arr = np.stack([np.asarray(shards.get(int(s), length), dtype=np.int64) for s in starts])
    return torch.from_numpy(arr)


def even_starts(n_tokens: int, length: int, count: int) -> list[int]:
    """`count` window starts spread evenly over a stream (fewer when it is short)."""
    hi = n_tokens - length
    if hi < 0:
        return []
    count = min(count, hi // max(1, length) + 1)
    step = hi / max(1, count - 1) if count > 1 else 0
    return [int(round(i * step)) for i in range(count)]


@torch.no_grad()
def shard_loss(model: nn.Module, shards, length: int, count: int, batch_size: int, device) -> float | None:
    """Mean next-token loss on `count` evenly spread windows of `length` + 1 tokens (None if too short)."""
    starts = even_starts(shards.num_tokens, length + 1, count)
    if not starts:
        return None
    total, n = 0.0, 0
    for i in range(0, len(starts), batch_size):
        b = window_batch(shards, starts[i:i + batch_size], length + 1).to(device)
        out = model(b[:, :-1])
        total += float(cross_entropy(out.logits, b[:, 1:])) * b[:, 1:].numel()
        n += b[:, 1:].numel()
    return total / n


# ---- the stage -------------------------------------------------------------------------------------------

class SFTStage(BaseStage):
    """Chat SFT (every --train/--method combination), with optional replay and evaluation.

    `save_as`: "full" — model.safetensors as trained (for --method adapter/prompt: the base weights,
    the extra weights in sft_extras.*); "merged" — LoRA folded into model.safetensors (the LoRA
    weights also go to train_state for --resume); "adapter" — only the PEFT adapter (tiaoyu lora)."""

    name = "sft"

    def __init__(self, rows: Sequence[Example | PackedRow], cfg: SFTConfig, batch_size: int, seed: int = 0,
                 eval_data: ChatDataset | None = None, eval_records: list[dict] | None = None,
                 replay=None, base_val=None, prompt: nn.Module | None = None, save_as: str = "full",
                 lora_cfg=None, base_info: dict | None = None, name: str | None = None, info: dict | None = None):
        cfg.validate()
        if not rows:
            raise TiaoyuError("no training examples")
        if cfg.replay_ratio > 0 and replay is None:
            raise TiaoyuError("--replay-ratio needs --replay TOKENS (pretraining token shards)")
        if save_as not in ("full", "merged", "adapter"):
            raise ValueError(f"save_as {save_as!r}")
        self.rows, self.cfg, self.batch_size, self.seed = list(rows), cfg, batch_size, seed
        self.eval_data, self.eval_records = eval_data, eval_records or []
        self.replay, self.base_val, self.prompt = replay, base_val, prompt
        self.save_as, self.lora_cfg, self.base_info = save_as, lora_cfg, base_info or {}
        self.extra_info = info or {}
        if name:
            self.name = name
        self.steps_per_epoch = math.ceil(len(self.rows) / batch_size)
        self.n_replay = math.ceil(cfg.replay_ratio * batch_size) if cfg.replay_ratio > 0 else 0

    # -- setup and data --
    def setup(self, trainer) -> None:
        super().setup(trainer)
        d = trainer.dist
        self.rank, self.world, self.device = d.rank, d.world_size, trainer.device
        mcfg = unwrap(trainer.raw_model).config
        longest = max(len(r) for r in self.rows) + (self.prompt.n_tokens if self.prompt is not None else 0)
        if longest > mcfg.max_seq_len and mcfg.position != "rope":
            raise TiaoyuError(f"records of {longest} tokens exceed the model's max_seq_len {mcfg.max_seq_len}")
        self.sampler = EpochSampler(len(self.rows), self.batch_size, self.seed, rank=self.rank, world=self.world)
        if self.replay is not None:
            self.replay_len = self.cfg.replay_seq_len or self.cfg.max_len or mcfg.max_seq_len
            self.replay_len = min(self.replay_len, mcfg.max_seq_len, self.replay.num_tokens - 2)
            self.replay_sampler = WindowSampler(self.replay.num_tokens, self.replay_len,
                                                max(1, self.n_replay) * self.world, "random", self.seed + 1)

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"soft_prompt": self.prompt} if self.prompt is not None else {}

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = collate([self.rows[i] for i in self.sampler.next_indices()])
        if self.n_replay:
            starts = self.replay_sampler.next_starts()
            starts = starts[self.rank * self.n_replay:(self.rank + 1) * self.n_replay]
            batch["replay"] = window_batch(self.replay, starts, self.replay_len + 1)
        return {k: v.to(self.device) for k, v in batch.items()}

    # -- one micro-batch --
    def step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        prompt = self.trainer.extras["soft_prompt"] if self.prompt is not None else None
        out = lm_forward(model, batch, prompt)
        loss = cross_entropy(out.logits, batch["labels"])
        metrics: dict[str, Any] = {}
        tokens = int(batch["attention_mask"].sum())
        if out.aux_loss is not None:
            metrics["aux_loss"] = out.aux_loss.detach()
            loss = loss + out.aux_loss
        if "replay" in batch:
            w = batch["replay"]
            r_out = model(w[:, :-1])
            r_loss = cross_entropy(r_out.logits, w[:, 1:])
            metrics["sft_loss"] = loss.detach()
            metrics["replay_loss"] = r_loss.detach()
            rho = self.cfg.replay_ratio
            loss = (1 - rho) * loss + rho * r_loss
            tokens += w[:, :-1].numel()
        return StepOutput(loss, metrics, tokens=tokens)

    # -- evaluation --
    def generation_model(self, model: nn.Module) -> nn.Module:
        """The model as generation sees it (with the soft prompt in front, if any)."""
        if self.prompt is None:
            return model

        prompt = self.trainer.extras["soft_prompt"] if hasattr(self, "trainer") else self.prompt
        return SoftPromptModel(model, prompt)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        res: dict[str, float] = {}
        device = next(model.parameters()).device
        prompt = None
        if self.prompt is not None:
            prompt = self.trainer.extras["soft_prompt"] if hasattr(self, "trainer") else self.prompt
        if self.eval_data is not None:
            total, n = 0.0, 0
            ex = self.eval_data.examples
            for i in range(0, len(ex), self.cfg.eval_batch_size):
                b = {k: v.to(device) for k, v in collate(ex[i:i + self.cfg.eval_batch_size]).items()}
                out = lm_forward(model, b, prompt)
                k = int((b["labels"] != -100).sum())
                if k:
                    total += float(cross_entropy(out.logits, b["labels"])) * k
                    n += k
            if n:
                res["val_loss"] = total / n
        if self.eval_records and self.cfg.eval_samples:
            tok = self.trainer.tokenizer  # evaluation runs inside a Trainer (setup gave the stage its trainer)
            records = self.eval_records[:self.cfg.eval_samples]
            if self.cfg.eval_tools:
                rep = tool_answer_accuracy(self.generation_model(model), tok, records,
                                           Toolbox.from_names(self.cfg.eval_tools), batch_size=self.cfg.eval_batch_size,
                                           max_new_tokens=self.cfg.eval_max_new_tokens,
                                           schemas_in_prompt=bool(self.cfg.tool_schemas))
                res["tool_call_rate"] = rep.format_rate
            else:
                rep = answer_accuracy(self.generation_model(model), tok, records,
                                      batch_size=self.cfg.eval_batch_size, max_new_tokens=self.cfg.eval_max_new_tokens)
            res["answer_acc"] = rep.accuracy
            res["answer_n"] = rep.total  # questions asked: the standard error of answer_acc needs it
            self.last_answers = rep
        if self.base_val is not None:
            length = min(getattr(self, "replay_len", 0) or self.cfg.max_len or model.config.max_seq_len,
                         model.config.max_seq_len)
            v = shard_loss(model, self.base_val, length, self.cfg.base_val_windows, self.cfg.eval_batch_size, device)
            if v is not None:
                res["base_val_loss"] = v
        return res

    # -- checkpoint contents --
    def state_dict(self) -> dict[str, Any]:
        st: dict[str, Any] = dict(self.sampler.state_dict())
        if self.n_replay:
            st["replay_rng"] = self.replay_sampler.gen.get_state()
        if self.save_as == "merged":  # the unmerged LoRA weights, to resume from

            for k, v in lora_state_dict(self.trainer.raw_model).items():
                st[f"lora:{k}"] = v
        return st

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        if self.n_replay and "replay_rng" in state:
            self.replay_sampler.gen.set_state(state["replay_rng"])
        lora = {k[len("lora:"):]: v for k, v in state.items() if k.startswith("lora:")}
        if lora:
            load_lora_state_dict(self.trainer.raw_model, lora, "--resume")

    @property
    def shardable(self) -> bool:  # --fsdp: a plain model trained in full
        return self.cfg.method == "full" and self.prompt is None

    def save_model(self, folder: Path, model: nn.Module, tokenizer) -> None:
        model = unwrap(model)
        if self.save_as == "adapter":
            L.save_adapter(folder, model, self.lora_cfg, self.base_info)
            if tokenizer is not None:
                tokenizer.save(folder)
            return
        if self.save_as == "merged":
            write_model_folder(folder, model.config, L.merged_state_dict(model), tokenizer)
            return
        write_model_folder(folder, model.config, A.base_state_dict(model), tokenizer)
        extra = A.bottleneck_state_dict(model)
        if extra:
            A.save_extras(folder, "BOTTLENECK", extra, {"bottleneck": self.cfg.adapter_dim,
                                                        "layers": list(A.ADAPTER_LAYERS)})
        if self.prompt is not None:
            prompt = self.trainer.extras["soft_prompt"]
            A.save_extras(folder, "PROMPT_TUNING", {"prompt_embeddings": prompt.prompt_embeddings},
                          A.prompt_config(prompt, model.config, self.base_info.get("base_model")))

    def load_for_resume(self, folder: Path, model: nn.Module) -> None:
        model = unwrap(model)
        if self.save_as == "adapter":
            _, _, tensors, _ = L.read_adapter(folder)
            L.load_lora_state_dict(model, tensors, str(folder))
            return
        if self.save_as == "merged":
            return  # base weights come from the base checkpoint; LoRA weights from train_state (load_state_dict)
        sd = load_model_tensors(folder, None)
        if (folder / A.EXTRAS_WEIGHTS).exists():
            ex = load_tensors(folder / A.EXTRAS_WEIGHTS)
            if "prompt_embeddings" in ex and self.prompt is not None:
                with torch.no_grad():
                    self.prompt.prompt_embeddings.copy_(ex.pop("prompt_embeddings"))
            sd.update(ex)
        load_weights(model, sd, f"--resume: {folder}", strict=False,
                     hint=": resume with the options the run started with")

    def info(self) -> dict:
        return {**dataclasses.asdict(self.cfg), "examples": len(self.rows), "save_as": self.save_as,
                **self.extra_info}
