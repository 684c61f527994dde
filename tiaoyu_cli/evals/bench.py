"""`tiaoyu eval bench CKPT PATH --task …`: one standard benchmark, one JSON result.

    result = run_bench("ckpt/base", "data/mmlu", BenchConfig(task="mmlu", shots=5))
    result["acc"], result["stderr"]["acc"], result["per_subject"]["anatomy"]["acc"]

Few-shot examples are the first K items of the same subject in the few-shot split (dev for
the CSV layouts, train for ARC/HellaSwag/GSM8K): deterministic, as lm-eval's `first_n` sampler.
Standard errors are lm-eval's: sqrt(p(1 - p) / (n - 1)) for a score p over n items.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tiaoyu_cli.checkpoint import load_model, load_tokenizer, load_trainer_info
from tiaoyu_cli.device import resolve_device, resolve_dtype
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.evals import bench_formats as bf
from tiaoyu_cli.evals.contamination import dirty_items
from tiaoyu_cli.evals.gsm8k import run_gsm8k
from tiaoyu_cli.evals.multiple_choice import MCRequest, loglikelihoods, mean_stderr, score_item
from tiaoyu_cli.infer.session import trained_with_tool_schemas

CHAT_STAGES = {"sft", "dpo", "ppo", "grpo", "reason", "reason-rl", "distill", "lora"}


@dataclass
class BenchConfig:
    task: str = "mmlu"
    shots: int = 0
    split: str = ""  # "" = the task's usual eval split
    fewshot_split: str = ""  # "" = dev (CSV layouts) or train (JSONL layouts)
    limit: int = 0  # first N items (0 = all)
    style: str = "letters"  # letters | cloze (CSV layouts)
    batch_size: int = 16
    max_new_tokens: int = 256  # gsm8k
    chat: str = "auto"  # gsm8k: auto | yes | no
    device: str = "auto"
    dtype: str = "fp32"
    bos: bool = True
    contamination: list[str] = field(default_factory=list)
    keep_items: bool = False  # per-item log-likelihoods / answers in the result
    tools: list[str] | None = None  # gsm8k: tools the model may call while answering (infer/tools.py)


def load_docs(path: str | os.PathLike, cfg: BenchConfig) -> tuple[list[bf.Doc], Callable[[bf.Doc], list[bf.Doc]], dict]:
    """The evaluated items, a function giving each item's few-shot examples, and subject names."""
    task = cfg.task
    if task not in bf.TASKS:
        raise TiaoyuError(f"--task {task!r}: choose one of {', '.join(bf.TASKS)}")
    split = cfg.split or bf.DEFAULT_SPLIT[task]
    files = bf.find_files(path, task, split)
    docs = bf.read_docs(files, task, cfg.style)
    if cfg.limit > 0:
        docs = docs[:cfg.limit]
    names = bf.subject_names(files)
    if cfg.shots <= 0:
        return docs, lambda d: [], names
    fsplit = cfg.fewshot_split or bf.FEWSHOT_SPLIT[task]
    pool = bf.read_docs(bf.fewshot_files(path, task, fsplit, files), task, cfg.style)
    by_subject: dict[str, list[bf.Doc]] = {}
    for d in pool:
        by_subject.setdefault(d.subject, []).append(d)
    per_subject = task in bf.CSV_TASKS

    def shots_for(d: bf.Doc) -> list[bf.Doc]:
        src = by_subject.get(d.subject) if per_subject else pool
        if not src:
            raise TiaoyuError(f"--shots {cfg.shots}: no few-shot examples of subject '{d.subject}' in the "
                              f"'{fsplit}' split")
        picked = [x for x in src if x.where != d.where][:cfg.shots]
        if len(picked) < cfg.shots:
            raise TiaoyuError(f"--shots {cfg.shots}: the '{fsplit}' split has only {len(picked)} examples "
                              f"of subject '{d.subject}'")
        return picked

    return docs, shots_for, names


def summarize(scores: list[dict], keys: tuple[str, ...]) -> dict:
    out: dict = {"n": len(scores)}
    stderr = {}
    for k in keys:
        m, se = mean_stderr([s[k] for s in scores])
        out[k], stderr[k] = m, se
    out["stderr"] = stderr
    return out


def run_bench(ckpt: str | os.PathLike, path: str | os.PathLike, cfg: BenchConfig,
              progress: Callable[[int, int], Callable[[int], None]] | None = None) -> dict:
    """Evaluate; `progress(total, …)` may return a callback taking the number of items just done."""
    docs, shots_for, names = load_docs(path, cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model, d = load_model(ckpt, device)
    tok = load_tokenizer(d)
    step = progress(len(docs)) if progress else None
    if cfg.task == "gsm8k":
        stage = load_trainer_info(d).get("stage")
        chat = cfg.chat == "yes" or (cfg.chat == "auto" and stage in CHAT_STAGES)
        schemas = trained_with_tool_schemas(Path(d)) is not False  # as the checkpoint learned its tools
        scores = run_gsm8k(model, tok, docs, shots_for, chat, cfg.max_new_tokens, cfg.batch_size, cfg.tools, step,
                           schemas_in_prompt=schemas)
        keys: tuple[str, ...] = ("acc", "acc_flexible")
        extra = {"chat_template": chat}
        if cfg.tools:
            extra["tools"] = cfg.tools
            extra["tool_call_rate"] = sum(bool(s["tool_calls"]) for s in scores) / max(1, len(scores))
    else:
        reqs = []
        for doc in docs:
            prefix = bf.fewshot_prefix(cfg.task, doc.subject, shots_for(doc), names, cfg.style)
            reqs.append(MCRequest(prefix + doc.text, [doc.delimiter + c for c in doc.choices]))
        lls = loglikelihoods(model, tok, reqs, cfg.batch_size, cfg.bos, dtype, step)
        scores = [dict(score_item(ll, doc.choices, doc.gold), lls=ll) for ll, doc in zip(lls, docs)]
        keys = ("acc", "acc_norm", "acc_bytes")
        extra = {"chance": sum(1 / len(doc.choices) for doc in docs) / len(docs)}
    result = {"task": cfg.task, "style": cfg.style if cfg.task in bf.CSV_TASKS else None, "shots": cfg.shots,
              "split": cfg.split or bf.DEFAULT_SPLIT[cfg.task], "checkpoint": str(d), "data": str(path),
              **summarize(scores, keys), **extra}
    subjects: dict[str, list[dict]] = {}
    for doc, s in zip(docs, scores):
        subjects.setdefault(doc.subject, []).append(s)
    result["per_subject"] = {k: summarize(v, keys) for k, v in sorted(subjects.items())}
    if cfg.contamination:
        dirty, records = dirty_items([doc.raw for doc in docs], cfg.contamination)
        clean = [s for s, bad in zip(scores, dirty) if not bad]
        result["contamination"] = {
            "train_files": [str(p) for p in cfg.contamination], "train_records": records, "ngram": 13,
            "dirty": sum(dirty), "dirty_share": sum(dirty) / len(docs),
            "clean": summarize(clean, keys) if clean else {"n": 0},
        }
    if cfg.keep_items:
        result["items"] = [{"where": doc.where, "subject": doc.subject, "gold": doc.gold,
                            **{k: v for k, v in s.items()}} for doc, s in zip(docs, scores)]
    return result
