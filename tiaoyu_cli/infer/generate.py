"""Text generation: batched, with a KV cache, left padding, stop tokens, log-probs and streaming.

    result = generate_detailed(model, [ids_a, ids_b], max_new_tokens=64, params=SamplingParams(0.7, top_p=0.9))
    result.tokens[0], result.logprobs[0], result.finish_reasons[0]

How one batch is generated:

1. Prompts of different lengths are LEFT-padded into one [B, L] tensor with an attention mask
   (1 = real token). Padding does not advance positions, so a padded row computes exactly what
   it would alone. Left padding puts every row's last token in the last column, so the next
   token of every row comes from the same position.
2. Prefill: one forward pass over [B, L] fills the KV cache and gives the logits of the last
   column (`step.prefill`; the LM head runs on one position, not L).
3. Decode: feed the chosen tokens [B]; each step attends to the cache instead of recomputing
   the prefix (`step(tokens)`). A row that emits a stop token (EOS, <|im_end|>) or reaches
   max_new_tokens is done; done rows are dropped from the batch and the cache (`step.select`), so
   the rest run faster.

Context limits: a prompt longer than the context keeps its most recent tokens (left truncation),
leaving room to answer: at most `max_seq_len - min(max_new_tokens, max_seq_len // 2)` prompt
tokens are kept. New tokens are then clamped so the longest prompt plus its answer fits.

The step. This module never runs the model itself: `make_step` (infer/steps.py) gives one step object
per batch and the loop calls only its `prefill`, `__call__` and `select`. The reference is
`Transformer.forward` — `ForwardStep` (with the cache; `fast_decode=False`) and `RecomputeStep` (no
cache: `use_cache=False` recomputes the whole sequence every step, slow, here to prove that the cache
changes nothing; tests compare both token for token). By default the factory picks an optimisation of
the same computation from infer/fast/ where one runs the model — `NumpyStep` for small fp32 models on
CPU, `OneTokenStep` for the other stock Transformers (LoRA, MoE, autocast, GPUs) — each tested against
the reference; any other model decodes with `ForwardStep`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, NamedTuple

import torch

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.infer.sampling import SamplingParams, choose, make_generator, process_logits
from tiaoyu_cli.infer.steps import make_step

EOS_ID, IM_END_ID, THINK_ID, END_THINK_ID = 3, 5, 6, 7
DEFAULT_STOP_IDS = frozenset({EOS_ID, IM_END_ID})
NUM_SPECIAL = 8


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per prompt; ends with the stop token when finish_reason == "stop"
    finish_reasons: list[str]  # "stop" (a stop token) or "length" (max_new_tokens or the context is full)
    prompts: list[list[int]]  # the prompts as fed to the model (after left truncation)
    logprobs: list[list[float]] | None = None  # log-prob of each new token (see `generate_detailed`)
    truncated: list[bool] = field(default_factory=list)  # prompt lost tokens on the left


class Step(NamedTuple):
    rows: list[int]  # original batch indices still generating
    tokens: list[int]  # the token each of those rows chose
    logprobs: list[float] | None


def fit_to_context(prompts: list[list[int]], max_new_tokens: int, context: int) -> tuple[list[list[int]], int, list[bool]]:
    """Left-truncate prompts and clamp max_new_tokens so that prompt + answer fits `context` tokens."""
    if max_new_tokens < 1:
        raise TiaoyuError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if context < 2:
        raise TiaoyuError(f"context of {context} tokens is too short to generate")
    keep = context - min(max_new_tokens, context // 2)
    out, cut = [], []
    for p in prompts:
        if len(p) == 0:
            raise TiaoyuError("cannot generate from an empty prompt (give at least one token, e.g. BOS)")
        cut.append(len(p) > keep)
        out.append(list(p[-keep:]) if len(p) > keep else list(p))
    longest = max(len(p) for p in out)
    return out, min(max_new_tokens, context - longest), cut


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] ids and attention mask (1 = real token), padding on the left."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, L - len(p):] = 1
    return ids.to(device), mask.to(device)


def amp_context(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast on CUDA (when supported) unless dtype says otherwise; fp32 elsewhere."""
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def decode_steps(model, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams,
                 stop_ids: Iterable[int] = DEFAULT_STOP_IDS, generator: torch.Generator | None = None,
                 use_cache: bool = True, logprobs: str | None = None, dtype: torch.dtype | None = None,
                 fast_decode: bool = True) -> Iterator[Step]:
    """The generation loop as an iterator: one `Step` per decoding step.

    `prompts` must already fit the context (see `fit_to_context`). `logprobs`: None, "model"
    (log p of the token under the unmodified model, temperature 1 — what a training forward pass
    computes) or "sampling" (under the distribution actually sampled: after penalty, temperature,
    top-k, top-p). The step that runs the model comes from `make_step` (infer/steps.py); `fast_decode=False`
    asks for the reference, `Transformer.forward` with the cache, instead of a fast step.
    """
    device = next(model.parameters()).device
    pad_id = getattr(model.config, "pad_token_id", 0)
    ids, mask = left_pad(prompts, pad_id, device)
    B, L = ids.shape
    V = model.config.vocab_size
    rows = list(range(B))  # original index of each active row
    stop_set = frozenset(int(s) for s in stop_ids)
    seen = None
    if params.repetition_penalty != 1.0:  # [B, V] True where the token occurs in the row (prompt or answer)
        seen = torch.zeros(B, V, dtype=torch.bool, device=device)
        seen.scatter_(1, ids.clamp(max=V - 1), mask.bool())
    was_training = model.training
    if was_training:  # (train()/eval() walk every module: skipped when there is nothing to change)
        model.eval()
    try:
        with torch.inference_mode(), amp_context(device, dtype):
            step_fn = make_step(model, B, L + max_new_tokens, device, use_cache, fast_decode)
            logits = step_fn.prefill(ids, mask)  # [B, V]
            for step in range(max_new_tokens):
                if logits.dtype != torch.float32:
                    logits = logits.float()
                processed = process_logits(logits, params, seen)
                nxt = choose(processed, params, generator)  # [B]
                lp = None
                if logprobs is not None:
                    src = logits if logprobs == "model" else processed
                    lp = src.log_softmax(-1).gather(-1, nxt[:, None]).squeeze(-1).tolist()
                toks = nxt.tolist()  # the one read of the device per step
                yield Step(rows, toks, lp)
                if step == max_new_tokens - 1:
                    break
                if not stop_set.isdisjoint(toks):  # some rows are done: drop them from the batch
                    kept = [j for j, t in enumerate(toks) if t not in stop_set]
                    if not kept:
                        break
                    keep = torch.tensor(kept, device=device)
                    rows, nxt = [rows[j] for j in kept], nxt[keep]
                    if seen is not None:
                        seen = seen[keep]
                    step_fn.select(keep)
                if seen is not None:
                    seen[torch.arange(len(nxt), device=device), nxt] = True
                logits = step_fn(nxt)
    finally:
        if was_training:
            model.train()


def generate_detailed(model, prompts: list[list[int]], max_new_tokens: int = 256, params: SamplingParams | None = None,
                      stop_ids: Iterable[int] = DEFAULT_STOP_IDS, seed: int | None = None,
                      stream_callback: Callable[[int, int], None] | None = None, logprobs: str | None = None,
                      use_cache: bool = True, dtype: torch.dtype | None = None,
                      fast_decode: bool = True) -> GenerationResult:
    """Generate for a batch of token-id prompts. `stream_callback(index, token)` is called for every
    new token as soon as it is chosen. `logprobs`: None | "model" | "sampling" (see `decode_steps`).
    The same seed, prompts and batch give the same tokens."""
    params = params or SamplingParams()
    if logprobs not in (None, "model", "sampling"):
        raise ValueError(f"logprobs must be None, 'model' or 'sampling', got {logprobs!r}")
    if not prompts:
        return GenerationResult([], [], [], [] if logprobs else None, [])
    V = model.config.vocab_size
    for p in prompts:
        if any(not 0 <= int(t) < V for t in p):
            raise ValueError(f"prompt holds a token id outside the model's vocabulary (0..{V - 1})")
    fitted, n_new, cut = fit_to_context([list(map(int, p)) for p in prompts], max_new_tokens, model.config.max_seq_len)
    device = next(model.parameters()).device
    gen = make_generator(seed, device) if not params.greedy else None
    stops = set(int(s) for s in stop_ids)
    out: list[list[int]] = [[] for _ in fitted]
    lps: list[list[float]] | None = [[] for _ in fitted] if logprobs else None
    reasons = ["length"] * len(fitted)
    for step in decode_steps(model, fitted, n_new, params, stops, gen, use_cache, logprobs, dtype, fast_decode):
        for j, (r, t) in enumerate(zip(step.rows, step.tokens)):
            out[r].append(t)
            if lps is not None:
                lps[r].append(step.logprobs[j])
            if t in stops:
                reasons[r] = "stop"
            if stream_callback is not None:
                stream_callback(r, t)
    return GenerationResult(out, reasons, fitted, lps, cut)


def generate(model, prompts: list[list[int]], max_new_tokens: int = 256, params: SamplingParams | None = None,
             stop_ids: Iterable[int] = DEFAULT_STOP_IDS, seed: int | None = None,
             stream_callback: Callable[[int, int], None] | None = None, use_cache: bool = True,
             **sampling) -> list[list[int]]:
    """New tokens for each prompt (stop token included when one was produced).

    Sampling options come as `params=SamplingParams(...)` or as keywords (temperature=0, top_k=…).
    """
    if sampling:
        params = SamplingParams(**sampling) if params is None else _replace(params, **sampling)
    return generate_detailed(model, prompts, max_new_tokens, params, stop_ids, seed, stream_callback,
                             use_cache=use_cache).tokens


def _replace(params: SamplingParams, **kw) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(params, **kw)


# ---- text: incremental decoding, streaming, reasoning split ------------------------------------

class Piece(NamedTuple):
    text: str
    reasoning: bool  # True inside <think> … </think>


def think_ids(tokenizer) -> tuple[int | None, int | None]:
    """The tokenizer's <think> and </think> ids (an open model's may have none: None)."""
    return getattr(tokenizer, "think_id", THINK_ID), getattr(tokenizer, "end_think_id", END_THINK_ID)


def open_think_ids(tokenizer) -> list[int]:
    """The tokens that open a reasoning block: the <think> token, or the text `<think>\n` where the tokenizer
    has no such token (an open model that writes its think tags as text)."""
    think = think_ids(tokenizer)[0]
    return [think] if think is not None else tokenizer.encode("<think>\n")


def special_test(tokenizer):
    """is_special(id) of the tokenizer: tiaoyu's control ids 0..7(11), or an open model's special added tokens."""
    test = getattr(tokenizer, "is_special", None)
    return test if test is not None else (lambda i: i < NUM_SPECIAL)


class IncrementalDecoder:
    """Turn a stream of token ids into text pieces as soon as they are complete characters.

    A character outside the vocabulary arrives as several byte tokens; until its last byte is
    there, decoding ends in U+FFFD, so the decoder waits. Each segment (answer, or the reasoning
    between <think> and </think>) is decoded as a whole and only the new suffix is emitted, so
    pieces joined are exactly decode(all tokens). Special tokens (stop tokens, chat markers) give no text.
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted = 0
        self.reasoning = False
        self.think, self.end_think = think_ids(tokenizer)
        self.special = special_test(tokenizer)

    def _new_text(self, final: bool) -> str:
        if not self.ids:
            return ""
        text = self.tok.decode(self.ids)
        if not final and text.endswith("\ufffd"):
            return ""
        new = text[self.emitted:]
        self.emitted = len(text)
        return new

    def _switch(self, reasoning: bool) -> list[Piece]:
        out = self.flush()
        self.ids, self.emitted, self.reasoning = [], 0, reasoning
        return out

    def push(self, token: int) -> list[Piece]:
        token = int(token)
        if token == self.think:
            return self._switch(True)
        if token == self.end_think:
            return self._switch(False)
        if self.special(token):
            return []
        self.ids.append(token)
        new = self._new_text(final=False)
        return [Piece(new, self.reasoning)] if new else []

    def flush(self) -> list[Piece]:
        new = self._new_text(final=True)
        return [Piece(new, self.reasoning)] if new else []


def stream(model, tokenizer, prompt: list[int], max_new_tokens: int = 256, params: SamplingParams | None = None,
           stop_ids: Iterable[int] = DEFAULT_STOP_IDS, seed: int | None = None, dtype: torch.dtype | None = None,
           tokens_out: list[int] | None = None) -> Iterator[Piece]:
    """Generate for one prompt and yield text pieces as they decode. The new token ids are appended
    to `tokens_out` when given (e.g. to keep the exact answer in a chat history)."""
    params = params or SamplingParams()
    fitted, n_new, _ = fit_to_context([list(map(int, prompt))], max_new_tokens, model.config.max_seq_len)
    device = next(model.parameters()).device
    gen = make_generator(seed, device) if not params.greedy else None
    dec = IncrementalDecoder(tokenizer)
    stops = frozenset(int(s) for s in stop_ids)
    for step in decode_steps(model, fitted, n_new, params, stops, gen, dtype=dtype):
        t = step.tokens[0]
        if tokens_out is not None:
            tokens_out.append(t)
        if t not in stops:  # the stop token ends the answer without being part of it, special or not
            yield from dec.push(t)
    yield from dec.flush()


@dataclass
class DecodedResponse:
    response: str  # the whole answer as text; reasoning shown as <think>…</think>
    reasoning: str | None  # text inside <think> … </think> (None when the model did not think)
    answer: str | None  # text after </think> (None when the model did not think)


def decode_response(tokenizer, tokens: list[int], stop_ids: Iterable[int] | None = None) -> DecodedResponse:
    """Decode new tokens: drop a trailing stop token (default: the tokenizer's end-of-turn ids) and other
    special tokens; split reasoning and answer at <think>/</think>. A <think> without </think> (cut by
    max_new_tokens) is all reasoning."""
    toks = list(tokens)
    stops = set(getattr(tokenizer, "stop_ids", DEFAULT_STOP_IDS) if stop_ids is None else stop_ids)
    if toks and toks[-1] in stops:
        toks = toks[:-1]
    think, end_think = think_ids(tokenizer)
    if (think is None or think not in toks) and (end_think is None or end_think not in toks):
        return DecodedResponse(tokenizer.decode(toks), None, None)
    closed = end_think is not None and end_think in toks
    head, tail = (toks[:toks.index(end_think)], toks[toks.index(end_think) + 1:]) if closed else (toks, [])
    if think is not None and think in head:  # the model opened <think> itself
        i = head.index(think)
        prefix, think = head[:i], head[i + 1:]
    else:  # the prompt opened it
        prefix, think = [], head
    reasoning, answer = tokenizer.decode(think), tokenizer.decode(tail)
    response = tokenizer.decode(prefix) + "<think>" + reasoning + ("</think>" if closed else "") + answer
    return DecodedResponse(response, reasoning, answer)
