"""Reading a score head (reward model, classifier) at each sequence's last real token."""

from __future__ import annotations

import torch


def last_token_scores(scores: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      last_index: torch.Tensor | None = None) -> torch.Tensor:
    """The score of each sequence at its last real token (the HF sequence-classification convention).

    scores [B, T, L] (or [B, T]); the last token is `last_index` [B] when given, else the last position
    where attention_mask [B, T] is 1 (left or right padding). Returns [B, L], or [B] for a one-output
    head (L = 1, a reward model)."""
    if last_index is None:
        if attention_mask is None:
            raise ValueError("give attention_mask or last_index")
        T = attention_mask.shape[1]
        pos = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
        last_index = torch.where(attention_mask.bool(), pos, torch.full_like(pos, -1)).amax(dim=1).clamp(min=0)
    out = scores[torch.arange(scores.shape[0], device=scores.device), last_index]
    return out[:, 0] if out.dim() == 2 and out.shape[1] == 1 else out
