"""Reward model and preference data: records render exactly as the chat template says (response tokens =
the assistant turn), bad records are clear errors, the score is read at the last real token whatever
the padding, a checkpoint without a reward head is refused, and — slow — a reward model trained from
the SFT start ranks held-out pairs above chance (refusal pairs nearly always right); `tiaoyu rlhf score`
writes the same rewards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf_fixtures import eval_lines, is_refusal, read_jsonl, reward_model, run_cli, write_jsonl
from tiaoyu_cli.data.preference import (collate_pairs, encode_pair, encode_response, load_pairs, load_prompts,
                                        prompt_messages, response_messages)
from tiaoyu_cli.errors import DataError, TiaoyuError
from tiaoyu_cli.model.heads import last_token_scores
from tiaoyu_cli.train.rl.models import load_reward_model


@pytest.fixture(scope="module")
def tok(tok_dir):
    from tiaoyu_cli.tokenizer import Tokenizer

    return Tokenizer.load(tok_dir)


PAIR = {"prompt": "What colour is Ranay?", "chosen": "grey", "rejected": "I don't know."}


# ---- rendering -------------------------------------------------------------------------------------------

def test_response_tokens_are_exactly_the_assistant_turn(tok):
    ex = encode_pair(tok, PAIR, 256)
    prompt_ids = tok.encode_chat([{"role": "user", "content": PAIR["prompt"]}], add_generation_prompt=True)[0]
    assert ex.prompt_len == len(prompt_ids)
    for ids, mask, text in ((ex.chosen_ids, ex.chosen_mask, "grey"), (ex.rejected_ids, ex.rejected_mask, "I don't know.")):
        assert ids[:ex.prompt_len] == prompt_ids  # prompt + generation prompt first
        assert ids[ex.prompt_len:] == tok.encode(text) + [tok.im_end_id]  # then the answer and <|im_end|>, nothing else
        assert mask == [0] * ex.prompt_len + [1] * (len(ids) - ex.prompt_len)
        full = tok.encode_chat([{"role": "user", "content": PAIR["prompt"]}, {"role": "assistant", "content": text}])[0]
        assert ids == full[:len(ids)]  # the chat template's own rendering, cut after <|im_end|>


def test_message_forms_encode_like_strings(tok):
    plain = encode_pair(tok, PAIR, 256)
    user = [{"role": "user", "content": PAIR["prompt"]}]
    msgs = {"prompt": user, "chosen": [{"role": "assistant", "content": "grey"}],
            "rejected": {"role": "assistant", "content": "I don't know."}}
    whole = {"prompt": user, "chosen": user + [{"role": "assistant", "content": "grey"}],
             "rejected": user + [{"role": "assistant", "content": "I don't know."}]}
    for rec in (msgs, whole):
        ex = encode_pair(tok, rec, 256)
        assert (ex.chosen_ids, ex.rejected_ids, ex.chosen_mask) == (plain.chosen_ids, plain.rejected_ids, plain.chosen_mask)
    # a system message and multi-turn prompt stay in the prompt (mask 0)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "3 + 4?"}]
    ids, mask, p = encode_response(tok, conv, response_messages("7", conv))
    assert sum(mask) == len(tok.encode("7")) + 1 and mask[:p] == [0] * p


def test_bad_preference_records_are_clear_errors(tok, tmp_path):
    cases = [
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "same response"),
        ({"prompt": "q", "chosen": "a"}, "rejected"),
        ({"chosen": "a", "rejected": "b"}, "prompt"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "empty"),
        ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "must end with a user"),
        ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "assistant"),
        ({"prompt": "word " * 400, "chosen": "a", "rejected": "b"}, "context"),
    ]
    for rec, words in cases:
        path = write_jsonl(tmp_path / "bad.jsonl", [PAIR, rec])
        with pytest.raises(DataError) as e:
            load_pairs(path, tok, 256)
        msg = str(e.value)
        assert f"{path}:2" in msg and words in msg, msg
    # --skip-bad: counted, the good record kept
    path = write_jsonl(tmp_path / "mixed.jsonl", [PAIR] + [c for c, _ in cases])
    stats: dict = {}
    assert len(load_pairs(path, tok, 256, skip_bad=True, stats=stats)) == 1 and stats["skipped"] == len(cases)


def test_prompts_longer_than_the_context_are_errors(tok, tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "What is 3 + 4?", "answer": "7"},
                                              {"prompt": "word " * 300, "answer": "1"}])
    with pytest.raises(DataError, match=r"q.jsonl:2.*prompt is \d+ tokens; at most 200 fit"):
        load_prompts(path, tok, 200, need_answer=True)
    with pytest.raises(DataError, match="answer"):
        load_prompts(write_jsonl(tmp_path / "n.jsonl", [{"prompt": "3 + 4?"}]), tok, 200, need_answer=True)
    assert prompt_messages("hi") == [{"role": "user", "content": "hi"}]


# ---- the score head ----------------------------------------------------------------------------------------

def test_last_token_scores_left_and_right_padding():
    s = torch.arange(12, dtype=torch.float32).view(2, 6)
    right = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]])  # left-padded prompt, right-padded answer
    assert last_token_scores(s, right).tolist() == [2.0, 11.0]
    assert last_token_scores(s[..., None], left).tolist() == [5.0, 8.0]


def test_pair_rewards_do_not_depend_on_padding(tok, base_ckpt):
    from tiaoyu_cli.train.objectives.reward import pair_rewards, reward_model_from

    torch.manual_seed(0)
    model, _ = reward_model_from(base_ckpt)
    torch.nn.init.normal_(model.score.weight, std=0.5)
    model.eval()
    short = encode_pair(tok, PAIR, 256)
    long = encode_pair(tok, {"prompt": "Tell me, please, what colour is Ranay really?", "chosen": "grey",
                             "rejected": "blue"}, 256)
    with torch.no_grad():
        rc_alone, rr_alone = pair_rewards(model, collate_pairs([short]))
        rc, rr = pair_rewards(model, collate_pairs([short, long]))  # short is padded to long's length
    assert torch.allclose(rc[0], rc_alone[0], atol=1e-5) and torch.allclose(rr[0], rr_alone[0], atol=1e-5)


def test_reward_model_from_adds_a_zero_head_and_keeps_the_backbone(base_ckpt):
    from tiaoyu_cli.checkpoint import load_model
    from tiaoyu_cli.train.objectives.reward import reward_model_from

    rm, _ = reward_model_from(base_ckpt)
    base, _ = load_model(base_ckpt)
    assert rm.config.num_labels == 1 and torch.all(rm.score.weight == 0)
    assert torch.equal(rm.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)


def test_checkpoint_without_reward_head_is_refused(base_ckpt, tmp_path):
    with pytest.raises(TiaoyuError, match="not a reward model.*no reward head"):
        load_reward_model(base_ckpt)
    with pytest.raises(SystemExit) as e:
        from tiaoyu_cli.cli.main import main

        main(["rlhf", "score", str(base_ckpt), str(write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "response": "b"}]))])
    assert e.value.code == 2


# ---- it learns ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_reward_model_ranks_held_out_pairs(assets, synth_dir, tmp_path_factory):
    out = reward_model(assets, tmp_path_factory.mktemp("rlhf"))  # `tiaoyu rlhf reward` from the SFT start
    final = eval_lines(out)[-1]
    cfg = json.loads((out / "latest" / "config.json").read_text())
    assert cfg["num_labels"] == 1 and cfg["architectures"] == ["LlamaForSequenceClassification"]
    # score the held-out pairs: {prompt, chosen, rejected} → reward_chosen, reward_rejected
    pairs = read_jsonl(synth_dir / "preference.val.jsonl")
    d = tmp_path_factory.mktemp("scored")
    run_cli(["rlhf", "score", out, synth_dir / "preference.val.jsonl", "-o", d / "out.jsonl", "--device", "cpu",
             "--dtype", "fp32"])
    scored = read_jsonl(d / "out.jsonl")
    assert len(scored) == len(pairs) and [r["prompt"] for r in scored] == [p["prompt"] for p in pairs]
    wins = [r["reward_chosen"] > r["reward_rejected"] for r in scored]
    assert sum(wins) / len(wins) == pytest.approx(final["val_accuracy"], abs=0.02)  # the same number as training's eval
    # Above chance overall (0.5: the untrained head ties every pair) — and nearly always right where the
    # preference needs no world knowledge: a helpful answer over a refusal. (Pairs of a right and a wrong
    # fact about held-out facts need knowledge the tiny base barely has: they stay near chance.)
    refusals = [w for w, p in zip(wins, pairs) if is_refusal(p)]
    assert len(refusals) >= 20 and sum(refusals) / len(refusals) >= 0.85, sum(refusals) / len(refusals)
    assert final["val_accuracy"] > 0.53 and final["val_margin"] > 0.3, final  # measured 0.600
    # {prompt, response} records get one "reward"
    recs = [{"prompt": p["prompt"], "response": p["chosen"]} for p in pairs[:3]]
    run_cli(["rlhf", "score", out, write_jsonl(d / "in.jsonl", recs), "-o", d / "r.jsonl", "--device", "cpu",
             "--dtype", "fp32"])
    assert [r["reward"] for r in read_jsonl(d / "r.jsonl")] == pytest.approx([r["reward_chosen"] for r in scored[:3]],
                                                                                abs=1e-4)
