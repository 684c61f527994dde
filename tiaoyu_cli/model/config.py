"""Model configuration, presets, and the mapping to Hugging Face `config.json` keys.

`config.json` uses Llama keys (Mixtral keys for a mixture of experts without shared experts), so a
checkpoint of the default architecture loads in transformers' LlamaForCausalLM / MixtralForCausalLM.
Options HF has no key for (learned/sinusoidal positions, dropout, shared experts) live under
the "tiaoyu" key, which HF ignores.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from tiaoyu_cli.errors import TiaoyuError

POSITIONS = ("rope", "learned", "sinusoidal")


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

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise TiaoyuError(f"model config: {msg}")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
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

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
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
