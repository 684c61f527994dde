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

`tools` is the seam for `--tools calculator` (issue 13's tool registry): None runs without tools.
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


def build_prompt(tok, doc: Doc, shots: list[Doc], chat: bool) -> list[int]:
    if not chat:
        text = "".join(d.text + " " + d.target + "\n\n" for d in shots) + doc.text
        return tok.document_affixes()[0] + tok.encode(text)  # the BOS the tokenizer puts first, if any
    messages = []
    for d in shots:
        messages += [{"role": "user", "content": d.text.removeprefix("Question: ").removesuffix("\nAnswer:")},
                     {"role": "assistant", "content": d.target}]
    messages.append({"role": "user", "content": doc.text.removeprefix("Question: ").removesuffix("\nAnswer:")})
    ids, _ = tok.encode_chat(messages, add_generation_prompt=True)
    return ids


def run_gsm8k(model, tok, docs: list[Doc], shots_for: Callable[[Doc], list[Doc]], chat: bool,
              max_new_tokens: int = 256, batch_size: int = 16, tools: list[str] | None = None,
              progress: Callable[[int], None] | None = None) -> list[dict]:
    """Per item: the generated answer, the extracted numbers and whether each filter matched."""
    if tools:
        raise TiaoyuError(f"--tools {','.join(tools)}: tool calls during GSM8K need the tool registry "
                          f"(issue 13), not in this build")
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
            gold = normalise(docs[i].extra["number"])
            strict, flex = extract_strict(text), extract_flexible(text)
            out[i] = {"prompt": tok.decode(prompts[i]), "answer": text, "gold": gold, "strict": strict, "flexible": flex,
                      "acc": float(strict == gold), "acc_flexible": float(flex == gold)}
        if progress:
            progress(len(idx))
    return out  # type: ignore[return-value]
