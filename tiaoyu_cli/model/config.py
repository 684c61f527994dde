"""Model configuration, presets, and the mapping to Hugging Face `config.json` keys.

`config.json` uses Llama keys (Mixtral keys for a mixture of experts without shared experts), so a
checkpoint of the default architecture loads in transformers' LlamaForCausalLM / MixtralForCausalLM.
Options HF has no key for (learned/sinusoidal positions, dropout, shared experts) live under
the "tiaoyu" key, which HF ignores.

Open families: a Hugging Face `config.json` of llama, mistral, qwen2 or qwen3 is read as it is
(transformers 4.x keys `rope_theta`/`rope_scaling`, 5.x `rope_parameters`); `family` remembers the
`model_type` and `hf_config` the file, so writing the model back keeps its family. The switches
the families need: explicit `head_size` (qwen3), q/k/v(/o) biases (qwen2, llama `attention_bias`),
MLP biases (llama `mlp_bias`), a per-head RMSNorm on queries and keys (qwen3), RoPE scaling
(linear, llama3, yarn) and a sliding attention window (mistral).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from tiaoyu_cli.errors import TiaoyuError

POSITIONS = ("rope", "learned", "sinusoidal")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe")  # HF model_types read as open families
MOE_FAMILIES = ("qwen2_moe", "qwen3_moe")
SAVE_DTYPES = ("float32", "bfloat16", "float16")  # the dtypes a model folder is written in (config.json `dtype`)


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    dim: int = 128  # hidden size d
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention: n_heads / n_kv_heads query heads share one K/V head
    ffn_dim: int = 384  # SwiGLU hidden size (per expert for MoE)
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    position: str = "rope"  # rope | learned | sinusoidal
    # mixture of experts (n_experts = 0 means a dense SwiGLU FFN)
    n_experts: int = 0
    n_experts_per_tok: int = 2
    n_shared_experts: int = 0
    moe_aux_loss_coef: float = 0.01
    # sequence-level head: reward model (1) or classifier (n labels); 0 = language model only
    num_labels: int = 0
    id2label: dict[str, str] = field(default_factory=dict)
    bos_token_id: int = 2
    eos_token_id: int = 3
    pad_token_id: int = 0
    # open model families (module docstring); the defaults are tiaoyu's own architecture
    family: str = ""  # "" = tiaoyu's own; else the Hugging Face model_type it was read from
    head_size: int = 0  # per-head size when it is not dim // n_heads (0 = dim // n_heads)
    qkv_bias: bool = False  # biases on q_proj, k_proj, v_proj
    o_bias: bool = False  # a bias on o_proj
    mlp_bias: bool = False  # biases on gate_proj, up_proj, down_proj
    qk_norm: bool = False  # RMSNorm over every query and key head before RoPE (q_norm, k_norm)
    rope_scaling: dict = field(default_factory=dict)  # {"rope_type": linear|llama3|yarn, …}; {} = plain RoPE
    sliding_window: int = 0  # a query sees the keys of at most this many positions, itself included (0 = all)
    # Qwen-MoE layout (family qwen2_moe / qwen3_moe): mlp.gate, mlp.experts.E.{gate,up,down}_proj
    expert_ffn_dim: int = 0  # hidden size of each expert (0 = ffn_dim)
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities (tiaoyu's and Mixtral's: always)
    gated_shared_ffn_dim: int = 0  # qwen2_moe: a shared expert of this size, scaled by sigmoid(gate·x) (0 = none)
    dense_layers: list = field(default_factory=list)  # layers with a plain SwiGLU (ffn_dim) instead of experts
    hf_config: dict = field(default_factory=dict, compare=False, repr=False)  # the family's config.json as read (kept when written back)
    # the dtype an open family's folder is written in: its source's ("bfloat16", "float16", "float32"), or the one
    # --dtype asks for; tiaoyu's own checkpoints are always fp32 ("" = float32)
    save_dtype: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.head_size or self.dim // self.n_heads

    @property
    def sparse_mlp(self) -> bool:
        """The experts are the Qwen-MoE layout (`mlp.*`, model/moe.py SparseMoE) rather than Mixtral's."""
        return self.family in MOE_FAMILIES and self.n_experts > 0

    @property
    def plain_attention(self) -> bool:
        """Attention the one-token decode steps compute: no q/k norms and no sliding window."""
        return not self.qk_norm and not self.sliding_window

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise TiaoyuError(f"model config: {msg}")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        if self.head_size < 0:
            bad(f"head_size must be positive (or 0: dim // n_heads), got {self.head_size}")
        if not self.head_size and self.dim % self.n_heads:
            bad(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            bad(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.position not in POSITIONS:
            bad(f"position must be one of {', '.join(POSITIONS)}, got {self.position!r}")
        if self.position == "rope" and self.head_dim % 2:
            bad(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.n_experts and not (1 <= self.n_experts_per_tok <= self.n_experts):
            bad(f"n_experts_per_tok must be in 1..{self.n_experts}, got {self.n_experts_per_tok}")
        if not 0.0 <= self.dropout < 1.0:
            bad(f"dropout must be in [0, 1), got {self.dropout}")
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        if kind not in ROPE_TYPES:
            bad(f"rope type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        if kind != "default" and self.position != "rope":
            bad(f"rope scaling {kind!r} needs position=rope")
        if self.sliding_window < 0:
            bad(f"sliding_window must be >= 0, got {self.sliding_window}")
        if self.save_dtype not in ("", *SAVE_DTYPES):
            bad(f"save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {self.save_dtype!r}")

    def replace(self, **overrides: Any) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TiaoyuError(f"unknown model option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **overrides)

    # ---- Hugging Face config.json ------------------------------------------------------------
    @property
    def hf_compatible(self) -> bool:
        """True when transformers can load this architecture unchanged (Llama or Mixtral)."""
        return self.position == "rope" and self.n_shared_experts == 0

    def to_hf_dict(self) -> dict[str, Any]:
        if self.family:
            return self._family_hf_dict()
        moe = self.is_moe
        if self.num_labels:
            arch = ("Mixtral" if moe else "Llama") + "ForSequenceClassification"
        else:
            arch = ("Mixtral" if moe else "Llama") + "ForCausalLM"
        d: dict[str, Any] = {
            "architectures": [arch],
            "model_type": "mixtral" if moe else "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.ffn_dim,
            "max_position_embeddings": self.max_seq_len,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rms_norm_eps": self.norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "initializer_range": 0.02,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
            "dtype": "float32",
            "use_cache": True,
            "tiaoyu": {
                "position": self.position,
                "dropout": self.dropout,
                "n_shared_experts": self.n_shared_experts,
                "moe_aux_loss_coef": self.moe_aux_loss_coef,
            },
        }
        if moe:
            d.update(
                num_local_experts=self.n_experts,
                num_experts_per_tok=self.n_experts_per_tok,
                router_aux_loss_coef=self.moe_aux_loss_coef,
                output_router_logits=False,
                sliding_window=None,
            )
        if self.num_labels:
            d["num_labels"] = self.num_labels
            d["id2label"] = dict(self.id2label) or {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            d["label2id"] = {v: int(k) for k, v in d["id2label"].items()}
        return d

    def _family_hf_dict(self) -> dict[str, Any]:
        """An open family's config.json: the file it was read from, with the sizes and ids of this config."""
        d = json.loads(json.dumps(self.hf_config))  # a deep copy
        d.update({
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.ffn_dim,
            "rms_norm_eps": self.norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
        })
        if self.head_size or "head_dim" in d:
            d["head_dim"] = self.head_dim
        if self.sparse_mlp:
            d.update({k: v for k, v in (("num_experts", self.n_experts), ("num_local_experts", self.n_experts))
                      if k in d})
            d.update(num_experts_per_tok=self.n_experts_per_tok, norm_topk_prob=self.norm_topk_prob)
        for key in ("torch_dtype", "dtype"):  # the dtype the weights are written in (checkpoint.write_model_folder)
            if key in d or key == "dtype":
                d[key] = self.save_dtype or "float32"
        head = "ForSequenceClassification" if self.num_labels else "ForCausalLM"
        d["architectures"] = [_HF_CLASS[self.family] + head]
        for k in ("num_labels", "id2label", "label2id"):
            d.pop(k, None)
        if self.num_labels:  # a reward model or classifier on an open family: transformers' *ForSequenceClassification
            d["id2label"] = dict(self.id2label) or {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            d["label2id"] = {v: int(k) for k, v in d["id2label"].items()}
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        model_type = d.get("model_type")
        if "tiaoyu" not in d and model_type not in (None, "mixtral"):  # tiaoyu's own files carry "tiaoyu"
            return cls._from_family(d)
        try:
            extra = d.get("tiaoyu", {}) or {}
            rope_theta = d.get("rope_theta")
            if rope_theta is None:
                rope_theta = (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
            num_labels = 0
            arch = (d.get("architectures") or [""])[0]
            if arch.endswith("ForSequenceClassification"):
                num_labels = int(d.get("num_labels") or len(d.get("id2label") or {}) or 1)
            n_heads = int(d["num_attention_heads"])
            return cls(
                vocab_size=int(d["vocab_size"]),
                dim=int(d["hidden_size"]),
                n_layers=int(d["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
                ffn_dim=int(d["intermediate_size"]),
                max_seq_len=int(d.get("max_position_embeddings", 2048)),
                rope_theta=float(rope_theta),
                norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                tie_embeddings=bool(d.get("tie_word_embeddings", True)),
                dropout=float(extra.get("dropout", 0.0)),
                position=str(extra.get("position", "rope")),
                n_experts=int(d.get("num_local_experts", 0) or 0),
                n_experts_per_tok=int(d.get("num_experts_per_tok", 2) or 2),
                n_shared_experts=int(extra.get("n_shared_experts", 0)),
                moe_aux_loss_coef=float(extra.get("moe_aux_loss_coef", d.get("router_aux_loss_coef", 0.01))),
                num_labels=num_labels,
                id2label={str(k): str(v) for k, v in (d.get("id2label") or {}).items()} if num_labels else {},
                bos_token_id=int(d.get("bos_token_id", 2) if d.get("bos_token_id") is not None else 2),
                eos_token_id=_first_int(d.get("eos_token_id"), 3),
                pad_token_id=int(d.get("pad_token_id", 0) if d.get("pad_token_id") is not None else 0),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise TiaoyuError(f"config.json: missing or invalid key ({e})") from None


    @classmethod
    def _from_family(cls, d: dict[str, Any]) -> "ModelConfig":
        """An open family's config.json (module docstring), with transformers' defaults for absent keys."""
        family = d.get("model_type")
        if family not in FAMILIES:
            raise TiaoyuError(f"config.json: model_type {family!r} is not supported; supported: "
                              f"{', '.join(FAMILIES)}, mixtral")
        arch = (d.get("architectures") or [""])[0]
        if arch and not arch.endswith(("ForCausalLM", "ForSequenceClassification")):
            raise TiaoyuError(f"config.json: architecture {arch} is not a causal language model "
                              f"(supported: {', '.join(_HF_CLASS[f] + 'ForCausalLM' for f in FAMILIES)})")
        num_labels = 0
        if arch.endswith("ForSequenceClassification"):
            num_labels = int(d.get("num_labels") or len(d.get("id2label") or {}) or 1)
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise TiaoyuError(f"config.json: hidden_act {act!r} is not supported (only silu)")
        defaults = _FAMILY_DEFAULTS[family]

        def get(key: str, default: Any = None) -> Any:
            v = d.get(key)
            return defaults.get(key, default) if v is None else v

        try:
            n_heads = int(d["num_attention_heads"])
            dim = int(d["hidden_size"])
            head_dim = int(get("head_dim") or dim // n_heads)
            max_pos = int(get("max_position_embeddings", 2048))
            theta, scaling = _rope_settings(d, max_pos)
            window = 0
            if family == "mistral":
                window = int(get("sliding_window") or 0)
            elif family in ("qwen2", "qwen3", *MOE_FAMILIES):
                sliding = [t for t in (d.get("layer_types") or []) if t == "sliding_attention"]
                if sliding or (d.get("use_sliding_window") and not d.get("layer_types")):
                    raise TiaoyuError(f"config.json: {family} with sliding-window layers (use_sliding_window) "
                                      "is not supported")
            bias = bool(d.get("attention_bias", False))
            n_layers = int(d["num_hidden_layers"])
            moe: dict[str, Any] = {}
            if family in MOE_FAMILIES:
                n_exp = int(d.get("num_experts") or d.get("num_local_experts") or 0)
                step = int(d.get("decoder_sparse_step") or 1)
                only = [int(i) for i in d.get("mlp_only_layers") or []]
                moe = dict(
                    n_experts=n_exp,
                    n_experts_per_tok=int(d.get("num_experts_per_tok") or 1),
                    expert_ffn_dim=int(d.get("moe_intermediate_size") or 0),
                    norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                    gated_shared_ffn_dim=int(get("shared_expert_intermediate_size") or 0) if family == "qwen2_moe" else 0,
                    dense_layers=[i for i in range(n_layers) if i in only or not (n_exp > 0 and (i + 1) % step == 0)],
                    moe_aux_loss_coef=float(get("router_aux_loss_coef", 0.001)),
                )
            return cls(
                vocab_size=int(d["vocab_size"]),
                dim=dim,
                n_layers=n_layers,
                n_heads=n_heads,
                n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
                ffn_dim=int(d["intermediate_size"]),
                max_seq_len=max_pos,
                rope_theta=float(theta),
                norm_eps=float(get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(get("tie_word_embeddings", False)),
                bos_token_id=_first_int(d.get("bos_token_id"), 0),
                eos_token_id=_first_int(d.get("eos_token_id"), 0),
                pad_token_id=_first_int(d.get("pad_token_id"), 0),
                num_labels=num_labels,
                id2label={str(k): str(v) for k, v in (d.get("id2label") or {}).items()} if num_labels else {},
                family=family,
                head_size=head_dim if head_dim != dim // n_heads or dim % n_heads else 0,
                qkv_bias=True if family in ("qwen2", "qwen2_moe") else bias,
                o_bias=bias and family in ("llama", "qwen3", "qwen3_moe"),
                mlp_bias=bool(d.get("mlp_bias", False)) and family == "llama",
                qk_norm=family in ("qwen3", "qwen3_moe"),
                rope_scaling=scaling,
                sliding_window=window if 0 < window < max_pos else 0,
                hf_config=dict(d),
                save_dtype=next((v for v in (d.get("dtype"), d.get("torch_dtype")) if v in SAVE_DTYPES), ""),
                **moe,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise TiaoyuError(f"config.json: missing or invalid key ({e})") from None


_HF_CLASS = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "qwen2_moe": "Qwen2Moe",
             "qwen3_moe": "Qwen3Moe"}
# transformers' defaults for keys a config.json may leave out
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048},
    "mistral": {"max_position_embeddings": 32768, "sliding_window": 4096},
    "qwen2": {"max_position_embeddings": 32768},
    "qwen3": {"max_position_embeddings": 32768, "head_dim": 128},
    "qwen2_moe": {"max_position_embeddings": 32768, "shared_expert_intermediate_size": 5632},
    "qwen3_moe": {"max_position_embeddings": 32768, "head_dim": 128},
}


def _rope_settings(d: dict[str, Any], max_pos: int) -> tuple[float, dict]:
    """(theta, scaling) from transformers 4.x keys (`rope_theta`, `rope_scaling` with `type` or `rope_type`)
    or 5.x `rope_parameters`; scaling is {} for plain RoPE, else {"rope_type": …, factor and the type's keys}."""
    params = d.get("rope_parameters") or {}
    if params and all(isinstance(v, dict) for v in params.values()):  # per layer type (5.x)
        kinds = list(params.values())
        if any(k != kinds[0] for k in kinds):
            raise TiaoyuError("config.json: different RoPE settings per layer type are not supported")
        params = kinds[0]
    merged = {**(d.get("rope_scaling") or {}), **params}
    theta = merged.get("rope_theta", d.get("rope_theta"))
    theta = 10000.0 if theta is None else float(theta)
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if kind not in ROPE_TYPES:
        raise TiaoyuError(f"config.json: rope type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if float(merged.get("partial_rotary_factor", d.get("partial_rotary_factor") or 1.0)) != 1.0:
        raise TiaoyuError("config.json: partial_rotary_factor is not supported")
    if kind == "default":
        return theta, {}
    scaling = {k: v for k, v in merged.items() if k not in ("rope_theta", "type", "rope_type") and v is not None}
    scaling["rope_type"] = kind
    if kind in ("llama3", "yarn"):
        scaling.setdefault("original_max_position_embeddings", max_pos)
    if kind in ("linear", "llama3") and "factor" not in scaling:
        raise TiaoyuError(f"config.json: rope type {kind!r} needs a factor")
    if kind == "llama3" and not {"low_freq_factor", "high_freq_factor"} <= set(scaling):
        raise TiaoyuError("config.json: rope type 'llama3' needs low_freq_factor and high_freq_factor")
    return theta, scaling


def _first_int(v: Any, default: int) -> int:
    if v is None:
        return default
    if isinstance(v, list):
        return int(v[0]) if v else default
    return int(v)


# Presets. Parameter counts are for vocab 4096 (tiny) / 6400 (others), tied head.
PRESETS: dict[str, dict[str, Any]] = {
    # ~1.3M: tests and CPU demos
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, max_seq_len=256, vocab_size=4096),
    # ~26M: minimind-small scale (d512, L8)
    "small": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, ffn_dim=1408, max_seq_len=512, vocab_size=6400),
    # ~105M
    "base": dict(dim=768, n_layers=16, n_heads=12, n_kv_heads=4, ffn_dim=2048, max_seq_len=1024, vocab_size=6400),
    # 4 experts, top-2 (Mixtral layout)
    "moe-small": dict(
        dim=512, n_layers=8, n_heads=8, n_kv_heads=2, ffn_dim=1408, max_seq_len=512, vocab_size=6400,
        n_experts=4, n_experts_per_tok=2,
    ),
    # tiny MoE for tests and CPU demos
    "moe-tiny": dict(
        dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=256, max_seq_len=256, vocab_size=4096,
        n_experts=4, n_experts_per_tok=2,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise TiaoyuError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ModelConfig().replace(**{**PRESETS[name], **overrides})


def parse_overrides(items: list[str] | None, what: str = "--model") -> dict[str, Any]:
    """--model overrides: ["dim=256", "position=learned", "tie_embeddings=false"] → typed dict (JSON literals where they parse)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise TiaoyuError(f"{what} {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = {"true": True, "false": False}.get(v.lower(), v)
    return out
