"""Generation with tools: the model writes a call, the tool runs, its result joins the conversation,
the model continues — for `tiaoyu chat --tools`, and for anything else (RL rollouts) that wants it.

One round, for every conversation still going (batched, KV cache, left padding — generate.py):

    prompt  = template(messages, tools=schemas) + "<|im_start|>assistant\\n"
    new     = generate(prompt, stop at <|im_end|>, </s> or </tool_call>)
    ends with </tool_call>  ->  parse the JSON after <tool_call>, run it (tools.py), append
                                {"role": "assistant", "content": text before the call, "tool_calls": [call]}
                                {"role": "tool", "tool_call_id": id, "content": result}
                                and go round again
    otherwise               ->  the answer; the conversation is done

At most `max_tool_calls` calls per answer: a call past the limit is not run and the answer ends
there (finish reason "tool_limit"). A malformed call (too long or too deeply nested included), an
unknown tool, or a tool that raises or runs past the toolbox's time limit (`Toolbox(timeout=…)`,
`--tool-timeout`) gives an "error: …" result the model reads; nothing here raises for what the model wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from tiaoyu_cli.infer.generate import DecodedResponse, Piece, decode_response, generate_detailed, stream
from tiaoyu_cli.infer.tools import ToolCall, Toolbox


@dataclass
class ToolAnswer:
    """The outcome of one conversation: the final answer, the calls made and the messages added."""

    response: DecodedResponse
    calls: list[ToolCall] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)  # assistant/tool messages appended, the final answer last
    finish: str = "stop"  # "stop", "length" or "tool_limit"


def tool_stop_ids(tokenizer) -> frozenset[int]:
    return frozenset(tokenizer.tool_stop_ids)


def split_call(tokenizer, tokens: list[int]) -> tuple[str, str] | None:
    """(text before the call, the call's JSON text) when `tokens` end with </tool_call>, else None."""
    if not tokens or tokens[-1] != tokenizer.end_tool_call_id:
        return None
    body = tokens[:-1]
    if tokenizer.tool_call_id in body:
        k = len(body) - 1 - body[::-1].index(tokenizer.tool_call_id)
        before, inside = body[:k], body[k + 1:]
    else:  # </tool_call> without its opening token: all of it is the call
        before, inside = [], body
    return tokenizer.decode(before).strip(), tokenizer.decode(inside).strip()


def call_messages(content: str, call: ToolCall) -> list[dict]:
    """The assistant message that made `call` and the tool message with its result."""
    return [{"role": "assistant", "content": content,
             "tool_calls": [{"id": call.id, "type": "function",
                             "function": {"name": call.name, "arguments": call.arguments}}]},
            {"role": "tool", "tool_call_id": call.id, "content": call.result}]


class ToolRunner:
    """Runs conversations with a toolbox. `schemas_in_prompt=False` leaves the <tools> block out of the
    system turn (for models trained without it, e.g. a tiny model with a short context)."""

    def __init__(self, model, tokenizer, toolbox: Toolbox, max_tool_calls: int = 5, schemas_in_prompt: bool = True):
        tokenizer.require_tool_tokens()
        if max_tool_calls < 0:
            from tiaoyu_cli.errors import TiaoyuError

            raise TiaoyuError(f"--max-tool-calls must be >= 0, got {max_tool_calls}")
        self.model, self.tok, self.toolbox = model, tokenizer, toolbox
        self.max_tool_calls = max_tool_calls
        self.schemas = (toolbox.schemas() or None) if schemas_in_prompt else None
        self.stops = tool_stop_ids(tokenizer)
        self._n = 0

    def prompt(self, messages: list[dict]) -> list[int]:
        return self.tok.encode_chat(messages, add_generation_prompt=True, tools=self.schemas)[0]

    def _next_id(self) -> str:
        self._n += 1
        return f"call_{self._n}"

    def step(self, messages: list[dict], answer: ToolAnswer, tokens: list[int], finish: str) -> bool:
        """Digest one round's new tokens; True when the conversation goes on (a call was run)."""
        split = split_call(self.tok, tokens) if finish == "stop" else None
        if split is None:
            answer.response = decode_response(self.tok, tokens, self.stops)
            answer.finish = finish
            answer.messages.append({"role": "assistant", "content": answer.response.answer
                                    if answer.response.answer is not None else answer.response.response})
            return False
        before, text = split
        if len(answer.calls) >= self.max_tool_calls:
            answer.response = DecodedResponse(before, None, None)
            answer.finish = "tool_limit"
            answer.messages.append({"role": "assistant", "content": before})
            return False
        call = self.toolbox.run_text(text, self._next_id())
        answer.calls.append(call)
        new = call_messages(before, call)
        messages.extend(new)
        answer.messages.extend(new)
        return True

    def answer_batch(self, conversations: list[list[dict]], max_new_tokens: int, params, seed: int | None = None
                     ) -> list[ToolAnswer]:
        """Answer every conversation, generating all that are still going together each round."""
        convs = [list(c) for c in conversations]
        answers = [ToolAnswer(DecodedResponse("", None, None)) for _ in convs]
        active = list(range(len(convs)))
        rnd = 0
        while active:
            res = generate_detailed(self.model, [self.prompt(convs[i]) for i in active], max_new_tokens, params,
                                    self.stops, seed=None if seed is None else seed + rnd)
            rnd += 1
            active = [i for i, toks, fin in zip(active, res.tokens, res.finish_reasons)
                      if self.step(convs[i], answers[i], toks, fin)]
        return answers

    def stream(self, messages: list[dict], max_new_tokens: int, params, seed: int | None = None
               ) -> Iterator[Piece | ToolCall]:
        """One conversation, streamed: answer text as `Piece`s (the call's JSON is not shown as text), each
        call as a `ToolCall` once it ran. `messages` is extended in place; `self.last` is the ToolAnswer."""
        answer = ToolAnswer(DecodedResponse("", None, None))
        self.last = answer
        rnd = 0
        while True:
            new: list[int] = []
            for piece in stream(self.model, self.tok, self.prompt(messages), max_new_tokens, params, self.stops,
                                seed=None if seed is None else seed + rnd, tokens_out=new):
                if self.tok.tool_call_id not in new:
                    yield piece
            rnd += 1
            done_by_stop = bool(new) and new[-1] in self.stops
            n_calls = len(answer.calls)
            if not self.step(messages, answer, new, "stop" if done_by_stop else "length"):
                if answer.messages:
                    messages.append(answer.messages[-1])
                return
            if len(answer.calls) > n_calls:
                yield answer.calls[-1]


def answer_records_with_tools(runner: ToolRunner, records: list[tuple[int, dict]], options, system: str | None = None,
                              batch_size: int = 16, name: str = "<stdin>", on_batch=None) -> Iterator[dict]:
    """`session.answer_records` with tools: each record + "response" and "tool_calls" ([{name, arguments,
    result}]), in input order; `batch_size` conversations generated together."""
    from tiaoyu_cli.infer.session import record_messages, response_fields

    convs = []
    for line, rec in records:  # check everything before generating anything
        conv = record_messages(rec, name, line, runner.tok)
        msgs = [{"role": "user", "content": conv}] if isinstance(conv, str) else list(conv)
        if system and not (msgs and msgs[0]["role"] == "system"):
            msgs = [{"role": "system", "content": system}] + msgs
        convs.append(msgs)
    for b in range(0, len(convs), batch_size):
        seed = None if options.seed is None else options.seed + b // batch_size
        answers = runner.answer_batch(convs[b:b + batch_size], options.max_new_tokens, options.sampling, seed)
        for (line, rec), ans in zip(records[b:b + batch_size], answers):
            out = response_fields(rec, ans.response)
            if "tool_calls" in out and "input_tool_calls" not in out:
                out["input_tool_calls"] = out["tool_calls"]
            out["tool_calls"] = [c.to_dict() for c in ans.calls]
            if ans.finish == "tool_limit":
                out["finish_reason"] = "tool_limit"
            yield out
        if on_batch is not None:
            on_batch(len(answers))


# ---- agentic rollouts (for RL): the model's tokens and the inserted tool turns, with a mask --------------

@dataclass
class AgenticRollout:
    """Per prompt: `response` = every token after the prompt, the model's own and the inserted tool turns;
    `mask[t]` = 1 where the model chose the token (policy loss and KL), 0 on inserted tokens (tool results,
    turn markers). prompt + response are exactly the template's ids of the conversation, with the model's
    own tokens for its calls."""

    responses: list[list[int]]
    masks: list[list[int]]
    calls: list[list[ToolCall]]
    finish: list[str]


def tool_turn_ids(tokenizer, result: str) -> list[int]:
    """The tokens between a call's </tool_call> and the model's next turn, as the tokenizer's template lays
    them out (tiaoyu's ChatML, or an open model's own template)."""
    return tokenizer.tool_turn_ids(result)


def agentic_rollout(model, tokenizer, toolbox: Toolbox, prompts: list[list[int]], max_new_tokens: int, params,
                    seed: int | None = None, max_tool_calls: int = 5, generate=generate_detailed,
                    context: int | None = None) -> AgenticRollout:
    """Batched multi-turn sampling: all prompts still going are generated together each round; a round
    that ends in </tool_call> gets the call run and its tool turn appended (mask 0), then resumes.
    `max_new_tokens` bounds each round.

    Every conversation stays inside the model's context (`context`, default `model.config.max_seq_len`):
    a round gets at most the room that is left, and a conversation whose next tool turn would not fit
    ends there (finish "length"). Nothing is ever cut from the left — the training forward must see
    exactly what the sampler saw, or the log-probs the RL loss uses are not the ones that chose the tokens."""
    tokenizer.require_tool_tokens()
    if context is None:
        context = getattr(getattr(model, "config", None), "max_seq_len", None)
    stops = tool_stop_ids(tokenizer)
    n = len(prompts)
    seqs = [list(p) for p in prompts]
    out = AgenticRollout([[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)], ["length"] * n)
    active = list(range(n))
    rnd = 0
    while active:
        by_room: dict[int, list[int]] = {}  # rows with the same room generate together
        for i in active:
            room = max_new_tokens if context is None else min(max_new_tokens, context - len(seqs[i]))
            if room >= 1:
                by_room.setdefault(room, []).append(i)
        still = []
        for room, rows in sorted(by_room.items(), reverse=True):
            s = None if seed is None else seed + rnd + (0 if room == max_new_tokens else 1_000_003 * room)
            res = generate(model, [seqs[i] for i in rows], room, params, stops, seed=s)
            for i, toks, fin in zip(rows, res.tokens, res.finish_reasons):
                toks = list(toks)
                out.responses[i] += toks
                out.masks[i] += [1] * len(toks)
                seqs[i] += toks
                split = split_call(tokenizer, toks) if fin == "stop" else None
                if split is None or len(out.calls[i]) >= max_tool_calls:
                    out.finish[i] = "tool_limit" if split is not None else fin
                    continue
                call = toolbox.run_text(split[1], f"call_{len(out.calls[i]) + 1}")
                turn = tool_turn_ids(tokenizer, call.result)
                if context is not None and len(seqs[i]) + len(turn) >= context:
                    out.finish[i] = "length"  # no room left to read the result and answer
                    continue
                out.calls[i].append(call)
                out.responses[i] += turn
                out.masks[i] += [0] * len(turn)
                seqs[i] += turn
                still.append(i)
        rnd += 1
        active = sorted(still)
    return out
