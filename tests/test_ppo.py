"""PPO: the value head is a trained extra module saved for resume, GAE targets come from the rollout,
bad inputs (a reward checkpoint without a reward head, a reference with another tokenizer, prompts
longer than the context) are clear errors, and — slow — from the SFT start PPO raises the mean reward
of exact final answers and the greedy accuracy on its questions while the KL stays bounded."""

from __future__ import annotations

import pytest
import torch

from rlhf_fixtures import (eval_lines, other_tokenizer_ckpt, quiet, read_jsonl, sft_start, tiny_train, train_lines,
                           write_jsonl)
from tiaoyu_cli.errors import DataError, TiaoyuError
from tiaoyu_cli.train.objectives.ppo import PPOConfig
from tiaoyu_cli.train.stages import ppo


@pytest.fixture(scope="module")
def questions(synth_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("ppo-data")
    return write_jsonl(d / "q16.jsonl", read_jsonl(synth_dir / "verifiable.train.jsonl")[:16])


def test_value_head_trains_and_is_saved_for_resume(base_ckpt, questions, tmp_path):
    from safetensors.torch import load_file

    # a well-formed answer earns 1 (format reward, no normalisation): the returns are not all zero
    cfg = PPOConfig(rollout_batch_size=8, epochs=2, max_new_tokens=6, eval_size=4, format_reward=1.0, reward_norm=False)
    ppo.run(ppo.Config(start=base_ckpt, data=questions, ppo=cfg, val=questions, eval_before=False), tiny_train(tmp_path / "r", 2), log=quiet)
    state = load_file(str(tmp_path / "r" / "latest" / "train_state.safetensors"))
    w = state["extra.value_head.proj.bias"]
    assert w.shape == (1,) and float(w.abs().sum()) > 0  # zero-initialised, moved by the value loss
    assert "stage.buffer.returns" in state and "stage.buffer.adv" in state  # the rollout buffer, for an exact resume
    line = train_lines(tmp_path / "r")[-1]
    for k in ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "kl", "reward", "value_mean"):
        assert k in line
    ppo.run(ppo.Config(start=base_ckpt, data=questions, ppo=cfg, val=questions), tiny_train(tmp_path / "r", 3, resume=True), log=quiet)
    assert [r["step"] for r in train_lines(tmp_path / "r")] == [1, 2, 3]


def test_bad_inputs_are_clear_errors(base_ckpt, questions, tmp_path):
    # a reward checkpoint without a reward head
    with pytest.raises(TiaoyuError, match="not a reward model"):
        ppo.run(ppo.Config(start=base_ckpt, data=questions, ppo=PPOConfig(reward=str(base_ckpt))), tiny_train(tmp_path / "a", 1), log=quiet)
    # a reference with another tokenizer
    other = other_tokenizer_ckpt(base_ckpt, tmp_path / "other")
    with pytest.raises(TiaoyuError, match="another tokenizer"):
        ppo.run(ppo.Config(start=base_ckpt, data=questions, ppo=PPOConfig(), ref=other), tiny_train(tmp_path / "b", 1), log=quiet)
    # a prompt longer than the context (with room for the answer)
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "3 plus 4 " * 200, "answer": "7"}])
    with pytest.raises(DataError, match=r"long.jsonl:1.*at most \d+ fit in the context of 256 tokens with "
                                        r"--max-new-tokens 32"):
        ppo.run(ppo.Config(start=base_ckpt, data=long, ppo=PPOConfig()), tiny_train(tmp_path / "c", 1), log=quiet)
    with pytest.raises(TiaoyuError, match="--lam"):
        PPOConfig(lam=1.5).validate()
    # through the CLI: one line on stderr, exit status 2
    from tiaoyu_cli.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["rlhf", "ppo", str(base_ckpt), str(questions), "--reward", str(base_ckpt), "-o", str(tmp_path / "d"),
              "--max-steps", "1"])
    assert e.value.code == 2


@pytest.mark.slow
def test_ppo_verifiable_raises_reward_and_accuracy(assets, questions, tmp_path_factory):
    start = sft_start(assets, tmp_path_factory.mktemp("rlhf"))
    out = tmp_path_factory.mktemp("ppo") / "run"
    cfg = PPOConfig(reward="verifiable", rollout_batch_size=32, epochs=2, max_new_tokens=6, eval_size=0, eval_samples=4)
    res = ppo.run(ppo.Config(start=start, data=questions, ppo=cfg, val=questions), tiny_train(out, 40, batch_size=16, grad_accum=2, log_every=10), log=quiet)  # evaluated on its own questions
    before, after = res["before"], eval_lines(out)[-1]
    assert after["val_reward"] >= before["val_reward"] + 0.08, (before, after)
    assert after["val_accuracy"] >= before["val_accuracy"] + 0.1, (before, after)  # greedy answers
    assert after["val_kl"] < 3.0, after  # Σ_t log π/ref per answer: the policy stayed near the start
    assert all(r["kl"] < 3.0 for r in train_lines(out) if "kl" in r)


def test_ppo_with_a_reward_model_uses_its_scores(base_ckpt, tmp_path):
    """--reward RM: the rollout reward is the reward model's score of prompt + sampled answer."""
    from tiaoyu_cli.checkpoint import load_tokenizer, save_model_files
    from tiaoyu_cli.train.objectives.reward import reward_model_from

    torch.manual_seed(0)
    rm, _ = reward_model_from(base_ckpt)
    torch.nn.init.normal_(rm.score.weight, std=1.0)
    rm_dir = tmp_path / "rm"
    rm_dir.mkdir()
    save_model_files(rm_dir, rm, load_tokenizer(base_ckpt))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"What is {a} + {a}?"} for a in range(8)])
    out = tmp_path / "run"
    cfg = PPOConfig(reward=str(rm_dir), rollout_batch_size=8, epochs=1, max_new_tokens=5, eval_size=8, reward_norm=False,
                    reward_clip=0.0)
    res = ppo.run(ppo.Config(start=base_ckpt, data=prompts, ppo=cfg, val=prompts), tiny_train(out, 1), log=quiet)
    line = train_lines(out)[0]
    assert abs(line["reward"]) > 1e-3 and abs(line["score_norm"] - line["reward"]) < 1e-4  # raw RM scores, unnormalised
    assert "val_reward" in res and "val_accuracy" not in res  # a reward model: no exact answers to check
