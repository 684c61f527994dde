"""Tokenizer: SentencePiece training, loading, parallel encoding and the ChatML chat template.

    from tiaoyu_cli.tokenizer import Tokenizer, SPECIAL_TOKENS, train_tokenizer
    tok = Tokenizer.load("tok/")
    ids, loss_mask = tok.encode_chat([{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}])
"""

from tiaoyu_cli.tokenizer.core import CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer, copy_tokenizer_files
from tiaoyu_cli.tokenizer.template import TOOL_TOKENS
from tiaoyu_cli.tokenizer.train import ALGOS, TrainReport, train_tokenizer

__all__ = ["Tokenizer", "SPECIAL_TOKENS", "CHAT_TEMPLATE", "train_tokenizer", "TrainReport", "ALGOS",
           "copy_tokenizer_files", "TOOL_TOKENS"]
