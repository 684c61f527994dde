"""`tiaoyu export`: the HF folder loads in transformers with our logits; the GGUF file reads back with
our tensors (after the documented RoPE permutation), tokenizer and chat template; q8_0 stays close;
configurations llama.cpp/transformers cannot run are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_lines import run_main
from tiaoyu_cli.export.gguf import permute, unpermute


def save_random(folder: Path, tok_dir: Path, **cfg) -> Path:
    """A checkpoint folder holding a randomly initialised model of the given config (tiny)."""
    from tiaoyu_cli.model import Transformer, preset
    from tiaoyu_cli.tokenizer import Tokenizer
    from tiaoyu_cli.checkpoint import save_model_files

    tok = Tokenizer.load(tok_dir)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size, n_layers=2, **cfg))
    folder.mkdir(parents=True)
    save_model_files(folder, model, tok)
    return folder


# ---- Hugging Face --------------------------------------------------------------------------------------

def test_hf_export_loads_in_transformers_with_our_logits(base_ckpt, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from tiaoyu_cli.checkpoint import load_model, load_tokenizer

    out = tmp_path / "hf"
    code, stdout, err = run_main(["export", base_ckpt, "--format", "hf", "-o", out], capsys)
    assert code == 0, err
    files = sorted(p.name for p in out.iterdir())
    assert files == ["README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
                     "tokenizer_config.json"]
    assert json.loads(stdout)["architecture"] == "LlamaForCausalLM"
    card = (out / "README.md").read_text()
    assert "LlamaForCausalLM" in card and "pretrain" in card and "val_loss" in card

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours, _ = load_model(base_ckpt)
    ours.eval()
    ids = torch.tensor([[2, 100, 200, 300, 400, 500, 600, 700, 800, 900, 17, 42]])
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids).logits).abs().max().item()
    assert diff < 1e-4

    htok = transformers.AutoTokenizer.from_pretrained(out)
    tok = load_tokenizer(base_ckpt)
    text = "Tosi has a pet named Vinay. 王丽住在青石城。 3 + 4 = 7"
    assert htok.encode(text, add_special_tokens=False) == tok.encode(text)
    msgs = [{"role": "user", "content": "What is 3 + 4?"}]
    assert htok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == tok.render_chat(msgs, True)


def test_hf_export_refuses_what_transformers_cannot_load(tok_dir, tmp_path, capsys):
    sin = save_random(tmp_path / "sin", tok_dir, position="sinusoidal")
    code, _, err = run_main(["export", sin, "--format", "hf", "-o", tmp_path / "o"], capsys)
    assert code == 2 and "sinusoidal positions" in err and not (tmp_path / "o").exists()
    shared = save_random(tmp_path / "shared", tok_dir, n_experts=4, n_experts_per_tok=2, n_shared_experts=1)
    code, _, err = run_main(["export", shared, "--format", "gguf", "-o", tmp_path / "s.gguf"], capsys)
    assert code == 2 and "shared expert" in err and not (tmp_path / "s.gguf").exists()


# ---- GGUF ------------------------------------------------------------------------------------------------------

def rope_half(x: torch.Tensor, pos: int, theta: float = 10000.0) -> torch.Tensor:
    """Our (HF) RoPE on one head vector: rotate pairs (x_i, x_{i+hd/2})."""
    hd = x.shape[-1]
    f = pos * theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    x1, x2 = x[: hd // 2], x[hd // 2:]
    return torch.cat([x1 * f.cos() - x2 * f.sin(), x2 * f.cos() + x1 * f.sin()])


def rope_adjacent(x: torch.Tensor, pos: int, theta: float = 10000.0) -> torch.Tensor:
    """llama.cpp's normal RoPE: rotate adjacent pairs (x_2i, x_2i+1)."""
    hd = x.shape[-1]
    f = pos * theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    a, b = x[0::2], x[1::2]
    out = torch.empty_like(x)
    out[0::2], out[1::2] = a * f.cos() - b * f.sin(), b * f.cos() + a * f.sin()
    return out


def test_permutation_turns_half_split_rope_into_adjacent_pairs():
    """permute(W) computes, per head, the rows llama.cpp's adjacent-pair RoPE expects: rotating the permuted
    projection gives the permuted rotation of ours, so q·k (both permuted alike) is unchanged."""
    torch.manual_seed(0)
    heads, hd, d = 3, 8, 5
    w = torch.randn(heads * hd, d, dtype=torch.float64)
    x = torch.randn(d, dtype=torch.float64)
    wp = torch.from_numpy(permute(w.numpy(), heads))
    assert np.array_equal(unpermute(wp.numpy(), heads), w.numpy())
    ours = (w @ x).view(heads, hd)
    theirs = (wp @ x).view(heads, hd)
    for h in range(heads):
        a = rope_half(ours[h], 7)
        b = rope_adjacent(theirs[h], 7)
        perm = torch.from_numpy(permute(np.arange(hd, dtype=np.float64)[:, None], 1)[:, 0]).long()
        assert torch.allclose(a[perm], b)
        assert torch.allclose(rope_half(ours[h], 3) @ rope_half(ours[(h + 1) % heads], 5),
                              rope_adjacent(theirs[h], 3) @ rope_adjacent(theirs[(h + 1) % heads], 5))


def read_gguf(path: Path):
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(path)

    def field(name):
        f = reader.fields[name]
        if len(f.types) > 1 and f.types[0] == gguf.GGUFValueType.ARRAY:
            if f.types[1] == gguf.GGUFValueType.STRING:
                return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
            return [f.parts[i][0].item() for i in f.data]
        if f.types[0] == gguf.GGUFValueType.STRING:
            return bytes(f.parts[f.data[0]]).decode("utf-8")
        return f.parts[f.data[0]][0].item()

    tensors = {}
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = (t.tensor_type.name, np.asarray(arr, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)]))
    return field, tensors


def ours_by_gguf_name(model) -> dict[str, np.ndarray]:
    """Our tensors under llama.cpp names, unpermuted back (what the read-back must equal)."""
    cfg = model.config
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    m = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        m.update({
            f"blk.{i}.attn_norm.weight": sd[p + "input_layernorm.weight"],
            f"blk.{i}.attn_q.weight": sd[p + "self_attn.q_proj.weight"],
            f"blk.{i}.attn_k.weight": sd[p + "self_attn.k_proj.weight"],
            f"blk.{i}.attn_v.weight": sd[p + "self_attn.v_proj.weight"],
            f"blk.{i}.attn_output.weight": sd[p + "self_attn.o_proj.weight"],
            f"blk.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
        })
        if cfg.is_moe:
            e = p + "block_sparse_moe."
            m[f"blk.{i}.ffn_gate_inp.weight"] = sd[e + "gate.weight"]
            for ours, theirs in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
                m[f"blk.{i}.ffn_{theirs}_exps.weight"] = np.stack(
                    [sd[f"{e}experts.{j}.{ours}.weight"] for j in range(cfg.n_experts)])
        else:
            for n in ("gate", "up", "down"):
                m[f"blk.{i}.ffn_{n}.weight"] = sd[f"{p}mlp.{n}_proj.weight"]
    return m


def unpermuted(name: str, arr: np.ndarray, cfg) -> np.ndarray:
    if name.endswith("attn_q.weight"):
        return unpermute(arr, cfg.n_heads)
    if name.endswith("attn_k.weight"):
        return unpermute(arr, cfg.n_kv_heads)
    return arr


def test_gguf_reads_back_our_tensors_tokenizer_and_template(base_ckpt, tmp_path, capsys):
    from tiaoyu_cli.checkpoint import load_model, load_tokenizer

    out = tmp_path / "m.gguf"
    code, _, err = run_main(["export", base_ckpt, "--format", "gguf", "-o", out], capsys)
    assert code == 0, err
    field, tensors = read_gguf(out)
    model, _ = load_model(base_ckpt)
    cfg = model.config
    tok = load_tokenizer(base_ckpt)
    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == cfg.n_layers and field("llama.embedding_length") == cfg.dim
    assert field("llama.attention.head_count") == cfg.n_heads
    assert field("llama.attention.head_count_kv") == cfg.n_kv_heads
    assert field("llama.rope.dimension_count") == cfg.head_dim
    assert field("llama.context_length") == cfg.max_seq_len
    assert field("tokenizer.ggml.model") == "llama"
    pieces, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert len(pieces) == cfg.vocab_size and pieces[:8] == ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>",
                                                            "<|im_end|>", "<think>", "</think>"]
    assert types[1] == 2 and set(types[2:8]) == {3}  # unknown, control
    assert all(types[i] == 6 for i in range(tok.vocab_size) if tok.is_byte(i))  # <0xXX> byte fallback
    assert all(pieces[i] == tok.id_to_piece(i) for i in range(tok.vocab_size))
    assert field("tokenizer.ggml.bos_token_id") == 2 and field("tokenizer.ggml.eos_token_id") == 3
    assert field("tokenizer.ggml.eot_token_id") == 5
    assert field("tokenizer.chat_template") == tok.config["chat_template"]

    expected = ours_by_gguf_name(model)
    assert set(tensors) == set(expected)
    for name, (ttype, arr) in tensors.items():
        assert ttype == "F32", name
        assert np.array_equal(unpermuted(name, arr, cfg), expected[name]), name
    # the permutation is really applied (not a no-op) to q and k
    assert not np.array_equal(tensors["blk.0.attn_q.weight"][1], expected["blk.0.attn_q.weight"][1])


def test_gguf_q8_0_is_close_and_smaller(base_ckpt, tmp_path, capsys):
    from tiaoyu_cli.checkpoint import load_model

    f32, q8 = tmp_path / "f32.gguf", tmp_path / "q8.gguf"
    assert run_main(["export", base_ckpt, "-f", "gguf", "-o", f32], capsys)[0] == 0
    code, stdout, err = run_main(["export", base_ckpt, "-f", "gguf", "--quantize", "q8_0", "-o", q8], capsys)
    assert code == 0, err
    assert q8.stat().st_size < 0.35 * f32.stat().st_size
    _, tensors = read_gguf(q8)
    model, _ = load_model(base_ckpt)
    expected = ours_by_gguf_name(model)
    for name, (ttype, arr) in tensors.items():
        ref = expected[name]
        if ref.ndim == 1:
            assert ttype == "F32" and np.array_equal(arr, ref)
            continue
        assert ttype == "Q8_0", name
        got = unpermuted(name, arr, model.config)
        # each block of 32 weights: error ≤ half a step (max|w|/127/2) plus the f16 rounding of the scale
        blocks = np.abs(ref.reshape(-1, 32)).max(1, keepdims=True)
        err_ = np.abs(got - ref).reshape(-1, 32)
        assert (err_ <= blocks / 127 * 0.5 + blocks * 2e-3 + 1e-7).all(), name
        assert not np.array_equal(got, ref)


def test_gguf_moe_stacks_experts(tok_dir, tmp_path, capsys):
    from tiaoyu_cli.checkpoint import load_model

    moe = save_random(tmp_path / "moe", tok_dir, n_experts=4, n_experts_per_tok=2, ffn_dim=64)
    out = tmp_path / "moe.gguf"
    code, _, err = run_main(["export", moe, "-f", "gguf", "-o", out], capsys)
    assert code == 0, err
    field, tensors = read_gguf(out)
    assert field("llama.expert_count") == 4 and field("llama.expert_used_count") == 2
    model, _ = load_model(moe)
    expected = ours_by_gguf_name(model)
    assert tensors["blk.0.ffn_gate_exps.weight"][1].shape == (4, 64, 128)
    for name, (_, arr) in tensors.items():
        assert np.array_equal(unpermuted(name, arr, model.config), expected[name]), name


def test_gguf_refuses_what_llama_cpp_cannot_run(base_ckpt, tok_dir, tmp_path, capsys):
    sin = save_random(tmp_path / "sin", tok_dir, position="sinusoidal")
    code, _, err = run_main(["export", sin, "-f", "gguf", "-o", tmp_path / "a.gguf"], capsys)
    assert code == 2 and "sinusoidal positions" in err and "Traceback" not in err
    learned = save_random(tmp_path / "learned", tok_dir, position="learned")
    code, _, err = run_main(["export", learned, "-f", "gguf", "-o", tmp_path / "a.gguf"], capsys)
    assert code == 2 and "learned positions" in err
    rm = save_random(tmp_path / "rm", tok_dir, num_labels=1)
    code, _, err = run_main(["export", rm, "-f", "gguf", "-o", tmp_path / "a.gguf"], capsys)
    assert code == 2 and "score head" in err and "--format hf" in err
    assert not (tmp_path / "a.gguf").exists()
    # existing outputs, unknown options
    (tmp_path / "taken.gguf").write_bytes(b"x")
    code, _, err = run_main(["export", base_ckpt, "-f", "gguf", "-o", tmp_path / "taken.gguf"], capsys)
    assert code == 2 and "--force" in err and (tmp_path / "taken.gguf").read_bytes() == b"x"
    code, _, err = run_main(["export", base_ckpt, "-f", "gguf", "--quantize", "q4_k", "-o", tmp_path / "b.gguf"], capsys)
    assert code == 2 and "q8_0" in err
    code, _, err = run_main(["export", base_ckpt, "-f", "onnx", "-o", tmp_path / "c"], capsys)
    assert code == 2 and "hf or gguf" in err
