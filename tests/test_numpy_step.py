"""The numpy decode step (infer/fast/numpy_step.py) computes what the model's forward pass computes.

Reference: `Transformer.forward` with the KV cache (and without it), on the same weights — logits of
the prompt (left-padded batch) and of every decode step, tokens and log-probs of whole generations.
"""

from __future__ import annotations

import pytest
import torch

from tiaoyu_cli.infer.generate import generate_detailed
from tiaoyu_cli.infer.fast import kernel
from tiaoyu_cli.infer.fast.kernel import c_kernel
from tiaoyu_cli.infer.fast.numpy_step import NumpyStep
from tiaoyu_cli.infer.fast.weights import prepared_weights
from tiaoyu_cli.infer.sampling import SamplingParams
from tiaoyu_cli.model import Transformer
from tiaoyu_cli.model.kv_cache import KVCache
from tiaoyu_cli.model.lora import LoraConfig, apply_lora

from decode_models import V, small_model

CPU = torch.device("cpu")


def make(seed: int = 0, std: float = 0.25, **kw) -> Transformer:
    return small_model(seed, std, norms=True, **kw)  # norm weights not all ones: their folding is checked


def reference_logits(m: Transformer, rows: list[list[int]]) -> list[torch.Tensor]:
    """Logits [T, V] of each row alone through the model's forward pass (no cache)."""
    with torch.no_grad():
        return [m(torch.tensor([r])).logits[0] for r in rows]


@pytest.fixture(params=["c", "numpy"])
def one_row(request, monkeypatch):
    """One row runs the compiled step (decode_kernel.c) when a C compiler built it, else `_one_row`."""
    if request.param == "c":
        if c_kernel() is None:
            pytest.skip("no C compiler here: the compiled step is not built")
    else:
        monkeypatch.setitem(kernel._C, "fn", None)
        monkeypatch.setitem(kernel._C, "tried", True)
    return request.param


@pytest.mark.parametrize("rows", [3, 1])  # a padded batch; one row (its own loop, or the compiled step)
@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 1}, {"n_kv_heads": 4}, {"tie_embeddings": False}])
def test_prefill_and_steps_equal_the_forward_pass(kw, rows, one_row):
    m = make(**kw)
    prompts = [[2, 50, 60, 70, 80, 90, 9], [2, 10, 11, 12, 13], [2, 40]][:rows]
    follow = [[44, 45, 46, 47], [7, 8, 9, 21], [33, 34, 35, 36]][:rows]  # tokens fed one step at a time
    B, L = rows, max(len(p) for p in prompts)
    ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for b, p in enumerate(prompts):  # left padding, as generate does
        ids[b, L - len(p):] = torch.tensor(p)
        mask[b, L - len(p):] = 1
    prep = NumpyStep.prepare(m, CPU, True)
    assert prep is not None
    with torch.inference_mode():
        cache = KVCache.for_model(m, B, L + 4)
        step = NumpyStep(m, cache, mask.sum(-1), prep)
        got = [step.prefill(ids, mask)]
        for t in range(4):
            got.append(step(torch.tensor([f[t] for f in follow])))
    refs = reference_logits(m, [p + f for p, f in zip(prompts, follow)])
    for b, p in enumerate(prompts):
        for t in range(5):
            want = refs[b][len(p) - 1 + t]
            assert torch.allclose(got[t][b], want, atol=2e-5, rtol=1e-4), (b, t, (got[t][b] - want).abs().max())


def test_rows_dropping_out_keep_their_cache():
    m = make()
    prompts = [[2, 10, 11, 12, 13], [2, 40], [2, 50, 60, 70, 80, 90, 9], [2, 33, 34]]
    stops = (3, 5, 17, 29)  # frequent stops: rows leave the batch at different steps (KVCache.select)
    fast = generate_detailed(m, prompts, 24, SamplingParams(0), stops, logprobs="model")
    plain = generate_detailed(m, prompts, 24, SamplingParams(0), stops, logprobs="model", fast_decode=False)
    assert fast.tokens == plain.tokens
    assert len({len(t) for t in fast.tokens}) > 1  # rows did stop at different steps
    assert max(abs(a - b) for x, y in zip(fast.logprobs, plain.logprobs) for a, b in zip(x, y)) < 1e-4


def test_huge_attention_scores_fall_back_to_the_row_max(one_row):
    """The step shifts scores by the query's own key score (one call less than the row max); a key scoring
    > 88 above it overflows exp to inf — the step sees the non-finite logits and redoes itself with the max."""
    m = make(std=0.25)
    with torch.no_grad():
        for b in m.model.layers:
            b.self_attn.q_proj.weight.mul_(60.0)
            b.self_attn.k_proj.weight.mul_(60.0)  # scores in the thousands
    prompt = [2, 10, 11, 12, 13, 14, 15]
    with torch.inference_mode():
        cache = KVCache.for_model(m, 1, 12)
        step = NumpyStep(m, cache, torch.tensor([len(prompt)]))
        step.prefill(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long))
        feed = [20, 21, 22, 23]
        got = [step(torch.tensor([t])) for t in feed]
    ref = reference_logits(m, [prompt + feed])[0]
    for t in range(4):
        assert torch.isfinite(got[t]).all()
        assert torch.allclose(got[t][0], ref[len(prompt) + t], atol=1e-3, rtol=1e-3)


def test_only_plain_fp32_rope_models_on_cpu():
    assert NumpyStep.prepare(make(), CPU, True) is not None
    assert NumpyStep.prepare(make(), CPU, False) is None  # autocast
    assert NumpyStep.prepare(make(), torch.device("meta"), True) is None  # not a CPU
    assert NumpyStep.prepare(make(position="learned"), CPU, True) is None
    assert NumpyStep.prepare(make(n_experts=4, n_experts_per_tok=2), CPU, True) is None
    assert NumpyStep.prepare(make().to(torch.bfloat16), CPU, True) is None
    lora = make()
    apply_lora(lora, LoraConfig(rank=4, targets=["q", "v"], dropout=0.0))
    assert NumpyStep.prepare(lora, CPU, True) is None


def test_prepared_weights_follow_the_model():
    m = make()
    a = prepared_weights(m)
    assert prepared_weights(m) is a  # cached
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight.mul_(2.0)
    b = prepared_weights(m)
    assert b is not a
    m.weights_version = 7  # the Trainer's bump after an optimizer step
    assert prepared_weights(m) is not b


def test_when_the_numpy_step_runs_and_on_how_many_blas_threads():
    """One row: numpy, BLAS on torch's threads; several: numpy on one BLAS thread only for narrow models at
    one torch thread or ≤ 4 rows (the measured crossovers), else torch."""
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads() -> set[int]:
        return {i["num_threads"] for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"}

    before = torch.get_num_threads()
    narrow, wide = make(), make(dim=320, n_heads=4, n_kv_heads=2)
    try:
        torch.set_num_threads(2)
        generate_detailed(narrow, [[2, 10, 11]], 3, SamplingParams(0), [])
        assert blas_threads() == {2}
        generate_detailed(narrow, [[2, 10, 11], [2, 12]], 3, SamplingParams(0), [])
        assert blas_threads() == {1}
        assert NumpyStep.prepare(wide, CPU, True, 1) is not None
        assert NumpyStep.prepare(wide, CPU, True, 2) is None
        assert NumpyStep.prepare(narrow, CPU, True, 4) is not None
        assert NumpyStep.prepare(narrow, CPU, True, 16) is None  # torch's two threads win there
        torch.set_num_threads(1)
        assert NumpyStep.prepare(narrow, CPU, True, 64) is not None
        assert NumpyStep.prepare(wide, CPU, True, 4) is None
    finally:
        torch.set_num_threads(before)


def test_compiled_step_matches_and_a_missing_compiler_falls_back(tmp_path, monkeypatch):
    """With the C step: the same tokens and log-probs as the forward pass over a long answer. Without a
    compiler (CC pointing nowhere, nothing cached): c_kernel() is None and generation still works."""
    m = make()
    plain = generate_detailed(m, [[2, 10, 11, 12]], 40, SamplingParams(0), [], logprobs="model", fast_decode=False)
    if c_kernel() is not None:
        got = generate_detailed(m, [[2, 10, 11, 12]], 40, SamplingParams(0), [], logprobs="model")
        assert got.tokens == plain.tokens
        assert max(abs(a - b) for a, b in zip(got.logprobs[0], plain.logprobs[0])) < 1e-4
    monkeypatch.setitem(kernel._C, "tried", False)
    monkeypatch.setitem(kernel._C, "fn", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(kernel.shutil, "which", lambda name: None)
    assert c_kernel() is None
    assert not any(tmp_path.rglob("*.so"))
    again = generate_detailed(m, [[2, 10, 11, 12]], 40, SamplingParams(0), [], logprobs="model")
    assert again.tokens == plain.tokens


def test_a_failed_build_leaves_no_file_and_falls_back(tmp_path, monkeypatch):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'cc: error' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setitem(kernel._C, "tried", False)
    monkeypatch.setitem(kernel._C, "fn", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(fake))
    assert c_kernel() is None
    assert list((tmp_path / "cache" / "tiaoyu").iterdir()) == []  # the half-built file is gone
    monkeypatch.setitem(kernel._C, "tried", False)
    monkeypatch.setenv("TIAOYU_C_KERNEL", "0")
    monkeypatch.delenv("CC")
    assert c_kernel() is None  # switched off
