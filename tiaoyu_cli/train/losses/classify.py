"""The classification loss: a pure function of label scores and labels.

    p(label | text) = softmax(score(h_last))
    L = −(1/B) Σ_b log p(y_b | text_b)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def classification_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L = −(1/B) Σ_b log softmax(scores_b)[labels_b]; scores [B, n_labels], labels [B] (fp32)."""
    return F.cross_entropy(scores.float(), labels)
