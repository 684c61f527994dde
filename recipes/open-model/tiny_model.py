"""Write a small random open-model folder, as transformers' `save_pretrained` writes one, to try the
open-model recipe (or a benchmark) without downloading anything. Needs the hf extra (transformers).

    python recipes/open-model/tiny_model.py models/tiny-qwen2                      # Qwen2-style, ~0.2M params
    python recipes/open-model/tiny_model.py models/smol --family llama --shape smollm2-135m --vocab 49152

The folder holds config.json, model.safetensors, tokenizer.json + tokenizer_config.json (a byte-level BPE
trained here on the bundled synthetic corpus, ChatML template), and generation_config.json whose
end-of-turn ids are <|im_end|> and <|endoftext|>. The weights are random (transformers' own init, seeded):
the model talks nonsense, but every stage reads and writes it as it would a downloaded one.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

SHAPES = {
    # hidden, layers, heads, kv heads, intermediate, context
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, max_position_embeddings=512),
    # HuggingFaceTB/SmolLM2-135M's shape (its vocabulary is 49,152; give --vocab 49152 to pad to it)
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, max_position_embeddings=2048),
}
FAMILIES = {"qwen2": ("Qwen2Config", "Qwen2Tokenizer", 1_000_000.0), "llama": ("LlamaConfig", "PreTrainedTokenizerFast", 100_000.0)}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = """{%- for message in messages %}
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# the pre-tokenizer split Qwen2's tokenizer uses (transformers rebuilds Qwen2Tokenizer's pipeline with it)
SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
         r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def corpus(mb: float = 0.3) -> list[str]:
    """Documents of the bundled synthetic corpus (English and Chinese text, arithmetic, chat-like
    questions): what the recipe's data looks like, so the BPE merges fit it."""
    from tiaoyu_cli.data.synth import Generator, SynthConfig

    g = Generator(SynthConfig(seed=0, text_mb=mb, records=200))
    docs = list(g.text_docs("train"))
    docs += [m["content"] for r in g.chat("train") for m in r["messages"]]
    return docs


def bpe_tokenizer(vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    return tok


def write_folder(out: Path, family: str = "qwen2", shape: str = "tiny", vocab: int = 0, bpe_vocab: int = 1024,
                 seed: int = 0, sizes: dict | None = None) -> Path:
    """Write the folder at `out` (atomically: a half-written folder never appears under that name).
    `sizes` overrides config fields of the shape (e.g. {"num_hidden_layers": 2})."""
    import torch
    import transformers
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    from tiaoyu_cli.io import atomic_dir

    if family not in FAMILIES:
        raise SystemExit(f"tiny_model: --family {family!r}: choose one of {', '.join(FAMILIES)}")
    if shape not in SHAPES:
        raise SystemExit(f"tiny_model: --shape {shape!r}: choose one of {', '.join(SHAPES)}")
    cfg_cls, tok_cls, theta = FAMILIES[family]
    tok = bpe_tokenizer(bpe_vocab)
    n_tok = tok.get_vocab_size()
    if vocab and vocab < n_tok:
        raise SystemExit(f"tiny_model: --vocab {vocab} is smaller than the tokenizer's {n_tok} tokens")
    # the embedding rows: the tokenizer's count rounded up to 64 (as open models pad theirs), or --vocab
    vocab = vocab or -(-n_tok // 64) * 64
    ids = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    cfg = getattr(transformers, cfg_cls)(**{**SHAPES[shape], **(sizes or {})}, vocab_size=vocab, tie_word_embeddings=True,
                                         rope_theta=theta, bos_token_id=None, eos_token_id=ids[0],
                                         pad_token_id=ids[1])
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        fast.save_pretrained(tmp)
        tc = json.loads((tmp / "tokenizer_config.json").read_text())
        tc["tokenizer_class"] = tok_cls
        (tmp / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": ids, "pad_token_id": ids[1]}, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="folder to write (replaced if it exists)")
    ap.add_argument("--family", default="qwen2", choices=list(FAMILIES))
    ap.add_argument("--shape", default="tiny", choices=list(SHAPES))
    ap.add_argument("--vocab", type=int, default=0, help="embedding rows (0: the tokenizer's size rounded up to 64)")
    ap.add_argument("--bpe-vocab", type=int, default=1024, help="tokens the BPE tokenizer learns")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    folder = write_folder(a.out, a.family, a.shape, a.vocab, a.bpe_vocab, a.seed)
    n = sum(1 for _ in folder.iterdir())
    print(f"tiny_model: wrote {folder} ({a.family}, {a.shape}, {n} files)", file=sys.stderr)


if __name__ == "__main__":
    main()
