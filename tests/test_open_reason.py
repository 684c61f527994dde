"""`tiaoyu reason` (think-format SFT, then `--rl`) on Hugging Face model folders (tiny random models and tokenizers
built here). A folder whose tokenizer adds <think>/</think> and whose template renders a turn's reasoning (Qwen's
layout) learns the reasoning through its template, with the think tokens; a folder without think tokens whose
template drops the reasoning field (Llama 3's layout) learns `<think>…</think>` as text before the answer, and
answers are split and scored on that text. The outputs load in transformers as the same class."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from rlhf_fixtures import run_cli, write_jsonl
from test_open_chat import make_folder
from tiaoyu_cli.checkpoint import load_model, load_tokenizer

transformers = pytest.importorskip("transformers")

TRACES = [{"messages": [{"role": "user", "content": "What is 12 + 7?"},
                        {"role": "assistant", "reasoning": "12 + 7 = 19.", "content": "19"}]}] * 4
QUESTIONS = [{"prompt": "What is 12 + 7?", "answer": "19"}, {"prompt": "What is 2 + 3?", "answer": "5"}] * 2
COMMON = ["--max-steps", "2", "--batch-size", "2", "--lr", "1e-3", "--device", "cpu", "--dtype", "fp32", "--seed", "0"]
END = {"qwen2": "<|im_end|>", "llama3": "<|eot_id|>"}


def learned_text(tok, traces) -> str:
    from tiaoyu_cli.data.chat import ChatDataset

    ex = ChatDataset(traces, tok, 128).examples[0]
    return tok.decode([i for i, m in zip(ex.ids, ex.loss_mask) if m], skip_special=False)


@pytest.mark.parametrize("kind", ["qwen2", "llama3"])
def test_think_tokens_or_text_tags(kind, tmp_path):
    from tiaoyu_cli.infer.generate import decode_response, open_think_ids
    from tiaoyu_cli.train.rl.answers import format_ok, is_correct
    from tiaoyu_cli.train.stages.reason import reasoning_for_template

    tok = load_tokenizer(make_folder(kind, tmp_path / kind))
    traces, as_text = reasoning_for_template(TRACES, tok)
    learned = learned_text(tok, traces)
    if kind == "qwen2":  # added tokens and a template that renders reasoning_content
        assert not as_text and tok.think_id is not None and open_think_ids(tok) == [tok.think_id]
        assert learned == "<think>\n12 + 7 = 19.\n</think>\n\n19" + END[kind]
        body = [tok.think_id] + tok.encode("\n12 + 7 = 19.\n") + [tok.end_think_id] + tok.encode("\n\n19")
    else:  # no think tokens, a template that drops the field: the tags are text in the answer
        assert as_text and tok.think_id is None and tok.end_think_id is None
        assert open_think_ids(tok) == tok.encode("<think>\n")
        assert learned == "<think>\n12 + 7 = 19.\n</think>\n\n19" + END[kind]
        body = tok.encode("<think>\n12 + 7 = 19.\n</think>\n\n19")
    stop = min(tok.stop_ids)
    r = decode_response(tok, body + [stop])
    assert r.reasoning is None or r.reasoning.strip() == "12 + 7 = 19."
    assert is_correct(r.response, "19") and format_ok(r.response, require_think=True)
    assert not is_correct(decode_response(tok, tok.encode("<think>\n19")).response, "19")  # never closed


def test_a_template_that_drops_reasoning_everywhere_is_an_error(tmp_path):
    from tiaoyu_cli.errors import TiaoyuError
    from tiaoyu_cli.train.stages.reason import reasoning_for_template

    folder = make_folder("llama3", tmp_path / "l")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = cfg["chat_template"].replace("message['content'] | trim",
                                                        "message['content'].split('</think>')[-1] | trim")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TiaoyuError, match="drops an assistant turn's reasoning"):
        reasoning_for_template(TRACES, load_tokenizer(folder))


@pytest.mark.parametrize("kind", ["qwen2", "llama3"])
def test_reason_then_rl_keep_the_family(kind, tmp_path):
    src = make_folder(kind, tmp_path / "src")
    traces = write_jsonl(tmp_path / "traces.jsonl", TRACES)
    qs = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    run_cli(["reason", src, traces, "-o", tmp_path / "r1", "--eval-data", traces, "--eval-samples", "2",
             "--eval-max-new-tokens", "4"] + COMMON)
    run_cli(["reason", "--rl", tmp_path / "r1", qs, "-o", tmp_path / "r2", "--open-think", "--group-size", "2",
             "--rollout-batch-size", "2", "--max-new-tokens", "6"] + COMMON)
    arch = json.loads((src / "config.json").read_text())["architectures"]
    for out in (tmp_path / "r1" / "latest", tmp_path / "r2" / "latest"):
        assert json.loads((out / "config.json").read_text())["architectures"] == arch
        assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
        ours, _ = load_model(out)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert type(theirs).__name__ == arch[0]
        ids = torch.tensor([load_tokenizer(out).encode("What is 12 + 7? <think>")])
        with torch.no_grad():
            assert (ours.eval()(ids).logits - theirs(ids).logits).abs().max() < 1e-4
    before, _ = load_model(src)
    after, _ = load_model(tmp_path / "r1" / "latest")
    with torch.no_grad():
        assert (before(ids).logits - after(ids).logits).abs().max() > 1e-4  # think-SFT trained
