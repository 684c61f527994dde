"""Weight-only int8 (`--quantize int8`): the rounding bound, both matmul paths, the whole model's quality
cost on held-out text, and generation/serving with the quantized model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.model.quant import FUSED_MAX_ROWS, Int8Linear, quantize_model, quantize_weight, weight_bytes


def test_quantize_weight_rounds_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(48, 96) * torch.linspace(0.01, 3, 48)[:, None]  # rows of very different scales
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and s.shape == (48,)
    assert int(q.abs().max()) == 127  # each row uses the full range
    err = (q.float() * s[:, None] - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()


def test_both_matmul_paths_match_the_dequantized_weight():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 40, bias=False)
    q = Int8Linear(lin)
    w = q.dequantized()
    small = torch.randn(3, 64)  # decode-sized: fused int8 kernel (bf16 activations) when available
    big = torch.randn(FUSED_MAX_ROWS + 5, 64)  # prefill-sized: dequantize + fp32 matmul
    assert torch.allclose(q(big), F.linear(big, w), atol=1e-5)
    assert torch.allclose(q(small), F.linear(small, w), atol=0.05, rtol=0.02)
    # close to the original layer, not equal to it
    ref = lin(big)
    assert 0 < (q(big) - ref).abs().max() < 0.02 * ref.abs().max()
    assert q(torch.randn(2, 5, 64)).shape == (2, 5, 40)
    with pytest.raises(TiaoyuError, match="bias"):
        Int8Linear(torch.nn.Linear(4, 4, bias=True))


def test_quantized_model_keeps_its_quality(base_ckpt, synth_dir):
    from tiaoyu_cli.infer.generate import generate
    from tiaoyu_cli.checkpoint import load_model, load_tokenizer
    from tiaoyu_cli.evals.evaluate import EvalConfig, _records, evaluate, text_stream, text_metrics

    model, _ = load_model(base_ckpt)
    model.eval()
    q = quantize_model(copy.deepcopy(model), "int8")
    n_lin = sum(isinstance(m, Int8Linear) for m in q.modules())
    assert n_lin == model.config.n_layers * 7  # q k v o gate up down
    assert torch.equal(q.model.embed_tokens.weight, model.model.embed_tokens.weight)  # embeddings untouched
    assert weight_bytes(q) < 0.6 * weight_bytes(model)

    tok = load_tokenizer(base_ckpt)
    data = synth_dir / "text.val.jsonl"
    stream, _ = text_stream(_records(data, "text", 30), tok, data)
    with torch.inference_mode():
        a = text_metrics(model, stream, 0, 128, 16)["loss"]
        b = text_metrics(q, stream, 0, 128, 16)["loss"]
    assert a != b and abs(a - b) < 0.01  # a real change, and a small one

    # the CLI path: tiaoyu eval --quantize int8
    res = evaluate(base_ckpt, data, EvalConfig(limit=30, seq_len=128, quantize="int8"))
    assert res["loss"] == pytest.approx(b, abs=1e-6)

    # greedy generation (the one-token decode step calls the int8 layers) mostly agrees
    prompt = tok.encode("Tosi has a pet named", bos=True)
    x = generate(model, [prompt], 16, temperature=0, stop_ids=[])[0]
    y = generate(q, [prompt], 16, temperature=0, stop_ids=[])[0]
    assert len(y) == 16 and sum(i == j for i, j in zip(x, y)) >= 8

    with pytest.raises(TiaoyuError, match="choose none or int8"):
        quantize_model(copy.deepcopy(model), "int4")


def test_serve_loads_int8(base_ckpt):
    from tiaoyu_cli.serve.server import load_engine

    engine, name = load_engine(base_ckpt, device="cpu", quantize="int8")
    try:
        assert any(isinstance(m, Int8Linear) for m in engine.model.modules())
        assert name == "base"
    finally:
        engine.close()
