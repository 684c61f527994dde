"""Train a SentencePiece tokenizer from JSONL: `tiaoyu tokenize train DATA… -o tok/`.

1. Stream the records once and keep a uniform random sample of text pieces (reservoir
   sampling, fixed seed): memory is bounded by --sample-size, not by the corpus. Every 20th
   record goes to a small held-out sample instead, to measure chars/token afterwards.
2. Hand the sample to SentencePiece through a sentence iterator (no temp file), on all cores.
3. Write tokenizer.model + tokenizer_config.json atomically into the output folder.

The SentencePiece settings and why:
  pad/unk/bos/eos = 0/1/2/3, then <|im_start|> <|im_end|> <think> </think> as control symbols
      (fixed ids 0..7, never parsed from text);
  "\\n" as a user-defined symbol: always its own token, so chat-template pieces join exactly;
  byte_fallback: an unseen character becomes its UTF-8 bytes, never <unk>;
  split_digits: numbers are cut into single digits (arithmetic generalises better);
  identity normalisation, remove_extra_whitespaces=False, add_dummy_prefix=False:
      the tokenizer never changes the text, so decode(encode(x)) == x;
  allow_whitespace_only_pieces: runs of spaces (indentation) become one piece.
"""

from __future__ import annotations

import os
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tiaoyu_cli.data.jsonl import iter_jsonl
from tiaoyu_cli.errors import DataError, TiaoyuError
from tiaoyu_cli.tokenizer.core import CONFIG_FILE, MODEL_FILE, NUM_SPECIAL, SPECIAL_TOKENS, Tokenizer, make_config
from tiaoyu_cli.tokenizer.text import RecordError, sample_texts

ALGOS = ("bpe", "unigram", "char", "word")
MAX_PIECE_CHARS = 2048  # long documents are cut into pieces of at most this many characters
HELDOUT_EVERY = 20  # every 20th record is held out for the chars/token figure …
HELDOUT_MAX = 1000  # … up to this many pieces


@dataclass
class TrainReport:
    """What `train_tokenizer` did, for the CLI's stats table."""

    algo: str
    requested_vocab_size: int
    vocab_size: int = 0
    seconds: float = 0.0
    records: int = 0
    sample_pieces: int = 0
    sample_chars: int = 0
    heldout_pieces: int = 0
    heldout_chars: int = 0
    heldout_tokens: int = 0
    heldout_byte_tokens: int = 0
    heldout_is_training_sample: bool = False
    skipped_bad: int = 0
    fingerprint: str = ""
    inputs: list[str] = field(default_factory=list)

    @property
    def chars_per_token(self) -> float:
        return self.heldout_chars / self.heldout_tokens if self.heldout_tokens else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["chars_per_token"] = round(self.chars_per_token, 4)
        return d


def split_long(text: str, limit: int = MAX_PIECE_CHARS) -> list[str]:
    """Cut a long text into pieces of at most `limit` chars, at a newline when one is near the end."""
    out = []
    while len(text) > limit:
        cut = text.rfind("\n", limit // 2, limit)
        cut = cut + 1 if cut > 0 else limit
        out.append(text[:cut])
        text = text[cut:]
    if text:
        out.append(text)
    return out


class Reservoir:
    """A uniform random sample of at most `size` items of a stream of unknown length (reservoir sampling,
    Algorithm R): the first `size` items fill it, then item n replaces a random slot with probability size/n."""

    def __init__(self, size: int, rng: random.Random):
        self.size, self.rng = size, rng
        self.items: list = []
        self.seen = 0

    def add(self, item) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(item)
        else:
            j = self.rng.randrange(self.seen)
            if j < self.size:
                self.items[j] = item


def sample_corpus(inputs: list[str], sample_size: int, seed: int = 0, skip_bad: bool = False,
                  report: TrainReport | None = None) -> tuple[list[str], list[str]]:
    """One streaming pass over JSONL inputs -> (training pieces, held-out pieces), both uniform
    reservoir samples of the text pieces of all records."""
    rng = random.Random(seed)  # one generator for both samples: their draws interleave in stream order
    train, held = Reservoir(sample_size, rng), Reservoir(HELDOUT_MAX, rng)
    records = bad = 0
    for path in inputs:
        stats: dict = {}
        for lineno, rec in iter_jsonl(path, skip_bad=skip_bad, stats=stats):
            try:
                texts = sample_texts(rec)
            except RecordError as e:
                if skip_bad:
                    bad += 1
                    continue
                raise DataError(e.message, "<stdin>" if path == "-" else path, lineno, e.field) from None
            sample = held if records % HELDOUT_EVERY == HELDOUT_EVERY - 1 else train
            records += 1
            for t in texts:
                for piece in split_long(t):
                    if piece.strip():
                        sample.add(piece)
        bad += stats.get("bad", 0)
    if report is not None:
        report.records = records
        report.skipped_bad = bad
    return train.items, held.items


# SentencePiece's two complaints about --vocab-size, and what to do: each names the limit (its second number)
VOCAB_LIMITS = (
    (re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)"),
     "--vocab-size {vocab_size} is too large for this corpus: with --algo {algo} SentencePiece can make at most "
     "{limit} pieces from the {sample_chars:,} sampled characters. Use --vocab-size {limit} or less, or train on "
     "more text (more data, a larger --sample-size)."),
    (re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)"),
     "--vocab-size {vocab_size} is too small: the {special} special tokens, the newline, 256 byte tokens and the "
     "characters that cover {coverage:g} of the text already need {limit}. Use --vocab-size {limit} or more (or "
     "lower --character-coverage)."),
)


def _explain_spm_error(msg: str, vocab_size: int, algo: str, sample_chars: int, coverage: float) -> str:
    for pattern, advice in VOCAB_LIMITS:
        m = pattern.search(msg)
        if m:
            return advice.format(vocab_size=vocab_size, algo=algo, sample_chars=sample_chars, coverage=coverage,
                                 special=NUM_SPECIAL, limit=int(m.group(2)))
    return f"SentencePiece training failed (--algo {algo}, --vocab-size {vocab_size}): {msg}"


def train_model_proto(texts: list[str], algo: str = "bpe", vocab_size: int = 4096,
                      character_coverage: float = 0.9995, num_threads: int = 0, seed: int = 0) -> bytes:
    """Train SentencePiece on in-memory texts; return the serialized model (tokenizer.model bytes)."""
    import io

    import sentencepiece as spm

    if algo not in ALGOS:
        raise TiaoyuError(f"unknown --algo {algo!r} (choose one of {', '.join(ALGOS)})")
    if not texts:
        raise TiaoyuError("empty input: there is no text to train a tokenizer on")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=buf,
            model_type=algo,
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            pad_piece=SPECIAL_TOKENS[0], unk_piece=SPECIAL_TOKENS[1],
            bos_piece=SPECIAL_TOKENS[2], eos_piece=SPECIAL_TOKENS[3],
            control_symbols=SPECIAL_TOKENS[4:],
            user_defined_symbols=["\n"],
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            max_sentence_length=4 * MAX_PIECE_CHARS + 16,  # bytes; pieces are at most MAX_PIECE_CHARS chars
            input_sentence_size=0,  # we sampled already
            num_threads=num_threads if num_threads > 0 else (os.cpu_count() or 1),
            minloglevel=2,
        )
    except RuntimeError as e:
        raise TiaoyuError(
            _explain_spm_error(str(e), vocab_size, algo, sum(map(len, texts)), character_coverage)
        ) from None
    return buf.getvalue()


def _check_out_dir(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise TiaoyuError(f"{out} exists and is not a folder")
        other = [p.name for p in out.iterdir() if p.name not in (MODEL_FILE, CONFIG_FILE)]
        if other:
            raise TiaoyuError(
                f"{out} already holds other files ({', '.join(sorted(other)[:3])}…); "
                f"give -o a new or empty folder (or an existing tokenizer folder to replace it)"
            )


def measure(tok: Tokenizer, texts: list[str], report: TrainReport) -> None:
    ids = tok.encode_batch(texts) if texts else []
    report.heldout_pieces = len(texts)
    report.heldout_chars = sum(len(t) for t in texts)
    report.heldout_tokens = sum(len(x) for x in ids)
    report.heldout_byte_tokens = sum(1 for x in ids for i in x if tok.is_byte(i))


def train_tokenizer(inputs: list[str], out_dir: str | os.PathLike, algo: str = "bpe", vocab_size: int = 4096,
                    sample_size: int = 200_000, character_coverage: float = 0.9995, seed: int = 0,
                    num_threads: int = 0, model_max_length: int = 2048, skip_bad: bool = False) -> Tokenizer:
    """Train a tokenizer on JSONL `inputs` ('-' is stdin, .gz works) and write it to `out_dir`.

    The returned Tokenizer has a `.report` (TrainReport) with timing and held-out statistics.
    """
    from tiaoyu_cli.io import atomic_dir

    if algo not in ALGOS:
        raise TiaoyuError(f"unknown --algo {algo!r} (choose one of {', '.join(ALGOS)})")
    if sample_size < 1:
        raise TiaoyuError("--sample-size must be at least 1")
    if not inputs:
        raise TiaoyuError("no input: give JSONL files (or - for stdin)")
    out = Path(out_dir)
    _check_out_dir(out)
    report = TrainReport(algo=algo, requested_vocab_size=vocab_size, inputs=[str(i) for i in inputs])
    train_texts, held = sample_corpus(list(inputs), sample_size, seed, skip_bad, report)
    if not train_texts and not held:
        raise TiaoyuError(f"empty input: no text in {', '.join(map(str, inputs))}")
    if not train_texts:  # a corpus of fewer records than HELDOUT_EVERY cannot spare a held-out part
        train_texts, held = held, []
    report.sample_pieces = len(train_texts)
    report.sample_chars = sum(len(t) for t in train_texts)

    t0 = time.perf_counter()
    proto = train_model_proto(train_texts, algo, vocab_size, character_coverage, num_threads, seed)
    report.seconds = time.perf_counter() - t0

    extra = {"algo": algo, "vocab_size": vocab_size, "sample_pieces": report.sample_pieces,
             "sample_chars": report.sample_chars, "seed": seed, "character_coverage": character_coverage}
    tok = Tokenizer(proto, make_config(model_max_length, extra))
    report.vocab_size = tok.vocab_size
    report.fingerprint = tok.fingerprint
    if not held:
        held = train_texts[:HELDOUT_MAX]
        report.heldout_is_training_sample = True
    measure(tok, held, report)

    with atomic_dir(out) as tmp:
        tok.save(tmp)
    tok.path = out
    tok.report = report  # type: ignore[attr-defined]
    return tok
