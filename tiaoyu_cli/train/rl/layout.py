"""Rollouts: generate answers for a batch of prompts with the batched KV-cache generator and lay them out for
training as one [B, P + R] tensor — prompts left-padded to P columns, responses right-padded to R columns —
so every row's response occupies the same columns P … P+R−1 and its per-token log-probs are
`logits[:, P−1 : P+R−1]` for all rows at once (`response_logps`); a reward model scores the same layout.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.infer.generate import DEFAULT_STOP_IDS, generate_detailed
from tiaoyu_cli.infer.sampling import SamplingParams
from tiaoyu_cli.model.heads import last_token_scores
from tiaoyu_cli.train.engine.distributed import unwrap
from tiaoyu_cli.train.losses.rl import token_logps


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (run seed, rollout number, rank …), independent of PYTHONHASHSEED."""
    h = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


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


def concat_rollouts(parts: list[Rollout], pad_id: int = 0) -> Rollout:
    """Rows of several rollouts in one: prompts re-aligned to the longest (left padding), responses to the
    longest (right padding); every row keeps its tokens, mask and attention exactly."""
    P = max(r.prompt_len for r in parts)
    R = max(r.resp_len for r in parts)
    B = sum(r.ids.shape[0] for r in parts)
    dev = parts[0].ids.device
    ids = torch.full((B, P + R), pad_id, dtype=torch.long, device=dev)
    att = torch.zeros((B, P + R), dtype=parts[0].attention_mask.dtype, device=dev)
    mask = torch.zeros((B, R), dtype=parts[0].mask.dtype, device=dev)
    row, responses, finished = 0, [], []
    for r in parts:
        b, p, n = r.ids.shape[0], r.prompt_len, r.resp_len
        ids[row:row + b, P - p:P + n] = r.ids
        att[row:row + b, P - p:P + n] = r.attention_mask
        mask[row:row + b, :n] = r.mask
        responses += r.responses
        finished += r.finished
        row += b
    return Rollout(ids, att, mask, P, responses, finished)


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
