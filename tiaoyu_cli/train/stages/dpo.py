"""`tiaoyu rlhf dpo`: preference optimisation against a frozen reference, no reward model, no sampling.

    tiaoyu rlhf dpo ckpt/sft prefs.jsonl -o ckpt/dpo --beta 0.1 --epochs 1
    tiaoyu rlhf dpo ckpt/sft prefs.jsonl -o ckpt/dpo-lora --method lora --rank 8

Load the policy and its reference (the start checkpoint, --ref, or with LoRA the policy with its adapters
off), read the pairs, and hand a `DPOStage` (objectives/dpo.py) to the one run path; with --method lora the
final adapter is published at the top of the run folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tiaoyu_cli.data.preference import load_pairs
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.train.engine.outdir import publish_final_adapter
from tiaoyu_cli.train.engine.run import Plan, run_stage
from tiaoyu_cli.train.objectives.dpo import DPOConfig, DPOStage
from tiaoyu_cli.train.rl.lora import adapters_off, apply_lora_for_rl
from tiaoyu_cli.train.rl.models import load_policy, load_reference
from tiaoyu_cli.train.rl.prompts import split_holdout


@dataclass
class DPORunOptions:
    start: str  # policy checkpoint (usually SFT)
    data: str  # preference JSONL
    val: str | None = None  # held-out preference JSONL (default: --val-frac of data)
    ref: str | None = None  # reference checkpoint (default: start)
    method: str = "full"  # full | lora
    lora: dict | None = None  # LoRA options (rank, alpha, dropout, targets) for method lora
    skip_bad: bool = False


def prepare_dpo(opts: DPORunOptions, train, cfg: DPOConfig) -> Plan:
    """Load policy and reference, read the pairs."""
    cfg.validate()
    if opts.method not in ("full", "lora"):
        raise TiaoyuError(f"--method {opts.method!r}: choose full or lora")
    model, folder, tok = load_policy(opts.start, "DPO")
    max_len = cfg.max_len or model.config.max_seq_len
    if max_len > model.config.max_seq_len:
        raise TiaoyuError(f"--max-len {max_len} exceeds the model's context of {model.config.max_seq_len}")
    stats: dict = {}
    pairs = load_pairs(opts.data, tok, max_len, opts.skip_bad, stats)
    if opts.val is not None:
        held = load_pairs(opts.val, tok, max_len, opts.skip_bad)
    else:
        pairs, held = split_holdout(pairs, cfg.val_frac, train.seed)
    ref_model, ref_context, save_lora = None, None, None
    if opts.method == "lora":
        model, save_lora = apply_lora_for_rl(model, opts.lora or {}, tok, folder)
        if opts.ref is not None:  # an explicit reference: a full frozen model after all
            ref_model = load_reference(opts.ref, tok)
        else:
            ref_context = lambda: adapters_off(model)  # noqa: E731
    else:
        ref_model = load_reference(opts.ref or folder, tok)
    line = (f"dpo: {len(pairs)} training pairs, {len(held)} held out"
        + (f", {stats['skipped']} bad records skipped" if stats.get("skipped") else "")
        + f"; β {cfg.beta}, reference {opts.ref or folder}" + (" (adapters off)" if ref_context else "")
        + f"; {model.num_parameters(trainable_only=True) / 1e6:.2f}M trainable parameters")
    stage = DPOStage(pairs, held, cfg, batch_size=train.batch_size, ref_model=ref_model, ref_context=ref_context,
                     seed=train.seed, saver=save_lora)
    return Plan(model, stage, tok, parent=str(folder), lines=[line], eval_before=bool(held))


def run_dpo(opts: DPORunOptions, train, cfg: DPOConfig, log=print) -> dict:
    """`tiaoyu rlhf dpo`: train; returns the final metrics plus `before` (held-out metrics of the start).
    With --method lora the final adapter is also published at the top of the run folder."""
    res = run_stage("dpo", train, lambda: prepare_dpo(opts, train, cfg), log=log)
    if opts.method == "lora":
        publish_final_adapter(Path(train.out), log)
    return res
