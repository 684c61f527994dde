"""`tiaoyu export CKPT --format gguf -o model.gguf [--quantize q8_0]`: one file llama.cpp runs.

GGUF is llama.cpp's format: a header of typed key/value metadata, then named tensors. We write it
with the `gguf` package (optional extra: `pip install 'tiaoyu[hf]'`), in llama.cpp's architecture for
the model: "llama" for tiaoyu's own models (Mixtral-style mixtures of experts included) and for open
llama/mistral folders, "qwen2" and "qwen3" for those families — as llama.cpp's convert_hf_to_gguf.py
writes them. Other open families are refused with a clear error.

Tensor names (ours → llama.cpp):

    model.embed_tokens.weight                      token_embd.weight
    model.layers.N.input_layernorm.weight          blk.N.attn_norm.weight
    model.layers.N.self_attn.{q,k,v,o}_proj        blk.N.attn_{q,k,v,output}.weight      (q, k permuted, below)
    model.layers.N.post_attention_layernorm        blk.N.ffn_norm.weight
    model.layers.N.mlp.{gate,up,down}_proj         blk.N.ffn_{gate,up,down}.weight
    …block_sparse_moe.gate / experts.E.w1|w3|w2    blk.N.ffn_gate_inp / ffn_{gate,up,down}_exps (experts stacked)
    model.norm.weight                              output_norm.weight
    lm_head.weight (untied only)                   output.weight   (tied: llama.cpp reuses token_embd)
    …{q,k,v,o}_proj.bias, mlp.*_proj.bias          blk.N.attn_{q,k,v,output}.bias, blk.N.ffn_*.bias  (open families)
    …self_attn.{q,k}_norm (qwen3)                  blk.N.attn_{q,k}_norm.weight
    llama3 RoPE scaling                            rope_freqs.weight: per frequency, plain / scaled

The RoPE permutation (the "llama" architecture only: llama.cpp runs qwen2/qwen3 with NeoX RoPE, which
rotates the two halves of a head as we do, so their q/k go unchanged). Our rotary embedding (like HF's) rotates the pairs (x_i, x_{i+hd/2}) —
the two halves of a head. llama.cpp's "normal" RoPE, used by the llama architecture, rotates
adjacent pairs (x_2i, x_2i+1), the layout of Meta's original checkpoints. So the rows of W_q and
W_k are reordered per head so that row i of the first half and row i of the second half become
neighbours:

    permute(W, h):  W.reshape(h, 2, hd/2, d).swapaxes(1, 2).reshape(h·hd, d)

(h = n_heads for W_q, n_kv_heads for W_k). Attention scores q·k are unchanged by reordering
both the same way; `unpermute` is the inverse, used by tests to compare tensors read back.

Tokenizer: tiaoyu's SentencePiece model as llama.cpp's "llama" tokenizer — every piece with its
score and type (normal, unknown, control for our special tokens, byte for <0xXX> fallback
pieces), BOS/EOS/UNK/PAD ids, <|im_end|> as end-of-turn, no automatic BOS and no space prefix
(as our tokenizer), and the ChatML chat template. An open model's byte-level BPE `tokenizer.json`
(Qwen, Llama 3) as llama.cpp's "gpt2" tokenizer: the vocabulary by id (added special tokens as
control, other added tokens user-defined, rows past the tokenizer's end as unused [PADn]), its merges,
the pre-tokenizer named by its split regex ("qwen2", "llama-bpe", "gpt-2"), the special ids and flags
gguf's SpecialVocab reads from the folder, an end-of-turn id from generation_config.json, and the
folder's own chat template. A SentencePiece-style tokenizer.json (Metaspace, byte fallback) is refused. A foreign
SentencePiece `tokenizer.model` folder without tokenizer.json (Llama 2, Mistral) as llama.cpp's "llama" tokenizer,
as convert_hf_to_gguf.py writes one: every piece with its score and type, tokens added past the model as control
(special) or user-defined, the ids by role, BOS/EOS added as tokenizer_config.json says, the space prefix as the
tokenizer adds it, and the folder's template.

Types: f32 (exact), f16, or q8_0 (blocks of 32 weights, each stored as int8 with one f16 scale:
8.5 bits per weight). Norms always stay f32, as llama.cpp expects.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tiaoyu_cli.checkpoint import load_model, load_tokenizer
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.export.hf import check_hf_exportable, source_checkpoint
from tiaoyu_cli.io import fsync_dir
from tiaoyu_cli.tokenizer import SPFolderTokenizer

GGUF_TYPES = ("f32", "f16", "q8_0")
IM_END_ID = 5
# llama.cpp's architecture per family ("" = tiaoyu's own); mistral runs as llama without a sliding window
ARCHES = {"": "llama", "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
          "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
# how llama.cpp's MoE graphs mix the chosen experts and the shared one: qwen2moe keeps the raw top-k softmax
# weights and adds a shared expert scaled by sigmoid(gate·x); qwen3moe renormalises the top-k, no shared expert
MOE_GRAPH = {"qwen2moe": {"norm_topk_prob": False, "shared": True}, "qwen3moe": {"norm_topk_prob": True, "shared": False}}
# byte-level BPE split regexes → llama.cpp's pre-tokenizer names
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
PRE_TOKENIZERS = {QWEN2_SPLIT: "qwen2", LLAMA3_SPLIT: "llama-bpe"}


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of W_q/W_k [h·hd, d] from half-split RoPE pairs to adjacent pairs (per head)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `permute`."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_gguf_exportable(cfg) -> str:
    """llama.cpp's architecture for this model, or raise with the reason it cannot run it."""

    check_hf_exportable(cfg, "gguf")
    if cfg.num_labels:
        raise TiaoyuError(f"cannot export to gguf: the model has a score head ({cfg.num_labels} output(s), a reward "
                          "model or classifier), which llama.cpp's llama architecture does not run; "
                          "export it with --format hf")
    arch = ARCHES.get(cfg.family)
    if arch is None:
        raise TiaoyuError(f"cannot export to gguf: model_type {cfg.family} is not written yet (supported: llama, "
                          f"mistral, qwen2, qwen3, qwen2_moe, qwen3_moe, Mixtral and tiaoyu's own models); export it "
                          f"with --format hf")
    if cfg.sliding_window:
        raise TiaoyuError(f"cannot export to gguf: a sliding attention window ({cfg.sliding_window}) is not run by "
                          "llama.cpp's llama architecture")
    graph = MOE_GRAPH.get(arch)
    if graph is not None:
        if cfg.dense_layers:
            raise TiaoyuError(f"cannot export to gguf: layers {cfg.dense_layers} have a dense FFN instead of experts "
                              f"(mlp_only_layers / decoder_sparse_step), which llama.cpp's {arch} does not run")
        if cfg.norm_topk_prob != graph["norm_topk_prob"]:
            raise TiaoyuError(f"cannot export to gguf: norm_topk_prob is {cfg.norm_topk_prob}, llama.cpp's {arch} "
                              f"always runs with {graph['norm_topk_prob']}")
        if bool(cfg.gated_shared_ffn_dim) != graph["shared"]:
            raise TiaoyuError(f"cannot export to gguf: llama.cpp's {arch} runs "
                              + ("a shared expert on every layer; this model has none" if graph["shared"]
                                 else "no shared expert; this model has one"))
    kind = (cfg.rope_scaling or {}).get("rope_type", "default")
    if kind not in (("default", "linear", "llama3") if arch == "llama" else ("default", "linear")):
        raise TiaoyuError(f"cannot export to gguf: RoPE scaling {kind!r} is not written for llama.cpp's {arch} "
                          "architecture yet")
    return arch


def _import_gguf():
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise TiaoyuError("--format gguf needs the `gguf` package: pip install 'tiaoyu[hf]' (or pip install gguf)") from None
    return gguf


def gguf_tensors(model, arch: str = "llama") -> list[tuple[str, np.ndarray]]:
    """(llama.cpp name, fp32 array) for every tensor of `arch`: q/k permuted (llama), experts stacked, biases and
    q/k norms where the model has them, llama3 RoPE factors."""
    cfg = model.config
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    qk = (lambda w, h: permute(w, h)) if arch == "llama" else (lambda w, h: w)
    out = [("token_embd.weight", sd["model.embed_tokens.weight"])]
    if (cfg.rope_scaling or {}).get("rope_type") == "llama3":  # llama.cpp divides each frequency by its factor
        from tiaoyu_cli.model.transformer import rope_frequencies

        plain, _ = rope_frequencies(cfg.head_dim, cfg.rope_theta)
        scaled, _ = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        out.append(("rope_freqs.weight", (plain / scaled).numpy().astype(np.float32)))
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        b = f"blk.{i}."
        a = p + "self_attn."
        out += [
            (b + "attn_norm.weight", sd[p + "input_layernorm.weight"]),
            (b + "attn_q.weight", qk(sd[a + "q_proj.weight"], cfg.n_heads)),
            (b + "attn_k.weight", qk(sd[a + "k_proj.weight"], cfg.n_kv_heads)),
            (b + "attn_v.weight", sd[a + "v_proj.weight"]),
            (b + "attn_output.weight", sd[a + "o_proj.weight"]),
        ]
        if a + "q_proj.bias" in sd:
            out += [(b + "attn_q.bias", qk(sd[a + "q_proj.bias"], cfg.n_heads)),
                    (b + "attn_k.bias", qk(sd[a + "k_proj.bias"], cfg.n_kv_heads)),
                    (b + "attn_v.bias", sd[a + "v_proj.bias"])]
        if a + "o_proj.bias" in sd:
            out.append((b + "attn_output.bias", sd[a + "o_proj.bias"]))
        if a + "q_norm.weight" in sd:
            out += [(b + "attn_q_norm.weight", sd[a + "q_norm.weight"]),
                    (b + "attn_k_norm.weight", sd[a + "k_norm.weight"])]
        out.append((b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"]))
        if arch in MOE_GRAPH:  # the Qwen-MoE names: mlp.gate, mlp.experts.E.*_proj, mlp.shared_expert(_gate)
            m = p + "mlp."
            out.append((b + "ffn_gate_inp.weight", sd[m + "gate.weight"]))
            for ours, theirs in (("gate", "ffn_gate_exps"), ("up", "ffn_up_exps"), ("down", "ffn_down_exps")):
                stacked = np.stack([sd[f"{m}experts.{e}.{ours}_proj.weight"] for e in range(cfg.n_experts)])
                out.append((b + theirs + ".weight", stacked))  # [n_experts, out, in]
            if m + "shared_expert_gate.weight" in sd:
                out.append((b + "ffn_gate_inp_shexp.weight", sd[m + "shared_expert_gate.weight"].reshape(-1)))  # [d]
                for n in ("gate", "up", "down"):
                    out.append((b + f"ffn_{n}_shexp.weight", sd[m + f"shared_expert.{n}_proj.weight"]))
        elif cfg.is_moe:
            m = p + "block_sparse_moe."
            out.append((b + "ffn_gate_inp.weight", sd[m + "gate.weight"]))
            for ours, theirs in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")):
                stacked = np.stack([sd[f"{m}experts.{e}.{ours}.weight"] for e in range(cfg.n_experts)])
                out.append((b + theirs + ".weight", stacked))  # [n_experts, out, in]
        else:
            for n in ("gate", "up", "down"):
                out.append((b + f"ffn_{n}.weight", sd[p + f"mlp.{n}_proj.weight"]))
                if p + f"mlp.{n}_proj.bias" in sd:
                    out.append((b + f"ffn_{n}.bias", sd[p + f"mlp.{n}_proj.bias"]))
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


def add_sentencepiece_tokenizer(w, tok, vocab_size: int) -> None:
    """The "llama" tokenizer keys of a foreign SentencePiece folder (module docstring)."""
    gguf = _import_gguf()
    TT = gguf.TokenType
    enc = tok.tk  # tokenizer/spfolder.py's SentencePieceEncoder: the model in `.sp`, added tokens in `.added`
    pieces, scores, types = tokenizer_vocab(enc, vocab_size)
    for i, a in enc.added.items():
        if enc.size <= i < vocab_size:
            pieces[i], types[i] = a.content, int(TT.CONTROL if a.special else TT.USER_DEFINED)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    for role, i in (("bos", tok.bos_id), ("eos", tok.eos_id), ("unk", tok.unk_id), ("pad", tok.pad_id)):
        if i is not None and 0 <= i < vocab_size:
            getattr(w, f"add_{role}_token_id")(i)
    turn = sorted(i for i in tok.stop_ids if i != tok.eos_id)
    if turn:
        w.add_eot_token_id(turn[0])
    w.add_add_bos_token(enc.add_bos)
    w.add_add_eos_token(enc.add_eos)
    w.add_add_space_prefix(enc.prefix)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def bpe_vocab(tok, vocab_size: int) -> tuple[list[str], list[int], str]:
    """An open model's byte-level BPE tokenizer.json as llama.cpp's "gpt2" tokenizer: (tokens by id, their types,
    the pre-tokenizer's name), as convert_hf_to_gguf.py makes them."""
    gguf = _import_gguf()
    TT = gguf.TokenType
    spec = json.loads(tok._files["tokenizer.json"])
    model = spec.get("model") or {}
    where = f"{tok.path / 'tokenizer.json' if tok.path else 'tokenizer.json'}"
    if model.get("type") != "BPE" or model.get("byte_fallback") or "Metaspace" in json.dumps(spec.get("pre_tokenizer")):
        raise TiaoyuError(f"cannot export to gguf: {where} is a SentencePiece-style tokenizer (Metaspace, byte "
                          "fallback); only byte-level BPE tokenizers (Qwen, Llama 3) are written yet")
    pre = _pre_tokenizer(spec.get("pre_tokenizer"), where)
    added = tok.tk.get_added_tokens_decoder()  # {id: AddedToken}
    tokens, types = [], []
    for i in range(vocab_size):
        if i >= tok.vocab_size or tok.tk.id_to_token(i) is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(TT.UNUSED))
            continue
        text = tok.tk.id_to_token(i)
        tokens.append(text)
        if i in added:
            looks = text.startswith("<|") and text.endswith("|>")
            types.append(int(TT.CONTROL if added[i].special or looks else TT.USER_DEFINED))
        else:
            types.append(int(TT.NORMAL))
    return tokens, types, pre


def _pre_tokenizer(pre: dict | None, where: str) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer: the split regex of Qwen2 or Llama 3, or GPT-2's own."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    splits = [s for s in steps if s and s.get("type") == "Split"]
    levels = [s for s in steps if s and s.get("type") == "ByteLevel"]
    if not levels:
        raise TiaoyuError(f"cannot export to gguf: {where} has no byte-level pre-tokenizer")
    if not splits:
        if levels[0].get("use_regex", True):
            return "gpt-2"
        raise TiaoyuError(f"cannot export to gguf: {where} splits no words before its byte-level BPE")
    regex = (splits[0].get("pattern") or {}).get("Regex")
    if regex not in PRE_TOKENIZERS:
        raise TiaoyuError(f"cannot export to gguf: {where} splits words with a regex llama.cpp is not told about "
                          f"here ({str(regex)[:60]}…); known: Qwen2's and Llama 3's")
    return PRE_TOKENIZERS[regex]


def add_bpe_tokenizer(w, tok, folder: Path, vocab_size: int) -> None:
    """The "gpt2" tokenizer keys of an open model (bpe_vocab, module docstring)."""
    gguf = _import_gguf()
    tokens, types, pre = bpe_vocab(tok, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    quiet = logging.getLogger("gguf.vocab")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its notes on post-processor layouts it half understands
    try:
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    finally:
        quiet.setLevel(level)
    if not special.merges:
        raise TiaoyuError(f"cannot export to gguf: {folder / 'tokenizer.json'} has no BPE merges")
    # what tiaoyu (and transformers) do: the BOS the post-processor adds, no EOS, the template tiaoyu renders
    probe = tok.encode("a", bos=True)
    special.add_special_token.update(bos=tok.bos_id is not None and probe[:1] == [tok.bos_id]
                                     and len(probe) > len(tok.encode("a")), eos=False)
    special.chat_template = tok.chat_template
    if tok.eos_id is not None:
        special.special_token_ids["eos"] = tok.eos_id
    turn = [tok.im_end_id] if tok.im_end_id in tok.stop_ids else sorted(i for i in tok.stop_ids if i != tok.eos_id)
    if turn and "eot" not in special.special_token_ids:  # the end of a chat turn (generation_config.json)
        special.special_token_ids["eot"] = turn[0]
    special.add_to_gguf(w, quiet=True)


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
    arch = check_gguf_exportable(cfg)
    tok = load_tokenizer(src)
    if cfg.vocab_size < tok.vocab_size:
        raise TiaoyuError(f"{src}: tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size}")
    sp_tok = isinstance(tok, SPFolderTokenizer)
    open_tok = getattr(tok, "backend", None) == "hf" and not sp_tok
    if open_tok:
        bpe_vocab(tok, cfg.vocab_size)  # refuse a tokenizer llama.cpp would read wrongly, before writing anything

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
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
        if cfg.family:
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        if (cfg.rope_scaling or {}).get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        if cfg.is_moe:
            w.add_expert_count(cfg.n_experts)
            w.add_expert_used_count(cfg.n_experts_per_tok)
        if arch in MOE_GRAPH:
            w.add_expert_feed_forward_length(cfg.expert_ffn_dim or cfg.ffn_dim)
            if cfg.gated_shared_ffn_dim:
                w.add_expert_shared_feed_forward_length(cfg.gated_shared_ffn_dim)

        if sp_tok:
            add_sentencepiece_tokenizer(w, tok, cfg.vocab_size)
        elif open_tok:
            add_bpe_tokenizer(w, tok, src, cfg.vocab_size)
        else:
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
        for tname, arr in gguf_tensors(model, arch):
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
    return {"out": str(out), "type": kind, "arch": arch, "tensors": sum(counts.values()), "tensor_types": counts,
            "bytes": out.stat().st_size, "parameters": model.num_parameters(), "source": str(src)}
