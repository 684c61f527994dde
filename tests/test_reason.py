"""`tiaoyu reason`: trace validation (reasoning fields, <think> markup, teacher output), questions with
answers, think-format SFT end to end, GRPO stage, bad input through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tiaoyu_cli.errors import DataError, TiaoyuError
from tiaoyu_cli.train.reason import TraceStats, load_questions, load_traces, normalize_trace, split_think


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
