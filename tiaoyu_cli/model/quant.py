"""Weight-only int8 quantization of the transformer's Linear layers, for inference on CPU.

    model = quantize_model(model, "int8")      # tiaoyu chat/serve/eval … --quantize int8

Each weight matrix W [out, in] is stored as int8 with one fp32 scale per output row
(symmetric, per-channel):

    s_o = max_i |W_oi| / 127          q_oi = round(W_oi / s_o) ∈ [−127, 127]          W ≈ q · s

so the stored weights take a quarter of the memory, and the rounding error of each weight is
at most s_o / 2. Activations stay in floating point ("weight-only"):

* decode steps (a few rows at a time, where reading the weights dominates) run PyTorch's fused
  CPU kernel `aten._weight_int8pack_mm`, which reads the int8 matrix directly; it takes bf16
  activations, so those rows are computed in bf16 (the rounding is part of the measured cost);
* longer inputs (a prompt's prefill, evaluation) dequantize the matrix and multiply in the
  input's dtype — the same numbers, no speed gain.

Quantized: the attention and feed-forward projections of every block (q/k/v/o, gate/up/down,
the experts' w1/w2/w3). Kept in full precision: embeddings and the (tied) output head, the
norms, the MoE router and any score head — small, and where rounding would hurt most.
`benchmarks/bench_quant.py` measures the val loss before/after and the decode speed side by side.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from tiaoyu_cli.errors import TiaoyuError

QUANT_MODES = ("none", "int8")
FUSED_MAX_ROWS = 16  # up to this many rows per call use the fused int8 kernel


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row symmetric int8: W [out, in] → (q int8 [out, in], s fp32 [out]) with W ≈ q · s[:, None]."""
    w = w.detach().float()
    s = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
    return q, s


@functools.lru_cache(maxsize=1)
def fused_kernel_available() -> bool:
    """True when this PyTorch build has the CPU weight-only int8 matmul (and it computes what it should)."""
    op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    if op is None:
        return False
    try:
        x = torch.randn(2, 64, dtype=torch.bfloat16)
        q = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
        s = torch.rand(32, dtype=torch.bfloat16)
        ref = x.float() @ (q.float() * s.float()[:, None]).T
        return bool(torch.allclose(op(x, q, s).float(), ref, rtol=0.05, atol=0.05))
    except (RuntimeError, NotImplementedError):
        return False


class Int8Linear(nn.Module):
    """A bias-free Linear whose weight is int8 with per-row scales: y = x · (q · s)ᵀ."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise TiaoyuError("int8 quantization supports bias-free Linear layers only")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, s = quantize_weight(linear.weight)
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scale", s)
        self.register_buffer("scale_bf16", s.to(torch.bfloat16))
        self.fused = fused_kernel_available()

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the int8 values stand for, W ≈ q · s: [out, in]."""
        return self.qweight.to(dtype) * self.scale[:, None].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.fused and x2.shape[0] <= FUSED_MAX_ROWS and x2.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.qweight,
                                                   self.scale_bf16).to(x.dtype)
        else:
            y = F.linear(x2, self.dequantized(x2.dtype))
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, fused={self.fused}"


def quantizable(name: str, module: nn.Module) -> bool:
    """The Linear layers inside the blocks, except the MoE routers (`…block_sparse_moe.gate`, Qwen-MoE's
    `…mlp.gate` and `…mlp.shared_expert_gate`)."""
    return (type(module) is nn.Linear and name.startswith("model.layers.") and module.bias is None
            and not name.endswith(("block_sparse_moe.gate", "mlp.gate", "shared_expert_gate")))


def quantize_model(model: nn.Module, mode: str = "int8") -> nn.Module:
    """Replace the block Linear layers by Int8Linear in place (inference only; CPU). Returns the model."""
    if mode == "none":
        return model
    if mode != "int8":
        raise TiaoyuError(f"--quantize {mode!r}: choose none or int8")
    dev = next(model.parameters()).device
    if dev.type != "cpu":
        raise TiaoyuError(f"--quantize int8 is weight-only quantization for CPU inference; the model is on {dev} "
                          "(use --device cpu, or drop --quantize on a GPU)")
    from tiaoyu_cli.model.lora import lora_modules, merge_lora

    if lora_modules(model):  # a LoRA adapter on top: fold it in, so the int8 weights hold W + (α/r)·B·A
        merge_lora(model)
    targets = [(n, m) for n, m in model.named_modules() if quantizable(n, m)]
    if not targets:
        raise TiaoyuError("--quantize int8: this model has no Linear layers to quantize")
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, Int8Linear(lin))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.quantization = mode
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and persistent buffers (what the model holds in memory)."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    return n + sum(b.numel() * b.element_size() for b in model.buffers())
