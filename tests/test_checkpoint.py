"""Checkpoint folders (DESIGN §4): layout, `latest`, --keep, finding a checkpoint, loading it back,
optimizer state through safetensors, and clear errors for missing or corrupt files."""

from __future__ import annotations

import json

import pytest
import torch

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.model import Transformer, preset
from tiaoyu_cli import checkpoint as C

from pretrain_data import assets


@pytest.fixture(scope="module")
def tok():
    from tiaoyu_cli.tokenizer import Tokenizer

    return Tokenizer.load(assets() / "tok")


def model(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", **{"vocab_size": 400, "dim": 32, "n_layers": 1, "ffn_dim": 64, **kw}))


def test_layout_latest_and_reload(tmp_path, tok):
    m = model()
    path = C.save_checkpoint(tmp_path / "run", 5, m, tok, train_state={"x": torch.ones(3)}, info={"step": 5})
    assert path.name == "step-000005"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json", "generation_config.json",
         "train_state.safetensors", "trainer.json"])
    assert (tmp_path / "run" / "latest").is_symlink() and C.resolve_checkpoint(tmp_path / "run") == path
    loaded, folder = C.load_model(tmp_path / "run")
    assert folder == path
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), m.state_dict().values()))
    assert C.load_tokenizer(tmp_path / "run").fingerprint == tok.fingerprint
    assert C.load_trainer_info(path) == {"step": 5}
    assert C.load_config(path) == m.config
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["hidden_size"] == 32


def test_keep_and_latest_follow_the_newest(tmp_path, tok):
    for step in (1, 2, 3, 4):
        C.save_checkpoint(tmp_path, step, model(), tok, keep=2)
    assert [p.name for p in C.step_dirs(tmp_path)] == ["step-000003", "step-000004"]
    assert (tmp_path / "latest").resolve().name == "step-000004"


def test_resolve_checkpoint_forms(tmp_path, tok):
    path = C.save_checkpoint(tmp_path / "run", 7, model(), tok)
    assert C.resolve_checkpoint(path) == path  # a step folder itself
    (tmp_path / "run" / "latest").unlink()  # no latest link: the newest step folder
    assert C.resolve_checkpoint(tmp_path / "run") == path
    with pytest.raises(TiaoyuError, match="not a checkpoint"):
        C.resolve_checkpoint(tmp_path)
    with pytest.raises(TiaoyuError, match="no such checkpoint folder"):
        C.resolve_checkpoint(tmp_path / "missing")
    with pytest.raises(TiaoyuError, match="is a file"):
        C.resolve_checkpoint(path / "config.json")


def test_half_written_folders_are_not_checkpoints(tmp_path, tok):
    path = C.save_checkpoint(tmp_path, 1, model(), tok)
    (tmp_path / ".step-000002.x1y2.tmp").mkdir()
    (tmp_path / ".step-000002.x1y2.tmp" / "model.safetensors").write_bytes(b"\x00")
    (tmp_path / "step-000003").mkdir()  # a folder without weights is not a checkpoint either
    assert C.step_dirs(tmp_path) == [path]


def test_corrupt_and_missing_files_are_clear_errors(tmp_path, tok):
    path = C.save_checkpoint(tmp_path, 1, model(), tok)
    blob = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(TiaoyuError, match="corrupt or unreadable safetensors"):
        C.load_model(path)
    (path / "model.safetensors").write_bytes(blob)
    (path / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TiaoyuError, match="corrupt JSON"):
        C.load_model(path)
    (path / "config.json").write_text(json.dumps({"hidden_size": 32}), encoding="utf-8")
    with pytest.raises(TiaoyuError, match="missing or invalid key"):
        C.load_model(path)
    (path / "config.json").write_text(json.dumps(model(dim=64, n_heads=4).config.to_hf_dict()), encoding="utf-8")
    with pytest.raises(TiaoyuError, match="has shape"):
        C.load_model(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(TiaoyuError, match="missing model.safetensors"):
        C.load_model(path)


def test_optimizer_state_round_trips_through_tensors():
    m = model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randint(0, 400, (2, 8))).logits.sum().backward()
    opt.step()
    tensors, meta = C.optimizer_to_tensors(opt)
    json.dumps(meta)  # the non-tensor part must be JSON
    assert all(torch.is_tensor(v) for v in tensors.values())
    opt2 = torch.optim.AdamW(model().parameters(), lr=5.0)
    C.optimizer_from_tensors(opt2, tensors, meta)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s2["param_groups"][0]["lr"] == 1e-3
    for pid in s1["state"]:
        for k, v in s1["state"][pid].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(s2["state"][pid][k]))
