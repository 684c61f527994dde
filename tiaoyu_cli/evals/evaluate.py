"""Evaluate a checkpoint on a data file: the number each stage is judged by.

    tiaoyu eval ckpt/base synth/text.val.jsonl          # val loss, perplexity, bits per byte
    tiaoyu eval ckpt/sft  synth/chat.val.jsonl          # answer accuracy (+ loss on the answers)
    tiaoyu eval ckpt/rm   synth/preference.val.jsonl    # pairwise accuracy of a reward model
    tiaoyu eval ckpt/cls  synth/classification.val.jsonl

The kind of data is detected from the first record (DESIGN §1), or a folder of token shards:

| data | needs | metrics |
|---|---|---|
| text `{"text"}` or tokens/ | a language model | loss = mean −log p(token), perplexity = e^loss, bits per byte = Σ nats / ln 2 / UTF-8 bytes |
| chat `{"messages"}` | a language model | answer accuracy on the last assistant turn; loss on assistant tokens |
| verifiable `{"prompt","answer"}` | a language model | answer accuracy (greedy, `tiaoyu_cli.train.rl.answers`) |
| preference `{"prompt","chosen","rejected"}` | a reward model (score head, num_labels = 1) | pairwise accuracy = share of pairs with r(chosen) > r(rejected) (a tie counts half), mean margin |
| preference + `ref=` | a DPO policy and its reference | implicit reward r = log π(y|x) − log π_ref(y|x); pairwise accuracy |
| classification `{"text","label"}` | a classifier (score head, num_labels ≥ 2) | accuracy of the argmax label, and of always answering the majority label |

Encoders and metrics are the stages' own (data/preference.py, train/objectives/reward.py,
train/objectives/classify.py, train/rl/answers.py), so `tiaoyu eval` reports the number the stage
itself reports during training.
Data of a kind the checkpoint cannot judge (preference pairs on a plain language model, labels on
a model without a classifier head) is a TiaoyuError, not a meaningless number.

Text windows: the documents are encoded as pretraining sees them (<s> doc </s>; an open model's tokenizer
puts its own `document_affixes` around each, as `tokenize encode` does), joined into one
stream and cut into windows of seq_len + 1 tokens that overlap by one, so every token after the
first is predicted exactly once.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from tiaoyu_cli.checkpoint import load_model, load_tokenizer, resolve_checkpoint
from tiaoyu_cli.data.formats import record_kind
from tiaoyu_cli.data.jsonl import iter_jsonl
from tiaoyu_cli.data.preference import encode_pair, pad_right
from tiaoyu_cli.data.shards import check_fingerprint, open_tokens
from tiaoyu_cli.device import autocast, resolve_device, resolve_dtype
from tiaoyu_cli.errors import DataError, TiaoyuError
from tiaoyu_cli.model.quant import quantize_model
from tiaoyu_cli.train.losses.lm import cross_entropy
from tiaoyu_cli.train.objectives.classify import classify_texts
from tiaoyu_cli.train.objectives.reward import evaluate_pairs
from tiaoyu_cli.train.rl.answers import answer_accuracy
from tiaoyu_cli.train.rl.models import load_reference

KINDS = ("text", "chat", "reasoning", "verifiable", "preference", "classification")


@dataclass
class EvalConfig:
    batch_size: int = 16
    seq_len: int = 0  # text windows; 0 = the model's max_seq_len
    limit: int = 0  # evaluate the first N records (0 = all)
    max_new_tokens: int = 64  # answer accuracy: most tokens generated per answer
    device: str = "auto"
    dtype: str = "fp32"  # fp32 | bf16 | auto (autocast, like training)
    quantize: str = "none"  # none | int8 (weight-only int8 Linear layers, CPU)


# ---- what kind of data, what kind of checkpoint ------------------------------------------------

def eval_kind(rec: dict) -> str | None:
    """The kind of one record as eval reads it: its DESIGN §1 kind (data.formats.record_kind), a chat record
    whose assistant turns carry "reasoning" told apart as "reasoning"; None when it has no known shape."""
    kind = record_kind(rec)
    if kind == "chat":
        msgs = rec["messages"]
        if isinstance(msgs, list) and any(isinstance(m, dict) and m.get("reasoning") is not None for m in msgs):
            return "reasoning"
    return kind


def detect_kind(data: str | os.PathLike) -> str:
    """'tokens' for a folder of token shards, else the kind of the first record of a JSONL file."""

    p = Path(data)
    if p.is_dir():
        if (p / "meta.json").exists():
            return "tokens"
        raise TiaoyuError(f"{p}: is a folder but not a token folder (no meta.json); give a JSONL file or tokens/")
    for line, rec in iter_jsonl(p):
        kind = eval_kind(rec)
        if kind is None:
            raise DataError(f"unknown record kind (keys {sorted(rec)}); expected one of: text, chat (messages), "
                            "verifiable (prompt, answer), preference (prompt, chosen, rejected), "
                            "classification (text, label)", str(p), line)
        return kind
    raise TiaoyuError(f"{p}: no records")


def model_kind(cfg) -> str:
    """'lm', 'reward' (score head with one output) or 'classifier' (score head with ≥ 2 labels)."""
    if cfg.num_labels == 1:
        return "reward"
    if cfg.num_labels >= 2:
        return "classifier"
    return "lm"


KIND_NAMES = {"lm": "a language model", "reward": "a reward model (score head, num_labels = 1)",
              "classifier": "a classifier (score head, num_labels ≥ 2)"}


def check_compatible(data_kind: str, mkind: str, has_ref: bool, ckpt: Path) -> None:
    """Raise a TiaoyuError that says what to use instead when `data_kind` cannot be judged by the checkpoint."""
    if data_kind == "preference":
        if mkind == "reward" or (mkind == "lm" and has_ref):
            return
        if mkind == "lm":
            raise TiaoyuError(f"preference pairs need a reward checkpoint (score head, num_labels = 1, made by "
                              f"`tiaoyu rlhf reward`), but {ckpt} is a language model; to score a DPO policy by its "
                              f"implicit reward pass its reference model with --ref REF_CKPT")
        raise TiaoyuError(f"preference pairs need a reward checkpoint (num_labels = 1), but {ckpt} is "
                          f"{KIND_NAMES[mkind]}")
    if data_kind == "classification":
        if mkind == "classifier":
            return
        raise TiaoyuError(f"classification records need a classifier checkpoint (score head with one output per "
                          f"label, made by `tiaoyu sft --task classify`), but {ckpt} is {KIND_NAMES[mkind]}")
    if has_ref:
        raise TiaoyuError("--ref is only used with preference pairs (DPO implicit reward)")
    if mkind != "lm":
        raise TiaoyuError(f"{data_kind} data is scored by a language model's next-token predictions, but {ckpt} is "
                          f"{KIND_NAMES[mkind]}; evaluate it on "
                          + ("preference pairs" if mkind == "reward" else "classification records"))


# ---- loading ------------------------------------------------------------------------------------

def load_for_eval(ckpt: str | os.PathLike, device: torch.device, quantize: str = "none"):
    path = resolve_checkpoint(ckpt)
    tok = load_tokenizer(path)
    model, path = load_model(path, device=device)
    model.eval()
    if quantize != "none":
        model = quantize_model(model, quantize)
    return model, tok, path


def _records(data: Path, kind: str, limit: int) -> list[tuple[int, dict]]:
    """All records (up to `limit`) checked to be of `kind`; a record of another kind is a DataError."""

    out = []
    for line, rec in iter_jsonl(data):
        got = eval_kind(rec)
        if got != kind and not {got, kind} <= {"chat", "reasoning"}:
            raise DataError(f"expected a {kind} record like the first one, got {got or 'an unknown kind'} "
                            f"(keys {sorted(rec)})", str(data), line)
        out.append((line, rec))
        if limit and len(out) >= limit:
            break
    if not out:
        raise TiaoyuError(f"{data}: no records")
    return out


def _text(rec: dict, key: str, path: Path, line: int) -> str:
    v = rec.get(key)
    if not isinstance(v, str):
        raise DataError(f"expected a string, got {type(v).__name__}", str(path), line, key)
    return v


def _messages(value, tokenizer, path: Path, line: int, key: str, role: str = "user") -> list[dict]:
    """A str|messages field as a list of messages (a string becomes one message of `role`)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list):
        raise DataError(f"expected a string or a list of messages, got {type(value).__name__}", str(path), line, key)
    try:
        tokenizer._check_messages(value)
    except TiaoyuError as e:
        raise DataError(str(e), str(path), line, key) from None
    return list(value)


# ---- text: loss, perplexity, bits per byte ----------------------------------------------------------

def _sum_nll(model, windows: torch.Tensor) -> float:
    """Σ −log p(x_{t+1} | x_≤t) over a batch of windows [B, n+1] (fp32 sum)."""
    out = model(windows[:, :-1])
    return float(cross_entropy(out.logits, windows[:, 1:], reduction="sum"))


def text_metrics(model, stream: torch.Tensor, n_bytes: int, seq_len: int, batch_size: int) -> dict[str, float]:
    """Loss over a token stream [N], cut into windows of seq_len + 1 that overlap by one token.

        loss = (1/(N−1)) Σ_t −ln p(x_t | x_<t within its window)
        perplexity = e^loss,   bits per byte = Σ nats / ln 2 / n_bytes
    """
    device = next(model.parameters()).device
    N = int(stream.numel())
    if N < 2:
        raise TiaoyuError("need at least two tokens to measure a loss")
    starts = list(range(0, N - 1, seq_len))
    total, count = 0.0, 0
    full = [s for s in starts if s + seq_len + 1 <= N]
    for i in range(0, len(full), batch_size):
        b = torch.stack([stream[s:s + seq_len + 1] for s in full[i:i + batch_size]]).to(device)
        total += _sum_nll(model, b)
        count += b.shape[0] * seq_len
    tail = [s for s in starts if s + seq_len + 1 > N]
    for s in tail:  # the last, shorter window
        b = stream[s:].unsqueeze(0).to(device)
        total += _sum_nll(model, b)
        count += b.shape[1] - 1
    loss = total / count
    res = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}
    if n_bytes > 0:
        res["bits_per_byte"] = total / math.log(2) / n_bytes
    return res


def text_stream(records: list[tuple[int, dict]], tokenizer, path: Path) -> tuple[torch.Tensor, int]:
    """<s> doc </s> <s> doc </s> … as one tensor (the token shards' layout), and the UTF-8 byte count of the
    documents."""
    docs = [_text(rec, "text", path, line) for line, rec in records]
    prefix, suffix = tokenizer.document_affixes()
    ids = tokenizer.encode_batch(docs, num_threads=1)
    stream = torch.tensor([t for d in ids for t in (*prefix, *d, *suffix)], dtype=torch.long)
    return stream, sum(len(d.encode("utf-8")) for d in docs)


def shard_stream(folder: Path, tokenizer, limit_tokens: int) -> tuple[torch.Tensor, int, str]:
    """The val split of a token folder (else the folder itself) as a tensor, its byte count, the split used."""

    train, val = open_tokens(folder)
    shards = val if val is not None else train
    check_fingerprint(shards, tokenizer)
    n = shards.num_tokens if not limit_tokens else min(shards.num_tokens, limit_tokens)
    arr = shards.get(0, n).astype("int64")
    n_bytes = len(tokenizer.decode(arr.tolist(), skip_special=True).encode("utf-8"))
    return torch.from_numpy(arr), n_bytes, str(shards.folder)


# ---- preference pairs, classification, answers: the stages' own encoders and metrics ------------------

def masked_logps(model, seqs: list[list[int]], masks: list[list[int]], batch_size: int) -> torch.Tensor:
    """Σ log p(token) over the positions where mask = 1, per sequence: [N] (right padding)."""

    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # similar lengths together: less padding
    out = torch.empty(len(seqs))
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        ids, attn = pad_right([seqs[i] for i in idx], 0, device)
        lm, _ = pad_right([masks[i] for i in idx], 0, device)
        logits = model(ids, attention_mask=attn).logits[:, :-1].float()
        logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, T-1]
        out[idx] = (logp * lm[:, 1:]).sum(-1).cpu()
    return out


def preference_metrics(model, records, tokenizer, path: Path, batch_size: int, ref_model=None) -> dict[str, float]:
    """Reward model: pairwise accuracy of r(x, chosen) > r(x, rejected) (`rlhf reward`'s own metric: a tie
    counts half). With `ref_model` (a DPO policy): the implicit reward r = log π(y|x) − log π_ref(y|x)."""

    device = next(model.parameters()).device
    pairs = [encode_pair(tokenizer, rec, model.config.max_seq_len, str(path), line) for line, rec in records]
    if ref_model is None:
        res = evaluate_pairs(model, pairs, batch_size, device)
        return {"pairwise_accuracy": res["val_accuracy"], "mean_margin": res["val_margin"], "loss": res["val_loss"]}

    def implicit_reward(side: str) -> torch.Tensor:
        seqs = [getattr(p, f"{side}_ids") for p in pairs]
        masks = [getattr(p, f"{side}_mask") for p in pairs]
        return masked_logps(model, seqs, masks, batch_size) - masked_logps(ref_model, seqs, masks, batch_size)

    d = implicit_reward("chosen") - implicit_reward("rejected")
    return {"pairwise_accuracy": float((d > 0).float().mean() + 0.5 * (d == 0).float().mean()),
            "mean_margin": float(d.mean())}


def classification_metrics(model, records, path: Path, tokenizer, batch_size: int) -> dict[str, Any]:
    """Accuracy of the classifier's argmax label (`sft --task classify` reads <s> text </s>)."""

    id2label = model.config.id2label or {str(i): f"LABEL_{i}" for i in range(model.config.num_labels)}
    known = set(id2label.values())
    texts, gold = [], []
    for line, rec in records:
        label = _text(rec, "label", path, line)
        if label not in known:
            raise DataError(f"label {label!r} is not one of the classifier's labels ({', '.join(sorted(known))})",
                            str(path), line, "label")
        texts.append(_text(rec, "text", path, line))
        gold.append(label)
    pred = [p["label"] for p in classify_texts(model, tokenizer, texts, batch_size)]
    per = {lab: sum(p == g for p, g in zip(pred, gold) if g == lab) / gold.count(lab) for lab in sorted(set(gold))}
    majority = max(gold.count(lab) for lab in set(gold)) / len(gold)
    return {"accuracy": sum(p == g for p, g in zip(pred, gold)) / len(gold), "majority_accuracy": majority,
            "per_label_accuracy": per}


def assistant_loss(model, records, tokenizer, path: Path, batch_size: int) -> dict[str, float]:
    """Mean −log p over assistant tokens (the SFT objective on held-out conversations)."""
    max_len = model.config.max_seq_len
    seqs, masks = [], []
    for line, rec in records:
        msgs = _messages(rec.get("messages"), tokenizer, path, line, "messages")
        ids, mask = tokenizer.encode_chat(msgs)
        seqs.append(ids[:max_len])
        masks.append(mask[:max_len])
    n = sum(sum(m[1:]) for m in masks)
    if n == 0:
        return {}
    return {"answer_loss": -float(masked_logps(model, seqs, masks, batch_size).sum()) / n, "answer_tokens": n}


def answer_metrics(model, tokenizer, records, kind: str, path: Path, cfg: EvalConfig) -> dict[str, float]:
    """Greedy answers scored by the shared checker (tiaoyu_cli.train.rl.answers): the reference is a verifiable
    record's answer, or a chat record's last assistant message."""

    rep = answer_accuracy(model, tokenizer, [rec for _, rec in records], batch_size=cfg.batch_size,
                          max_new_tokens=cfg.max_new_tokens, require_think=kind == "reasoning", name=str(path))
    return {"answer_accuracy": rep.accuracy, "correct": rep.correct, "total": rep.total,
            "format_rate": rep.format_rate}


# ---- the entry point -------------------------------------------------------------------------------------

def evaluate(ckpt: str | os.PathLike, data: str | os.PathLike, cfg: EvalConfig | None = None,
             ref: str | os.PathLike | None = None) -> dict[str, Any]:
    """Evaluate checkpoint `ckpt` on `data`; returns {"checkpoint", "data", "kind", "records", <metrics>}."""

    cfg = cfg or EvalConfig()
    if cfg.batch_size < 1:
        raise TiaoyuError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.limit < 0 or cfg.seq_len < 0:
        raise TiaoyuError("--limit and --seq-len must not be negative")
    if cfg.quantize not in ("none", "int8"):
        raise TiaoyuError(f"--quantize {cfg.quantize!r}: choose none or int8")
    data = Path(data)
    if not data.exists():
        raise TiaoyuError(f"{data}: no such file")
    kind = detect_kind(data)
    device = resolve_device(cfg.device)
    amp = resolve_dtype(cfg.dtype, device)
    model, tok, path = load_for_eval(ckpt, device, cfg.quantize)
    mkind = model_kind(model.config)
    check_compatible("text" if kind == "tokens" else kind, mkind, ref is not None, path)
    if model.config.vocab_size < tok.vocab_size:
        raise TiaoyuError(f"{path}: tokenizer has {tok.vocab_size} tokens but the model only {model.config.vocab_size}")
    result: dict[str, Any] = {"checkpoint": str(path), "data": str(data), "kind": kind, "model": mkind}
    max_len = model.config.max_seq_len
    with torch.inference_mode(), autocast(device, amp):
        if kind == "tokens":
            stream, n_bytes, split = shard_stream(data, tok, cfg.limit)
            result["split"] = split
            result.update(text_metrics(model, stream, n_bytes, cfg.seq_len or max_len, cfg.batch_size))
            return result
        records = _records(data, kind, cfg.limit)
        result["records"] = len(records)
        if kind == "text":
            stream, n_bytes = text_stream(records, tok, data)
            result.update(text_metrics(model, stream, n_bytes, cfg.seq_len or max_len, cfg.batch_size))
        elif kind == "preference":
            ref_model = None
            if ref is not None:
                ref_model = load_reference(ref, tok, device)
                result["ref"] = str(ref)
            result.update(preference_metrics(model, records, tok, data, cfg.batch_size, ref_model))
        elif kind == "classification":
            result.update(classification_metrics(model, records, data, tok, cfg.batch_size))
        else:  # chat, reasoning, verifiable
            if kind in ("chat", "reasoning"):
                result.update(assistant_loss(model, records, tok, data, cfg.batch_size))
            result.update(answer_metrics(model, tok, records, kind, data, cfg))
    return result


def headline(result: dict[str, Any]) -> tuple[str, float] | None:
    """The one number a table shows for a result."""
    for key in ("loss", "answer_accuracy", "pairwise_accuracy", "accuracy"):
        if key in result:
            return key, result[key]
    return None


def iter_metric_rows(result: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(name, formatted value) for the rich table."""
    skip = {"checkpoint", "data", "kind", "model", "split", "ref"}
    for k, v in result.items():
        if k in skip:
            continue
        if isinstance(v, dict):
            for kk, vv in v.items():
                yield f"{k}.{kk}", f"{vv:.4f}" if isinstance(vv, float) else str(vv)
        elif isinstance(v, float):
            yield k, f"{v:.4f}"
        else:
            yield k, str(v)
