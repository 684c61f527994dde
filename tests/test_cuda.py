"""GPU paths, run only where CUDA is (`pytest -m cuda`; benchmarks/gpu_check.sh runs them on a lent GPU).

Each compares the GPU against a reference computed another way: the CPU's logits, the
cache-free decoder, a bf16 training run whose loss has to fall and whose saved weights stay fp32.
"""

from __future__ import annotations

import pytest
import torch

from pretrain_data import assets, run_cli, train_losses
from tiaoyu_cli.checkpoint import load_tensors, resolve_checkpoint
from tiaoyu_cli.infer.generate import generate
from tiaoyu_cli.model import Transformer, preset

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=512, dim=64, n_layers=2, ffn_dim=128)).eval()


def test_logits_on_gpu_match_cpu():
    model = tiny_model()
    ids = torch.randint(8, 512, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cpu = model(ids).logits
        gpu = model.cuda()(ids.cuda()).logits.cpu()
    assert torch.allclose(cpu, gpu, atol=2e-3, rtol=1e-3), (cpu - gpu).abs().max()


def test_kv_cache_decode_on_gpu_matches_recompute():
    model = tiny_model().cuda()
    prompts = [[1, 20, 30, 40], [1, 50], [1, 60, 70]]  # left padding in the batch
    kw = dict(temperature=0, stop_ids=[])
    with_cache = generate(model, prompts, 24, **kw)
    without = generate(model, prompts, 24, use_cache=False, **kw)
    assert with_cache == without
    assert all(len(t) == 24 for t in with_cache)


def test_pretrain_bf16_on_gpu(tmp_path):
    out = tmp_path / "run"
    r = run_cli("pretrain", assets() / "tokens", "-o", out, "--preset", "tiny", "--model", "dim=64", "--model",
                "n_layers=2", "--seq-len", "64", "--batch-size", "16", "--max-steps", "60", "--log-every", "5",
                "--device", "cuda", "--dtype", "bf16", "--eval-every", "0", "--save-every", "60")
    assert r.returncode == 0, r.stderr
    losses = train_losses(out)
    assert losses[60] < losses[5] - 0.5, losses
    saved = load_tensors(resolve_checkpoint(out / "latest") / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}  # fp32 master weights, not bf16 copies
