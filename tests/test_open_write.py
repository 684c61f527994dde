"""Writing open models back: an output folder keeps the dtype its source was stored in (bf16 stays bf16) unless
--dtype names one, and weights above the shard size (${TIAOYU_MAX_SHARD_SIZE}, 2GB by default) are written as
transformers writes them — model-0000K-of-0000N.safetensors and model.safetensors.index.json. transformers loads
the results as the same class with our logits; --resume from a bf16, sharded checkpoint continues exactly (the
fp32 weights behind it are kept in train_state). Tiny random models and tokenizers built here."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rlhf_fixtures import read_jsonl, run_cli, write_jsonl
from test_open_chat import make_folder
from tiaoyu_cli.checkpoint import load_model, load_tokenizer, parse_size, stored_dtype, write_model_folder
from tiaoyu_cli.errors import TiaoyuError

transformers = pytest.importorskip("transformers")

RECORDS = [{"messages": [{"role": "user", "content": "What is 12 + 7?"}, {"role": "assistant", "content": "It is 19."}]},
           {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}] * 4
SFT = ["--batch-size", "2", "--lr", "1e-2", "--warmup-steps", "0", "--schedule", "constant", "--device", "cpu",
       "--seed", "0", "--no-eval-before", "--log-every", "1"]


def bf16_folder(folder):
    """A qwen2 folder as save_pretrained writes a bf16 model: bf16 tensors, config.json dtype bfloat16."""
    make_folder("qwen2", folder)
    sd = load_file(str(folder / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def file_dtypes(folder) -> set:
    out = set()
    for f in folder.glob("model*.safetensors"):
        with safe_open(str(f), "pt") as st:
            out |= {st.get_slice(k).get_dtype() for k in st.keys()}
    return out


def assert_loads_as(src, out):
    arch = json.loads((src / "config.json").read_text())["architectures"]
    ours, _ = load_model(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert [type(theirs).__name__] == arch
    ids = torch.tensor([load_tokenizer(out).encode("What is 12 + 7? It is 19.")])
    with torch.no_grad():
        assert (ours.eval()(ids).logits - theirs(ids).logits).abs().max() < 1e-4


def sft(src, data, out, *extra):
    run_cli(["sft", src, data, "-o", out, *SFT, *extra])


def test_output_keeps_the_source_dtype_unless_dtype(tmp_path):
    src = bf16_folder(tmp_path / "src")
    data = write_jsonl(tmp_path / "chat.jsonl", RECORDS)
    sft(src, data, tmp_path / "kept", "--max-steps", "2")
    out = tmp_path / "kept" / "latest"
    assert stored_dtype(out) == "bfloat16" and file_dtypes(out) == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert any(k.startswith("master.") for k in load_file(str(out / "train_state.safetensors")))
    assert_loads_as(src, out)
    sft(src, data, tmp_path / "fp32", "--max-steps", "2", "--dtype", "fp32")
    out = tmp_path / "fp32" / "latest"
    assert file_dtypes(out) == {"F32"} and json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert not any(k.startswith("master.") for k in load_file(str(out / "train_state.safetensors")))
    assert_loads_as(src, out)


def test_large_weights_are_sharded_and_resume_exactly(tmp_path, monkeypatch):
    src = bf16_folder(tmp_path / "src")
    data = write_jsonl(tmp_path / "chat.jsonl", RECORDS)
    monkeypatch.setenv("TIAOYU_MAX_SHARD_SIZE", "60KB")
    sft(src, data, tmp_path / "straight", "--max-steps", "4")
    sft(src, data, tmp_path / "resumed", "--max-steps", "2")
    sft(src, data, tmp_path / "resumed", "--max-steps", "4", "--resume")
    out = tmp_path / "resumed" / "latest"
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert all(re.fullmatch(rf"model-{i + 1:05d}-of-{len(shards):05d}\.safetensors", s) for i, s in enumerate(shards))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert all((out / s).stat().st_size <= 60_000 + 20_000 for s in shards)  # the limit, plus a header
    assert file_dtypes(out) == {"BF16"}
    assert_loads_as(src, out)

    def losses(run):
        return {m["step"]: m["loss"] for m in read_jsonl(run / "metrics.jsonl") if "loss" in m}

    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(b) == [1, 2, 3, 4]
    for s in (3, 4):
        assert abs(a[s] - b[s]) < 1e-6, (s, a[s], b[s])


def test_shard_size_and_writer(tmp_path):
    assert parse_size("2GB") == 2 * 10 ** 9 and parse_size("500KB") == 500_000 and parse_size("1MiB") == 2 ** 20
    assert parse_size("1234") == 1234
    for bad in ("two GB", "5XB", "0"):
        with pytest.raises(TiaoyuError, match="shard size"):
            parse_size(bad)
    src = make_folder("qwen2", tmp_path / "src")
    model, _ = load_model(src)
    out = tmp_path / "out"
    out.mkdir()
    write_model_folder(out, model.config, model.state_dict(), load_tokenizer(src), max_shard_size="1KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    want = load_file(str(src / "model.safetensors"))
    assert set(index["weight_map"]) == set(want)  # a tied head left out, as transformers leaves it out
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in want.values())
    assert_loads_as(src, out)
