"""The tiaoyu tokenizer: a SentencePiece model plus a Hugging Face-style `tokenizer_config.json`.

A tokenizer folder holds exactly two files:

    tokenizer.model          the SentencePiece model (protobuf)
    tokenizer_config.json    LlamaTokenizer settings + the Jinja ChatML `chat_template`

Fixed ids 0..11 are the special tokens below (0..7 in tokenizers made before tool calls: they load,
and asking them for tools is a clear error). They are SentencePiece *control symbols*: the
encoder never produces them from text, so a document that contains the characters
"<|im_end|>" is cut into ordinary pieces. Only code (BOS/EOS around documents, the chat
template) inserts them.

How the model is trained (see train.py) makes three promises that the rest of tiaoyu relies on:
  * decode(encode(x)) == x for any text (identity normalisation, no dummy prefix, spaces kept,
    unseen characters fall back to their UTF-8 bytes). The one exception is U+2581 "▁", the
    character SentencePiece itself uses for a space: it decodes as a space.
  * "\\n" is always its own token, so encode(a + "\\n" + b) == encode(a + "\\n") + encode(b):
    the chat template can encode the header and the content separately and still produce
    exactly the ids of the rendered ChatML string.
  * fingerprint = first 16 hex chars of sha256(tokenizer.model): token shards and checkpoints
    store it, and a mismatch is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.tokenizer.template import (CHAT_ROLES, CHAT_TEMPLATE, TOOL_TOKENS, chat_parts, check_messages,
                                           uses_tools)

BASE_SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
SPECIAL_TOKENS = BASE_SPECIAL_TOKENS + TOOL_TOKENS  # ids 0..11
NUM_SPECIAL = len(SPECIAL_TOKENS)
NUM_BASE_SPECIAL = len(BASE_SPECIAL_TOKENS)

MODEL_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"


def fingerprint_bytes(data: bytes) -> str:
    """The tokenizer fingerprint: first 16 hex chars of the sha256 of tokenizer.model."""
    return hashlib.sha256(data).hexdigest()[:16]


def make_config(model_max_length: int = 2048, extra: dict | None = None) -> dict:
    """tokenizer_config.json contents: enough for `transformers.AutoTokenizer` (LlamaTokenizer,
    no BOS added automatically, no prefix space) plus our chat template."""
    cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(model_max_length),
        "added_tokens_decoder": {
            str(i): {"content": s, "lstrip": False, "rstrip": False, "normalized": False,
                     "single_word": False, "special": True}
            for i, s in enumerate(SPECIAL_TOKENS)
        },
        "additional_special_tokens": SPECIAL_TOKENS[4:],
        "chat_template": CHAT_TEMPLATE,
    }
    if extra:
        cfg["tiaoyu"] = extra
    return cfg


def _resolve_folder(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_file() and p.name == MODEL_FILE:
        p = p.parent
    if not p.exists():
        raise TiaoyuError(f"tokenizer folder {p} does not exist (make one with `tiaoyu tokenize train`)")
    if not p.is_dir():
        raise TiaoyuError(f"{p} is not a tokenizer folder (expected a folder with {MODEL_FILE} and {CONFIG_FILE})")
    missing = [f for f in (MODEL_FILE, CONFIG_FILE) if not (p / f).is_file()]
    if missing:
        raise TiaoyuError(
            f"{p} is not a complete tokenizer folder: missing {' and '.join(missing)} "
            f"(a tokenizer folder, or a checkpoint folder, holds {MODEL_FILE} and {CONFIG_FILE}; "
            f"make one with `tiaoyu tokenize train`)"
        )
    return p


def str_items(texts: Sequence[str], what: str) -> list[str]:
    """`texts` as a list, or TypeError naming `what` when an item is not a str."""
    texts = list(texts)
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"{what}() expects str items, got {type(t).__name__}")
    return texts


class TokenizerBase:
    """What every back-end of the tokenizer interface shares (core.Tokenizer, hf.HFTokenizer, spfolder)."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={str(self.path)!r}, vocab_size={self.vocab_size}, "
                f"fingerprint={self.fingerprint!r})")

    def __len__(self) -> int:
        return self.vocab_size


class Tokenizer(TokenizerBase):
    """A loaded tokenizer. Build it with `Tokenizer.load(folder)` or `train_tokenizer(...)`."""

    pad_id = 0
    unk_id = 1
    bos_id = 2
    eos_id = 3
    im_start_id = 4
    im_end_id = 5
    think_id = 6
    end_think_id = 7
    tool_call_id = 8
    end_tool_call_id = 9
    tool_response_id = 10
    end_tool_response_id = 11
    backend = "sentencepiece"
    stop_ids = frozenset({3, 5})  # a chat answer ends at </s> or <|im_end|>

    def __init__(self, model_proto: bytes, config: dict, path: Path | None = None):
        self.path = path
        self.config = config
        self._model_proto = model_proto
        self.fingerprint = fingerprint_bytes(model_proto)
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(model_proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on a bad proto
            where = f"{path / MODEL_FILE}" if path else "tokenizer.model"
            raise TiaoyuError(f"{where} is not a valid SentencePiece model ({e})") from None
        self.sp = sp
        self.vocab_size = sp.get_piece_size()
        got = [sp.id_to_piece(i) for i in range(min(NUM_SPECIAL, self.vocab_size))]
        if got[:NUM_BASE_SPECIAL] != BASE_SPECIAL_TOKENS:
            where = str(path) if path else "this tokenizer"
            raise TiaoyuError(
                f"{where} was not made by `tiaoyu tokenize train`: ids 0..7 must be {BASE_SPECIAL_TOKENS}, "
                f"got {got[:NUM_BASE_SPECIAL]}"
            )
        # tokenizers made before tool calls have ordinary pieces at 8..11
        self.has_tool_tokens = got == SPECIAL_TOKENS and all(sp.is_control(i) for i in range(8, NUM_SPECIAL))
        self.num_special = NUM_SPECIAL if self.has_tool_tokens else NUM_BASE_SPECIAL

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load from a folder holding tokenizer.model + tokenizer_config.json (a tokenizer folder or
        a checkpoint folder). A path to tokenizer.model itself also works."""
        folder = _resolve_folder(path)
        model_proto = (folder / MODEL_FILE).read_bytes()
        try:
            config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TiaoyuError(f"{folder / CONFIG_FILE} is not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise TiaoyuError(f"{folder / CONFIG_FILE} must hold a JSON object")
        return cls(model_proto, config, folder)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write tokenizer.model and tokenizer_config.json into `folder` (created if needed)."""
        from tiaoyu_cli.io import atomic_write_bytes, atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.path is not None and folder.resolve() == Path(self.path).resolve():
            return folder
        atomic_write_bytes(folder / MODEL_FILE, self._model_proto)
        atomic_write_text(folder / CONFIG_FILE, json.dumps(self.config, ensure_ascii=False, indent=2) + "\n")
        return folder

    def __getstate__(self):  # picklable for DataLoader workers: the model travels as bytes
        return {"model_proto": self._model_proto, "config": self.config, "path": self.path}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], state["config"], state["path"])

    @property
    def model_proto(self) -> bytes:
        return self._model_proto

    @property
    def model_max_length(self) -> int:
        return int(self.config.get("model_max_length", 2048))

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Text -> ids. Never yields a special id (0..7) from text; `bos`/`eos` add <s>/</s>."""
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        ids = self.sp.encode(text)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False,
                     num_threads: int = 0) -> list[list[int]]:
        """Encode many texts with SentencePiece's C++ thread pool (num_threads <= 0: all cores)."""
        texts = str_items(texts, "encode_batch")
        n = num_threads if num_threads > 0 else (os.cpu_count() or 1)
        return self.sp.encode(texts, add_bos=bos, add_eos=eos, num_threads=n)

    def document_affixes(self) -> tuple[list[int], list[int]]:
        """(prefix, suffix) around every document of a pretraining corpus: <s> doc </s>."""
        return [self.bos_id], [self.eos_id]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Ids -> text. With skip_special=False the special tokens appear as their text ("<s>" …)."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise TiaoyuError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        if skip_special:
            return self._decode_plain([i for i in ids if i >= self.num_special])
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i < self.num_special:
                if run:
                    out.append(self._decode_plain(run))
                    run = []
                out.append(SPECIAL_TOKENS[i])
            else:
                run.append(i)
        if run:
            out.append(self._decode_plain(run))
        return "".join(out)

    def _decode_plain(self, ids: list[int]) -> str:
        # "▁" stands for a space; SentencePiece leaves it in place when it arrives through byte
        # fallback (the `word` algorithm does this for unknown words), so finish the job here.
        return self.sp.decode(ids).replace("\u2581", " ")

    def is_special(self, i: int) -> bool:
        """True for the control tokens (ids below num_special): they never decode to text."""
        return 0 <= int(i) < self.num_special

    @property
    def chat_template(self) -> str:
        return self.config.get("chat_template") or CHAT_TEMPLATE

    def id_to_piece(self, i: int) -> str:
        if not 0 <= int(i) < self.vocab_size:
            raise TiaoyuError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return self.sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    def is_byte(self, i: int) -> bool:
        return self.sp.is_byte(int(i))

    # ------------------------------------------------------------------ chat template
    def require_tool_tokens(self) -> None:
        """TiaoyuError unless this tokenizer has the tool-call control tokens (ids 8..11)."""
        if not self.has_tool_tokens:
            where = str(self.path) if self.path else "this tokenizer"
            raise TiaoyuError(
                f"{where} has no tool tokens ({', '.join(TOOL_TOKENS)}): it was made before tool calls. "
                "Train a new tokenizer with `tiaoyu tokenize train` (and a model on it) to use tools")

    @property
    def tool_stop_ids(self) -> frozenset[int]:
        """Where a generation round with tools pauses: the end of a turn, or a finished call."""
        return self.stop_ids | {self.end_tool_call_id}

    def tool_turn_ids(self, result: str) -> list[int]:
        """The ids the template puts between a call's </tool_call> and the model's next turn (template.py's
        layout): the assistant turn's end, the tool turn with `result`, the next assistant generation prompt."""
        return ([self.im_end_id] + self.encode("\n") + [self.im_start_id] + self.encode("user\n")
                + [self.tool_response_id] + self.encode("\n" + result + "\n")
                + [self.end_tool_response_id, self.im_end_id] + self.encode("\n") + self.assistant_start_ids)

    @property
    def assistant_start_ids(self) -> list[int]:
        """The generation prompt: the ids that open an assistant turn."""
        return [self.im_start_id] + self.encode("assistant\n")

    def _check_messages(self, messages, tools=None) -> None:
        check_messages(messages, tools)
        if uses_tools(messages, tools):
            self.require_tool_tokens()

    def _control_id(self, piece: str) -> int:
        return SPECIAL_TOKENS.index(piece)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False,
                    tools: list[dict] | None = None) -> str:
        """The ChatML string (what the Jinja `chat_template` renders); see tokenizer/template.py."""
        self._check_messages(messages, tools)
        return "".join(text for text, _, _ in chat_parts(messages, tools, add_generation_prompt))

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False,
                    tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
        """Encode a conversation in ChatML and say which tokens SFT learns.

            <|im_start|>role\\n content <|im_end|>\\n      per message
            <think>reasoning</think>                      before an assistant's content
            <tool_call>\\n{"name", "arguments"}\\n</tool_call>   an assistant's calls (tokenizer/template.py)
            <|im_start|>assistant\\n                       the generation prompt

        Returns (ids, loss_mask): loss_mask[i] = 1 on the assistant's content (with <think>,
        reasoning and </think>, and its tool calls) and the assistant's closing <|im_end|> — what
        the model must learn to produce after the generation prompt — and 0 on everything else
        (system prompt and tool schemas, user turns, tool results, role headers). Control tokens
        are inserted as ids; text never becomes one.
        """
        self._check_messages(messages, tools)
        ids: list[int] = []
        mask: list[int] = []
        run, run_learn = "", 0

        def flush() -> None:
            nonlocal run
            if run:
                toks = self.encode(run)
                ids.extend(toks)
                mask.extend([run_learn] * len(toks))
                run = ""

        for text, control, learn in chat_parts(messages, tools, add_generation_prompt):
            if control:
                flush()
                ids.append(self._control_id(text))
                mask.append(learn)
            elif text:
                if run and learn != run_learn:
                    flush()  # parts with different masks meet right after a "\n" (template.py)
                run_learn = learn
                run += text
        flush()
        return ids, mask


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy tokenizer.model and tokenizer_config.json from one folder to another (e.g. into a checkpoint)."""
    src = _resolve_folder(src)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in (MODEL_FILE, CONFIG_FILE):
        shutil.copyfile(src / f, dst / f)


def check_same_tokenizer(ours, theirs, what: str, hint: str = "both must come from the same `tiaoyu tokenize train`") -> None:
    """Two models that compare token ids (policy and reference, teacher and student) must share one
    vocabulary: the same tokenizer fingerprint. `what` names the other side (e.g. "reference ckpt/sft")."""
    if ours is None or theirs is None or ours.fingerprint == theirs.fingerprint:
        return
    raise TiaoyuError(f"{what} uses another tokenizer (fingerprint {theirs.fingerprint}) than this run's "
                      f"({ours.fingerprint}); {hint}")
