"""`tiaoyu export CKPT --format hf -o out/`: a folder Hugging Face transformers loads as is.

A tiaoyu checkpoint already uses the Llama/Mixtral layout (DESIGN §3–4), so the export is a
clean copy of the files transformers reads — config.json, model.safetensors, tokenizer.model,
tokenizer_config.json, generation_config.json — without the training state (optimizer moments,
RNG, data position), plus a model card README.md:

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("out/")
    tok = AutoTokenizer.from_pretrained("out/")

The weights are re-saved from the loaded model, so tensors the model does not own (e.g. a PPO
value head kept beside the policy) are left out. Architectures transformers has no class for
(learned or sinusoidal positions, shared experts) are refused with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from tiaoyu_cli.checkpoint import (has_weights, load_model, load_tokenizer, load_trainer_info, resolve_checkpoint,
                                   save_model_files)
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.io import atomic_dir

HF_FILES = ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json", "generation_config.json")


def check_hf_exportable(cfg, what: str = "hf") -> None:
    """Raise when transformers cannot load this architecture unchanged."""
    if cfg.position != "rope":
        raise TiaoyuError(f"cannot export to {what}: the model uses {cfg.position} positions, which the Llama "
                          "architecture does not have (it uses RoPE); the checkpoint itself still works with tiaoyu")
    if cfg.n_shared_experts:
        raise TiaoyuError(f"cannot export to {what}: the model has {cfg.n_shared_experts} shared expert(s), which "
                          "Mixtral does not have; the checkpoint itself still works with tiaoyu")


def prepare_output(out: Path, force: bool) -> None:
    """Refuse to overwrite a non-empty folder or a file unless --force."""
    if out.exists() and not force:
        if out.is_file() or any(out.iterdir()):
            raise TiaoyuError(f"-o {out}: already exists and is not empty (use --force to replace it)")


def source_checkpoint(ckpt: str | os.PathLike) -> Path:
    """resolve_checkpoint, with a hint for LoRA adapter folders."""

    p = Path(ckpt)
    if p.is_dir() and (p / "adapter_config.json").exists() and not has_weights(p):
        raise TiaoyuError(f"{p} is a LoRA adapter, not a full model: merge it first "
                          f"(tiaoyu lora merge {p} -o merged/) and export the merged checkpoint")
    return resolve_checkpoint(p)


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def model_card(cfg, n_params: int, info: dict[str, Any], name: str) -> str:
    """README.md for the exported folder: what the model is, how it was trained, how to use it."""
    arch = cfg.to_hf_dict()["architectures"][0]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: " + ("text-classification" if cfg.num_labels else "text-generation"),
        "tags: [tiaoyu]",
        "---",
        "",
        f"# {name}",
        "",
        f"A {_fmt_params(n_params)}-parameter {arch} trained with tiaoyu "
        "(a toolkit that trains a small language model through its whole life).",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | {arch} |",
        f"| parameters | {n_params:,} |",
        f"| layers × hidden | {cfg.n_layers} × {cfg.dim} |",
        f"| heads (query / key-value) | {cfg.n_heads} / {cfg.n_kv_heads} |",
        f"| feed-forward | {'MoE ' + str(cfg.n_experts) + ' experts, top-' + str(cfg.n_experts_per_tok) + ', ' if cfg.is_moe else 'SwiGLU '}{cfg.ffn_dim} |",
        f"| context | {cfg.max_seq_len} tokens |",
        f"| vocabulary | {cfg.vocab_size} (SentencePiece, byte fallback) |",
        f"| tied embeddings | {'yes' if cfg.tie_embeddings else 'no'} |",
    ]
    if cfg.num_labels:
        labels = ", ".join(cfg.id2label.values()) if cfg.id2label else str(cfg.num_labels)
        lines.append(f"| score head | {cfg.num_labels} output(s): {labels} |")
    stage = info.get("stage")
    if stage:
        lines.append(f"| last stage | {stage} |")
    if info.get("step") is not None:
        lines.append(f"| steps | {info['step']} |")
    if info.get("tokens_seen"):
        lines.append(f"| tokens seen | {int(info['tokens_seen']):,} |")
    if info.get("parent"):
        lines.append(f"| trained from | {info['parent']} |")
    ev = info.get("eval") or {}
    if ev:
        lines += ["", "## Evaluation (held-out, at the end of training)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in ev.items()]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer" if not cfg.num_labels else
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
        "",
        "tok = AutoTokenizer.from_pretrained(\"PATH\")",
    ]
    if cfg.num_labels:
        lines += ["model = AutoModelForSequenceClassification.from_pretrained(\"PATH\")"]
    else:
        lines += [
            "model = AutoModelForCausalLM.from_pretrained(\"PATH\")",
            "msgs = [{\"role\": \"user\", \"content\": \"What is 3 + 4?\"}]",
            "ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors=\"pt\")",
            "out = model.generate(ids, max_new_tokens=32, do_sample=False)",
            "print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))",
        ]
    lines += [
        "```",
        "",
        "The chat template is ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n`); reasoning models write their",
        "thinking between `<think>` and `</think>` before the answer. With tiaoyu: `tiaoyu chat PATH`.",
        "",
    ]
    return "\n".join(lines)


def export_hf(ckpt: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> dict[str, Any]:
    """Write the HF folder atomically. Returns a summary {"out", "files", "parameters", "architecture"}."""

    src = source_checkpoint(ckpt)
    out = Path(out)
    if out.resolve() == src.resolve():
        raise TiaoyuError(f"-o {out} is the checkpoint itself; choose another folder")
    prepare_output(out, force)
    model, src = load_model(src)
    check_hf_exportable(model.config)
    tok = load_tokenizer(src)
    info = load_trainer_info(src)
    if out.is_file() and force:
        out.unlink()
    with atomic_dir(out) as tmp:
        save_model_files(tmp, model, tok)
        if (src / "generation_config.json").exists():  # keep the checkpoint's own generation settings
            shutil.copyfile(src / "generation_config.json", tmp / "generation_config.json")
        name = out.name or "tiaoyu-model"
        (tmp / "README.md").write_text(model_card(model.config, model.num_parameters(), info, name), encoding="utf-8")
    files = sorted(p.name for p in out.iterdir())
    arch = json.loads((out / "config.json").read_text(encoding="utf-8"))["architectures"][0]
    return {"out": str(out), "files": files, "parameters": model.num_parameters(), "architecture": arch,
            "source": str(src)}
