"""Classification fine-tuning (seeds 001, 003): a label for a whole text, read from its last token.

    tiaoyu sft ckpt/base classification.train.jsonl --task classify -o ckpt/cls --eval-data classification.val.jsonl
    tiaoyu chat ckpt/cls --classify "I loved it."

The model gets a `score` head, Linear(d, n_labels) — the name and layout of Hugging Face's
LlamaForSequenceClassification, so the checkpoint loads there too. A text is encoded as
`<s> text </s>`; the head reads the final hidden state of the last real token (`</s>`), which under
causal attention has seen the whole text:

    p(label | text) = softmax(score(h_last))
    L = −(1/B) Σ_b log p(y_b | text_b)            (`classification_loss`)

Labels are the sorted distinct `label` values of the training file; the map is saved in config.json
(`id2label` / `label2id`). Evaluation: `val_loss`, `val_acc`, and `majority_acc` — the accuracy of
always answering the most frequent training label — for comparison.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from tiaoyu_cli.checkpoint import load_config, load_model_tensors, load_weights, resolve_checkpoint, weights_source
from tiaoyu_cli.data.chat import collate_classification, encode_classification
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.model import Transformer
from tiaoyu_cli.model.heads import last_token_scores
from tiaoyu_cli.train.engine.sampler import EpochSampler
from tiaoyu_cli.train.engine.stage import BaseStage, StepOutput
from tiaoyu_cli.train.losses.classify import classification_loss


def label_scores(model: nn.Module, input_ids: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
    """[B, n_labels] scores at each row's last real token (rows right-padded: causal attention means the
    padding after it changes nothing, so no attention mask is needed)."""
    out = model(input_ids, compute_logits=False)
    if out.scores is None:
        raise TiaoyuError("this model has no classification head (config num_labels = 0)")
    return last_token_scores(out.scores, last_index=last_index)


@dataclass
class ClassifyConfig:
    max_len: int = 0  # tokens per text (0 = the model's max_seq_len)
    eval_batch_size: int = 64


def build_classifier(base_dir, labels: list[str], device="cpu"):
    """The base model with a fresh `score` head for `labels` (or its own head, if it already is a
    classifier for exactly these labels)."""

    d = resolve_checkpoint(base_dir)
    cfg = load_config(d)
    id2label = {str(i): l for i, l in enumerate(labels)}
    if cfg.num_labels and (cfg.num_labels != len(labels) or dict(cfg.id2label) != id2label):
        raise TiaoyuError(f"{d} is already a classifier for labels {list(cfg.id2label.values())}, not {labels}; "
                          f"start from a language-model checkpoint")
    cfg = cfg.replace(num_labels=len(labels), id2label=id2label)
    model = Transformer(cfg)
    load_weights(model, load_model_tensors(d), weights_source(d), may_miss=("score.weight",))
    return model.to(device), d


class ClassifyStage(BaseStage):
    name = "classify"

    def __init__(self, train: Sequence[tuple[str, str]], labels: list[str], tokenizer, cfg: ClassifyConfig,
                 batch_size: int, seed: int = 0, eval_data: Sequence[tuple[str, str]] | None = None,
                 max_len: int = 256):
        self.labels, self.cfg, self.batch_size, self.seed = labels, cfg, batch_size, seed
        self.label_index = {l: i for i, l in enumerate(labels)}
        self.max_len = cfg.max_len or max_len
        self.truncated = 0
        self.items = self._encode(train, tokenizer, "training")
        self.eval_items = self._encode(eval_data, tokenizer, "--eval-data") if eval_data else []
        counts = [0] * len(labels)
        for _, y in self.items:
            counts[y] += 1
        self.majority = max(range(len(labels)), key=lambda i: counts[i])
        self.steps_per_epoch = math.ceil(len(self.items) / batch_size)

    def _encode(self, pairs, tokenizer, what: str) -> list[tuple[list[int], int]]:
        out = []
        for text, label in pairs:
            if label not in self.label_index:
                raise TiaoyuError(f"{what}: label {label!r} does not occur in the training data "
                                  f"(labels: {', '.join(self.labels)})")
            ids, cut = encode_classification(tokenizer, text, self.max_len)
            self.truncated += cut
            out.append((ids, self.label_index[label]))
        return out

    def setup(self, trainer) -> None:
        super().setup(trainer)
        d = trainer.dist
        self.rank, self.world, self.device = d.rank, d.world_size, trainer.device
        self.sampler = EpochSampler(len(self.items), self.batch_size, self.seed, rank=self.rank, world=self.world)

    def next_batch(self) -> dict[str, torch.Tensor]:
        items = [self.items[i] for i in self.sampler.next_indices()]
        return {k: v.to(self.device) for k, v in collate_classification(items).items()}

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        scores = label_scores(model, batch["input_ids"], batch["last_index"])
        loss = classification_loss(scores, batch["labels"])
        acc = (scores.argmax(-1) == batch["labels"]).float().mean()
        return StepOutput(loss, {"acc": acc.detach()}, tokens=int(batch["attention_mask"].sum()))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.eval_items:
            return {}
        device = next(model.parameters()).device
        loss_sum, correct, n = 0.0, 0, 0
        for i in range(0, len(self.eval_items), self.cfg.eval_batch_size):
            b = {k: v.to(device) for k, v in collate_classification(self.eval_items[i:i + self.cfg.eval_batch_size]).items()}
            scores = label_scores(model, b["input_ids"], b["last_index"])
            loss_sum += float(classification_loss(scores, b["labels"])) * len(b["labels"])
            correct += int((scores.argmax(-1) == b["labels"]).sum())
            n += len(b["labels"])
        majority = sum(1 for _, y in self.eval_items if y == self.majority) / n
        return {"val_loss": loss_sum / n, "val_acc": correct / n, "majority_acc": majority}

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)

    def info(self) -> dict:
        return {**dataclasses.asdict(self.cfg), "task": "classify", "labels": self.labels,
                "examples": len(self.items), "truncated": self.truncated}


@torch.no_grad()
def classify_texts(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 64,
                   max_len: int | None = None) -> list[dict]:
    """[{"label": str, "probs": {label: p}}] for each text (model in eval mode, no grad)."""
    cfg = model.config
    if not cfg.num_labels:
        raise TiaoyuError("this checkpoint has no classification head: train one with `tiaoyu sft --task classify`")
    id2label = [cfg.id2label.get(str(i), f"LABEL_{i}") for i in range(cfg.num_labels)]
    max_len = max_len or cfg.max_seq_len
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(texts), batch_size):
            items = [(encode_classification(tokenizer, t, max_len)[0], 0) for t in texts[i:i + batch_size]]
            b = collate_classification(items)
            scores = label_scores(model, b["input_ids"].to(device), b["last_index"].to(device)).float()
            probs = scores.softmax(-1).cpu()
            for row in probs:
                k = int(row.argmax())
                out.append({"label": id2label[k], "probs": {id2label[j]: round(float(row[j]), 6) for j in range(len(row))}})
    finally:
        model.train(was)
    return out
