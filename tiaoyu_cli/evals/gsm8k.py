"""GSM8K: greedy generation and answer extraction, as lm-evaluation-harness's `gsm8k` task.

Prompt (base models): the K few-shot examples "Question: …\\nAnswer: <solution … #### N>\\n\\n",
then "Question: <q>\\nAnswer:". Generation is greedy and stops at "Question:" or a stop token.
Chat models (a checkpoint trained by sft, dpo, grpo, reason … — its trainer.json names the
stage) get the question through the chat template instead, the few-shot examples as earlier
user/assistant turns.

Two scores, lm-eval's two filters:
    acc (strict-match)       the first "#### N" in the answer
    acc_flexible             the last number in the answer ("(-?[$0-9.,]{2,})|(-?[0-9]+)")
Both compare after removing ",", "$" and a trailing ".", like lm-eval's exact_match settings.

With tools (`eval bench --task gsm8k --tools calculator`, chat checkpoints), each question is answered by the
tool loop of `tiaoyu chat --tools` (infer/tool_loop.py): the model may call the tools, reads their results and
answers; the final answer is scored the same way, and each item records the calls it made.
"""

from __future__ import annotations

import re
from typing import Callable

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.evals.bench_formats import GSM8K_ANSWER, Doc
from tiaoyu_cli.infer.generate import generate_detailed
from tiaoyu_cli.infer.sampling import SamplingParams

FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
UNTIL = "Question:"


def normalise(s: str) -> str:
    s = s.replace(",", "").replace("$", "").strip()
    return s[:-1] if s.endswith(".") else s


def extract_strict(text: str) -> str | None:
    m = GSM8K_ANSWER.search(text)
    return normalise(m.group(1)) if m else None


def extract_flexible(text: str) -> str | None:
    found = FLEXIBLE.findall(text)
    if not found:
        return None
    last = found[-1]
    return normalise(last[0] or last[1])


def chat_messages(doc: Doc, shots: list[Doc]) -> list[dict]:
    """The few-shot examples as user/assistant turns, then the question."""
    messages = []
    for d in shots:
        messages += [{"role": "user", "content": d.text.removeprefix("Question: ").removesuffix("\nAnswer:")},
                     {"role": "assistant", "content": d.target}]
    messages.append({"role": "user", "content": doc.text.removeprefix("Question: ").removesuffix("\nAnswer:")})
    return messages


def build_prompt(tok, doc: Doc, shots: list[Doc], chat: bool) -> list[int]:
    if not chat:
        text = "".join(d.text + " " + d.target + "\n\n" for d in shots) + doc.text
        return tok.document_affixes()[0] + tok.encode(text)  # the BOS the tokenizer puts first, if any
    ids, _ = tok.encode_chat(chat_messages(doc, shots), add_generation_prompt=True)
    return ids


def score(text: str, doc: Doc) -> dict:
    gold = normalise(doc.extra["number"])
    strict, flex = extract_strict(text), extract_flexible(text)
    return {"answer": text, "gold": gold, "strict": strict, "flexible": flex,
            "acc": float(strict == gold), "acc_flexible": float(flex == gold)}


def run_gsm8k_tools(model, tok, docs: list[Doc], shots_for: Callable[[Doc], list[Doc]], toolbox,
                    max_new_tokens: int = 256, batch_size: int = 16, schemas_in_prompt: bool = True,
                    progress: Callable[[int], None] | None = None) -> list[dict]:
    """Per item, answered greedily by the tool loop: the scores of its final answer and the calls it made."""
    from tiaoyu_cli.infer.tool_loop import ToolRunner

    runner = ToolRunner(model, tok, toolbox, schemas_in_prompt=schemas_in_prompt)
    greedy = SamplingParams(temperature=0.0)
    out = []
    for s in range(0, len(docs), batch_size):
        batch = docs[s:s + batch_size]
        convs = [chat_messages(d, shots_for(d)) for d in batch]
        for d, conv, ans in zip(batch, convs, runner.answer_batch(convs, max_new_tokens, greedy)):
            r = ans.response
            text = (r.answer if r.answer is not None else r.response).split(UNTIL)[0]
            out.append({"prompt": conv[-1]["content"], **score(text, d), "tool_calls": [c.to_dict() for c in ans.calls]})
        if progress:
            progress(len(batch))
    return out


def run_gsm8k(model, tok, docs: list[Doc], shots_for: Callable[[Doc], list[Doc]], chat: bool,
              max_new_tokens: int = 256, batch_size: int = 16, tools: list[str] | None = None,
              progress: Callable[[int], None] | None = None, schemas_in_prompt: bool = True) -> list[dict]:
    """Per item: the generated answer, the extracted numbers and whether each filter matched."""
    if tools:
        if not chat:
            raise TiaoyuError("--tools needs the chat template (--chat yes, or a checkpoint fine-tuned on chat)")
        from tiaoyu_cli.infer.tools import Toolbox

        return run_gsm8k_tools(model, tok, docs, shots_for, Toolbox.from_names(tools), max_new_tokens, batch_size,
                               schemas_in_prompt, progress)
    prompts = [build_prompt(tok, d, shots_for(d), chat) for d in docs]
    order = sorted(range(len(docs)), key=lambda i: -len(prompts[i]))
    out: list[dict | None] = [None] * len(docs)
    greedy = SamplingParams(temperature=0.0)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        res = generate_detailed(model, [prompts[i] for i in idx], max_new_tokens=max_new_tokens, params=greedy,
                                stop_ids=tok.stop_ids)  # an open model's end-of-turn ids
        for i, toks in zip(idx, res.tokens):
            text = tok.decode(toks).split(UNTIL)[0]
            out[i] = {"prompt": tok.decode(prompts[i]), **score(text, docs[i])}
        if progress:
            progress(len(idx))
    return out  # type: ignore[return-value]
