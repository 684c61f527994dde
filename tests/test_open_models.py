"""Open models: a Hugging Face causal-LM folder written by transformers' `save_pretrained` loads through
`load_model` as it is and computes what transformers computes (fp32 logits within 1e-4) — llama (RoPE
plain, linear, llama3, yarn; attention/MLP biases), mistral (sliding window), qwen2 (q/k/v biases),
qwen3 (q/k norms, explicit head_dim); bf16 and sharded weights; transformers 4.x config keys.
Every model is tiny, random and built here: nothing is downloaded."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from tiaoyu_cli.checkpoint import load_model, resolve_checkpoint
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.model import ModelConfig

transformers = pytest.importorskip("transformers")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=160, max_position_embeddings=64)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16, "rope_theta": 10000.0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "llama-tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "llama-bias": ("LlamaConfig", {"attention_bias": True, "mlp_bias": True}),
    "llama-linear": ("LlamaConfig", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}}),
    "llama3": ("LlamaConfig", {"rope_parameters": LLAMA3}),
    "llama-yarn": ("LlamaConfig", {"rope_parameters": YARN}),
    "mistral": ("MistralConfig", {"sliding_window": 7}),
    "qwen2": ("Qwen2Config", {}),
    "qwen2-tied": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),  # head_dim ≠ hidden / heads (16)
    # experts in mlp.*: a gated shared expert, plain top-k weights, a dense layer; and renormalised top-k with q/k norms
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                     "shared_expert_intermediate_size": 48, "norm_topk_prob": False,
                                     "mlp_only_layers": [1]}),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                     "head_dim": 16, "norm_topk_prob": True}),
}


def spread(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights with spread-out logits (transformers' init gives near-zero ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return model


def hf_model(family: str, **over):
    cls_name, kw = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**{**SIZES, **kw, **over})
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return spread(model).eval()


def save_hf(family: str, folder, dtype=torch.float32, **save_kw):
    model = hf_model(family)
    model.to(dtype).save_pretrained(folder, **save_kw)
    return folder


def load_hf(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


IDS = torch.tensor([[1, 17, 33, 8, 99, 120, 45, 61, 7, 12, 150, 3, 77, 5, 42, 9, 11, 130, 64, 2]])


def assert_same_logits(folder, ids=IDS):
    ours, _ = load_model(folder)
    ours.eval()
    theirs = load_hf(folder)
    with torch.no_grad():
        a = ours(ids).logits
        b = theirs(ids).logits
    assert a.shape == b.shape
    assert a.std() > 0.1  # not a comparison of near-zero logits
    assert (a - b).abs().max().item() < 1e-4
    return ours, theirs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_logits_match_transformers(family, tmp_path):
    folder = save_hf(family, tmp_path / family)
    ours, theirs = assert_same_logits(folder)
    cfg = ours.config
    assert cfg.family == theirs.config.model_type
    assert cfg.head_dim == theirs.config.head_dim if hasattr(theirs.config, "head_dim") else True
    assert cfg.tie_embeddings == bool(theirs.config.tie_word_embeddings)


def test_switches_read_from_config(tmp_path):
    """Each family's differences become the model's switches (and the tensors are really there)."""
    cases = {
        "qwen2": dict(qkv_bias=True, o_bias=False, qk_norm=False),
        "qwen3": dict(qkv_bias=False, qk_norm=True, head_size=32),
        "llama-bias": dict(qkv_bias=True, o_bias=True, mlp_bias=True),
        "mistral": dict(sliding_window=7),
        "llama3": dict(rope_scaling={k: v for k, v in LLAMA3.items() if k != "rope_theta"}),
    }
    for family, want in cases.items():
        ours, _ = load_model(save_hf(family, tmp_path / family))
        for k, v in want.items():
            assert getattr(ours.config, k) == v, (family, k)
    names = dict(ours.named_parameters())
    assert "model.layers.0.self_attn.q_proj.bias" not in names  # llama3: none
    qwen3, _ = load_model(tmp_path / "qwen3")
    assert qwen3.model.layers[0].self_attn.q_norm.weight.shape == (32,)


def test_qwen_moe_layout(tmp_path):
    """Which layers hold experts, and under which names, follow the config (mlp_only_layers, shared expert)."""
    from tiaoyu_cli.model.moe import SparseMoE, SwiGLU

    ours, _ = load_model(save_hf("qwen2_moe", tmp_path / "q2m"))
    blocks = ours.model.layers
    assert isinstance(blocks[0].mlp, SparseMoE) and type(blocks[1].mlp) is SwiGLU
    assert blocks[0].mlp.shared_expert.gate_proj.weight.shape == (48, 64)
    assert blocks[0].mlp.experts[3].down_proj.weight.shape == (64, 32)
    assert ours.config.norm_topk_prob is False and ours.config.dense_layers == [1]
    ours.train()
    out = ours(IDS)
    assert out.aux_loss is not None and out.aux_loss.item() > 0  # the load-balancing loss trains the router


def test_bf16_weights_load_as_fp32(tmp_path):
    folder = save_hf("qwen2", tmp_path / "bf16", dtype=torch.bfloat16)
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
    ours, _ = assert_same_logits(folder)  # transformers upcasts the same bf16 values
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    kept, _ = load_model(folder, dtype=None)  # asked: the file's dtype
    assert all(p.dtype == torch.bfloat16 for p in kept.parameters())


def test_sharded_weights(tmp_path):
    folder = save_hf("llama", tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").exists()
    assert not (folder / "model.safetensors").exists()
    assert resolve_checkpoint(folder) == folder
    assert_same_logits(folder)
    (folder / shards[-1]).unlink()
    with pytest.raises(TiaoyuError, match=shards[-1]):
        load_model(folder)


def test_transformers_4_config_keys(tmp_path):
    """A config.json of the transformers 4.x era: rope_theta and rope_scaling (with "type"), no rope_parameters,
    keys at their defaults left out."""
    folder = save_hf("llama-linear", tmp_path / "v4")
    d = json.loads((folder / "config.json").read_text())
    d.pop("rope_parameters")
    d["rope_theta"] = 500.0
    d["rope_scaling"] = {"type": "linear", "factor": 2.0}
    for k in ("tie_word_embeddings", "rms_norm_eps", "head_dim", "attention_bias", "mlp_bias"):
        d.pop(k, None)
    (folder / "config.json").write_text(json.dumps(d))
    ours, _ = assert_same_logits(folder)
    assert ours.config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert ours.config.rope_theta == 500.0 and ours.config.tie_embeddings is False


def test_llama3_rope_4x_keys_read_like_5x():
    a = ModelConfig.from_hf_dict({"model_type": "llama", **_sizes(), "rope_theta": 500000.0,
                                  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 8192}})
    b = ModelConfig.from_hf_dict({"model_type": "llama", **_sizes(),
                                  "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "rope_theta": 500000.0,
                                                      "original_max_position_embeddings": 8192}})
    assert a == b and a.rope_theta == 500000.0 and a.rope_scaling["rope_type"] == "llama3"


def _sizes() -> dict:
    return {k: v for k, v in SIZES.items()}


def test_sliding_window_matters_and_matches(tmp_path):
    """Past the window the mistral logits differ from full attention, and still equal transformers'."""
    folder = save_hf("mistral", tmp_path / "mistral")
    ours, _ = assert_same_logits(folder)
    full, _ = load_model(folder, config_overrides={"sliding_window": 0})
    with torch.no_grad():
        a, b = ours(IDS).logits, full(IDS).logits
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-5)  # within the window: the same
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3


def test_left_padding_and_cache_match_transformers(tmp_path):
    """Rows of different lengths (left padding) and a KV-cached continuation, on a biased, q/k-normed model."""
    from tiaoyu_cli.model.kv_cache import KVCache

    folder = save_hf("qwen3", tmp_path / "q3")
    ours, _ = load_model(folder)
    theirs = load_hf(folder)
    rows = [[5, 17, 33, 8, 99, 120, 45, 61], [9, 140, 8], [2, 55, 66, 77, 88]]
    L = max(map(len, rows))
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, L - len(r):] = torch.tensor(r)
        mask[b, L - len(r):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours.eval()(ids, attention_mask=mask).logits
        b = theirs(ids, attention_mask=mask, position_ids=pos).logits
        assert (a[mask.bool()] - b[mask.bool()]).abs().max() < 1e-4
        cache = KVCache.for_model(ours, 1, 32)
        first = ours(IDS[:, :12], kv_cache=cache).logits
        rest = ours(IDS[:, 12:], kv_cache=cache).logits
        whole = theirs(IDS).logits
    assert (torch.cat([first, rest], 1) - whole).abs().max() < 1e-4


def test_unsupported_model_type_is_one_clear_error(tmp_path):
    d = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 10, "n_embd": 8}
    with pytest.raises(TiaoyuError, match="gpt2.*llama, mistral, qwen2, qwen3"):
        ModelConfig.from_hf_dict(d)
    with pytest.raises(TiaoyuError, match="rope type 'longrope'"):
        ModelConfig.from_hf_dict({"model_type": "llama", **_sizes(),
                                  "rope_scaling": {"type": "longrope", "factor": 2.0}})


def test_own_configs_unchanged():
    """tiaoyu's own config.json (with its "tiaoyu" key) reads exactly as before: no family, no switches."""
    cfg = ModelConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96)
    d = cfg.to_hf_dict()
    back = ModelConfig.from_hf_dict(d)
    assert back == cfg and back.family == "" and back.to_hf_dict() == d
    assert "hf_config" not in json.dumps(d) and "head_size" not in json.dumps(d)


# ---- generation: the fast decode steps where they apply, the model's own forward where they do not ----

DECODE = ["llama3", "llama-yarn", "llama-bias", "qwen2", "qwen3", "mistral", "qwen2_moe"]
PROMPTS = [[1, 17, 33, 8, 99, 120, 45, 61, 7, 12], [1, 140, 8], [1, 55, 66, 77, 88, 10]]


def _hf_greedy(model, rows, n, stops):
    L = max(map(len, rows))
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, L - len(r):] = torch.tensor(r)
        mask[b, L - len(r):] = 1
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=stops,
                             pad_token_id=0)
    return [out[b, L:].tolist() for b in range(len(rows))]


@pytest.mark.parametrize("family", DECODE)
def test_greedy_generate_matches_transformers(family, tmp_path):
    from tiaoyu_cli.infer.fast.numpy_step import NumpyStep
    from tiaoyu_cli.infer.fast.torch_step import OneTokenStep
    from tiaoyu_cli.infer.generate import generate

    folder = save_hf(family, tmp_path / family)
    ours, _ = load_model(folder)
    ours.eval()
    theirs = load_hf(folder)
    stops = [3]
    for rows in (PROMPTS, PROMPTS[:1]):  # a padded batch, and one row (the compiled one-row step where it runs)
        fast = generate(ours, rows, 14, temperature=0, stop_ids=stops)
        slow = generate(ours, rows, 14, temperature=0, stop_ids=stops, use_cache=False)
        assert fast == slow
        for toks, hf in zip(fast, _hf_greedy(theirs, rows, 14, stops)):
            assert hf[:len(toks)] == toks
    cfg = ours.config
    # which step decoded: q/k norms and sliding windows use the model's forward; biases skip the numpy step
    assert OneTokenStep.supports(ours) == (not cfg.qk_norm and not cfg.sliding_window)
    numpy_ok = NumpyStep.prepare(ours, torch.device("cpu"), True) is not None
    assert numpy_ok == (OneTokenStep.supports(ours) and not (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias
                                                             or cfg.is_moe))


def test_one_token_step_with_scaled_rope_and_biases(tmp_path):
    """The torch decode step (what CUDA and batched CPU decoding run) on llama3 RoPE + biases equals the forward."""
    from tiaoyu_cli.infer.fast.torch_step import OneTokenStep
    from tiaoyu_cli.model.kv_cache import KVCache

    ours, _ = load_model(save_hf("llama-bias", tmp_path / "b"))
    ours.config = ours.config.replace(rope_scaling={k: v for k, v in LLAMA3.items() if k != "rope_theta"})
    ours.eval()
    ids = IDS[:, :12]
    with torch.no_grad():
        cache = KVCache.for_model(ours, 1, 16)
        ours(ids[:, :8], kv_cache=cache)
        step = OneTokenStep(ours, cache, torch.tensor([8]))
        got = torch.stack([step(ids[:, t]) for t in range(8, 12)], 1)
        want = ours(ids).logits[:, 8:12]
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["llama-bias", "llama3", "qwen3"])
def test_continuous_batching_slots(family, tmp_path):
    """The serve path's slot cache: biases (torch slot step) and llama3 RoPE (numpy step) decode like the full
    forward; q/k-normed models are refused by SlotBatch (the server then decodes through model.forward)."""
    from tiaoyu_cli.infer.slots import SlotBatch

    ours, _ = load_model(save_hf(family, tmp_path / family))
    ours.eval()
    if ours.config.qk_norm:
        with pytest.raises(TypeError):
            SlotBatch(ours, 2, 32)
        return
    rows = [[1, 17, 33, 8, 99], [1, 140, 8]]
    nxt = [[120, 45, 61], [7, 12, 150]]
    with torch.inference_mode():
        slots = SlotBatch(ours, 2, 32)
        first = slots.prefill_many(rows)
        steps = [slots.step([nxt[0][t], nxt[1][t]]) for t in range(3)]
        for b in range(2):
            full = ours(torch.tensor([rows[b] + nxt[b]])).logits[0]
            got = torch.stack([first[b]] + [s[b] for s in steps])
            assert (got - full[len(rows[b]) - 1:]).abs().max() < 1e-4


def test_mixtral_folder_reads_as_tiaoyus_moe(tmp_path):
    """A transformers Mixtral folder is tiaoyu's own MoE layout: it loads as it is, with the same logits."""
    cfg = transformers.MixtralConfig(**SIZES, num_local_experts=4, num_experts_per_tok=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = spread(transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)).eval()
    model.save_pretrained(tmp_path / "mixtral")
    ours, _ = assert_same_logits(tmp_path / "mixtral")
    assert ours.config.n_experts == 4 and ours.config.n_experts_per_tok == 2


def test_sequence_classification_on_a_family(tmp_path):
    """A reward model / classifier made from an open family writes transformers' XForSequenceClassification
    config, which transformers loads with the same scores."""
    from tiaoyu_cli.checkpoint import write_model_folder
    from tiaoyu_cli.model import Transformer

    ours, _ = load_model(save_hf("qwen3", tmp_path / "q3"))
    cfg = ours.config.replace(num_labels=2, id2label={"0": "bad", "1": "good"})
    clf = Transformer(cfg).eval()
    sd = ours.state_dict()
    clf.load_state_dict(sd, strict=False)
    torch.nn.init.normal_(clf.score.weight, std=0.5)
    (tmp_path / "clf").mkdir()
    write_model_folder(tmp_path / "clf", cfg, clf.state_dict(), None)
    d = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert d["architectures"] == ["Qwen3ForSequenceClassification"] and d["id2label"] == {"0": "bad", "1": "good"}
    back, _ = load_model(tmp_path / "clf")
    assert back.config.num_labels == 2 and back.config.family == "qwen3"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf", dtype=torch.float32)
    ids = IDS[:, :9]
    with torch.no_grad():
        mine = back(ids).scores[:, -1]
        theirs = hf.eval()(ids).logits
    assert (mine - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2-tied", "qwen3", "qwen2_moe", "qwen3_moe"])
def test_written_folder_keeps_the_family(family, tmp_path):
    """Our writer on an open family: config.json as the source had it, loaded by transformers as the same class."""
    from tiaoyu_cli.checkpoint import write_model_folder

    src = save_hf(family, tmp_path / "src")
    ours, _ = load_model(src)
    (tmp_path / "out").mkdir()
    write_model_folder(tmp_path / "out", ours.config, ours.state_dict(), None)
    a, b = (json.loads((d / "config.json").read_text()) for d in (src, tmp_path / "out"))
    assert {k: v for k, v in a.items() if k != "dtype"} == {k: v for k, v in b.items() if k != "dtype"}
    assert_same_logits(tmp_path / "out")
