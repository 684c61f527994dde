"""`tiaoyu export --format gguf` of Hugging Face folders (tiny random llama 3, qwen2 and qwen3 models with byte-level
BPE tokenizers, built here): llama.cpp's architecture names, tensor names and shapes, the tokenizer as a "gpt2" BPE
vocabulary with its merges, special ids and the folder's template, read back with gguf.GGUFReader. A forward pass
over the file's tensors as llama.cpp computes it (adjacent-pair RoPE for "llama" with its rope_freqs, NeoX RoPE for
qwen2/qwen3) gives transformers' logits. Where llama-cpp-python is installed, llama.cpp's own logits are compared too."""

from __future__ import annotations

import json
import math
import sys
import warnings

import numpy as np
import pytest
import torch

from test_export import read_gguf
from test_open_chat import make_folder
from tiaoyu_cli.checkpoint import load_model, load_tokenizer

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

ARCH = {"llama3": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
TEXT = "What is 12 + 7? It is 19. 你好！"


def export(folder, out, *extra):
    from tiaoyu_cli.cli.main import main

    try:
        main(["export", str(folder), "--format", "gguf", "-o", str(out), *extra])
    except SystemExit as e:
        assert e.code in (0, None)


def hf_logits(folder, ids: list[int]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def gguf_forward(field, t, ids: list[int]) -> np.ndarray:
    """Logits over the file's tensors the way llama.cpp's llama/qwen2/qwen3 graphs compute them (float64)."""
    arch = field("general.architecture")
    t = {k: v.astype(np.float64) for k, (_, v) in t.items()}
    n_head, n_kv = field(f"{arch}.attention.head_count"), field(f"{arch}.attention.head_count_kv")
    hd, eps = field(f"{arch}.attention.key_length"), field(f"{arch}.attention.layer_norm_rms_epsilon")
    theta = field(f"{arch}.rope.freq_base")
    freq = theta ** (-np.arange(0, hd, 2) / hd) / t.get("rope_freqs.weight", 1.0)
    T = len(ids)
    ang = np.arange(T)[:, None] * freq[None]  # [T, hd/2]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]

    def rope(x):  # [T, h, hd]
        if arch == "llama":  # adjacent pairs (2i, 2i+1)
            a, b = x[..., 0::2], x[..., 1::2]
            return np.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(x.shape)
        a, b = x[..., :hd // 2], x[..., hd // 2:]  # NeoX: the two halves
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)

    x = t["token_embd.weight"][ids]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(field(f"{arch}.block_count")):
        b = f"blk.{i}."
        h = rms(x, t[b + "attn_norm.weight"], eps)
        q, k, v = (h @ t[b + f"attn_{n}.weight"].T + t.get(b + f"attn_{n}.bias", 0.0) for n in "qkv")
        q, k, v = q.reshape(T, n_head, hd), k.reshape(T, n_kv, hd), v.reshape(T, n_kv, hd)
        if b + "attn_q_norm.weight" in t:
            q, k = rms(q, t[b + "attn_q_norm.weight"], eps), rms(k, t[b + "attn_k_norm.weight"], eps)
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, n_head // n_kv, 1), np.repeat(v, n_head // n_kv, 1)
        s = np.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", p, v).reshape(T, n_head * hd)
        x = x + o @ t[b + "attn_output.weight"].T + t.get(b + "attn_output.bias", 0.0)
        h = rms(x, t[b + "ffn_norm.weight"], eps)
        if b + "ffn_gate_inp.weight" in t:
            x = x + moe(field, t, b, arch, h)
        else:
            g, u = h @ t[b + "ffn_gate.weight"].T, h @ t[b + "ffn_up.weight"].T
            x = x + (g / (1 + np.exp(-g)) * u) @ t[b + "ffn_down.weight"].T
    x = rms(x, t["output_norm.weight"], eps)
    return x @ t.get("output.weight", t["token_embd.weight"]).T


# llama.cpp's MoE graphs: softmax router, top-k experts; qwen3moe (and llama's Mixtral) renormalise the top-k
# weights, qwen2moe does not and adds a shared expert scaled by sigmoid(x · ffn_gate_inp_shexp)
MOE_NORM = {"qwen2moe": False, "qwen3moe": True, "llama": True}


def moe(field, t, b, arch, h):
    silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
    r = h @ t[b + "ffn_gate_inp.weight"].T  # [T, E]
    p = np.exp(r - r.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    k = field(f"{arch}.expert_used_count")
    idx = np.argsort(-p, -1, kind="stable")[:, :k]
    w = np.take_along_axis(p, idx, -1)
    if MOE_NORM[arch]:
        w = w / w.sum(-1, keepdims=True)
    out = np.zeros_like(h)
    for i in range(h.shape[0]):
        for j, e in enumerate(idx[i]):
            g, u = t[b + "ffn_gate_exps.weight"][e] @ h[i], t[b + "ffn_up_exps.weight"][e] @ h[i]
            out[i] += w[i, j] * (t[b + "ffn_down_exps.weight"][e] @ (silu(g) * u))
    if b + "ffn_gate_inp_shexp.weight" in t:
        gate = 1 / (1 + np.exp(-(h @ t[b + "ffn_gate_inp_shexp.weight"].reshape(-1))))
        g, u = h @ t[b + "ffn_gate_shexp.weight"].T, h @ t[b + "ffn_up_shexp.weight"].T
        out += gate[:, None] * ((silu(g) * u) @ t[b + "ffn_down_shexp.weight"].T)
    return out


MOE = {"qwen2_moe": ("Qwen2MoeConfig", {"shared_expert_intermediate_size": 48, "norm_topk_prob": False}),
       "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": 32, "norm_topk_prob": True})}


def moe_folder(kind: str, folder):
    from hf_tokenizers import make_qwen_tokenizer
    from test_open_chat import SIZES, spread

    cls_name, kw = MOE[kind]
    cfg = getattr(transformers, cls_name)(**{**SIZES, "num_experts": 4, "num_experts_per_tok": 2,
                                             "moe_intermediate_size": 32, **kw})
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = spread(transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), seed=1).eval()
    model.save_pretrained(folder)
    make_qwen_tokenizer(folder)
    return folder


@pytest.mark.parametrize("kind", list(MOE))
def test_gguf_of_an_open_moe_folder(kind, tmp_path):
    """Qwen2-MoE / Qwen3-MoE folders: llama.cpp's qwen2moe / qwen3moe, experts stacked, qwen2moe's shared expert and
    its gate; the file computes transformers' logits the way those graphs mix the experts."""
    src = moe_folder(kind, tmp_path / kind)
    out = tmp_path / f"{kind}.gguf"
    export(src, out)
    field, tensors = read_gguf(out)
    arch = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}[kind]
    assert field("general.architecture") == arch
    assert field(f"{arch}.expert_count") == 4 and field(f"{arch}.expert_used_count") == 2
    assert field(f"{arch}.expert_feed_forward_length") == 32
    assert tensors["blk.0.ffn_gate_exps.weight"][1].shape == (4, 32, 64)
    assert tensors["blk.0.ffn_down_exps.weight"][1].shape == (4, 64, 32)
    assert ("blk.1.ffn_gate_inp_shexp.weight" in tensors) == (kind == "qwen2_moe")
    if kind == "qwen2_moe":
        assert field(f"{arch}.expert_shared_feed_forward_length") == 48
    tok = load_tokenizer(src)
    ids = tok.encode(TEXT, bos=True)
    got, want = gguf_forward(field, tensors, ids), hf_logits(src, ids)
    assert np.abs(want).max() > 0.5 and np.abs(got - want).max() < 1e-4


def test_gguf_refuses_moe_graphs_llama_cpp_does_not_run(tmp_path, capfd):
    """A Qwen3-MoE folder without renormalised top-k weights would run differently in llama.cpp: refused."""
    from tiaoyu_cli.cli.main import main

    src = moe_folder("qwen3_moe", tmp_path / "q")
    cfg = json.loads((src / "config.json").read_text())
    cfg["norm_topk_prob"] = False
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit) as e:
        main(["export", str(src), "--format", "gguf", "-o", str(tmp_path / "a.gguf")])
    err = capfd.readouterr()[1]
    assert e.value.code == 2 and "norm_topk_prob" in err and not (tmp_path / "a.gguf").exists()


@pytest.mark.parametrize("kind", list(ARCH))
def test_gguf_of_an_open_folder(kind, tmp_path):
    src = make_folder(kind, tmp_path / kind)
    out = tmp_path / f"{kind}.gguf"
    export(src, out)
    field, tensors = read_gguf(out)
    cfg = json.loads((src / "config.json").read_text())
    model, _ = load_model(src)
    mc = model.config
    tok = load_tokenizer(src)
    arch = ARCH[kind]
    assert field("general.architecture") == arch
    assert field(f"{arch}.block_count") == mc.n_layers and field(f"{arch}.embedding_length") == mc.dim
    assert field(f"{arch}.attention.head_count") == mc.n_heads
    assert field(f"{arch}.attention.head_count_kv") == mc.n_kv_heads
    assert field(f"{arch}.attention.key_length") == mc.head_dim == field(f"{arch}.rope.dimension_count")
    assert field(f"{arch}.vocab_size") == cfg["vocab_size"]

    # tensors: llama.cpp's names and shapes
    names = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{n}.weight" for i in range(mc.n_layers) for n in (
        "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    if kind == "qwen2":
        names |= {f"blk.{i}.attn_{n}.bias" for i in range(mc.n_layers) for n in "qkv"}
    if kind == "qwen3":
        names |= {f"blk.{i}.attn_{n}_norm.weight" for i in range(mc.n_layers) for n in "qk"}
    if kind == "llama3":
        names |= {"rope_freqs.weight"}
    if not mc.tie_embeddings:
        names |= {"output.weight"}
    assert set(tensors) == names
    hd = mc.head_dim
    assert tensors["token_embd.weight"][1].shape == (cfg["vocab_size"], mc.dim)
    assert tensors["blk.0.attn_q.weight"][1].shape == (mc.n_heads * hd, mc.dim)
    assert tensors["blk.0.attn_k.weight"][1].shape == (mc.n_kv_heads * hd, mc.dim)
    assert tensors["blk.0.ffn_down.weight"][1].shape == (mc.ffn_dim, mc.dim)[::-1]
    if kind == "qwen3":
        assert tensors["blk.0.attn_q_norm.weight"][1].shape == (hd,)
    # qwen runs with NeoX RoPE: q and k go as they are; llama's are permuted to adjacent pairs
    q = model.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert np.array_equal(tensors["blk.0.attn_q.weight"][1], q) == (kind != "llama3")

    # tokenizer: gpt2 BPE from tokenizer.json
    spec = json.loads((src / "tokenizer.json").read_text())
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == {"llama3": "gpt-2", "qwen2": "qwen2", "qwen3": "qwen2"}[kind]
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == cfg["vocab_size"]
    assert tokens[:tok.vocab_size] == [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    assert all(tokens[i] == f"[PAD{i}]" and types[i] == 5 for i in range(tok.vocab_size, cfg["vocab_size"]))
    merges = spec["model"]["merges"]
    assert field("tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert field("tokenizer.ggml.eos_token_id") == tok.eos_id
    assert field("tokenizer.chat_template") == tok.chat_template
    if kind == "llama3":
        assert field("tokenizer.ggml.bos_token_id") == tok.bos_id and field("tokenizer.ggml.add_bos_token") is True
        assert field("tokenizer.ggml.eot_token_id") == tok.piece_to_id("<|eot_id|>")
        assert types[tok.piece_to_id("<|eot_id|>")] == 3  # control
    else:
        assert field("tokenizer.ggml.add_bos_token") is False
        assert field("tokenizer.ggml.eot_token_id") == tok.im_end_id
        assert types[tok.im_end_id] == 3 and types[tok.think_id] == 4  # control; <think>: user-defined
    assert sum(t == 1 for t in types) == len(spec["model"]["vocab"]) - sum(
        1 for a in spec["added_tokens"] if a["id"] in spec["model"]["vocab"].values())

    # the file computes transformers' logits, read as llama.cpp reads it
    ids = tok.encode(TEXT, bos=True)
    got = gguf_forward(field, tensors, ids)
    want = hf_logits(src, ids)
    assert np.abs(want).max() > 0.5 and np.abs(got - want).max() < 1e-4


def test_gguf_refuses_what_it_cannot_write(tmp_path, capfd):
    from tiaoyu_cli.cli.main import main

    src = make_folder("qwen2", tmp_path / "q")
    spec = json.loads((src / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+"
    (src / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(SystemExit) as e:
        main(["export", str(src), "--format", "gguf", "-o", str(tmp_path / "a.gguf")])
    err = capfd.readouterr()[1]
    assert e.value.code == 2 and "regex" in err and "Traceback" not in err
    assert not (tmp_path / "a.gguf").exists()


@pytest.mark.parametrize("kind", list(ARCH))
def test_llama_cpp_logits(kind, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    src = make_folder(kind, tmp_path / kind)
    out = tmp_path / f"{kind}.gguf"
    export(src, out)
    tok = load_tokenizer(src)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, logits_all=True, verbose=False)
    ids = tok.encode(TEXT, bos=True)
    assert llm.tokenize(TEXT.encode(), add_bos=True, special=True) == ids
    llm.eval(ids)
    got = np.asarray(llm.scores[:len(ids)], dtype=np.float64)
    want = hf_logits(src, ids)
    print(kind, float(np.abs(got - want).max()), file=sys.stderr)
    assert np.abs(got - want).max() < 2e-3
