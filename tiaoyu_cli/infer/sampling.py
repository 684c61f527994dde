"""Choosing the next token from the model's logits: pure functions over a [B, V] tensor.

The order is the usual one (Hugging Face, llama.cpp):

    logits → repetition penalty → temperature → top-k → top-p → softmax → draw (or argmax)

* repetition penalty (CTRL, Keskar et al. 2019): for every token already present in the row,
  a positive logit is divided by the penalty and a negative one multiplied by it, so the token
  always becomes less likely (penalty > 1).
* temperature T: logits / T. T → 0 sharpens to greedy; T == 0 *is* greedy (argmax).
* top-k: keep the k largest logits, set the rest to -inf.
* top-p (nucleus, Holtzman et al. 2019): keep the smallest set of most likely tokens whose
  probabilities add up to at least p (the top token is always kept).

Randomness comes only from an explicit `torch.Generator`, so a seed gives the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiaoyu_cli.errors import TiaoyuError


@dataclass
class SamplingParams:
    temperature: float = 0.7  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise TiaoyuError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise TiaoyuError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise TiaoyuError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise TiaoyuError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL penalty. logits [B, V]; seen [B, V] bool, True where the token already occurred in the row.

        l' = l / penalty   if l > 0 and seen
        l' = l * penalty   if l ≤ 0 and seen
        l' = l             otherwise
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T (T > 0; greedy decoding never calls this)."""
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept), -inf elsewhere. k ≤ 0: no-op."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their probability mass reaches p.

    Sorted descending, token i is dropped when the mass of the tokens *before* it is already ≥ p,
    so the token that crosses p is kept, and the top token always is. p ≥ 1: no-op.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # [B, V]
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """All the logit transforms in order (fp32). Greedy skips temperature/top-k/top-p (argmax is unchanged)."""
    logits = logits.float()
    if seen is not None and params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = apply_temperature(logits, params.temperature)
    logits = top_k_filter(logits, params.top_k)
    return top_p_filter(logits, params.top_p)


def choose(processed: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from processed logits [B, V]: argmax when greedy, else one draw from softmax."""
    if params.greedy:
        if processed.device.type == "cpu" and processed.dtype == torch.float32:  # numpy's argmax: less call overhead
            return torch.from_numpy(processed.detach().numpy().argmax(-1))
        return processed.argmax(dim=-1)
    probs = processed.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                seen: torch.Tensor | None = None) -> torch.Tensor:
    """process_logits + choose: [B, V] → [B]."""
    return choose(process_logits(logits, params, seen), params, generator)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device`, seeded with `seed` (a random seed when None)."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g
