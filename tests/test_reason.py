"""`tiaoyu reason`: trace validation (reasoning fields, <think> markup, teacher output), questions with
answers, think-format SFT end to end, GRPO stage, bad input through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiaoyu_cli.errors import DataError, TiaoyuError
from tiaoyu_cli.train.stages.reason import TraceStats, load_questions, load_traces, normalize_trace, split_think


def _write(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records),
                    encoding="utf-8")
    return path


def _trace(q="What is 3 + 4 - 2?", steps="3 + 4 = 7. 7 - 2 = 5.", ans="5"):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "reasoning": steps, "content": ans}]}


def test_split_think():
    assert split_think("<think>a b</think> 5") == ("a b", "5")
    assert split_think("a b</think>5") == ("a b", "5")  # the prompt opened <think>
    assert split_think("just 5") == (None, "just 5")
    for bad in ("<think>never closed", "<think>a</think>b<think>c</think>d", "x <think>a</think>b"):
        with pytest.raises(ValueError):
            split_think(bad)


def test_normalize_keeps_reasoning_field_and_splits_markup():
    st = TraceStats()
    assert normalize_trace(_trace(), "t.jsonl", 1, st)["messages"][-1] == \
        {"role": "assistant", "reasoning": "3 + 4 = 7. 7 - 2 = 5.", "content": "5"}
    rec = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>1 + 1 = 2.</think>2"}]}
    out = normalize_trace(rec, "t.jsonl", 2, st)
    assert out["messages"][-1] == {"role": "assistant", "content": "2", "reasoning": "1 + 1 = 2."}
    assert st.split_markup == 1


def test_teacher_chat_output_is_a_trace():
    st = TraceStats()
    rec = {"prompt": "What is 2 + 2?", "response": "<think>2 + 2 = 4.</think>4", "reasoning": "2 + 2 = 4.",
           "answer": "4"}
    out = normalize_trace(rec, "t.jsonl", 1, st)
    assert out["messages"] == [{"role": "user", "content": "What is 2 + 2?"},
                               {"role": "assistant", "reasoning": "2 + 2 = 4.", "content": "4"}]
    assert st.from_teacher == 1
    # a teacher answer without thinking is not a trace
    with pytest.raises(DataError, match="no reasoning"):
        normalize_trace({"prompt": "q", "response": "4"}, "t.jsonl", 3, st)


@pytest.mark.parametrize("rec,msg,field", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "5"}]},
     "no reasoning", "messages[1]"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>3 + 4 = 7. so 7"}]},
     "never closed", "messages[1].content"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "reasoning": "<think>3 + 4 = 7.", "content": "7"}]},
     "markup", "messages[1].reasoning"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>3 + 4 = 7.</think>"}]},
     "no final answer", "messages[1].content"),
    ({"prompt": "What is 3 + 4?", "answer": "7"}, "reason --rl", None),
])
def test_bad_traces_are_clear_errors(rec, msg, field):
    with pytest.raises(DataError, match=msg) as e:
        normalize_trace(rec, "traces.jsonl", 7, TraceStats())
    assert "traces.jsonl:7" in str(e.value)
    if field:
        assert e.value.field == field


def test_load_traces_errors_or_counts(tmp_path):
    p = _write(tmp_path / "traces.jsonl", [
        _trace(),
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "5"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>2 + 2 = 4."}]},
        "{not json",
        _trace("What is 1 + 1?", "1 + 1 = 2.", "2"),
    ])
    with pytest.raises(DataError, match=r"traces.jsonl:2"):
        load_traces(p)
    recs, st = load_traces(p, skip_bad=True)
    assert len(recs) == 2 and st.kept == 2 and st.bad == 3
    assert st.reasons == {"without reasoning": 1, "with an unclosed <think>": 1, "malformed JSON": 1}
    assert "3 skipped" in st.summary()
    # --direct drops the reasoning (the baseline), keeps the answers
    direct, _ = load_traces(p, skip_bad=True, direct=True)
    assert direct[0]["messages"][-1] == {"role": "assistant", "content": "5"}
    with pytest.raises(TiaoyuError, match="no usable reasoning traces"):
        load_traces(_write(tmp_path / "none.jsonl", [{"prompt": "q", "answer": "1"}]), skip_bad=True)


def test_teacher_traces_only_correct(tmp_path):
    """`tiaoyu chat` output of a verifiable question keeps the reference as input_answer: --only-correct
    keeps the teacher's traces that got it right (rejection sampling)."""
    recs = [{"prompt": "What is 2 + 3?", "input_answer": "5", "response": "<think>2 + 3 = 5.</think>5",
             "reasoning": "2 + 3 = 5.", "answer": "5"},
            {"prompt": "What is 4 + 4?", "input_answer": "8", "response": "<think>4 + 4 = 9.</think>9",
             "reasoning": "4 + 4 = 9.", "answer": "9"}]
    p = _write(tmp_path / "teacher.jsonl", recs)
    all_, st = load_traces(p)
    assert len(all_) == 2 and st.from_teacher == 2
    kept, st = load_traces(p, only_correct=True)
    assert [r["messages"][-1]["content"] for r in kept] == ["5"]
    assert st.reasons == {"with a wrong answer": 1}


def test_load_questions(tmp_path):
    p = _write(tmp_path / "q.jsonl", [
        {"prompt": "What is 3 + 4?", "answer": "7"},
        {"prompt": "What is 5 + 5?"},
        {"prompt": "What is 1 + 1?", "answer": ""},
        {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 × 3?"}], "answer": 6},
    ])
    with pytest.raises(DataError, match=r"q.jsonl:2: field 'answer'"):
        load_questions(p)
    qs, st = load_questions(p, skip_bad=True)
    assert st.kept == 3 and st.bad == 2 and st.reasons == {"without an answer": 2}
    assert qs[0] == {"prompt": [{"role": "user", "content": "What is 3 + 4?"}], "answer": "7", "line": 1}
    assert qs[1]["answer"] == "4" and qs[2]["answer"] == "6"


# ---- runs on the tiny base ------------------------------------------------------------------------------

from tiaoyu_cli.train.engine.trainer import TrainConfig  # noqa: E402


def _train(out, **kw) -> TrainConfig:
    base = dict(out=str(out), max_steps=2, batch_size=4, lr=1e-3, warmup_steps=0, log_every=1, device="cpu",
                dtype="fp32", keep=1)
    base.update(kw)
    return TrainConfig(**base)


def _head(src: Path, dst: Path, n: int) -> Path:
    lines = src.read_text(encoding="utf-8").splitlines()[:n]
    dst.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dst


def test_think_sft_trains_on_reasoning_tokens(base_ckpt, synth_dir, tmp_path):
    """Stage 1 is the SFT stage on <think>steps</think>answer: the reasoning tokens are learned."""
    from tiaoyu_cli.data.chat import ChatDataset
    from tiaoyu_cli.tokenizer import Tokenizer
    from tiaoyu_cli.checkpoint import load_trainer_info
    from tiaoyu_cli.train.stages import reason

    tok = Tokenizer.load(base_ckpt)
    traces, _ = load_traces(synth_dir / "reasoning.train.jsonl")
    ex = ChatDataset(traces[:1], tok, 128).examples[0]
    learned = [i for i, m in zip(ex.ids, ex.loss_mask) if m]
    assert learned[0] == tok.think_id and tok.end_think_id in learned and learned[-1] == tok.im_end_id
    assert tok.decode(learned[1:learned.index(tok.end_think_id)]) == traces[0]["messages"][-1]["reasoning"]

    data = _head(synth_dir / "reasoning.train.jsonl", tmp_path / "traces.jsonl", 16)
    val = _head(synth_dir / "verifiable.val.jsonl", tmp_path / "val.jsonl", 4)
    o = reason.Config(ckpt=base_ckpt, data=data, eval_data=val, eval_samples=4, eval_max_new_tokens=8)
    res = reason.run(o, _train(tmp_path / "r"), log=lambda m: None)
    assert res["step"] == 2 and {"answer_acc", "format_rate"} <= set(res) and {"answer_acc", "format_rate"} <= set(res["before"])
    info = load_trainer_info(tmp_path / "r")
    assert info["stage"] == "reason" and info["stage_config"]["step"] == "think-sft"


def test_reason_rl_runs_grpo_with_think_format(base_ckpt, synth_dir, tmp_path):
    from tiaoyu_cli.checkpoint import load_trainer_info
    from tiaoyu_cli.train.stages import reason

    qs = _head(synth_dir / "verifiable.train.jsonl", tmp_path / "q.jsonl", 8)
    val = _head(synth_dir / "reasoning.val.jsonl", tmp_path / "val.jsonl", 4)  # chat records serve as questions too
    o = reason.Config(ckpt=base_ckpt, data=qs, eval_data=val, rl=True, eval_samples=4,
                      grpo=reason.reason_grpo_config(group_size=2, rollout_batch_size=2, max_new_tokens=8, beta=0.04,
                                                     format_reward=0.2))
    res = reason.run(o, _train(tmp_path / "rl", batch_size=4), log=lambda m: None)
    assert res["step"] == 2 and "val_accuracy" in res and "val_format_rate" in res
    info = load_trainer_info(tmp_path / "rl")
    assert info["stage"] == "reason-rl"


def _tool_trace(reasoning="Plan: step 1: 2 + 3."):
    call = {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "2+3"}'}}
    first = {"role": "assistant", "content": "", "tool_calls": [call]}
    if reasoning is not None:
        first["reasoning"] = reasoning
    return {"messages": [{"role": "user", "content": "What is 2 + 3?"}, first,
                         {"role": "tool", "tool_call_id": "call_1", "content": "5"},
                         {"role": "assistant", "content": "2 + 3 = 5"}], "answer": "5"}


def test_tool_traces_think_before_the_first_call():
    """A tool-use trace thinks in its first assistant turn (then calls); the final turn answers."""
    out = normalize_trace(_tool_trace(), "t.jsonl", 3, TraceStats())
    assert out["messages"][1]["reasoning"].startswith("Plan") and out["messages"][-1]["content"] == "2 + 3 = 5"
    with pytest.raises(DataError, match="no reasoning") as e:
        normalize_trace(_tool_trace(None), "t.jsonl", 3, TraceStats())
    assert e.value.field == "messages[1]"
    bad = _tool_trace()
    bad["messages"] = bad["messages"][:3]  # ends on the tool result: no final answer
    with pytest.raises(DataError):
        normalize_trace(bad, "t.jsonl", 3, TraceStats())


def test_synth_reasoning_tools_records_are_traces(synth_dir):
    traces, st = load_traces(synth_dir / "reasoning-tools.train.jsonl")
    assert len(traces) == st.records > 0
    first = traces[0]["messages"][1]
    assert first["tool_calls"] and first["reasoning"].strip()


def test_reason_rl_with_tools_rolls_out_calls(base_ckpt, synth_dir, tmp_path):
    """reason --rl --tools: agentic rollouts (the tool turns masked) with the think-format reward."""
    from tiaoyu_cli.infer.tools import ToolOptions
    from tiaoyu_cli.train.stages import reason
    from tiaoyu_cli.train.rl.rollout import ToolVerifiableReward

    qs = _head(synth_dir / "reasoning-tools.train.jsonl", tmp_path / "q.jsonl", 8)
    val = _head(synth_dir / "reasoning-tools.val.jsonl", tmp_path / "val.jsonl", 4)
    o = reason.Config(ckpt=base_ckpt, data=qs, eval_data=val, rl=True, eval_samples=4,
                      grpo=reason.reason_grpo_config(group_size=2, rollout_batch_size=2, max_new_tokens=8, beta=0.04,
                                                     format_reward=0.2),
                      tool=ToolOptions(tools="calculator", max_tool_calls=2))
    plan = reason.prepare_reason_rl(o, _train(tmp_path / "p", batch_size=4))
    assert "calculator" in plan.stage.tools.toolbox.tools and plan.stage.tools.max_tool_calls == 2
    assert isinstance(plan.stage.reward, ToolVerifiableReward)
    assert plan.stage.reward.require_think and "tools calculator" in plan.lines[0]
    res = reason.run(o, _train(tmp_path / "rl", batch_size=4), log=lambda m: None)
    assert res["step"] == 2 and "val_accuracy" in res and "val_format_rate" in res


def test_think_tool_reward_reads_the_first_turns_reasoning_and_the_last_turns_answer(base_ckpt):
    from tiaoyu_cli.data.preference import PromptExample
    from tiaoyu_cli.infer.tool_loop import tool_turn_ids
    from tiaoyu_cli.tokenizer import Tokenizer
    from tiaoyu_cli.train.rl.layout import layout
    from tiaoyu_cli.train.rl.rollout import ToolVerifiableReward

    tok = Tokenizer.load(base_ckpt)
    call = [tok.tool_call_id] + tok.encode('{"name": "calculator", "arguments": {"expression": "2+3"}}') + [
        tok.end_tool_call_id]
    final = tok.encode("2 + 3 = 5") + [tok.im_end_id]
    closed = tok.encode("plan") + [tok.end_think_id] + call + tool_turn_ids(tok, "5") + final
    unclosed = tok.encode("plan") + call + tool_turn_ids(tok, "5") + final
    wrong = tok.encode("plan") + [tok.end_think_id] + call + tool_turn_ids(tok, "5") + tok.encode("6") + [tok.im_end_id]
    one_turn = tok.encode("plan") + [tok.end_think_id] + tok.encode("5") + [tok.im_end_id]
    prompt = tok.encode_chat([{"role": "user", "content": "2+3?"}], add_generation_prompt=True)[0]
    ro = layout([prompt] * 4, [closed, unclosed, wrong, one_turn])
    r = ToolVerifiableReward(tok, format_weight=0.2, require_think=True, prefix_ids=[tok.think_id])
    s = r([PromptExample(prompt, "5")] * 4, ro)
    assert s.correct.tolist() == [1.0, 1.0, 0.0, 1.0] and s.format_ok.tolist() == [1.0, 0.0, 1.0, 1.0]
    assert r.texts([closed])[0] == "<think>plan</think>2 + 3 = 5"


def test_cli_bad_input(base_ckpt, tmp_path, capfd):
    from tiaoyu_cli.cli.main import main

    def run(*args):
        with pytest.raises(SystemExit) as e:
            main(["reason", *map(str, args)])
        out, err = capfd.readouterr()
        return e.value.code, out, " ".join(err.split())

    traces = _write(tmp_path / "t.jsonl", [_trace(), {"messages": [{"role": "user", "content": "q"},
                                                                 {"role": "assistant", "content": "7"}]}])
    code, out, err = run(base_ckpt, traces, "-o", tmp_path / "a", "--max-steps", "1")
    assert code == 2 and "t.jsonl:2" in err and "no reasoning" in err and "Traceback" not in err and out == ""
    qs = _write(tmp_path / "q.jsonl", [{"prompt": "What is 1 + 1?", "answer": "2"}, {"prompt": "What is 2 + 2?"}])
    code, _, err = run("--rl", base_ckpt, qs, "-o", tmp_path / "b", "--max-steps", "1")
    assert code == 2 and "q.jsonl:2" in err and "answer" in err
    code, _, err = run("--rl", "--direct", base_ckpt, qs, "-o", tmp_path / "c", "--max-steps", "1")
    assert code == 2 and "--direct" in err
    assert not (tmp_path / "a" / "latest").exists() and not (tmp_path / "b" / "latest").exists()
    code, _, err = run(base_ckpt, traces, "-o", tmp_path / "d", "--tools", "calculator", "--max-steps", "1")
    assert code == 2 and "--tools is for --rl" in err
    code, _, err = run("--rl", base_ckpt, qs, "-o", tmp_path / "e", "--eval-tools", "calculator", "--max-steps", "1")
    assert code == 2 and "--eval-tools is for stage 1" in err
    code, _, err = run("--rl", base_ckpt, qs, "-o", tmp_path / "f", "--tools", "calculatr", "--max-steps", "1")
    assert code == 2 and "unknown tool 'calculatr'" in err
