"""Pieces the preference and RL stages share (reward, DPO, PPO, GRPO).

* loading a frozen reference or reward model, with the checks users need (same tokenizer as the
  policy; a reward model must have a one-output `score` head);
* rollouts: generate answers for a batch of prompts with the batched KV-cache generator and lay
  them out for training as one [B, P + R] tensor — prompts left-padded to P columns, responses
  right-padded to R columns — so every row's response occupies the same columns P … P+R−1 and
  its per-token log-probs are `logits[:, P−1 : P+R−1]` for all rows at once.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from tiaoyu_cli.checkpoint import load_config, load_model, load_tokenizer, write_model_folder
from tiaoyu_cli.data.preference import load_prompts
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.infer.generate import DEFAULT_STOP_IDS, generate_detailed
from tiaoyu_cli.infer.sampling import SamplingParams
from tiaoyu_cli.model import lora as L
from tiaoyu_cli.model.heads import last_token_scores
from tiaoyu_cli.model.lora import lora_modules
from tiaoyu_cli.tokenizer.core import check_same_tokenizer
from tiaoyu_cli.train.distributed import unwrap
from tiaoyu_cli.train.losses_rl import token_logps

# ---- models ------------------------------------------------------------------------------------------


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: a reference or reward model."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_policy(start, stage: str):
    """(model, folder, tokenizer) of the language model an RL stage trains; a reward model or classifier
    (a score head) is refused."""
    model, folder = load_model(start)
    if model.config.num_labels:
        raise TiaoyuError(f"{folder} has a score head (a reward model or classifier): {stage} trains a language model")
    return model, folder, load_tokenizer(folder)


def prompt_room(context: int, max_new_tokens: int, prefix: int = 0, what: str = "the model's context") -> int:
    """Tokens a prompt may take so that `max_new_tokens` (and a `prefix` the prompt is given) still fit."""
    room = context - max_new_tokens - prefix
    if room < 1:
        raise TiaoyuError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in {what} of {context} tokens")
    return room


def load_reference(path: str | os.PathLike, policy_tok, device="cpu", what: str = "reference") -> nn.Module:
    """A frozen copy of a checkpoint (the DPO/PPO/GRPO reference), checked against the policy's tokenizer."""

    check_same_tokenizer(policy_tok, load_tokenizer(path), f"{what} {path}")
    model, _ = load_model(path, device=device)
    return freeze(model)


def load_reward_model(path: str | os.PathLike, policy_tok=None, device="cpu") -> tuple[nn.Module, object]:
    """A frozen reward model (a checkpoint with a `score` head of one output). Returns (model, tokenizer)."""

    cfg = load_config(path)
    if cfg.num_labels != 1:
        what = "no reward head" if cfg.num_labels == 0 else f"a classification head with {cfg.num_labels} labels"
        raise TiaoyuError(f"{path} is not a reward model: it has {what}, not a `score` head with one output "
                          f"(train one with `tiaoyu rlhf reward`)")
    tok = load_tokenizer(path)
    check_same_tokenizer(policy_tok, tok, f"reward model {path}")
    model, _ = load_model(path, device=device)
    return freeze(model), tok


# ---- data order -------------------------------------------------------------------------------------


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (run seed, rollout number, rank …), independent of PYTHONHASHSEED."""
    h = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


# ---- rollouts -----------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """Prompts and sampled responses laid out for training (see the module docstring)."""

    ids: torch.Tensor  # [B, P + R] left-padded prompts, then right-padded responses
    attention_mask: torch.Tensor  # [B, P + R] 1 = real token
    mask: torch.Tensor  # [B, R] 1 on response tokens (including the stop token, if one was produced)
    prompt_len: int  # P
    responses: list[list[int]]  # the generated tokens of each row
    finished: list[bool]  # True where the response ended with a stop token

    @property
    def resp_len(self) -> int:
        return self.mask.shape[1]

    def rows(self, idx) -> "Rollout":
        idx_t = torch.as_tensor(idx, dtype=torch.long, device=self.ids.device)
        return Rollout(self.ids[idx_t], self.attention_mask[idx_t], self.mask[idx_t], self.prompt_len,
                       [self.responses[i] for i in idx], [self.finished[i] for i in idx])


def layout(prompts: list[list[int]], responses: list[list[int]], pad_id: int = 0, device=None,
           finished: list[bool] | None = None) -> Rollout:
    """Prompts left-padded to P, responses right-padded to R (at least 1 column)."""
    P = max(len(p) for p in prompts)
    R = max(1, max((len(r) for r in responses), default=1))
    B = len(prompts)
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    att = torch.zeros((B, P + R), dtype=torch.long)
    mask = torch.zeros((B, R), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        att[i, P - len(p):P] = 1
        if r:
            ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
            att[i, P:P + len(r)] = 1
            mask[i, :len(r)] = 1
    fin = finished if finished is not None else [True] * B
    return Rollout(ids.to(device), att.to(device), mask.to(device), P, [list(r) for r in responses], list(fin))


def generate_rollout(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                     top_k: int = 0, top_p: float = 1.0, seed: int = 0, gen_batch_size: int = 0,
                     dtype: torch.dtype | None = None, stop_ids=None) -> Rollout:
    """Sample one response per prompt with the batched KV-cache generator, `gen_batch_size` prompts
    at a time (0 = all at once), and lay the batch out for training. stop_ids: the tokenizer's end-of-turn
    ids (default: tiaoyu's </s> and <|im_end|>)."""

    model = unwrap(model)
    device = next(model.parameters()).device
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    chunk = gen_batch_size if gen_batch_size > 0 else len(prompts)
    responses: list[list[int]] = []
    finished: list[bool] = []
    for start in range(0, len(prompts), chunk):
        res = generate_detailed(model, prompts[start:start + chunk], max_new_tokens=max_new_tokens, params=params,
                                stop_ids=DEFAULT_STOP_IDS if stop_ids is None else stop_ids,
                                seed=derive_seed(seed, start), dtype=dtype)
        if any(res.truncated):
            raise TiaoyuError("a prompt does not fit the model's context with the answer length asked for "
                              "(lower --max-new-tokens)")
        responses.extend(res.tokens)
        finished.extend(r == "stop" for r in res.finish_reasons)
    pad = getattr(model.config, "pad_token_id", 0)
    return layout(prompts, responses, pad, device, finished)


def response_logps(model: nn.Module, ro: Rollout, with_hidden: bool = False):
    """Per-token log π of the response tokens, [B, R] (fp32; padding positions hold junk — use ro.mask).
    With with_hidden, also the final hidden states at the positions that predict them, [B, R, d]."""
    out = model(ro.ids, attention_mask=ro.attention_mask)
    P, R = ro.prompt_len, ro.resp_len
    logits = out.logits[:, P - 1:P + R - 1]
    lp = token_logps(logits, ro.ids[:, P:P + R])
    if with_hidden:
        return lp, out.hidden[:, P - 1:P + R - 1]
    return lp


def reward_model_scores(rm: nn.Module, ro: Rollout) -> torch.Tensor:
    """Scalar reward of each prompt + response under a reward model: its score at the last real token. [B]"""
    out = rm(ro.ids, attention_mask=ro.attention_mask, compute_logits=False)
    return last_token_scores(out.scores.float(), ro.attention_mask)


# ---- running statistics -------------------------------------------------------------------------------


class RunningMeanStd:
    """Mean and variance of a stream of numbers (parallel Welford / Chan et al.). Used to normalise
    PPO rewards: r' = (r − mean) / (std + eps), statistics updated with every rollout batch."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten().cpu()
        n = x.numel()
        if n == 0:
            return
        b_mean = float(x.mean())
        b_m2 = float(((x - b_mean) ** 2).sum())
        tot = self.count + n
        delta = b_mean - self.mean
        self.mean += delta * n / tot
        self.m2 += b_m2 + delta * delta * self.count * n / tot
        self.count = tot

    @property
    def var(self) -> float:
        return self.m2 / self.count if self.count else 1.0

    @property
    def std(self) -> float:
        return self.var ** 0.5

    def normalize(self, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        return (x - self.mean) / (self.std + eps)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, st: dict) -> None:
        self.count, self.mean, self.m2 = int(st.get("count", 0)), float(st.get("mean", 0.0)), float(st.get("m2", 0.0))


# ---- runs ----------------------------------------------------------------------------------------------


def split_holdout(items: list, frac: float, seed: int = 0) -> tuple[list, list]:
    """(train, held out): a fixed random `frac` of the items (at least one when frac > 0 and there are
    at least two items) is held out for evaluation."""
    if frac <= 0 or len(items) < 2:
        return items, []
    if frac >= 1:
        raise TiaoyuError("--val-frac must be below 1")
    n_val = max(1, int(round(len(items) * frac)))
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    held = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def load_rl_prompts(data, val, tok, room: int, *, need_answer: bool, skip_bad: bool, context_hint: str,
                    val_frac: float, seed: int) -> tuple[list, list, int]:
    """The prompts a PPO/GRPO run trains on and the ones it holds out: all of `val` when given, else a fixed
    random `val_frac` of `data` (split_holdout). Returns (train, held out, bad records of `data` skipped)."""
    stats: dict = {}
    prompts = load_prompts(data, tok, room, need_answer=need_answer, skip_bad=skip_bad, stats=stats,
                           context_hint=context_hint)
    if val is not None:
        held = load_prompts(val, tok, room, need_answer=need_answer, skip_bad=skip_bad, context_hint=context_hint)
    else:
        prompts, held = split_holdout(prompts, val_frac, seed)
    return prompts, held, stats.get("skipped", 0)


def fmt_metrics(d: dict, keys: list[str] | None = None) -> str:
    keys = keys or list(d)
    return "  ".join(f"{k.removeprefix('val_')} {d[k]:.4g}" for k in keys if k in d)


# ---- LoRA (--method lora) --------------------------------------------------------------------------------


class adapters_off:
    """Context manager: the LoRA layers of `model` compute their frozen base layer only (scaling 0),
    so the policy itself serves as its reference — no second copy of the model in memory."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.saved: list[tuple[nn.Module, float]] = []

    def __enter__(self):
        self.saved = [(m, m.scaling) for m in lora_modules(unwrap(self.model)).values()]
        for m, _ in self.saved:
            m.scaling = 0.0
        return self.model

    def __exit__(self, *exc):
        for m, s in self.saved:
            m.scaling = s
        return False


class LoraCheckpoint:
    """How a `--method lora` stage writes and resumes checkpoints: the merged model (an ordinary
    checkpoint every other command reads) plus the PEFT adapter files in the same folder."""

    full_model = False

    def __init__(self, lora_cfg, base_info: dict):
        self.lora_cfg, self.base_info = lora_cfg, base_info

    def save_model(self, folder, model: nn.Module, tokenizer) -> None:
        model = unwrap(model)
        write_model_folder(folder, model.config, L.merged_state_dict(model), tokenizer)
        L.save_adapter(folder, model, self.lora_cfg, self.base_info)

    def load_for_resume(self, folder, model: nn.Module) -> None:
        _, _, tensors, _ = L.read_adapter(folder)
        L.load_lora_state_dict(unwrap(model), tensors, str(folder))


def apply_lora_for_rl(model: nn.Module, opts: dict, tokenizer, base_dir) -> tuple[nn.Module, LoraCheckpoint]:
    """Wrap `model` with LoRA layers (everything else frozen). opts: rank, alpha, dropout, targets."""

    cfg = L.LoraConfig(rank=int(opts.get("rank", 8)), alpha=float(opts.get("alpha", 16.0)),
                       dropout=float(opts.get("dropout", 0.0)),
                       targets=L.parse_targets(opts.get("targets", "q,k,v,o,gate,up,down")))
    L.apply_lora(model, cfg, freeze=True)
    return model, LoraCheckpoint(cfg, L.base_info(model.config, tokenizer, base_dir))
