"""DPO: summed response log-probs do not depend on padding, the precomputed reference gives exactly the
losses of the reference run every step, with LoRA the reference is the adapter-free policy (first loss
log 2, base weights frozen, adapter saved), a reference with another tokenizer is refused, and — slow —
from the SFT start DPO raises the held-out preference for chosen over rejected (implicit-reward accuracy,
nearly perfect on refusal pairs) and the margins."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_fixtures import (eval_lines, is_refusal, other_tokenizer_ckpt, quiet, read_jsonl, sft_start, tiny_train,
                           train_lines, write_jsonl)
from tiaoyu_cli.data.preference import collate_pairs, encode_pair
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.train.objectives.dpo import DPOConfig, pair_logps
from tiaoyu_cli.train.stages import dpo


@pytest.fixture(scope="module")
def prefs(synth_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo-data")
    return {"train64": write_jsonl(d / "train64.jsonl", read_jsonl(synth_dir / "preference.train.jsonl")[:64]),
            "val": write_jsonl(d / "val.jsonl", read_jsonl(synth_dir / "preference.val.jsonl")[:100]),
            "train": synth_dir / "preference.train.jsonl"}


def test_pair_logps_sum_the_response_tokens_and_ignore_padding(base_ckpt):
    from tiaoyu_cli.checkpoint import load_model, load_tokenizer
    from tiaoyu_cli.train.losses.rl import token_logps

    model, _ = load_model(base_ckpt)
    model.eval()
    tok = load_tokenizer(base_ckpt)
    a = encode_pair(tok, {"prompt": "What is 3 + 4?", "chosen": "7", "rejected": "I don't know."}, 256)
    b = encode_pair(tok, {"prompt": "What colour are the roofs in Torport? Tell me.", "chosen": "green",
                          "rejected": "white"}, 256)
    with torch.no_grad():
        pc, pr = pair_logps(model, collate_pairs([a, b]))
        for k, ex in enumerate((a, b)):  # by hand: one unpadded sequence, response positions only
            for ids, mask, got in ((ex.chosen_ids, ex.chosen_mask, pc[k]), (ex.rejected_ids, ex.rejected_mask, pr[k])):
                t = torch.tensor([ids])
                lp = token_logps(model(t[:, :-1]).logits, t[:, 1:])[0]
                want = sum(float(lp[i - 1]) for i in range(1, len(ids)) if mask[i])
                assert float(got) == pytest.approx(want, abs=1e-4)


def test_precomputed_reference_changes_nothing(base_ckpt, prefs, tmp_path):
    runs = {}
    for mode in ("yes", "no"):
        out = tmp_path / mode
        dpo.run(dpo.Config(start=base_ckpt, data=prefs["train64"], val=prefs["val"],
                           dpo=DPOConfig(beta=0.1, precompute_ref=mode)), tiny_train(out, 3), log=quiet)
        runs[mode] = train_lines(out)
    # metrics.jsonl rounds to 6 decimals and the two paths batch the reference differently (float sums in
    # another order), so equal runs may differ by a unit in the last logged digit; a wrong or misaligned
    # reference moves the loss by far more than 1e-5 (the margin grows ~0.1 per step here)
    for a, b in zip(runs["yes"], runs["no"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["reward_margin"] == pytest.approx(b["reward_margin"], abs=1e-5)
    assert runs["yes"][0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert runs["yes"][-1]["loss"] != pytest.approx(math.log(2), abs=1e-4)


def test_lora_dpo_reference_is_the_adapter_free_policy(base_ckpt, prefs, tmp_path):
    from tiaoyu_cli.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from tiaoyu_cli.checkpoint import load_model, load_tensors

    out = tmp_path / "lora"
    cfg = dpo.Config(start=base_ckpt, data=prefs["train64"], val=prefs["val"], method="lora", rank=4, alpha=8,
                     lora_dropout=0.0, targets="q,v", dpo=DPOConfig(beta=0.5, precompute_ref="no"))
    res = dpo.run(cfg, tiny_train(out, 4, lr=5e-3), log=quiet)
    lines = train_lines(out)
    assert lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # B = 0: the policy is its reference
    assert res["val_reward_margin"] > 0
    ck = out / "latest"
    assert (ck / ADAPTER_CONFIG).exists() and (ck / ADAPTER_WEIGHTS).exists()
    merged, _ = load_model(ck)  # an ordinary checkpoint (adapter folded in)
    base = load_tensors(base_ckpt / "model.safetensors")
    sd = merged.state_dict()
    assert torch.equal(sd["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])  # not a target
    assert not torch.equal(sd["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


def test_cli_lora_dpo_publishes_the_adapter(base_ckpt, prefs, tmp_path):
    """`tiaoyu rlhf dpo --method lora`, like `tiaoyu lora`: the final PEFT adapter at the top of the run folder."""
    from rlhf_fixtures import run_cli
    from tiaoyu_cli.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    out = tmp_path / "run"
    run_cli(["rlhf", "dpo", base_ckpt, prefs["train64"], "--val", prefs["val"], "-o", out, "--method", "lora",
             "--rank", "4", "--max-steps", "2", "--batch-size", "8", "--device", "cpu", "--dtype", "fp32"])
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        assert (out / name).read_bytes() == (out / "latest" / name).read_bytes()


def test_reference_with_another_tokenizer_is_refused(base_ckpt, prefs, tmp_path):
    other = other_tokenizer_ckpt(base_ckpt, tmp_path / "other")
    with pytest.raises(TiaoyuError, match="another tokenizer"):
        dpo.run(dpo.Config(start=base_ckpt, data=prefs["train64"], ref=other), tiny_train(tmp_path / "x", 1), log=quiet)
    with pytest.raises(TiaoyuError, match="--beta"):
        DPOConfig(beta=0).validate()


@pytest.mark.slow
def test_dpo_raises_held_out_preference_and_margin(assets, prefs, tmp_path_factory):
    from tiaoyu_cli.data.preference import load_pairs
    from tiaoyu_cli.checkpoint import load_model, load_tokenizer
    from tiaoyu_cli.train.objectives.dpo import evaluate_dpo

    start = sft_start(assets, tmp_path_factory.mktemp("rlhf"))
    out = tmp_path_factory.mktemp("dpo") / "run"
    cfg = DPOConfig(beta=0.1)
    res = dpo.run(dpo.Config(start=start, data=prefs["train"], val=prefs["val"], dpo=cfg),
                  tiny_train(out, 60, batch_size=16, lr=2e-4, log_every=20), log=quiet)
    before, after = res["before"], eval_lines(out)[-1]
    # the implicit reward β(log π − log ref) ranks held-out chosen above rejected (the start ties: 0.5, margin 0)
    assert before["val_reward_accuracy"] == 0.5 and before["val_reward_margin"] == 0
    assert after["val_reward_accuracy"] > 0.52 and after["val_reward_margin"] > 0.5, after  # measured 0.57: refusal pairs right, knowledge pairs near chance (below)
    # and the policy's own log-prob gap between chosen and rejected widens
    assert after["val_logp_margin"] > before["val_logp_margin"] + 5.0, (before, after)
    # where the preference needs no world knowledge (a helpful answer over a refusal) it is nearly always right
    tok = load_tokenizer(start)
    pairs = [p for p, r in zip(load_pairs(prefs["val"], tok, 256), read_jsonl(prefs["val"])) if is_refusal(r)]
    ref_model, _ = load_model(start)
    policy, _ = load_model(out / "latest")
    with torch.no_grad():
        ref = torch.stack(pair_logps(ref_model.eval(), collate_pairs(pairs)), dim=1)
    sub = evaluate_dpo(policy, pairs, ref, cfg, "cpu")
    assert len(pairs) >= 10 and sub["val_reward_accuracy"] >= 0.85, sub
