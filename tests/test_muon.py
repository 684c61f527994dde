"""--optim muon: torch.optim.Muon on the blocks' hidden matrices, AdamW on the rest, as one optimizer
whose state round-trips through train_state (exact resume), and that learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tiaoyu_cli import checkpoint as ckpt_io
from pattern_shards import V, pattern_shards, small_model
from tiaoyu_cli.data.shards import TokenShards
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.model import Transformer, preset
from tiaoyu_cli.train.engine.optim import MuonAdamW, build_optimizer
from tiaoyu_cli.train.engine.trainer import TrainConfig, Trainer
from tiaoyu_cli.train.objectives.pretrain import PretrainConfig, PretrainStage


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> TokenShards:
    return pattern_shards(tmp_path_factory.mktemp("tokens") / "train")


def run(shards, out, model=None, hook=None, **cfg) -> Trainer:
    cfg = {"max_steps": 10, "lr": 3e-3, "warmup_steps": 2, "log_every": 1, "device": "cpu", "dtype": "fp32",
           "keep": 0, "optim": "muon", **cfg}
    stage = PretrainStage(shards, shards, PretrainConfig(seq_len=32, eval_batches=2), batch_size=4, seed=0)
    trainer = Trainer(model if model is not None else small_model(), stage, TrainConfig(out=str(out), batch_size=4, **cfg),
                      log=lambda m: None)
    if hook:
        hook(trainer)
    trainer.fit()
    return trainer


def losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.history if not h.get("eval")}


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = small_model(tie_embeddings=False)
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"), "muon")
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert not muon & adamw and muon | adamw == set(names.values())
    assert muon == {n for n in names.values() if n.endswith("_proj.weight")}  # q k v o gate up down, every layer
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= adamw
    # the loop sets the lr of every group; both optimizers step
    for g in opt.param_groups:
        g["lr"] = 0.01
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    q, head = model.model.layers[0].self_attn.q_proj.weight, model.lm_head.weight
    before_q, before_head = q.detach().clone(), head.detach().clone()
    opt.step()
    assert not torch.equal(q, before_q) and not torch.equal(head, before_head)
    assert "momentum_buffer" in opt.muon.state[q] and "exp_avg" in opt.adamw.state[head]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="choose adamw or muon"):
        build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"), "sgd")


def test_state_dict_round_trips_through_train_state_tensors():
    model = small_model()
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"), "muon")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    tensors, meta = ckpt_io.optimizer_to_tensors(opt)
    assert any(k.endswith(".momentum_buffer") for k in tensors) and any(k.endswith(".exp_avg") for k in tensors)
    twin = small_model()
    twin.load_state_dict(model.state_dict())
    opt2 = build_optimizer(twin, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"), "muon")
    ckpt_io.optimizer_from_tensors(opt2, {k: v.clone() for k, v in tensors.items()}, meta)  # as if read from disk
    g = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for m, o in ((model, opt), (twin, opt2)):
        for n, p in m.named_parameters():
            p.grad = g[n].clone()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_resume_with_muon_reproduces_losses_exactly(shards, tmp_path):
    straight = run(shards, tmp_path / "a", model=small_model(dropout=0.1), max_steps=16)
    run(shards, tmp_path / "b", model=small_model(dropout=0.1), max_steps=16, save_every=8,
        hook=lambda t: setattr(t, "done", lambda: t.step >= 8))
    resumed = run(shards, tmp_path / "b", model=small_model(dropout=0.1), max_steps=16, resume=True)
    assert losses(resumed) == {k: v for k, v in losses(straight).items() if k > 8}
    a = ckpt_io.load_tensors(tmp_path / "a" / "latest" / "model.safetensors")
    b = ckpt_io.load_tensors(tmp_path / "b" / "latest" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_the_other_optimizer(shards, tmp_path):
    run(shards, tmp_path / "r", max_steps=2)
    with pytest.raises(TiaoyuError, match="trained with --optim muon; resume with --optim muon"):
        run(shards, tmp_path / "r", max_steps=4, resume=True, optim="adamw")
    run(shards, tmp_path / "s", max_steps=2, optim="adamw")
    with pytest.raises(TiaoyuError, match="--optim adamw"):
        run(shards, tmp_path / "s", max_steps=4, resume=True)


def test_muon_learns(shards, tmp_path):
    t = run(shards, tmp_path / "m", max_steps=40, lr=3e-3)
    got = losses(t)
    assert got[1] > 3.9  # ~ln(64) at the start
    assert np.mean([got[s] for s in range(36, 41)]) < got[1] - 1.0


def test_optim_flag_is_validated():
    with pytest.raises(TiaoyuError, match="--optim"):
        TrainConfig(max_steps=1, optim="lion").validate()
