"""Tokenizer: SentencePiece training, loading, parallel encoding and the ChatML chat template; and the
same interface over an open model's Hugging Face folder: its `tokenizer.json` (hf.py) or a foreign SentencePiece
`tokenizer.model` (spfolder.py: Llama 2, Mistral).

    from tiaoyu_cli.tokenizer import Tokenizer, SPECIAL_TOKENS, train_tokenizer, open_tokenizer
    tok = Tokenizer.load("tok/")
    ids, loss_mask = tok.encode_chat([{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}])
    tok = open_tokenizer("qwen/")      # tokenizer.json → HFTokenizer, tiaoyu's tokenizer.model → Tokenizer,
                                       # another tokenizer.model (Llama 2) → SPFolderTokenizer
"""

import os
from pathlib import Path

from tiaoyu_cli.tokenizer.core import CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer, copy_tokenizer_files
from tiaoyu_cli.tokenizer.hf import HFTokenizer, is_hf_folder
from tiaoyu_cli.tokenizer.spfolder import SPFolderTokenizer, is_sentencepiece_folder
from tiaoyu_cli.tokenizer.template import TOOL_TOKENS
from tiaoyu_cli.tokenizer.train import ALGOS, TrainReport, train_tokenizer


def open_tokenizer(path: str | os.PathLike):
    """The tokenizer of a folder: its `tokenizer.json` (Hugging Face back-end) when it has one, else its
    SentencePiece `tokenizer.model`: tiaoyu's own, or another one read as transformers' LlamaTokenizer reads it."""
    p = Path(path)
    if p.is_file() and p.name in ("tokenizer.json", "tokenizer.model"):
        p = p.parent
    if p.is_dir() and is_hf_folder(p):
        return HFTokenizer.load(p)
    if p.is_dir() and is_sentencepiece_folder(p):
        return SPFolderTokenizer.load(p)
    return Tokenizer.load(p)


def model_token_ids(tok) -> dict[str, int]:
    """bos/eos/pad ids of a new model built for `tok`. An open model's tokenizer may have no BOS or pad (Qwen has
    no BOS, Llama 3 no pad): its eos stands in (a pad is never learned from; tiaoyu's own ids are all set)."""
    stops = sorted(getattr(tok, "stop_ids", ()))
    eos = tok.eos_id if tok.eos_id is not None else (stops[0] if stops else 0)
    return {"bos_token_id": eos if tok.bos_id is None else tok.bos_id, "eos_token_id": eos,
            "pad_token_id": eos if tok.pad_id is None else tok.pad_id}


def has_tokenizer(path: str | os.PathLike) -> bool:
    p = Path(path)
    return is_hf_folder(p) or ((p / "tokenizer.model").is_file() and (p / "tokenizer_config.json").is_file())


__all__ = ["Tokenizer", "HFTokenizer", "SPFolderTokenizer", "open_tokenizer", "has_tokenizer", "model_token_ids", "SPECIAL_TOKENS", "CHAT_TEMPLATE",
           "train_tokenizer", "TrainReport", "ALGOS", "copy_tokenizer_files", "TOOL_TOKENS"]
