"""Reasoning models: think first, then answer.

    tiaoyu reason ckpt/sft traces.jsonl -o ckpt/reason --eval-data reasoning.val.jsonl
    tiaoyu reason --rl ckpt/reason questions.jsonl -o ckpt/reason-rl --eval-data verifiable.val.jsonl

Stage 1 — think-format SFT (seed 000, 推理模型训练: black-box distillation on data that contains the
reasoning process). Every trace is a chat record whose assistant turn carries its steps in a separate
"reasoning" field; the tokenizer renders it as

    <|im_start|>assistant\\n<think>3 + 4 = 7. 7 - 2 = 5.</think>5<|im_end|>

and the SFT stage learns all of it (reasoning, both think tags, answer), so the model learns to open
<think>, work step by step, close it and give the bare answer. Traces come from the synthetic corpus
(`reasoning.train.jsonl`) or from a reasoning teacher (`tiaoyu chat teacher/ < questions.jsonl >
traces.jsonl` keeps "reasoning" and "answer" apart; those records are accepted as they are, and
`--only-correct` keeps only the traces whose answer matches the question's reference — rejection
sampling).
`--direct` drops the reasoning and trains on the answers alone: the baseline at the same budget.

Stage 2 — `--rl`: GRPO with verifiable rewards on `{"prompt", "answer"}` records (the rlhf GRPO
engine), the policy prompted in the think format. Reward of a sampled response:

    r = 1 · [final answer correct] + w_format · [format ok: <think>…</think> then a non-empty answer]

(`rl/answers.py`: the answer is the text after </think>; numbers compare as numbers).

Trace checks (`load_traces`): the last assistant turn must carry reasoning — a "reasoning" field, or
content with literal `<think>…</think>` markup (split into the two fields). A trace without reasoning,
an unclosed `<think>`, or markup inside the reasoning is an error naming file:line (or, with
`--skip-bad`, a counted skip).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from tiaoyu_cli.checkpoint import load_model, load_tokenizer, resolve_checkpoint
from tiaoyu_cli.data.chat import ChatDataset, check_messages
from tiaoyu_cli.data.jsonl import RecordCounts, load_records, read_jsonl
from tiaoyu_cli.data.preference import PromptExample, encode_prompt
from tiaoyu_cli.errors import DataError, TiaoyuError
from tiaoyu_cli.infer.generate import open_think_ids
from tiaoyu_cli.infer.tools import ToolOptions
from tiaoyu_cli.train.engine.config import TrainConfig
from tiaoyu_cli.train.engine.run import Plan, run_stage
from tiaoyu_cli.train.objectives.grpo import GRPOConfig, GRPOStage, ToolUse
from tiaoyu_cli.train.objectives.sft import SFTConfig, SFTStage
from tiaoyu_cli.train.rl.answers import format_ok, is_correct, split_record
from tiaoyu_cli.train.rl.models import load_policy, load_reference
from tiaoyu_cli.train.rl.prompts import prompt_room, split_holdout

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


# ---- traces ----------------------------------------------------------------------------------------

@dataclass
class TraceStats(RecordCounts):
    what = "traces"
    split_markup: int = 0  # content "<think>…</think>answer" turned into reasoning + answer
    from_teacher: int = 0  # `tiaoyu chat` output records (prompt + reasoning + answer)

    def notes(self) -> list[str]:
        out = [f"{self.from_teacher:,} from a teacher's chat output"] if self.from_teacher else []
        if self.split_markup:
            out.append(f"{self.split_markup:,} with <think> markup split into reasoning + answer")
        return out


def split_think(text: str) -> tuple[str | None, str]:
    """Literal markup → (reasoning, answer): "<think>r</think>a" or "r</think>a" (the prompt opened it).
    Text without markup → (None, text). An unclosed or doubled tag raises ValueError."""
    n_open, n_close = text.count(THINK_OPEN), text.count(THINK_CLOSE)
    if n_open == 0 and n_close == 0:
        return None, text
    if n_close == 0:
        raise ValueError("<think> is never closed by </think>")
    if n_open > 1 or n_close > 1:
        raise ValueError("more than one <think>…</think> block")
    head, answer = text.split(THINK_CLOSE, 1)
    if n_open:
        before, reasoning = head.split(THINK_OPEN, 1)
        if before.strip():
            raise ValueError("text before <think>")
    else:
        reasoning = head
    return reasoning.strip(), answer.strip()


def normalize_trace(rec: dict, name: str, line: int, stats: TraceStats) -> dict:
    """One trace as a chat record whose last assistant turn has non-empty "reasoning" and "content".
    Raises DataError (file:line, field) when it cannot be one."""

    if "messages" not in rec and "prompt" in rec and ("reasoning" in rec or "response" in rec):
        rec = _from_chat_output(rec, name, line)  # `tiaoyu chat` output: prompt + response/reasoning/answer
        stats.from_teacher += 1
    elif "messages" not in rec and "prompt" in rec and "answer" in rec:
        raise DataError("a question with only its final answer (no reasoning): think-format SFT needs the steps; "
                        "train on {prompt, answer} records with `tiaoyu reason --rl`", name, line)
    elif "messages" in rec and ("reasoning" in rec or "response" in rec):
        rec = _from_chat_output(rec, name, line)
        stats.from_teacher += 1
    msgs = [dict(m) for m in check_messages(rec, name, line)]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue  # user text is encoded as plain characters whatever it says
        where = f"messages[{i}]"
        if m.get("reasoning") is not None:  # the fields are already apart: no markup may remain in either
            for key in ("reasoning", "content"):
                if THINK_OPEN in m[key] or THINK_CLOSE in m[key]:
                    raise DataError("literal <think>/</think> markup next to a reasoning field (the template adds "
                                    "the tags itself)", name, line, f"{where}.{key}")
            continue
        try:
            reasoning, answer = split_think(m["content"])
        except ValueError as e:
            raise DataError(str(e), name, line, f"{where}.content") from None
        if reasoning is not None:
            m["reasoning"], m["content"] = reasoning, answer
            stats.split_markup += 1
    # the turn that thinks: the last assistant turn, or in a tool-use trace the first assistant turn after the
    # last user message (think, then call; the turns after the tool results carry on from there)
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
    start = users[-1] + 1 if users else 0
    answer_turns = [i for i in range(start, len(msgs)) if msgs[i]["role"] == "assistant"]
    tool_trace = any(msgs[i].get("tool_calls") for i in answer_turns)
    think_at = answer_turns[0] if tool_trace and answer_turns else last
    if not (msgs[think_at].get("reasoning") or "").strip():
        raise DataError("the assistant turn has no reasoning (a \"reasoning\" field, or content written as "
                        "<think>steps</think>answer): nothing to learn to think with", name, line,
                        f"messages[{think_at}]")
    if not (msgs[last]["content"] or "").strip() or msgs[last].get("tool_calls"):
        raise DataError("the assistant turn has reasoning but no final answer after it", name, line,
                        f"messages[{last}].content")
    return {"messages": msgs}


def _from_chat_output(rec: dict, name: str, line: int) -> dict:
    """A record written by `tiaoyu chat` (input fields + "response", and "reasoning"/"answer" when the
    model thought) → a chat record ending with the assistant's reasoning and answer."""
    if "messages" in rec:
        conv = rec["messages"]
        if not isinstance(conv, list):
            raise DataError("expected a list of messages", name, line, "messages")
        if conv and isinstance(conv[-1], dict) and conv[-1].get("role") == "assistant":
            conv = conv[:-1]
    else:
        p = rec["prompt"]
        if isinstance(p, str):
            conv = [{"role": "user", "content": p}]
        elif isinstance(p, list):
            conv = list(p)
        else:
            raise DataError("expected a string or a list of messages", name, line, "prompt")
    reasoning, answer = rec.get("reasoning"), rec.get("answer")
    if reasoning is None:
        resp = rec.get("response")
        if not isinstance(resp, str):
            raise DataError("expected a string", name, line, "response")
        try:
            reasoning, answer = split_think(resp)
        except ValueError as e:
            raise DataError(f"{e}", name, line, "response") from None
        if reasoning is None:
            raise DataError("the response has no reasoning (no <think>…</think>): nothing to learn to think with",
                            name, line, "response")
    if not isinstance(reasoning, str) or not isinstance(answer, str):
        raise DataError("reasoning and answer must be strings", name, line, "reasoning")
    return {"messages": list(conv) + [{"role": "assistant", "reasoning": reasoning.strip(), "content": answer.strip()}]}


def load_traces(path: str | Path, skip_bad: bool = False, direct: bool = False,
                only_correct: bool = False) -> tuple[list[dict], TraceStats]:
    """Validated think-format chat records of a JSONL file (see the module docstring). `direct` drops the
    reasoning (the direct-answer baseline). `only_correct` keeps a teacher's trace (a `tiaoyu chat` output
    record of a verifiable question) only when its answer matches the question's reference answer
    ("input_answer") — rejection sampling; the others are counted as "with a wrong answer"."""

    st = TraceStats()

    def read(rec: dict, name: str, line: int) -> dict | None:
        r = normalize_trace(rec, name, line, st)
        gold = rec.get("input_answer")
        if only_correct and gold is not None and not is_correct(r["messages"][-1]["content"], str(gold)):
            st.skip("with a wrong answer")
            return None
        if direct:
            r = {"messages": [{k: v for k, v in m.items() if k != "reasoning"} for m in r["messages"]]}
        return r

    out = load_records(path, read, skip_bad, st, why=lambda e: _short_reason(str(e)))
    if not out:
        raise TiaoyuError(f"{path}: no usable reasoning traces ({st.summary()})")
    return out, st


def _short_reason(msg: str) -> str:
    if "no reasoning" in msg or "only its final answer" in msg:
        return "without reasoning"
    if "never closed" in msg:
        return "with an unclosed <think>"
    if "markup" in msg or "<think>" in msg:
        return "with stray <think> markup"
    return "invalid"


_PROBE = "tiaoyu reasoning probe"


def reasoning_for_template(traces: list[dict], tok) -> tuple[list[dict], bool]:
    """The traces as the tokenizer's chat template can show their reasoning. tiaoyu's own template and a template
    that renders a message's reasoning (Qwen3's `reasoning_content`) take the field as it is; for one that drops it
    (Llama 3's) the reasoning moves into the content as `<think>\nsteps\n</think>\n\nanswer` text. A template
    that drops that too cannot teach thinking: an error. Returns (traces, moved into the content)."""
    if getattr(tok, "backend", None) != "hf":
        return traces, False
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": _PROBE}]
    if _PROBE in tok.render_chat(probe):
        return traces, False
    if _PROBE not in tok.render_chat(fold_reasoning(probe)):
        raise TiaoyuError(f"the chat template of {tok.path or 'this tokenizer'} drops an assistant turn's reasoning, "
                          f"as a field and as <think>…</think> text before the answer: reason cannot teach thinking "
                          f"with it")
    return [{**t, "messages": fold_reasoning(t["messages"])} for t in traces], True


def fold_reasoning(messages: list[dict]) -> list[dict]:
    """Assistant turns with a reasoning field → content `<think>\nreasoning\n</think>\n\ncontent`."""
    out = []
    for m in messages:
        reasoning = m.get("reasoning") if m.get("role") == "assistant" else None
        if reasoning is not None:
            m = {k: v for k, v in m.items() if k != "reasoning"}
            m["content"] = f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{m.get('content') or ''}"
        out.append(m)
    return out


def _answer_only(m: dict, as_text: bool) -> dict:
    m = {k: v for k, v in m.items() if k != "reasoning"}
    if as_text and m.get("role") == "assistant" and THINK_CLOSE in (m.get("content") or ""):
        m["content"] = m["content"].rsplit(THINK_CLOSE, 1)[1].strip()
    return m


# ---- questions (stage 2) ----------------------------------------------------------------------------

class QuestionStats(RecordCounts):
    what = "questions"


def load_questions(path: str | Path, skip_bad: bool = False) -> tuple[list[dict], QuestionStats]:
    """`{"prompt": str | messages, "answer": str}` records (a chat record's last assistant content also
    serves as the answer) → `{"prompt": messages, "answer": str, "line": int}`. A record without an answer
    is an error naming file:line, or with `skip_bad` a counted skip."""

    def read(rec: dict, name: str, line: int) -> dict:
        if "messages" not in rec and "answer" not in rec:
            raise DataError("missing: a verifiable question needs its final answer ({\"prompt\", \"answer\"})",
                            name, line, "answer")
        if "messages" not in rec and "prompt" not in rec:
            raise DataError("missing: a verifiable question needs a prompt", name, line, "prompt")
        ans = rec.get("answer")
        if "messages" not in rec and (ans is None or not str(ans).strip()):
            raise DataError("empty answer", name, line, "answer")
        msgs, gold = split_record(rec, name, line)
        if not gold.strip():
            raise DataError("empty answer", name, line, "answer")
        if not msgs or msgs[-1].get("role") != "user":
            raise DataError("the prompt must end with a user message", name, line, "prompt")
        return {"prompt": msgs, "answer": gold.strip(), "line": line}

    st = QuestionStats()
    out = load_records(path, read, skip_bad, st,
                       why=lambda e: "without an answer" if "answer" in str(e) else "invalid")
    if not out:
        raise TiaoyuError(f"{path}: no usable questions with answers ({st.summary()})")
    return out, st


def read_eval_records(path: str | Path, tok, max_len: int):
    """Held-out data for evaluation: (ChatDataset or None, records for answer accuracy). Chat/trace records
    give a val loss and questions; {"prompt", "answer"} records give questions only."""

    recs = read_jsonl(path)
    if not recs:
        raise TiaoyuError(f"--eval-data {path}: empty")
    if all("messages" in r for r in recs):
        recs, as_text = reasoning_for_template(recs, tok)
        ds = ChatDataset(recs if as_text else path, tok, max_len, name=str(path))
        # the question is everything before the last assistant turn; the reference is its content (without
        # the reasoning a template that drops the field got in its content)
        records = [{"messages": [_answer_only(m, as_text) for m in msgs]}
                   for msgs in ds.messages if msgs[-1]["role"] == "assistant"]
        return ds, records
    qs, _ = load_questions(path)
    return None, qs


# ---- stage 1: think-format SFT ----------------------------------------------------------------------

def think_metrics(report) -> dict[str, float]:
    """Answer accuracy plus the share of responses in the think format (<think>…</think>answer)."""

    n = max(1, len(report.samples))
    return {"answer_acc": report.accuracy, "answer_n": report.total,
            "format_rate": sum(format_ok(s["response"], require_think=True) for s in report.samples) / n}


def make_reason_sft_stage(rows, cfg, batch_size: int, seed: int, eval_data, eval_records, info: dict):
    """The SFT stage, named "reason", whose evaluation also reports the think-format rate."""

    class ReasonSFTStage(SFTStage):
        name = "reason"

        @torch.no_grad()
        def evaluate(self, model: nn.Module) -> dict[str, float]:
            res = super().evaluate(model)
            rep = getattr(self, "last_answers", None)
            if rep is not None and self.eval_records and self.cfg.eval_samples and not self.cfg.eval_tools:
                res.update(think_metrics(rep))  # (with --eval-tools the answers are final turns: no think block)
            return res

    return ReasonSFTStage(rows, cfg, batch_size, seed=seed, eval_data=eval_data, eval_records=eval_records,
                          name="reason", info=info)


def prepare_think_sft(o: Config, train: TrainConfig) -> Plan:
    """Validate the traces and build the SFT stage on them (loss on reasoning + answer)."""
    if o.eval_samples < 0 or o.max_len < 0 or o.eval_max_new_tokens < 1:
        raise TiaoyuError("--eval-samples and --max-len must not be negative, --eval-max-new-tokens positive")
    base = resolve_checkpoint(o.ckpt)
    tok = load_tokenizer(base)
    traces, st = load_traces(o.data, skip_bad=o.skip_bad, direct=o.direct, only_correct=o.only_correct)
    traces, as_text = reasoning_for_template(traces, tok)
    torch.manual_seed(train.seed)
    model, base = load_model(base)
    max_len = o.max_len or model.config.max_seq_len
    if max_len > model.config.max_seq_len:
        raise TiaoyuError(f"--max-len {max_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    ds = ChatDataset(traces, tok, max_len, name=str(o.data))
    eval_ds, eval_records = (None, [])
    if o.eval_data is not None:
        eval_ds, eval_records = read_eval_records(o.eval_data, tok, max_len)
    cfg = SFTConfig(max_len=max_len, eval_samples=o.eval_samples if eval_records else 0,
                    eval_max_new_tokens=o.eval_max_new_tokens, eval_tools=o.eval_tools)
    stage = make_reason_sft_stage(ds.examples, cfg, train.batch_size, train.seed, eval_ds, eval_records,
                                  info={"step": "think-sft" if not o.direct else "direct-sft", "data": str(o.data),
                                        "eval_data": str(o.eval_data) if o.eval_data else None,
                                        "traces": vars(st)})
    line = (f"reason ({'direct-answer baseline' if o.direct else 'think-format SFT'}): {base} → {train.out}; "
            f"{st.summary()}; {ds.stats.tokens:,} tokens ({ds.stats.loss_tokens:,} learned)"
            + ("; the template drops reasoning fields: <think>…</think> written into the answers" if as_text else ""))
    return Plan(model, stage, tok, parent=str(base), lines=[line], eval_before=bool(eval_records or eval_ds))


# ---- stage 2: GRPO with verifiable rewards ----------------------------------------------------------

def reason_grpo_config(**kw) -> GRPOConfig:
    """`reason --rl` is GRPO with the think format on: its config, with reason's defaults (format weight 0.2)."""
    return GRPOConfig(**{"format_reward": 0.2, **kw, "think_format": True})


@dataclass(kw_only=True)
class Config:
    """Everything `tiaoyu reason` (stage 1, or stage 2 with `rl`) takes besides the loop's TrainConfig. Stage 2's
    GRPO options are GRPO's own config (`reason_grpo_config`: think format on, format weight 0.2; its eval_size
    is `eval_samples`) and its tools the tool options."""

    ckpt: Path = field(metadata={"help": "checkpoint to start from (sft for stage 1, the stage-1 result for --rl)"})
    data: Path = field(metadata={"help": "traces JSONL (chat records with \"reasoning\"), or with --rl questions "
                                         "JSONL ({\"prompt\", \"answer\"})"})
    rl: bool = field(default=False, metadata={"negatable": False, "help": "stage 2: GRPO with verifiable rewards instead of SFT"})
    eval_data: Optional[Path] = field(default=None, metadata={
        "help": "held-out traces or {prompt, answer} records: answer accuracy and think-format rate (and val loss "
                "for traces)"})
    eval_samples: int = field(default=200, metadata={
        "help": "held-out questions answered at each evaluation (0 = none)"})
    eval_max_new_tokens: int = field(default=96, metadata={"help": "most tokens per generated eval answer"})
    max_len: int = field(default=0, metadata={
        "help": "stage 1: most tokens per trace (0 = the model's max_seq_len)"})
    direct: bool = field(default=False, metadata={"negatable": False,
        "help": "stage 1 baseline: drop the reasoning, learn answers only"})
    only_correct: bool = field(default=False, metadata={"negatable": False,
        "help": "stage 1, traces from `tiaoyu chat`: keep a teacher's trace only if its answer matches the reference "
                "(input_answer)"})
    skip_bad: bool = field(default=False, metadata={"negatable": False, "help": "skip (and count) bad records instead of stopping"})
    eval_tools: str = field(default="", metadata={
        "help": "stage 1: the held-out answers may call these tools (e.g. calculator), for traces that think and "
                "then call"})
    grpo: GRPOConfig = field(default_factory=reason_grpo_config)
    tool: ToolOptions = field(default_factory=ToolOptions)


def question_examples(records: list[dict], tok, room: int, name: str, skip_bad: bool) -> tuple[list, int]:
    """PromptExamples (chat prompt ids + answer) for GRPO; a prompt too long for the context is an error or,
    with --skip-bad, a counted skip. Returns (examples, skipped)."""

    out, skipped = [], 0
    for r in records:
        ids = encode_prompt(tok, r["prompt"])
        if len(ids) > room:
            if not skip_bad:
                raise DataError(f"prompt is {len(ids)} tokens; at most {room} fit with --max-new-tokens", name,
                                r["line"], "prompt")
            skipped += 1
            continue
        out.append(PromptExample(ids, r["answer"], {"prompt": r["prompt"], "answer": r["answer"]}, r["line"]))
    return out, skipped


def prepare_reason_rl(o: Config, train: TrainConfig) -> Plan:
    """Load the policy (and reference when β > 0) and the questions; GRPO stage with the think-format reward."""
    cfg = dataclasses.replace(o.grpo, eval_size=o.eval_samples)
    toolbox = o.tool.toolbox()  # first: a misspelt tool is named before any data is read
    if not cfg.think_format:
        raise TiaoyuError("reason --rl trains the think format: its GRPO config needs think_format=True")
    if cfg.format_reward < 0:
        raise TiaoyuError("--format-weight must not be negative")
    cfg.validate()
    model, folder, tok = load_policy(o.ckpt, "reason --rl")
    room = prompt_room(model.config.max_seq_len, cfg.max_new_tokens, len(open_think_ids(tok)) if cfg.open_think else 0)
    qs, st = load_questions(o.data, skip_bad=o.skip_bad)
    train_ex, too_long = question_examples(qs, tok, room, str(o.data), o.skip_bad)
    if o.eval_data is not None:
        held_recs = load_questions(o.eval_data, skip_bad=o.skip_bad)[0]
        held = question_examples(held_recs, tok, room, str(o.eval_data), True)[0]
    else:
        train_ex, held = split_holdout(train_ex, 0.05, train.seed)
    if not train_ex:
        raise TiaoyuError(f"{o.data}: no question fits the context")
    ref = load_reference(folder, tok) if cfg.beta > 0 else None
    line = (f"reason --rl (GRPO, think format): {folder} → {train.out}; {st.summary()}"
            + (f", {too_long} too long skipped" if too_long else "") + f"; {len(held)} held out; "
            f"{cfg.rollout_batch_size} questions × {cfg.group_size} answers per rollout; reward = correct + "
            f"{cfg.format_reward} × format; β {cfg.beta}")
    tools = (ToolUse(toolbox, o.tool.max_tool_calls, o.tool.tool_call_penalty, model.config.max_seq_len)
             if toolbox is not None else None)
    stage = GRPOStage(train_ex, held, cfg, batch_size=train.batch_size, tokenizer=tok, ref_model=ref, seed=train.seed,
                      tools=tools, name="reason-rl")
    if tools is not None:
        line += f"; tools {', '.join(tools.toolbox.tools)} (at most {tools.max_tool_calls} calls per answer)"
    return Plan(model, stage, tok, parent=str(folder), lines=[line], eval_before=bool(held))


def run(cfg: Config, train: TrainConfig, log=print) -> dict:
    """Stage 1: think-format SFT; stage 2 (`rl`): GRPO (the rlhf engine's `GRPOStage`) on verifiable questions,
    rewarding a correct final answer (1) and the think format (`format_reward`: <think>…</think> first, then a
    non-empty answer). Both through the one run path."""
    if cfg.eval_tools and cfg.rl:
        raise TiaoyuError("--eval-tools is for stage 1; with --rl, --tools makes the rollouts and the "
                          "held-out evaluation call tools")
    if cfg.tool.wanted and not cfg.rl:
        raise TiaoyuError("--tools is for --rl (agentic rollouts); stage 1 learns tool calls from the traces "
                          "themselves (chat records with tool_calls)")
    if not cfg.rl:
        return run_stage("reason", train, lambda: prepare_think_sft(cfg, train), default_epochs=1.0, log=log)
    if cfg.direct:
        raise TiaoyuError("--direct is a stage-1 (SFT) baseline; it does not combine with --rl")
    if not (train.max_steps or train.max_tokens or train.max_time or train.epochs):
        raise TiaoyuError("no training budget: give --max-steps (GRPO steps) or --max-time")
    return run_stage("reason-rl", train, lambda: prepare_reason_rl(cfg, train), log=log)
