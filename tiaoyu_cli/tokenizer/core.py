"""The tiaoyu tokenizer: a SentencePiece model plus a Hugging Face-style `tokenizer_config.json`.

A tokenizer folder holds exactly two files:

    tokenizer.model          the SentencePiece model (protobuf)
    tokenizer_config.json    LlamaTokenizer settings + the Jinja ChatML `chat_template`

Fixed ids 0..7 are the special tokens below. They are SentencePiece *control symbols*: the
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

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
NUM_SPECIAL = len(SPECIAL_TOKENS)

MODEL_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
CHAT_ROLES = ("system", "user", "assistant")

# The ChatML template in Jinja, for Hugging Face tooling (`apply_chat_template`). It renders the
# same string as `Tokenizer.render_chat` (tests check this). One line: no stray whitespace.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' and message['reasoning'] is defined "
    "and message['reasoning'] is not none -%}"
    "{{- '<think>' + message['reasoning'] + '</think>' -}}"
    "{%- endif -%}"
    "{{- message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


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


class Tokenizer:
    """A loaded tokenizer. Build it with `Tokenizer.load(folder)` or `train_tokenizer(...)`."""

    pad_id = 0
    unk_id = 1
    bos_id = 2
    eos_id = 3
    im_start_id = 4
    im_end_id = 5
    think_id = 6
    end_think_id = 7

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
        if got != SPECIAL_TOKENS:
            where = str(path) if path else "this tokenizer"
            raise TiaoyuError(
                f"{where} was not made by `tiaoyu tokenize train`: ids 0..7 must be {SPECIAL_TOKENS}, got {got}"
            )

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

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size}, fingerprint={self.fingerprint!r})"

    def __len__(self) -> int:
        return self.vocab_size

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
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode_batch() expects str items, got {type(t).__name__}")
        n = num_threads if num_threads > 0 else (os.cpu_count() or 1)
        return self.sp.encode(texts, add_bos=bos, add_eos=eos, num_threads=n)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Ids -> text. With skip_special=False the special tokens appear as their text ("<s>" …)."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise TiaoyuError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        if skip_special:
            return self._decode_plain([i for i in ids if i >= NUM_SPECIAL])
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i < NUM_SPECIAL:
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

    def id_to_piece(self, i: int) -> str:
        if not 0 <= int(i) < self.vocab_size:
            raise TiaoyuError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return self.sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    def is_byte(self, i: int) -> bool:
        return self.sp.is_byte(int(i))

    # ------------------------------------------------------------------ chat template
    @staticmethod
    def _check_messages(messages) -> None:
        if not isinstance(messages, (list, tuple)):
            raise TiaoyuError(f"chat messages must be a list, got {type(messages).__name__}")
        for k, m in enumerate(messages):
            if not isinstance(m, dict):
                raise TiaoyuError(f"chat message {k} must be an object with role and content, got {type(m).__name__}")
            role = m.get("role")
            if role not in CHAT_ROLES:
                raise TiaoyuError(f"chat message {k}: unknown role {role!r} (expected one of {', '.join(CHAT_ROLES)})")
            if not isinstance(m.get("content"), str):
                raise TiaoyuError(f"chat message {k} ({role}): content must be a string, got {type(m.get('content')).__name__}")
            r = m.get("reasoning")
            if r is not None and not isinstance(r, str):
                raise TiaoyuError(f"chat message {k} ({role}): reasoning must be a string, got {type(r).__name__}")

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The ChatML string (what the Jinja `chat_template` renders)."""
        self._check_messages(messages)
        parts = []
        for m in messages:
            parts.append(f"<|im_start|>{m['role']}\n")
            if m["role"] == "assistant" and m.get("reasoning") is not None:
                parts.append(f"<think>{m['reasoning']}</think>")
            parts.append(f"{m['content']}<|im_end|>\n")
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Encode a conversation in ChatML and say which tokens SFT learns.

            <|im_start|>role\\n content <|im_end|>\\n      per message
            <think>reasoning</think>                      before an assistant's content
            <|im_start|>assistant\\n                       the generation prompt

        Returns (ids, loss_mask): loss_mask[i] = 1 on the assistant's content (with <think>,
        reasoning and </think>) and the assistant's closing <|im_end|> — what the model must learn to
        produce after the generation prompt — and 0 on everything else.
        """
        self._check_messages(messages)
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: list[int], learn: int) -> None:
            ids.extend(tokens)
            mask.extend([learn] * len(tokens))

        newline = self.encode("\n")
        for m in messages:
            role = m["role"]
            learn = 1 if role == "assistant" else 0
            add([self.im_start_id], 0)
            add(self.encode(role + "\n"), 0)
            if role == "assistant" and m.get("reasoning") is not None:
                add([self.think_id], 1)
                add(self.encode(m["reasoning"]), 1)
                add([self.end_think_id], 1)
            add(self.encode(m["content"]), learn)
            add([self.im_end_id], learn)
            add(newline, 0)
        if add_generation_prompt:
            add([self.im_start_id], 0)
            add(self.encode("assistant\n"), 0)
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
