"""The training loop itself, in-process on tiny models: exact resume, gradient accumulation,
budgets, LR schedules by hand, AdamW parameter groups, NaN stop, interrupted checkpoint writes,
--keep pruning, MoE aux loss, learned/sinusoidal positions."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pattern_shards import V, pattern_shards, small_model
from tiaoyu_cli import checkpoint as ckpt_io
from tiaoyu_cli.data.shards import TokenShards
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.model import Transformer, preset
from tiaoyu_cli.train.engine.optim import build_optimizer, lr_at
from tiaoyu_cli.train.engine.stage import StepOutput
from tiaoyu_cli.train.engine.trainer import TrainConfig, Trainer
from tiaoyu_cli.train.losses.lm import cross_entropy as lm_loss
from tiaoyu_cli.train.objectives.pretrain import PretrainConfig, PretrainStage


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> TokenShards:
    return pattern_shards(tmp_path_factory.mktemp("tokens") / "train")


def run(shards, out, model=None, batch=4, seq=32, seed=0, trainer_hook=None, stage_cls=PretrainStage, **cfg):
    cfg = {"max_steps": 10, "lr": 3e-3, "warmup_steps": 2, "log_every": 1, "device": "cpu", "dtype": "fp32",
           "keep": 0, **cfg}
    model = model if model is not None else small_model()
    stage = stage_cls(shards, shards, PretrainConfig(seq_len=seq, eval_batches=2), batch_size=batch, seed=seed)
    trainer = Trainer(model, stage, TrainConfig(out=str(out), batch_size=batch, seed=seed, **cfg), log=lambda m: None)
    if trainer_hook:
        trainer_hook(trainer)
    trainer.fit()
    return trainer


def losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.history if not h.get("eval")}


# ---------------------------------------------------------------------------- resume
def test_resume_after_10_of_20_steps_reproduces_losses_exactly(shards, tmp_path):
    """Dropout on, fp32: optimizer, schedule, RNG and data position all come back."""
    straight = run(shards, tmp_path / "a", model=small_model(dropout=0.1), max_steps=20)
    part = run(shards, tmp_path / "b", model=small_model(dropout=0.1), max_steps=20, save_every=10,
               trainer_hook=lambda t: setattr(t, "done", lambda: t.step >= 10))  # stop after step 10
    assert max(losses(part)) == 10 and (tmp_path / "b" / "step-000010").is_dir()
    resumed = run(shards, tmp_path / "b", model=small_model(dropout=0.1), max_steps=20, resume=True)
    assert losses(resumed) == {k: v for k, v in losses(straight).items() if k > 10}
    # metrics.jsonl holds each step exactly once
    lines = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if not l.get("eval")] == list(range(1, 21))
    # and the final weights are the same
    a = ckpt_io.load_tensors(tmp_path / "a" / "latest" / "model.safetensors")
    b = ckpt_io.load_tensors(tmp_path / "b" / "latest" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_architecture(shards, tmp_path):
    run(shards, tmp_path / "r", max_steps=2)
    with pytest.raises(TiaoyuError, match="resume with the model options"):
        run(shards, tmp_path / "r", model=Transformer(preset("tiny", vocab_size=V, dim=48, n_layers=2, ffn_dim=64,
                                                                max_seq_len=64)), max_steps=4, resume=True)


def test_grad_accumulation_equals_a_bigger_batch(shards, tmp_path):
    big = run(shards, tmp_path / "a", batch=8, max_steps=4)
    accum = run(shards, tmp_path / "b", batch=4, grad_accum=2, max_steps=4)
    # the window sampler draws 8 starts at once or 4 + 4 in a row: the same windows either way
    assert list(losses(big).values()) == pytest.approx(list(losses(accum).values()), abs=1e-5)
    assert big.tokens_seen == accum.tokens_seen == 4 * 8 * 32


# ---------------------------------------------------------------------------- budgets
def test_max_tokens_budget_stops(shards, tmp_path):
    t = run(shards, tmp_path / "r", max_steps=0, max_tokens=5 * 4 * 32 - 1)
    assert t.step == 5 and t.tokens_seen == 5 * 4 * 32
    assert t.total_steps() == 5  # the schedule knew the length in advance


def test_max_time_budget_stops(shards, tmp_path):
    t = run(shards, tmp_path / "r", max_steps=0, max_time=0.5, log_every=1000)
    assert t.train_time >= 0.5 and t.step >= 1
    assert (tmp_path / "r" / f"step-{t.step:06d}").is_dir()


def test_lr_schedules_by_hand():
    # warmup: linear from base/warmup up to base
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    # cosine: base at the end of warmup, halfway down at the middle, min at the end
    assert lr_at(10, 110, 1.0, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_at(60, 110, 1.0, 10, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(35, 110, 1.0, 10, "cosine", 0.1) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.25)))
    assert lr_at(110, 110, 1.0, 10, "cosine", 0.1) == pytest.approx(0.1)
    # wsd: flat until the last 20 %, then linear to min
    assert lr_at(50, 100, 1.0, 10, "wsd", 0.0) == 1.0
    assert lr_at(79, 100, 1.0, 10, "wsd", 0.0) == 1.0
    assert lr_at(90, 100, 1.0, 10, "wsd", 0.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 1.0, 10, "wsd", 0.1) == pytest.approx(0.1)
    assert lr_at(500, 100, 2.0, 10, "constant") == 2.0


def test_trainer_follows_the_schedule(shards, tmp_path):
    t = run(shards, tmp_path / "r", max_steps=8, warmup_steps=2, schedule="wsd", min_lr_ratio=0.0, lr=1e-3)
    got = [h["lr"] for h in t.history if not h.get("eval")]
    assert got == pytest.approx([lr_at(s, 8, 1e-3, 2, "wsd", 0.0) for s in range(8)])


def test_adamw_does_not_decay_norms_or_embeddings():
    model = small_model(tie_embeddings=False)
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decay and no_decay and not decay & no_decay
    assert decay | no_decay == set(names.values())
    assert "model.embed_tokens.weight" in no_decay
    assert all(("norm" in n) == (n in no_decay) for n in names.values() if "embed" not in n)
    assert "lm_head.weight" in decay and "model.layers.0.self_attn.q_proj.weight" in decay
    # a decayed matrix with zero gradient shrinks; a norm weight does not
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    q = model.model.layers[0].self_attn.q_proj.weight
    before_q, before_n = q.detach().clone(), model.model.norm.weight.detach().clone()
    opt.step()
    assert torch.allclose(q, before_q * (1 - 1e-3 * 0.1))
    assert torch.equal(model.model.norm.weight, before_n)


# ---------------------------------------------------------------------------- checkpoints
def test_keep_prunes_old_checkpoints(shards, tmp_path):
    run(shards, tmp_path / "r", max_steps=8, save_every=2, keep=2)
    assert sorted(p.name for p in (tmp_path / "r").glob("step-*")) == ["step-000006", "step-000008"]
    assert (tmp_path / "r" / "latest").resolve().name == "step-000008"
    run(shards, tmp_path / "all", max_steps=6, save_every=2, keep=0)
    assert len(list((tmp_path / "all").glob("step-*"))) == 3


def test_interrupted_checkpoint_write_keeps_the_previous_one(shards, tmp_path, monkeypatch):
    from safetensors.torch import save_file as real_save_file

    calls = {"n": 0}

    def dying_save_file(tensors, filename, *a, **kw):
        calls["n"] += 1
        if calls["n"] > 2:  # the first checkpoint (model + train state) goes through, the second dies half-way
            with open(filename, "wb") as f:
                f.write(b"\x00" * 1000)
            raise OSError(28, "No space left on device")
        return real_save_file(tensors, filename, *a, **kw)

    monkeypatch.setattr("safetensors.torch.save_file", dying_save_file)
    monkeypatch.setattr(ckpt_io, "save_file", dying_save_file)
    out = tmp_path / "r"
    with pytest.raises(TiaoyuError, match=r"could not write checkpoint .*step-000004 \(No space left on device\); "
                                          r"the previous checkpoint .*step-000002 is intact"):
        run(shards, out, max_steps=6, save_every=2)
    assert sorted(p.name for p in out.iterdir()) == ["latest", "metrics.jsonl", "step-000002"]  # no half folder
    assert [p.name for p in ckpt_io.step_dirs(out)] == ["step-000002"]
    assert (out / "latest").resolve().name == "step-000002"
    model, folder = ckpt_io.load_model(out)
    assert folder.name == "step-000002"
    monkeypatch.undo()
    t = run(shards, out, max_steps=6, save_every=2, resume=True)  # and the run continues from it
    assert min(losses(t)) == 3 and t.step == 6


def test_stale_temp_folders_are_not_checkpoints(shards, tmp_path):
    out = tmp_path / "r"
    run(shards, out, max_steps=2)
    half = out / ".step-000004.abc123.tmp"  # what a SIGKILL in the middle of a save leaves
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\x00" * 10)
    assert [p.name for p in ckpt_io.step_dirs(out)] == ["step-000002"]
    assert ckpt_io.resolve_checkpoint(out).name == "step-000002"
    run(shards, out, max_steps=4, resume=True)
    assert not half.exists()  # cleaned up when the run continues
    assert [p.name for p in ckpt_io.step_dirs(out)] == ["step-000002", "step-000004"]


class NaNAtStep7(PretrainStage):
    def step(self, model, batch):
        out = super().step(model, batch)
        if self.trainer.step + 1 == 7:
            return StepOutput(out.loss * float("nan"), out.metrics, out.tokens)
        return out


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(shards, tmp_path):
    out = tmp_path / "r"
    with pytest.raises(TiaoyuError, match=r"loss became nan at step 7: stopped without saving; the last good "
                                          r"checkpoint is .*step-000006"):
        run(shards, out, max_steps=10, save_every=3, log_every=5, stage_cls=NaNAtStep7)
    assert [p.name for p in ckpt_io.step_dirs(out)] == ["step-000003", "step-000006"]
    sd = ckpt_io.load_tensors(out / "latest" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in sd.values())


# ---------------------------------------------------------------------------- model variants
def test_moe_trains_and_logs_aux_loss(shards, tmp_path):
    torch.manual_seed(0)
    model = Transformer(preset("moe-tiny", vocab_size=V, dim=32, n_layers=2, ffn_dim=32, max_seq_len=64))
    t = run(shards, tmp_path / "r", model=model, max_steps=12, lr=5e-3)
    lines = [h for h in t.history if not h.get("eval")]
    assert all("aux_loss" in h and "lm_loss" in h for h in lines)
    for h in lines:  # total = lm + aux; aux ≈ coef·k for balanced routing (top-2: ≥ 0.02·… > 0)
        assert h["loss"] == pytest.approx(h["lm_loss"] + h["aux_loss"], abs=1e-5)
        assert 0 < h["aux_loss"] < 0.1
    assert lines[-1]["lm_loss"] < lines[0]["lm_loss"] - 0.3
    cfg = json.loads((tmp_path / "r" / "latest" / "config.json").read_text())
    assert cfg["num_local_experts"] == 4 and cfg["model_type"] == "mixtral"


@pytest.mark.parametrize("position", ["learned", "sinusoidal"])
def test_other_positions_train_and_reload(position, shards, tmp_path):
    t = run(shards, tmp_path / "r", model=small_model(position=position), max_steps=12, lr=5e-3)
    ls = losses(t)
    assert ls[12] < ls[1] - 0.3
    model, _ = ckpt_io.load_model(tmp_path / "r")
    assert model.config.position == position
    x = torch.randint(8, V, (2, 16))
    t.raw_model.eval()
    assert torch.equal(model(x).logits, t.raw_model(x).logits)


def test_lm_loss_is_mean_cross_entropy():
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    targets[0, 0] = -100
    logp = torch.log_softmax(logits, -1)
    picked = [-logp[b, t, targets[b, t]] for b in range(2) for t in range(5) if targets[b, t] != -100]
    assert lm_loss(logits, targets).item() == pytest.approx(float(sum(picked) / len(picked)), rel=1e-6)


@pytest.mark.parametrize("chunk", [5, 256])
def test_linear_cross_entropy_equals_head_then_cross_entropy(chunk):
    """The fused head + loss gives the value and the gradients of F.linear → lm_loss (fp32), also
    with ignored targets, several chunks and a scaled upstream gradient."""
    from tiaoyu_cli.train.losses.lm import linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(2, 7, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    y = torch.randint(0, 40, (2, 7))
    y[1, 2:5] = -100
    ref = lm_loss(torch.nn.functional.linear(h, w), y)
    (3.0 * ref).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got = linear_cross_entropy(h, w, y, chunk=chunk)
    (3.0 * got).backward()
    assert got.item() == pytest.approx(ref.item(), abs=1e-5)
    assert torch.allclose(h.grad, gh, atol=1e-5) and torch.allclose(w.grad, gw, atol=1e-5)
    assert h.grad[1, 2:5].abs().max() == 0  # ignored positions get no gradient
    with torch.no_grad():  # evaluation: the value alone
        assert linear_cross_entropy(h, w, y).item() == pytest.approx(ref.item(), abs=1e-5)


def test_linear_cross_entropy_under_bf16_autocast_is_close():
    from tiaoyu_cli.train.losses.lm import linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(64, 32, requires_grad=True)
    w = (0.1 * torch.randn(100, 32)).requires_grad_()
    y = torch.randint(0, 100, (64,))
    with torch.autocast("cpu", torch.bfloat16):
        ref = lm_loss(torch.nn.functional.linear(h, w), y)
    ref.backward()
    gw = w.grad.clone()
    w.grad = None
    with torch.autocast("cpu", torch.bfloat16):
        got = linear_cross_entropy(h, w, y, chunk=16)
    got.backward()
    assert got.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-2)
    assert (w.grad - gw).abs().max() < 0.02 * gw.abs().max()
