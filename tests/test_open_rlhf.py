"""`tiaoyu rlhf dpo|grpo|ppo` on a Hugging Face model folder (a tiny random qwen2-style model and tokenizer built
here): pairs and prompts are rendered with the folder's own template, rollouts end at the end-of-turn ids of its
generation_config.json, answers are read with its tokenizer, and the output folder loads in transformers as the
same class with our logits."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from rlhf_fixtures import read_jsonl, run_cli, write_jsonl
from test_open_chat import hf_generate, make_folder, set_stops
from tiaoyu_cli.checkpoint import load_model, load_tokenizer
from tiaoyu_cli.train.rl.answers import normalize

transformers = pytest.importorskip("transformers")

PAIRS = [{"prompt": "What is 12 + 7?", "chosen": "It is 19.", "rejected": "It is 20."},
         {"prompt": "你好", "chosen": "你好！", "rejected": "走开。"}] * 4
QUESTION = "What is 12 + 7?"
COMMON = ["--max-steps", "2", "--batch-size", "2", "--device", "cpu", "--dtype", "fp32", "--seed", "0"]


def assert_same_class_and_logits(src, out, trained: bool = True):
    """`out` loads in transformers as the class of `src` and gives our logits (which moved from the source's
    when `trained`)."""
    a, b = json.loads((src / "config.json").read_text()), json.loads((out / "config.json").read_text())
    assert b["architectures"] == a["architectures"] and b["model_type"] == a["model_type"]
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert json.loads((out / "generation_config.json").read_text()) == \
        json.loads((src / "generation_config.json").read_text())
    ours, _ = load_model(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(theirs).__name__ == a["architectures"][0]
    ids = torch.tensor([load_tokenizer(out).encode("What is 12 + 7? It is 19.")])
    with torch.no_grad():
        mine = ours.eval()(ids).logits
        assert (mine - theirs(ids).logits).abs().max() < 1e-4
        if trained:
            before, _ = load_model(src)
            assert (mine - before.eval()(ids).logits).abs().max() > 1e-4


def test_preference_pairs_use_the_folders_template(tmp_path):
    """A pair's response tokens are the assistant's answer and the template's end-of-turn token, after the
    prompt as the template renders it with its generation prompt."""
    from tiaoyu_cli.data.preference import encode_prompt, encode_response

    src = make_folder("qwen2", tmp_path / "src")
    tok = load_tokenizer(src)
    prompt, response = [{"role": "user", "content": QUESTION}], [{"role": "assistant", "content": "It is 19."}]
    ids, mask, n = encode_response(tok, prompt, response)
    assert ids[:n] == encode_prompt(tok, prompt) == tok.encode(tok.render_chat(prompt, add_generation_prompt=True))
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False) == "It is 19.<|im_end|>"
    assert ids[-1] == tok.im_end_id and tok.im_end_id in tok.stop_ids


def test_dpo_on_an_open_folder(tmp_path):
    src = make_folder("qwen2", tmp_path / "src")
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    run_cli(["rlhf", "dpo", src, data, "-o", tmp_path / "dpo", "--lr", "1e-2", "--warmup-steps", "0"] + COMMON)
    assert_same_class_and_logits(src, tmp_path / "dpo" / "latest")


def test_grpo_rollouts_end_at_the_folders_end_of_turn(tmp_path):
    """GRPO on an open folder: greedy (top-k 1) rollouts stop at the token generation_config.json names as end of turn
    (not tiaoyu's own ids), and the text before it, read with the folder's tokenizer, is scored as the answer."""
    src = make_folder("qwen2", tmp_path / "src")
    tok = load_tokenizer(src)
    prompt = tok.encode_chat([{"role": "user", "content": QUESTION}], add_generation_prompt=True)[0]
    free = hf_generate(src, prompt, 8, [10 ** 6])  # what greedy decoding says, with no stop
    k = next(i for i in range(1, len(free)) if free[i] not in free[:i] and free[i] not in (3, 5)
             and normalize(tok.decode(free[:i])))
    answer = tok.decode(free[:k])
    set_stops(src, [free[k]])
    data = write_jsonl(tmp_path / "q.jsonl", [{"prompt": QUESTION, "answer": answer}] * 6)
    run_cli(["rlhf", "grpo", src, data, "-o", tmp_path / "grpo", "--group-size", "2", "--rollout-batch-size", "2",
             "--max-new-tokens", "8", "--top-k", "1", "--lr", "1e-5", "--weight-decay", "0"] + COMMON)
    metrics = read_jsonl(tmp_path / "grpo" / "metrics.jsonl")
    before = next(m for m in metrics if m.get("eval") and m["step"] == 0)
    first = next(m for m in metrics if m["step"] == 1 and "loss" in m)
    assert before["val_accuracy"] == 1.0
    assert first["stop_rate"] == 1.0 and first["resp_len"] == k + 1 and first["accuracy"] == 1.0
    assert_same_class_and_logits(src, tmp_path / "grpo" / "latest", trained=False)


def test_ppo_with_a_reward_model_on_an_open_folder(tmp_path):
    """`rlhf reward` then `rlhf ppo --reward RM` on an open folder: the reward model is the family's sequence
    classifier, the PPO policy comes out as the family's causal LM."""
    src = make_folder("qwen2", tmp_path / "src")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p["prompt"]} for p in PAIRS])
    run_cli(["rlhf", "reward", src, pairs, "-o", tmp_path / "rm", "--lr", "1e-3"] + COMMON)
    rm_cfg = json.loads((tmp_path / "rm" / "latest" / "config.json").read_text())
    assert rm_cfg["architectures"] == ["Qwen2ForSequenceClassification"]
    run_cli(["rlhf", "ppo", src, prompts, "--reward", tmp_path / "rm", "-o", tmp_path / "ppo", "--rollout-batch-size",
             "2", "--max-new-tokens", "6", "--lr", "1e-2", "--warmup-steps", "0"] + COMMON)
    assert_same_class_and_logits(src, tmp_path / "ppo" / "latest")
