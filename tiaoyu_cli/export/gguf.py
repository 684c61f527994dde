"""`tiaoyu export CKPT --format gguf -o model.gguf [--quantize q8_0]`: one file llama.cpp runs.

GGUF is llama.cpp's format: a header of typed key/value metadata, then named tensors. We write
the "llama" architecture (which also covers Mixtral-style mixtures of experts) with the `gguf`
package (optional extra: `pip install 'tiaoyu[hf]'`).

Tensor names (ours → llama.cpp):

    model.embed_tokens.weight                      token_embd.weight
    model.layers.N.input_layernorm.weight          blk.N.attn_norm.weight
    model.layers.N.self_attn.{q,k,v,o}_proj        blk.N.attn_{q,k,v,output}.weight      (q, k permuted, below)
    model.layers.N.post_attention_layernorm        blk.N.ffn_norm.weight
    model.layers.N.mlp.{gate,up,down}_proj         blk.N.ffn_{gate,up,down}.weight
    …block_sparse_moe.gate / experts.E.w1|w3|w2    blk.N.ffn_gate_inp / ffn_{gate,up,down}_exps (experts stacked)
    model.norm.weight                              output_norm.weight
    lm_head.weight (untied only)                   output.weight   (tied: llama.cpp reuses token_embd)

The RoPE permutation. Our rotary embedding (like HF's) rotates the pairs (x_i, x_{i+hd/2}) —
the two halves of a head. llama.cpp's "normal" RoPE, used by the llama architecture, rotates
adjacent pairs (x_2i, x_2i+1), the layout of Meta's original checkpoints. So the rows of W_q and
W_k are reordered per head so that row i of the first half and row i of the second half become
neighbours:

    permute(W, h):  W.reshape(h, 2, hd/2, d).swapaxes(1, 2).reshape(h·hd, d)

(h = n_heads for W_q, n_kv_heads for W_k). Attention scores q·k are unchanged by reordering
both the same way; `unpermute` is the inverse, used by tests to compare tensors read back.

Tokenizer: the SentencePiece model as llama.cpp's "llama" tokenizer — every piece with its
score and type (normal, unknown, control for our special tokens, byte for <0xXX> fallback
pieces), BOS/EOS/UNK/PAD ids, <|im_end|> as end-of-turn, no automatic BOS and no space prefix
(as our tokenizer), and the ChatML chat template.

Types: f32 (exact), f16, or q8_0 (blocks of 32 weights, each stored as int8 with one f16 scale:
8.5 bits per weight). Norms always stay f32, as llama.cpp expects.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tiaoyu_cli.checkpoint import load_model, load_tokenizer
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.export.hf import check_hf_exportable, source_checkpoint
from tiaoyu_cli.io import fsync_dir

GGUF_TYPES = ("f32", "f16", "q8_0")
IM_END_ID = 5


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of W_q/W_k [h·hd, d] from half-split RoPE pairs to adjacent pairs (per head)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `permute`."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_gguf_exportable(cfg) -> None:
    """Raise with the reason when llama.cpp's llama architecture cannot run this model."""

    check_hf_exportable(cfg, "gguf")
    if cfg.num_labels:
        raise TiaoyuError(f"cannot export to gguf: the model has a score head ({cfg.num_labels} output(s), a reward "
                          "model or classifier), which llama.cpp's llama architecture does not run; "
                          "export it with --format hf")


def _import_gguf():
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise TiaoyuError("--format gguf needs the `gguf` package: pip install 'tiaoyu[hf]' (or pip install gguf)") from None
    return gguf


def gguf_tensors(model) -> list[tuple[str, np.ndarray]]:
    """(llama.cpp name, fp32 array) for every tensor, q/k permuted, experts stacked."""
    cfg = model.config
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    out = [("token_embd.weight", sd["model.embed_tokens.weight"])]
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        b = f"blk.{i}."
        out += [
            (b + "attn_norm.weight", sd[p + "input_layernorm.weight"]),
            (b + "attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], cfg.n_heads)),
            (b + "attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], cfg.n_kv_heads)),
            (b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"]),
            (b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"]),
            (b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"]),
        ]
        if cfg.is_moe:
            m = p + "block_sparse_moe."
            out.append((b + "ffn_gate_inp.weight", sd[m + "gate.weight"]))
            for ours, theirs in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")):
                stacked = np.stack([sd[f"{m}experts.{e}.{ours}.weight"] for e in range(cfg.n_experts)])
                out.append((b + theirs + ".weight", stacked))  # [n_experts, out, in]
        else:
            out += [
                (b + "ffn_gate.weight", sd[p + "mlp.gate_proj.weight"]),
                (b + "ffn_up.weight", sd[p + "mlp.up_proj.weight"]),
                (b + "ffn_down.weight", sd[p + "mlp.down_proj.weight"]),
            ]
    out.append(("output_norm.weight", sd["model.norm.weight"]))
    if not cfg.tie_embeddings:
        out.append(("output.weight", sd["lm_head.weight"]))
    return out


def tensor_type(name: str, arr: np.ndarray, kind: str):
    """The GGML type a tensor is stored as: 1-D tensors (norms) and the router stay f32; q8_0 needs
    rows that are a multiple of 32 (its block size), else the tensor falls back to f16."""
    gguf = _import_gguf()
    T = gguf.GGMLQuantizationType
    if arr.ndim == 1 or kind == "f32" or name.endswith("ffn_gate_inp.weight"):
        return T.F32
    if kind == "q8_0" and arr.shape[-1] % 32 == 0:
        return T.Q8_0
    return T.F16


def tokenizer_vocab(tok, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and GGUF token types; the model's vocabulary may be larger than the tokenizer's
    (padded rows get unused placeholder pieces)."""
    gguf = _import_gguf()
    TT = gguf.TokenType
    sp = tok.sp
    pieces, scores, types = [], [], []
    for i in range(vocab_size):
        if i >= sp.get_piece_size():
            pieces.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(int(TT.UNUSED))
            continue
        pieces.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            t = TT.UNKNOWN
        elif sp.is_control(i):
            t = TT.CONTROL
        elif sp.is_byte(i):
            t = TT.BYTE
        elif sp.is_unused(i):
            t = TT.UNUSED
        else:
            t = TT.NORMAL
        types.append(int(t))
    return pieces, scores, types


def export_gguf(ckpt: str | os.PathLike, out: str | os.PathLike, kind: str = "f32", force: bool = False,
                name: str | None = None) -> dict[str, Any]:
    """Write the GGUF file atomically. Returns a summary {"out", "type", "tensors", "bytes", …}."""
    gguf = _import_gguf()

    if kind not in GGUF_TYPES:
        raise TiaoyuError(f"--quantize {kind!r} for gguf: choose {', '.join(GGUF_TYPES)} (f32 = none)")
    out = Path(out)
    if out.is_dir():
        raise TiaoyuError(f"-o {out}: is a folder; --format gguf writes one file (e.g. -o model.gguf)")
    if out.exists() and not force:
        raise TiaoyuError(f"-o {out}: already exists (use --force to replace it)")
    src = source_checkpoint(ckpt)
    model, src = load_model(src)
    cfg = model.config
    check_gguf_exportable(cfg)
    tok = load_tokenizer(src)
    if cfg.vocab_size < tok.vocab_size:
        raise TiaoyuError(f"{src}: tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size}")

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(name or (out.stem or "tiaoyu"))
        w.add_description("exported by tiaoyu")
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
        if kind == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.dim)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.ffn_dim)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        if cfg.is_moe:
            w.add_expert_count(cfg.n_experts)
            w.add_expert_used_count(cfg.n_experts_per_tok)

        pieces, scores, types = tokenizer_vocab(tok, cfg.vocab_size)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(pieces)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(tok.bos_id)
        w.add_eos_token_id(tok.eos_id)
        w.add_unk_token_id(tok.unk_id)
        w.add_pad_token_id(tok.pad_id)
        w.add_eot_token_id(IM_END_ID)
        w.add_add_bos_token(bool(tok.config.get("add_bos_token", False)))
        w.add_add_eos_token(bool(tok.config.get("add_eos_token", False)))
        w.add_add_space_prefix(False)
        if tok.config.get("chat_template"):
            w.add_chat_template(tok.config["chat_template"])

        counts: dict[str, int] = {}
        for tname, arr in gguf_tensors(model):
            t = tensor_type(tname, arr, kind)
            counts[t.name] = counts.get(t.name, 0) + 1
            data = gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), t)
            w.add_tensor(tname, data, raw_dtype=t if t == gguf.GGMLQuantizationType.Q8_0 else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return {"out": str(out), "type": kind, "tensors": sum(counts.values()), "tensor_types": counts,
            "bytes": out.stat().st_size, "parameters": model.num_parameters(), "source": str(src)}
