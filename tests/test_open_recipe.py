"""recipes/open-model end to end on a tiny random Qwen2-style folder (its `tiny-model` target writes one
with transformers): sft → dpo → chat → export leave their outputs, the DPO folder loads in transformers
as the source's class with our logits, and the GGUF file reads back with the gguf library."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "open-model" / "Makefile"

pytestmark = [pytest.mark.integration,  # the end-to-end recipe: `make test-all` runs it, `make test` does not
              pytest.mark.skipif(shutil.which("make") is None, reason="needs make")]
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")


def make(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = ["make", "-f", str(RECIPE), *args, f"TIAOYU={sys.executable} -m tiaoyu_cli", f"PYTHON={sys.executable}",
           "DEVICE=cpu", "SFT_STEPS=4", "DPO_STEPS=2", "RECORDS=40", "EVAL_SAMPLES=4", "CHAT_N=3", "NEW_TOKENS=8"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("open-recipe")
    model, out = root / "tiny-qwen2", root / "run"
    p = make("tiny-model", f"TINY={model}")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    p = make(f"MODEL={model}", f"OUT={out}")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return model, out


def test_every_stage_leaves_its_outputs(run):
    model, out = run
    assert json.loads((model / "config.json").read_text())["model_type"] == "qwen2"
    for f in ("data/chat.train.jsonl", "data/preference.train.jsonl", "sft/latest/model.safetensors",
              "dpo/latest/model.safetensors", "export/hf/config.json", "export/hf/model.safetensors",
              "export/hf/tokenizer.json", "export/model.gguf"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    for run_dir in ("sft", "dpo"):
        rows = [json.loads(l) for l in (out / run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
        assert max(r["step"] for r in rows) == {"sft": 4, "dpo": 2}[run_dir]
    answers = [json.loads(l) for l in (out / "chat.jsonl").read_text().splitlines()]
    assert len(answers) == 3 and all(isinstance(a["response"], str) for a in answers)
    # make skips what is done: a second run does nothing
    p = make(f"MODEL={model}", f"OUT={out}")
    assert p.returncode == 0 and "tiaoyu_cli" not in p.stdout, p.stdout


def test_dpo_output_loads_in_transformers_as_the_same_class(run):
    from tiaoyu_cli.checkpoint import load_model, load_tokenizer

    model, out = run
    dpo = (out / "dpo" / "latest").resolve()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(dpo, dtype=torch.float32).eval()
        src = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    assert type(theirs) is type(src) and type(theirs).__name__ == "Qwen2ForCausalLM"
    ours, _ = load_model(dpo)
    ids = torch.tensor([load_tokenizer(dpo).encode("What is 12 + 7? It is 19.")])
    with torch.no_grad():
        mine, hf, before = ours.eval()(ids).logits, theirs(ids).logits, src(ids).logits
    assert (mine - hf).abs().max() < 1e-4
    assert (hf - before).abs().max() > 0  # sft and dpo changed the weights


def test_gguf_reads_back(run):
    model, out = run
    r = gguf.GGUFReader(str(out / "export" / "model.gguf"))
    field = r.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "qwen2"
    cfg = json.loads((model / "config.json").read_text())
    names = {t.name: t for t in r.tensors}
    assert "token_embd.weight" in names and f"blk.{cfg['num_hidden_layers'] - 1}.attn_q.bias" in names
    assert sorted(int(x) for x in names["token_embd.weight"].shape) == sorted([cfg["vocab_size"], cfg["hidden_size"]])
    tokens = r.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == cfg["vocab_size"]


def test_without_model_it_stops_before_running_anything(tmp_path):
    p = make(f"OUT={tmp_path / 'run'}")
    assert p.returncode != 0 and "MODEL=path/to/folder is required" in p.stderr, p.stderr
    assert not (tmp_path / "run").exists()
