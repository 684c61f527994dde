"""Agentic RL pieces: rollouts that call tools, laid out for the PPO/GRPO update, and their reward.

    ro = generate_agentic_rollout(model, tok, toolbox, prompts, max_new_tokens=64, temperature=1.0, seed=0)
    ro.mask      1 on the tokens the policy chose, 0 on inserted tool turns and padding

Sampling is `infer.tool_loop.agentic_rollout` (batched across prompts with the KV cache; each round
pauses at </tool_call>, runs the call, appends the tool turn). The inserted tokens stay in the
sequence — the policy conditions on them — but their mask is 0, so they count in neither the policy
loss nor the KL (every RL loss here is a `masked_mean` over `ro.mask`).

`ToolVerifiableReward` (rl/rollout.py) scores the final answer only: the text of the last assistant turn (a number
inside a tool result is not an answer), minus `call_penalty` for each call that came back as an
error (malformed, too long or too deeply nested JSON, unknown tool, bad arguments, a tool that raised
or ran past the toolbox's time limit, `--tool-timeout`).

A GRPO stage built with `tools=ToolUse(toolbox, …)` (objectives/grpo.py) samples these rollouts.
"""

from __future__ import annotations

import torch

from tiaoyu_cli.infer.sampling import SamplingParams
from tiaoyu_cli.infer.tool_loop import agentic_rollout
from tiaoyu_cli.infer.tools import Toolbox
from tiaoyu_cli.train.rl.layout import Rollout, layout


def generate_agentic_rollout(model, tokenizer, toolbox: Toolbox, prompts: list[list[int]], max_new_tokens: int,
                             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                             max_tool_calls: int = 5, generate=None) -> Rollout:
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    kw = {"generate": generate} if generate is not None else {}
    ar = agentic_rollout(model, tokenizer, toolbox, prompts, max_new_tokens, params, seed, max_tool_calls, **kw)
    device = next(model.parameters()).device if model is not None else None
    pad = getattr(getattr(model, "config", None), "pad_token_id", 0)
    ro = layout(prompts, ar.responses, pad, device, [f == "stop" for f in ar.finish])
    for i, m in enumerate(ar.masks):
        if m:
            ro.mask[i, :len(m)] = torch.tensor(m, dtype=ro.mask.dtype, device=ro.mask.device)
    ro.tool_calls = ar.calls  # type: ignore[attr-defined]
    return ro


def last_turn(tokenizer, response: list[int]) -> list[int]:
    """The tokens of the last assistant turn of a response: after the last token that opens a turn
    (`<|im_start|>` in ChatML) and the rest of the generation prompt (`assistant\\n`) when it follows."""
    head = list(tokenizer.assistant_start_ids)
    if not head or head[0] not in response:
        return list(response)
    k = len(response) - 1 - response[::-1].index(head[0])
    rest = list(response[k + 1:])
    return rest[len(head) - 1:] if rest[:len(head) - 1] == head[1:] else rest
