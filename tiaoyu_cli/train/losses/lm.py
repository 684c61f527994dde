"""Language-model losses: pure functions of logits (or hidden states and the head) and targets.

    cross_entropy         L = −(1/N) Σ_t log softmax(logits_t)[y_t]       over the N targets ≠ ignore_index
    linear_cross_entropy  the same loss of F.linear(hidden, W), without materialising the logits

Every stage that learns next tokens (pretrain, sft, distill's data term, evaluation) takes its loss from here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """The language-model loss of every stage: L = −(1/N) Σ_t log softmax(logits_t)[y_t] over the N positions
    whose target y_t ≠ ignore_index, in fp32 (reduction="sum": the sum instead of the mean)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction)


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
