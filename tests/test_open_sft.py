"""`tiaoyu sft` on a Hugging Face model folder: the loss mask comes from the folder's own template (the
assistant's answers and their end-of-turn token), and the output folder keeps the family — config.json
with the same architectures/model_type/fields, tokenizer files and generation_config.json unchanged — so
transformers loads the fine-tuned model as the same class with the same logits as ours."""

from __future__ import annotations

import io
import json
import sys
import warnings

import pytest
import torch

from test_open_chat import make_folder
from tiaoyu_cli.checkpoint import load_model, load_tokenizer

transformers = pytest.importorskip("transformers")

RECORDS = [
    {"messages": [{"role": "user", "content": "What is 12 + 7?"}, {"role": "assistant", "content": "It is 19."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
                  {"role": "assistant", "content": "你好！"}]},
] * 3


def test_loss_mask_of_chat_records(tmp_path):
    from tiaoyu_cli.data.chat import ChatDataset

    for kind, end in (("qwen3", "<|im_end|>"), ("llama3", "<|eot_id|>")):
        folder = make_folder(kind, tmp_path / kind)
        tok = load_tokenizer(folder)
        data = ChatDataset(RECORDS[:2], tok, 128)
        learned = [tok.decode([i for i, m in zip(ex.ids, ex.loss_mask) if m], skip_special=False)
                   for ex in data.examples]
        assert learned == ["It is 19." + end, "你好！" + end]


@pytest.mark.parametrize("kind", ["qwen3", "llama3"])
def test_sft_output_keeps_the_family(kind, tmp_path, monkeypatch, capfd):
    from tiaoyu_cli.cli.main import main

    src = make_folder(kind, tmp_path / "src")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    with pytest.raises(SystemExit) as e:
        main(["sft", str(src), str(data), "-o", str(tmp_path / "out"), "--max-steps", "2", "--batch-size", "2",
              "--lr", "1e-2", "--device", "cpu"])
    out_, err = capfd.readouterr()
    assert e.value.code in (0, None), err
    out = tmp_path / "out" / "latest"
    a, b = json.loads((src / "config.json").read_text()), json.loads((out / "config.json").read_text())
    for d in (a, b):
        d.pop("dtype", None), d.pop("torch_dtype", None)
    assert a == b  # architectures, model_type and every field as the source had them
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name  # tokenizer files and template unchanged
    gen = "generation_config.json"
    assert json.loads((out / gen).read_text()) == json.loads((src / gen).read_text())
    ours, _ = load_model(out)
    before, _ = load_model(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(theirs).__name__ == a["architectures"][0]
    ids = torch.tensor([load_tokenizer(out).encode("What is 12 + 7? It is 19.")])
    with torch.no_grad():
        mine, hf, old = ours.eval()(ids).logits, theirs(ids).logits, before.eval()(ids).logits
    assert (mine - hf).abs().max() < 1e-4
    assert (mine - old).abs().max() > 1e-3  # it trained


def test_lora_and_merge_keep_the_family(tmp_path, monkeypatch, capfd):
    """`tiaoyu lora` on an open folder, then `lora merge`: the merged folder loads in transformers as the same class
    and gives our logits."""
    from tiaoyu_cli.cli.main import main

    src = make_folder("qwen2", tmp_path / "src")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    for args in (["lora", str(src), str(data), "-o", str(tmp_path / "ad"), "--max-steps", "2", "--batch-size", "2",
                  "--lr", "1e-2", "--device", "cpu"],
                 ["lora", "merge", str(src), str(tmp_path / "ad"), "-o", str(tmp_path / "merged")]):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code in (0, None), capfd.readouterr()[1]
    merged = tmp_path / "merged"
    assert json.loads((merged / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert (merged / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    ours, _ = load_model(merged)
    base, _ = load_model(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = torch.tensor([load_tokenizer(merged).encode("What is 12 + 7?")])
    with torch.no_grad():
        mine = ours.eval()(ids).logits
        assert (mine - theirs(ids).logits).abs().max() < 1e-4
        assert (mine - base.eval()(ids).logits).abs().max() > 1e-4  # the adapter changed something


def test_classification_text_without_a_bos(tmp_path):
    """A Qwen-style tokenizer has no BOS: a classification text is `text <eos>` (the classifier reads the last)."""
    from hf_tokenizers import make_qwen_tokenizer
    from tiaoyu_cli.data.chat import encode_classification
    from tiaoyu_cli.tokenizer import open_tokenizer

    tok = open_tokenizer(make_qwen_tokenizer(tmp_path / "q"))
    ids, cut = encode_classification(tok, "good day", 64)
    assert ids == tok.encode("good day") + [tok.eos_id] and not cut
    ids, cut = encode_classification(tok, "good day " * 40, 16)
    assert len(ids) == 16 and ids[-1] == tok.eos_id and cut
