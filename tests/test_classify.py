"""Classification fine-tuning proofs: bad records are clear errors (or counted), the classifier starts
from the base's weights with a fresh `score` head, transformers' LlamaForSequenceClassification reads
our checkpoint and gives our scores, and — slow — `tiaoyu sft --task classify` learns the synthetic
sentiment task well above the majority class, and `tiaoyu chat --classify` labels stdin JSONL."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tiaoyu_cli.checkpoint import load_model, load_tokenizer, save_model_files
from tiaoyu_cli.data.chat import collate_classification, encode_classification, read_classification
from tiaoyu_cli.errors import DataError, TiaoyuError
from tiaoyu_cli.train.objectives.classify import build_classifier, classify_texts, label_scores


@pytest.mark.parametrize("rec,field,msg", [
    ({"text": "great"}, "label", "missing label"),
    ({"text": "great", "label": ""}, "label", "non-empty string"),
    ({"label": "positive"}, "text", "missing"),
    ({"text": "   ", "label": "positive"}, "text", "non-empty string"),
    ({"messages": [], "label": "x"}, "text", "missing"),
])
def test_bad_records(tmp_path, rec, field, msg):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "fine", "label": "positive"}) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(DataError) as e:
        read_classification(p)
    assert f"{p}:2" in str(e.value) and f"field '{field}'" in str(e.value) and msg in str(e.value)
    pairs, st = read_classification(p, skip_bad=True)
    assert pairs == [("fine", "positive")] and st.bad == 1


def test_classifier_from_base_and_hf_parity(tmp_path, base_ckpt):
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(base_ckpt)
    torch.manual_seed(0)
    model, _ = build_classifier(base_ckpt, ["negative", "neutral", "positive"])
    base, _ = load_model(base_ckpt)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in base.state_dict().items())  # the base weights, unchanged
    assert own["score.weight"].shape == (3, base.config.dim)
    out = tmp_path / "cls"
    out.mkdir()
    save_model_files(out, model, tok)
    with pytest.raises(TiaoyuError, match="already a classifier"):
        build_classifier(out, ["a", "b"])
    again, _ = build_classifier(out, ["negative", "neutral", "positive"])  # continuing: its own head
    assert torch.equal(again.score.weight, model.score.weight)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), dtype=torch.float32).eval()
    assert hf.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    texts = ["I loved it.", "我觉得这个很好。", "terrible, never again and again and again"]
    b = collate_classification([(encode_classification(tok, t, 64)[0], 0) for t in texts])
    model.eval()
    with torch.no_grad():
        ours = label_scores(model, b["input_ids"], b["last_index"])
        theirs = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    res = classify_texts(model, tok, texts)
    assert [r["label"] for r in res] == [["negative", "neutral", "positive"][int(i)] for i in ours.argmax(-1)]
    assert all(abs(sum(r["probs"].values()) - 1) < 1e-4 for r in res)


def test_cli_errors(cli, tmp_path, base_ckpt, synth_dir):
    r = cli("sft", base_ckpt, synth_dir / "chat.val.jsonl", "--task", "classify", "-o", tmp_path / "o", "--max-steps", 1)
    assert r.returncode == 2 and "chat.val.jsonl:1" in r.stderr and "field 'text'" in r.stderr
    r = cli("chat", base_ckpt, "--classify", "--prompt", "hello")
    assert r.returncode == 2 and "no classification head" in r.stderr


@pytest.mark.slow
def test_classification_learns(cli, tmp_path, base_ckpt, synth_dir):
    out = tmp_path / "cls"
    val = synth_dir / "classification.val.jsonl"
    steps = int(os.environ.get("TIAOYU_TEST_CLS_STEPS", "60"))
    r = cli("sft", base_ckpt, synth_dir / "classification.train.jsonl", "--task", "classify", "-o", out,
            "--max-steps", steps, "--batch-size", 16, "--lr", 1e-3, "--eval-data", val, "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    info = json.loads((out / "latest" / "trainer.json").read_text())
    assert info["stage"] == "classify" and info["stage_config"]["labels"] == ["negative", "positive"]
    ev = info["eval"]
    print(f"classification: val acc {ev['val_acc']:.3f} (majority class {ev['majority_acc']:.3f}) after {steps} steps")
    assert ev["majority_acc"] <= 0.6
    assert ev["val_acc"] >= 0.85
    lines = val.read_text().splitlines()[:40]
    r = cli("chat", out, "--classify", stdin="\n".join(lines) + "\n")
    assert r.returncode == 0, r.stderr
    got = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(got) == 40 and all(g["label"] in ("negative", "positive") for g in got)
    acc = sum(g["label"] == g["input_label"] for g in got) / 40
    assert acc >= 0.8 and "accuracy" in r.stderr
    one = cli("chat", out, "--classify", "--prompt", json.loads(lines[0])["text"])
    assert one.returncode == 0 and one.stdout.strip() == got[0]["label"]
