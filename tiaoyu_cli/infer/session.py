"""Chat on top of `generate`: loading a checkpoint for chat, chat vs plain completion, a chat
session with history, and batch answers for JSONL prompts (how other stages call a teacher).

Modes
  chat      ChatML prompt (`Tokenizer.encode_chat(..., add_generation_prompt=True)`), stops at
            <|im_end|> or </s>; for checkpoints trained on conversations (sft, dpo, …).
  complete  plain text continuation: <s> + text, stops at </s>; for a pretrained base model,
            which never saw the chat markers. A conversation is written the way pretraining
            saw chat records: "role: content" lines, then "assistant: ".
  auto      `complete` when the checkpoint's trainer.json says stage "pretrain", else `chat`.
"""

from __future__ import annotations

import dataclasses
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import orjson
import torch

from tiaoyu_cli.errors import DataError, TiaoyuError
from tiaoyu_cli.infer.generate import (DEFAULT_STOP_IDS, EOS_ID, DecodedResponse, Piece, decode_response,
                                       generate_detailed, stream)
from tiaoyu_cli.infer.sampling import SamplingParams

MODES = ("auto", "chat", "complete")
COMPLETION_STAGES = {"pretrain"}  # stages whose checkpoints never learned the chat template


@dataclass
class ChatModel:
    """Everything `tiaoyu chat` needs from a checkpoint."""

    model: torch.nn.Module
    tokenizer: object
    path: Path
    stage: str | None  # trainer.json "stage" (None when the folder has no trainer.json)
    mode: str  # "chat" or "complete"
    tool_schemas: bool | None = None  # trained with the tools' schemas in the prompt (None: not known)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_mode(requested: str, stage: str | None) -> str:
    if requested not in MODES:
        raise TiaoyuError(f"--mode {requested!r}: choose auto, chat or complete")
    if requested != "auto":
        return requested
    return "complete" if stage in COMPLETION_STAGES else "chat"


def load_chat_model(ckpt: str | os.PathLike, device: str = "auto", mode: str = "auto",
                    adapter: str | os.PathLike | None = None, on_warning=None) -> ChatModel:
    """Load model + tokenizer of a checkpoint (step folder, run folder or exported folder) for generation.

    The one place `tiaoyu chat` builds its model: an adapter (`--adapter DIR`, LoRA) or a
    classification head (`--classify`) plug in here — load the base as below, then wrap or extend
    `model` before returning.
    """
    from tiaoyu_cli.checkpoint import has_weights, load_model, load_tokenizer, load_trainer_info, resolve_checkpoint
    from tiaoyu_cli.device import resolve_device

    dev = resolve_device(device)
    if (Path(ckpt) / "adapter_config.json").exists() and not has_weights(Path(ckpt)):
        raise TiaoyuError(f"{ckpt} is a LoRA adapter, not a checkpoint: tiaoyu chat BASE --adapter {ckpt}")
    path = resolve_checkpoint(ckpt)
    from tiaoyu_cli.tokenizer import has_tokenizer

    if not has_tokenizer(path):
        missing = [f for f in ("tokenizer.model", "tokenizer_config.json") if not (path / f).exists()]
        raise TiaoyuError(f"{path}: checkpoint is missing {' and '.join(missing)} (a checkpoint folder holds its "
                          "tokenizer: tokenizer.model and tokenizer_config.json, or an open model's tokenizer.json)")
    tok = load_tokenizer(path)
    model, path = load_model(path, device=dev)
    if model.config.vocab_size < tok.vocab_size:
        raise TiaoyuError(f"{path}: tokenizer has {tok.vocab_size} tokens but the model only {model.config.vocab_size}")
    model.eval()
    stage = load_trainer_info(path).get("stage")
    from tiaoyu_cli.model.adapters import apply_checkpoint_extras  # sft --method prompt|adapter weights

    model = apply_checkpoint_extras(model, path)
    if adapter is not None:  # a LoRA adapter (tiaoyu lora) on top of this base
        from tiaoyu_cli.model.lora import load_adapter

        for w in load_adapter(model, adapter, tokenizer=tok, base_dir=path)[1]:
            if on_warning is not None:
                on_warning(w)
        model.eval()
        stage = "lora"
    return ChatModel(model, tok, path, stage if isinstance(stage, str) else None, resolve_mode(mode, stage),
                     trained_with_tool_schemas(path))


def trained_with_tool_schemas(path: Path, hops: int = 16) -> bool | None:
    """Whether the checkpoint learned tool calls with the tools' schemas rendered in its prompts: the
    `tool_schemas` its fine-tuning stage recorded in trainer.json, else its parent's (a GRPO run from a
    tool-SFT checkpoint inherits it), else None (nobody recorded it)."""
    from tiaoyu_cli.checkpoint import load_trainer_info

    seen = set()
    for _ in range(hops):
        try:
            info = load_trainer_info(path)
        except (TiaoyuError, ValueError):  # a parent folder moved, changed or unreadable: not known
            return None
        value = (info.get("stage_config") or {}).get("tool_schemas")
        if isinstance(value, bool):
            return value
        parent = info.get("parent")
        if not isinstance(parent, str) or not parent or parent in seen or not Path(parent).is_dir():
            return None
        seen.add(parent)
        path = Path(parent)
    return None


# ---- prompts -------------------------------------------------------------------------------------

def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """ChatML ids of `messages` followed by the generation prompt `<|im_start|>assistant\\n`."""
    return tokenizer.encode_chat(messages, add_generation_prompt=True)[0]


def completion_text(messages: list[dict]) -> str:
    """A conversation as plain text, the way pretraining documents render chat records."""
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines + ["assistant: "])


def completion_prompt_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, bos=True)


def stop_ids_for(mode: str, tokenizer=None) -> frozenset[int]:
    """Where an answer ends: chat — the tokenizer's end-of-turn ids (tiaoyu's </s> and <|im_end|>, an open
    model's eos and generation_config.json `eos_token_id`s); complete — its eos."""
    if tokenizer is None or not hasattr(tokenizer, "stop_ids"):
        return DEFAULT_STOP_IDS if mode == "chat" else frozenset({EOS_ID})
    if mode == "chat":
        return frozenset(tokenizer.stop_ids)
    eos = getattr(tokenizer, "eos_id", EOS_ID)
    return frozenset({eos}) if eos is not None else frozenset(tokenizer.stop_ids)


class ContextError(TiaoyuError):
    """A prompt that does not fit the model's context with room to answer: an error, never a silent cut."""

    def __init__(self, n: int, context: int, max_new_tokens: int, note: str = ""):
        room = context_budget(context, max_new_tokens)
        super().__init__(f"the prompt is {n} tokens{note}; this model's context is {context} tokens, which leaves "
                         f"{room} for the prompt with --max-new-tokens {max_new_tokens}: shorten the prompt"
                         + (" or lower --max-new-tokens" if room < context - 1 else ""))


def context_budget(max_seq_len: int, max_new_tokens: int) -> int:
    """Prompt tokens that fit while leaving room to answer (same rule as `generate.fit_to_context`)."""
    return max_seq_len - min(max_new_tokens, max_seq_len // 2)


# ---- an interactive session ----------------------------------------------------------------------

@dataclass
class GenerationOptions:
    max_new_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None


class ChatSession:
    """A conversation: system prompt + alternating user/assistant turns, kept within the context.

        s = ChatSession(cm, system="You are helpful.")
        for piece in s.send("hello"): print(piece.text, end="")
        s.handle_command("/reset")

    In `complete` mode there is no history: every input is continued on its own.
    """

    COMMANDS = {"/reset": "forget the conversation", "/system TEXT": "set the system prompt (and reset)",
                "/exit": "quit (also /quit, Ctrl-D)", "/help": "this list"}

    def __init__(self, cm: ChatModel, system: str | None = None, options: GenerationOptions | None = None,
                 rewrite_user=None):
        self.cm = cm
        # rewrite_user(text) -> text the model sees for the newest user turn (RAG: passages + question);
        # the history keeps what the user typed
        self.rewrite_user = rewrite_user
        self.tok = cm.tokenizer
        self.system = system or None
        self.options = options or GenerationOptions()
        self.history: list[dict] = []  # user/assistant messages, oldest first
        self.turns = 0
        self.dropped_turns = 0  # turns forgotten to fit the context (last prompt)
        self.last: DecodedResponse | None = None

    @property
    def mode(self) -> str:
        return self.cm.mode

    def reset(self) -> None:
        self.history.clear()

    def set_system(self, text: str | None) -> None:
        self.system = (text or "").strip() or None
        self.reset()

    def handle_command(self, line: str) -> str | None:
        """Run a /command. Returns "exit", "reset", "system", "help", or None when `line` is not a command."""
        s = line.strip()
        if not s.startswith("/"):
            return None
        cmd, _, arg = s.partition(" ")
        if cmd in ("/exit", "/quit"):
            return "exit"
        if cmd == "/reset":
            self.reset()
            return "reset"
        if cmd == "/system":
            self.set_system(arg)
            return "system"
        if cmd == "/help":
            return "help"
        raise TiaoyuError(f"unknown command {cmd} (commands: /reset, /system TEXT, /exit, /help)")

    def messages_for(self, user_text: str) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history + [{"role": "user", "content": user_text}]

    def prompt_ids(self, user_text: str) -> list[int]:
        """The prompt for the next answer; the oldest turns are dropped until it fits the context."""
        if self.rewrite_user is not None:
            user_text = self.rewrite_user(user_text)
        if self.mode == "complete":
            return completion_prompt_ids(self.tok, user_text)
        budget = context_budget(self.cm.model.config.max_seq_len, self.options.max_new_tokens)
        history = list(self.history)
        self.dropped_turns = 0
        while True:
            system = [{"role": "system", "content": self.system}] if self.system else []
            ids = chat_prompt_ids(self.tok, system + history + [{"role": "user", "content": user_text}])
            if len(ids) <= budget or not history:
                break
            # drop the oldest exchange (a user message and the assistant reply that follows it)
            cut = 2 if len(history) >= 2 and history[1]["role"] == "assistant" else 1
            history = history[cut:]
            self.dropped_turns += 1
        if self.dropped_turns:
            self.history = history
        if len(ids) > budget:
            raise ContextError(len(ids), self.cm.model.config.max_seq_len, self.options.max_new_tokens)
        return ids

    def send(self, user_text: str) -> Iterator[Piece]:
        """Stream the answer to `user_text` as text pieces; afterwards it is in the history and `self.last`."""
        ids = self.prompt_ids(user_text)
        o = self.options
        seed = None if o.seed is None else o.seed + self.turns
        new: list[int] = []
        stops = stop_ids_for(self.mode, self.tok)
        yield from stream(self.cm.model, self.tok, ids, o.max_new_tokens, o.sampling, stops, seed=seed, tokens_out=new)
        self.turns += 1
        self.last = decode_response(self.tok, new, stops)
        if self.mode == "chat":
            answer = self.last.answer if self.last.answer is not None else self.last.response
            self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]


# ---- JSONL batch: {"prompt": …} / {"messages": […]} → record + {"response": …} -------------------------

@dataclass
class PromptRecord:
    line: int
    record: dict
    ids: list[int] = dataclasses.field(default_factory=list)


def read_prompt_records(stream: io.BufferedIOBase | Iterable[bytes], name: str = "<stdin>") -> list[tuple[int, dict]]:
    """(line, object) for every non-blank line; a malformed line is a DataError naming `name` and the line."""
    out = []
    for n, raw in enumerate(stream, start=1):
        if not raw.strip():
            continue
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise DataError(f"malformed JSON ({e})", name, n) from None
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, got {type(obj).__name__}", name, n)
        out.append((n, obj))
    return out


def record_messages(rec: dict, name: str, line: int, tokenizer) -> list[dict] | str:
    """The conversation to answer: a list of messages, or a plain prompt string."""
    if "messages" in rec:
        key, value = "messages", rec["messages"]
    elif "prompt" in rec:
        key, value = "prompt", rec["prompt"]
    else:
        raise DataError("expected a 'prompt' (string or messages) or a 'messages' field", name, line)
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise DataError(f"expected a string or a list of messages, got {type(value).__name__}", name, line, key)
    try:
        tokenizer._check_messages(value)
    except TiaoyuError as e:
        raise DataError(str(e), name, line, key) from None
    msgs = list(value)
    if msgs and msgs[-1]["role"] == "assistant":  # a finished conversation: answer its last user turn again
        msgs = msgs[:-1]
    if not any(m["role"] == "user" for m in msgs):
        raise DataError("the conversation has no user message to answer", name, line, key)
    return msgs


def build_prompt(tokenizer, mode: str, conv: list[dict] | str, system: str | None) -> list[int]:
    if mode == "complete":
        text = conv if isinstance(conv, str) else completion_text(conv)
        return completion_prompt_ids(tokenizer, text)
    msgs = [{"role": "user", "content": conv}] if isinstance(conv, str) else list(conv)
    if system and not (msgs and msgs[0]["role"] == "system"):
        msgs = [{"role": "system", "content": system}] + msgs
    return chat_prompt_ids(tokenizer, msgs)


def response_fields(rec: dict, d: DecodedResponse) -> dict:
    """The input record + response (and reasoning/answer when the model thought). An input field that
    would be overwritten (e.g. a verifiable record's reference "answer") is kept as "input_<name>"."""
    new = {"response": d.response}
    if d.reasoning is not None:
        new["reasoning"] = d.reasoning
        new["answer"] = d.answer
    out = dict(rec)
    for k, v in new.items():
        if k in out and f"input_{k}" not in out:
            out[f"input_{k}"] = out[k]
        out[k] = v
    return out


def answer_records(cm: ChatModel, records: list[tuple[int, dict]], options: GenerationOptions,
                   system: str | None = None, batch_size: int = 16, name: str = "<stdin>",
                   on_batch=None) -> Iterator[dict]:
    """Answer every record, in input order, generating `batch_size` prompts at a time.

    All prompts are checked before anything is generated. Within a window of 8 batches, prompts of
    similar length are batched together (less padding); results still come out in input order.
    The seed of batch k is seed + k, so a run is reproducible for the same input and batch size.
    `on_batch(n)` is called after every batch with the number of records it answered.
    """
    if batch_size < 1:
        raise TiaoyuError(f"--batch-size must be >= 1, got {batch_size}")
    items = [PromptRecord(line, rec, build_prompt(cm.tokenizer, cm.mode,
                                                  record_messages(rec, name, line, cm.tokenizer), system))
             for line, rec in records]
    stops = stop_ids_for(cm.mode, cm.tokenizer)
    window = batch_size * 8
    batch_no = 0
    for w in range(0, len(items), window):
        chunk = items[w:w + window]
        order = sorted(range(len(chunk)), key=lambda i: -len(chunk[i].ids))
        answers: dict[int, DecodedResponse] = {}
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            seed = None if options.seed is None else options.seed + batch_no
            res = generate_detailed(cm.model, [chunk[i].ids for i in idx], options.max_new_tokens,
                                    options.sampling, stops, seed=seed)
            for i, toks in zip(idx, res.tokens):
                answers[i] = decode_response(cm.tokenizer, toks, stops)
            batch_no += 1
            if on_batch is not None:
                on_batch(len(idx))
        for i, item in enumerate(chunk):
            yield response_fields(item.record, answers[i])
