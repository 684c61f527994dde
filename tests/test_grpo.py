"""GRPO: rollouts are grouped per prompt and advantages are relative to the group, an interrupted run
resumes exactly (the rollout buffer is part of the checkpoint), bad options are clear errors, and —
slow — from the SFT start it raises the mean reward and the greedy accuracy on its verifiable
questions while the KL to the reference stays bounded."""

from __future__ import annotations

import pytest
import torch

from rlhf_fixtures import eval_lines, read_jsonl, sft_start, tiny_train, train_lines, write_jsonl
from tiaoyu_cli.errors import DataError, TiaoyuError
from tiaoyu_cli.train.objectives.grpo import GRPOConfig, GRPOStage
from tiaoyu_cli.train.stages import grpo


@pytest.fixture(scope="module")
def questions(synth_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo-data")
    train = read_jsonl(synth_dir / "verifiable.train.jsonl")
    return {"q16": write_jsonl(d / "q16.jsonl", train[:16]), "q8": write_jsonl(d / "q8.jsonl", train[16:24])}


def test_rollouts_are_grouped_and_advantages_relative(base_ckpt, questions, tmp_path):
    from tiaoyu_cli.data.preference import load_prompts
    from tiaoyu_cli.checkpoint import load_model, load_tokenizer
    from tiaoyu_cli.train.rl.rollout import FunctionReward
    from tiaoyu_cli.train.engine.trainer import Trainer

    model, _ = load_model(base_ckpt)
    tok = load_tokenizer(base_ckpt)
    prompts = load_prompts(questions["q8"], tok, 200, need_answer=True)
    cfg = GRPOConfig(group_size=4, rollout_batch_size=2, beta=0.0, max_new_tokens=6)
    reward = FunctionReward(lambda ex, text: float(len(text) % 3), tok)  # anything that varies within a group
    stage = GRPOStage(prompts, [], cfg, batch_size=8, tokenizer=tok, reward=reward)
    Trainer(model, stage, tiny_train(tmp_path / "r", 1), tokenizer=tok, log=lambda m: None)
    stage.collect()
    b, P = stage.buffer, stage.prompt_len
    assert b["ids"].shape[0] == 8 and b["adv"].shape == (8,)
    groups = b["ids"][:, :P].view(2, 4, P)
    assert torch.equal(groups[:, :1].expand_as(groups), groups)  # the 4 answers of a group share their prompt
    assert not torch.equal(groups[0, 0], groups[1, 0])
    assert torch.allclose(b["adv"].view(2, 4).sum(1), torch.zeros(2), atol=1e-4)  # relative to the group mean
    # old log-probs are the policy's own: the first update starts at ratio 1
    from tiaoyu_cli.train.rl.layout import Rollout, response_logps

    with torch.no_grad():
        lp = response_logps(model.eval(), Rollout(b["ids"], b["attention_mask"], b["mask"], P, [], []))
    m = b["mask"].bool()
    assert torch.allclose(lp[m], b["old_logp"][m], atol=1e-5)


def test_dynamic_sampling_keeps_informative_groups(base_ckpt, questions, tmp_path):
    """--dynamic-sampling: groups that all scored the same are replaced by informative groups of new questions;
    the merged rollout's rows keep their log-probs exactly (their prompts re-padded to the longest)."""
    from tiaoyu_cli.checkpoint import load_model, load_tokenizer
    from tiaoyu_cli.data.preference import load_prompts
    from tiaoyu_cli.train.engine.trainer import Trainer
    from tiaoyu_cli.train.rl.layout import Rollout, response_logps
    from tiaoyu_cli.train.rl.rollout import FunctionReward

    model, _ = load_model(base_ckpt)
    tok = load_tokenizer(base_ckpt)
    prompts = load_prompts(questions["q16"], tok, 200, need_answer=True)
    informative = {p.line for p in prompts if p.line % 2}  # odd lines: a reward that varies; even lines: flat
    reward = FunctionReward(lambda ex, text: float(len(text) % 3) if ex.line in informative else 1.0, tok)
    cfg = GRPOConfig(group_size=4, rollout_batch_size=4, beta=0.0, max_new_tokens=8, dynamic_sampling=3)
    stage = GRPOStage(prompts, [], cfg, batch_size=8, tokenizer=tok, reward=reward)
    Trainer(model, stage, tiny_train(tmp_path / "r", 1), tokenizer=tok, log=lambda m: None)
    stage.collect()
    b, P, st = stage.buffer, stage.prompt_len, stage.rollout_stats
    assert b["ids"].shape[0] == 16 and st["rounds"] >= 2 and st["sampled_flat"] >= 0.5
    assert st["flat_groups"] < st["sampled_flat"]  # the kept groups are (mostly) the informative ones
    by_ids = {tuple(p.prompt_ids): p.line for p in prompts}
    lines = []
    for g in range(4):
        row = b["ids"][g * 4][:P][b["attention_mask"][g * 4][:P].bool()].tolist()
        lines.append(by_ids[tuple(row)])
    assert sum(line in informative for line in lines) >= 3 and len(set(lines)) == 4
    with torch.no_grad():
        lp = response_logps(model.eval(), Rollout(b["ids"], b["attention_mask"], b["mask"], P, [], []))
    m = b["mask"].bool()
    assert torch.allclose(lp[m], b["old_logp"][m], atol=1e-5)
    with pytest.raises(TiaoyuError, match="dynamic-sampling"):
        GRPOConfig(dynamic_sampling=-1).validate()


def test_concat_rollouts_keeps_every_row(base_ckpt):
    from tiaoyu_cli.checkpoint import load_model
    from tiaoyu_cli.train.rl.layout import concat_rollouts, layout, response_logps

    model, _ = load_model(base_ckpt)
    model.eval()
    a = layout([[5, 6, 7], [8]], [[9, 10], [11, 12, 13, 14]])
    b = layout([[5, 6, 7, 8, 9, 10]], [[3]])
    b.mask[0, 0] = 1
    c = concat_rollouts([a, b])
    assert c.prompt_len == 6 and c.resp_len == 4 and c.ids.shape == (3, 10)
    with torch.no_grad():
        want = [response_logps(model, r)[r.mask.bool()] for r in (a, b)]
        got = response_logps(model, c)
    assert torch.allclose(got[:2][c.mask[:2].bool()], want[0], atol=1e-5)
    assert torch.allclose(got[2:][c.mask[2:].bool()], want[1], atol=1e-5)
    assert c.responses == a.responses + b.responses and c.finished == a.finished + b.finished


def test_bad_options_and_records(base_ckpt, questions, tmp_path):
    with pytest.raises(TiaoyuError, match="group-size"):
        GRPOConfig(group_size=1).validate()
    with pytest.raises(TiaoyuError, match="temperature"):
        GRPOConfig(temperature=0).validate()
    with pytest.raises(TiaoyuError, match="reference"):
        GRPOStage([], [], GRPOConfig(beta=0.1), batch_size=8, tokenizer=None, ref_model=None)
    no_answer = write_jsonl(tmp_path / "na.jsonl", [{"prompt": "What is 3 + 4?"}])
    with pytest.raises(DataError, match=r"na.jsonl:1.*answer"):
        grpo.run(grpo.Config(start=base_ckpt, data=no_answer, grpo=GRPOConfig(beta=0.0)), tiny_train(tmp_path / "a", 1), log=lambda m: None)
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "3 plus 4 " * 200, "answer": "7"}])
    with pytest.raises(DataError, match=r"long.jsonl:1.*prompt is \d+ tokens; at most \d+ fit in the context"):
        grpo.run(grpo.Config(start=base_ckpt, data=long, grpo=GRPOConfig(beta=0.0)), tiny_train(tmp_path / "b", 1), log=lambda m: None)
    with pytest.raises(TiaoyuError, match="does not split into micro-batches"):
        grpo.run(grpo.Config(start=base_ckpt, data=questions["q8"], grpo=GRPOConfig(beta=0.0, group_size=4, rollout_batch_size=2)), tiny_train(tmp_path / "c", 1, batch_size=5), log=lambda m: None)


@pytest.mark.parametrize("dynamic", [0, 2])
def test_resume_is_exact(base_ckpt, questions, tmp_path, dynamic):
    """5 steps straight == 3 steps, stop, --resume to 5 (the stop falls inside a rollout's buffer); also with
    --dynamic-sampling (its extra rounds draw from the same question order and seeds)."""
    cfg = dict(group_size=4, rollout_batch_size=4, beta=0.04, max_new_tokens=6, eval_size=0, dynamic_sampling=dynamic)
    val = questions["q8"]
    quiet = lambda m: None  # noqa: E731
    grpo.run(grpo.Config(start=base_ckpt, data=questions["q16"], grpo=GRPOConfig(**cfg), val=val, eval_before=False), tiny_train(tmp_path / "straight", 5), log=quiet)
    grpo.run(grpo.Config(start=base_ckpt, data=questions["q16"], grpo=GRPOConfig(**cfg), val=val, eval_before=False), tiny_train(tmp_path / "split", 3), log=quiet)
    grpo.run(grpo.Config(start=base_ckpt, data=questions["q16"], grpo=GRPOConfig(**cfg), val=val, eval_before=False), tiny_train(tmp_path / "split", 5, resume=True), log=quiet)
    a = {r["step"]: r["loss"] for r in train_lines(tmp_path / "straight")}
    b = {r["step"]: r["loss"] for r in train_lines(tmp_path / "split")}
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    assert [a[s] for s in range(1, 6)] == pytest.approx([b[s] for s in range(1, 6)], abs=1e-6)
    assert len({round(v, 6) for v in a.values()}) > 1  # the steps really differ
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "straight" / "latest" / "model.safetensors"))
    wb = load_file(str(tmp_path / "split" / "latest" / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


@pytest.mark.slow
def test_grpo_raises_reward_and_accuracy(assets, questions, tmp_path_factory):
    start = sft_start(assets, tmp_path_factory.mktemp("sft"))
    out = tmp_path_factory.mktemp("grpo") / "run"
    q = questions["q16"]
    cfg = GRPOConfig(group_size=8, rollout_batch_size=8, beta=0.04, max_new_tokens=6, eval_size=0, eval_samples=4)
    train = tiny_train(out, 30, batch_size=16, grad_accum=4, lr=2e-4, log_every=10)
    res = grpo.run(grpo.Config(start=start, data=q, grpo=cfg, val=q), train, log=lambda m: None)  # evaluated on its own questions
    before, after = res["before"], eval_lines(out)[-1]
    assert after["val_reward"] >= before["val_reward"] + 0.08, (before, after)  # mean reward of sampled answers
    assert after["val_accuracy"] >= before["val_accuracy"] + 0.1, (before, after)  # greedy answers
    assert after["val_kl"] < 3.0, after  # Σ_t log π/ref per answer: the policy stayed near the start
    assert all(r["kl"] < 3.0 for r in train_lines(out) if "kl" in r)  # on every rollout, too
