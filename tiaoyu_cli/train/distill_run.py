"""The run of `tiaoyu distill`: black box (the teacher answers, the student is fine-tuned on the answers)
or white box (DistillStage over chat records or token shards), through the one run path.

    tiaoyu distill --teacher ckpt/big --student-preset tiny chat.jsonl -o ckpt/student --mode white
    tiaoyu distill --teacher ckpt/big --student ckpt/small prompts.jsonl -o ckpt/student --mode black
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from tiaoyu_cli.checkpoint import (load_config, load_model, load_tokenizer, load_trainer_info, resolve_checkpoint,
                                   weights_source)
from tiaoyu_cli.data.chat import ChatDataset
from tiaoyu_cli.data.jsonl import RecordCounts, load_records, read_jsonl, write_jsonl
from tiaoyu_cli.data.shards import check_fingerprint, open_tokens
from tiaoyu_cli.device import resolve_device
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.infer.sampling import SamplingParams
from tiaoyu_cli.infer.session import ChatModel, GenerationOptions, answer_records, record_messages
from tiaoyu_cli.model import Transformer, parse_overrides, preset
from tiaoyu_cli.tokenizer import model_token_ids
from tiaoyu_cli.tokenizer.core import check_same_tokenizer
from tiaoyu_cli.train.config import TrainConfig
from tiaoyu_cli.train.distill import DistillConfig, DistillStage
from tiaoyu_cli.train.lm import PretrainConfig, PretrainStage
from tiaoyu_cli.train.run import Plan, run_stage
from tiaoyu_cli.train.sft import SFTConfig, SFTStage

# ---- black box: the teacher answers -----------------------------------------------------------------

class TeacherAnswerStats(RecordCounts):
    what = "prompts answered"  # skipped: records without a usable prompt (--skip-bad), empty answers


def teacher_answers(cm, path: Path, max_new_tokens: int = 256, temperature: float = 0.0, batch_size: int = 32,
                    seed: int = 0, skip_bad: bool = False, stats: TeacherAnswerStats | None = None) -> list[dict]:
    """Black box, first half: the teacher (a `ChatModel`) answers every prompt of a JSONL file —
    `{"prompt": str | messages}`, `{"messages": [...]}` (a trailing assistant turn is answered anew) —
    through the batched KV-cache generation of `tiaoyu chat`. Returns chat records
    `{"messages": prompt + [{"role": "assistant", "content": answer, ["reasoning": …]}]}`, the SFT data
    of the second half. A reasoning teacher's <think> part is kept as the "reasoning" field."""

    st = stats if stats is not None else TeacherAnswerStats()
    name = str(path)

    def read(rec: dict, name: str, line: int) -> tuple[int, dict]:
        conv = record_messages(rec, name, line, cm.tokenizer)
        conv = [{"role": "user", "content": conv}] if isinstance(conv, str) else conv
        return line, {"messages": conv}  # only the prompt: the answer fields come from the teacher

    good = load_records(path, read, skip_bad, st, why=lambda e: "without a usable prompt")
    if not good:
        raise TiaoyuError(f"{name}: no prompts for the teacher to answer")
    options = GenerationOptions(max_new_tokens=max_new_tokens, sampling=SamplingParams(temperature=temperature),
                                seed=seed)
    out = []
    for (_, prompt), ans in zip(good, answer_records(cm, good, options, batch_size=batch_size, name=name)):
        reasoning = ans.get("reasoning")
        content = ans["answer"] if reasoning is not None else ans["response"]
        if not content.strip():  # nothing, or a <think> the teacher never closed
            st.skip("with an empty answer")
            continue
        msg = {"role": "assistant", "content": content.strip()}
        if reasoning is not None:
            msg["reasoning"] = reasoning.strip()
        out.append({"messages": prompt["messages"] + [msg]})
    st.kept = len(out)  # a prompt counts as kept once the teacher answered it
    if not out:
        raise TiaoyuError(f"{name}: the teacher gave no usable answer to any prompt (is it a chat model? "
                          f"try a larger --max-new-tokens)")
    return out


# ---- a whole run: what `tiaoyu distill` calls -------------------------------------------------------

@dataclass
class DistillOptions:
    teacher: Path
    data: Path  # chat/prompt JSONL, or a token folder (white box during pretraining)
    student: Path | None = None
    student_preset: str | None = None
    model_overrides: list[str] = field(default_factory=list)
    mode: str = "white"  # white | black
    alpha: float = 0.5
    temperature: float = 1.0
    divergence: str = "forward"
    cache_topk: int = 0
    keep_teacher_data: Path | None = None
    val: Path | None = None
    eval_samples: int = 200
    seq_len: int = 0
    max_new_tokens: int = 256
    gen_batch_size: int = 32
    gen_temperature: float = 0.0
    skip_bad: bool = False

    def kd_config(self) -> DistillConfig:
        return DistillConfig(alpha=self.alpha, temperature=self.temperature, divergence=self.divergence,
                             cache_topk=self.cache_topk)


def is_token_folder(path: Path) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "train").is_dir() or (p / "meta.json").exists())


def build_student(opts: DistillOptions, teacher_tok, teacher_cfg, train: TrainConfig):
    """(student model, its tokenizer, parent path or None). A preset student takes the teacher's tokenizer
    and context length; `--resume` rebuilds the architecture the run started with."""

    if (opts.student is None) == (opts.student_preset is None):
        raise TiaoyuError("give the student once: --student CKPT (an existing model) or --student-preset NAME "
                          "(a fresh one with the teacher's tokenizer)")
    overrides = parse_overrides(opts.model_overrides)
    if overrides and opts.student is not None:
        raise TiaoyuError("--model overrides shape a --student-preset student; an existing --student keeps its "
                          "architecture")
    if train.resume:
        ckpt = resolve_checkpoint(train.out)
        return Transformer(load_config(ckpt)), load_tokenizer(ckpt), str(opts.student) if opts.student else None
    if opts.student is not None:
        net, folder = load_model(opts.student)
        return net, load_tokenizer(folder), str(folder)
    cfg = preset(opts.student_preset, **{"vocab_size": teacher_tok.vocab_size, **model_token_ids(teacher_tok),
                                         "max_seq_len": teacher_cfg.max_seq_len, **overrides})
    return Transformer(cfg), teacher_tok, None


def teacher_identity(folder: Path) -> str:
    """Path, size and mtime of the teacher's weights: enough to tell a cache made from other weights."""
    w = weights_source(Path(folder))
    st = w.stat()
    return f"{w.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def check_options(opts: DistillOptions) -> tuple[Path, bool]:
    """Option and data-path checks that need no model. Returns (data path, is it a token folder)."""
    if opts.mode not in ("white", "black"):
        raise TiaoyuError(f"--mode {opts.mode!r}: choose white or black")
    if opts.mode == "white":
        opts.kd_config().validate()
    elif opts.cache_topk:
        raise TiaoyuError("--cache-topk caches teacher logits: it belongs to --mode white")
    if opts.max_new_tokens < 1 or opts.gen_batch_size < 1 or opts.seq_len < 0 or opts.eval_samples < 0:
        raise TiaoyuError("--max-new-tokens and --gen-batch-size must be positive, --seq-len and --eval-samples "
                          "not negative")
    data = Path(opts.data)
    if not data.exists():
        raise TiaoyuError(f"{data}: no such file or folder")
    tokens = is_token_folder(data)
    if data.is_dir() and not tokens:
        raise TiaoyuError(f"{data}: a folder, but not a token folder from `tiaoyu tokenize encode`")
    if tokens and opts.mode == "black":
        raise TiaoyuError(f"{data} is a token folder: black-box distillation needs prompts for the teacher to "
                          f"answer (a chat or prompt JSONL); token shards work with --mode white")
    if tokens and opts.cache_topk:
        raise TiaoyuError("--cache-topk needs a finite chat dataset; with token shards every step draws new "
                          "windows, so the teacher runs every step")
    return data, tokens


def prepare_distill(opts: DistillOptions, train: TrainConfig, log) -> Plan:
    """Load teacher and student, check that they fit together, and build the stage."""
    data, tokens = check_options(opts)
    teacher, tdir = load_model(opts.teacher)
    ttok = load_tokenizer(tdir)
    torch.manual_seed(train.seed)  # before the student is built: its init weights depend on it
    student, stok, parent = build_student(opts, ttok, teacher.config, train)
    if opts.mode == "white":
        check_same_tokenizer(ttok, stok, "the student", hint=(
            "white-box distillation compares next-token distributions, which needs one shared vocabulary. Use "
            "--mode black (the student learns from the teacher's text), or build the student with --student-preset "
            "(it takes the teacher's tokenizer)"))
    seq_len = opts.seq_len or student.config.max_seq_len
    if seq_len > student.config.max_seq_len:
        raise TiaoyuError(f"--seq-len {seq_len} exceeds the student's max_seq_len {student.config.max_seq_len}")
    if opts.mode == "white" and seq_len > teacher.config.max_seq_len:
        raise TiaoyuError(f"--seq-len {seq_len} exceeds the teacher's max_seq_len {teacher.config.max_seq_len}")
    lines = [f"distill ({opts.mode} box): teacher {tdir} ({teacher.num_parameters() / 1e6:.2f}M) → student "
             f"{student.num_parameters() / 1e6:.2f}M parameters" + (f" from {parent}" if parent else " (new)")]
    if tokens:
        stage = token_stage(data, teacher, stok, opts, train, seq_len)
    elif opts.mode == "white":
        stage = chat_stage(data, stok, opts, train, seq_len, lines.append, name="distill-inner")
        stage = DistillStage(stage, teacher, opts.kd_config(), vocab_size=stok.vocab_size,
                             cache_path=Path(train.out) / "teacher-topk.safetensors", teacher_id=teacher_identity(tdir))
    else:
        records = black_box_data(teacher, ttok, tdir, data, opts, train, log)
        del teacher
        stage = chat_stage(records, stok, opts, train, seq_len, lines.append, name="distill")
    # the teacher's own figures (teacher_*) are not the student's starting point
    return Plan(student, stage, stok, parent=parent or str(tdir), lines=lines,
                eval_before=opts.val is not None or tokens, before_drop_prefix="teacher_")


def run_distill(opts: DistillOptions, train: TrainConfig, log=print) -> dict:
    """`tiaoyu distill`: white box (DistillStage over chat records or token shards) or black box (the
    teacher answers, then the SFT stage trains the student on the answers)."""
    check_options(opts)
    return run_stage("distill", train, lambda: prepare_distill(opts, train, log), default_epochs=1.0,
                     log=log)


def token_stage(data: Path, teacher: nn.Module, tok, opts: DistillOptions, train: TrainConfig, seq_len: int):
    """White box during pretraining: PretrainStage windows, every token a distillation target."""

    train_sh, val_sh = open_tokens(data)
    check_fingerprint(train_sh, tok)
    if train_sh.num_tokens < seq_len + 2:
        raise TiaoyuError(f"{data} holds {train_sh.num_tokens} training tokens, fewer than one window of "
                          f"--seq-len {seq_len} + 1")
    inner = PretrainStage(train_sh, val_sh, PretrainConfig(seq_len=seq_len), batch_size=train.batch_size,
                          seed=train.seed)
    return DistillStage(inner, teacher, opts.kd_config(), vocab_size=tok.vocab_size)


def chat_stage(source, tok, opts: DistillOptions, train: TrainConfig, seq_len: int, log, name: str):
    """The SFT stage over chat records (a JSONL path or a list of records), with --val for evaluation."""

    ds = ChatDataset(source, tok, seq_len, skip_bad=opts.skip_bad,
                     name=None if isinstance(source, (str, Path)) else "teacher answers")
    log(f"data: {ds.stats.summary()}")
    eval_ds, eval_records = None, []
    if opts.val is not None:
        eval_ds = ChatDataset(opts.val, tok, seq_len, skip_bad=opts.skip_bad)
        eval_records = [{"messages": m} for m in eval_ds.messages if m[-1]["role"] == "assistant"]
    cfg = SFTConfig(max_len=seq_len, eval_samples=opts.eval_samples if eval_records else 0)
    return SFTStage(ds.examples, cfg, train.batch_size, seed=train.seed, eval_data=eval_ds, eval_records=eval_records,
                    name=name, info={"data": str(opts.data), "val": str(opts.val) if opts.val else None,
                                     "data_stats": vars(ds.stats)})


def black_box_data(teacher: nn.Module, ttok, tdir: Path, data: Path, opts: DistillOptions, train: TrainConfig,
                   log) -> list[dict]:
    """The teacher's answers as chat records, written to --keep-teacher-data (default -o/teacher.jsonl).
    A resumed run reads them back instead of asking the teacher again (exact resume needs the same data)."""

    keep = Path(opts.keep_teacher_data) if opts.keep_teacher_data else Path(train.out) / "teacher.jsonl"
    if train.resume and keep.exists():
        log(f"teacher: reusing its answers in {keep}")
        return read_jsonl(keep)
    stage = load_trainer_info(tdir).get("stage")
    if stage == "pretrain":
        log(f"warning: the teacher {tdir} is a pretrained base model (stage pretrain); it never learned to answer "
            f"in the chat template")
    device = resolve_device(train.device)
    teacher.to(device).eval()
    cm = ChatModel(teacher, ttok, tdir, stage if isinstance(stage, str) else None, "chat")
    st = TeacherAnswerStats()

    t0 = time.perf_counter()
    records = teacher_answers(cm, data, opts.max_new_tokens, opts.gen_temperature, opts.gen_batch_size,
                              seed=train.seed, skip_bad=opts.skip_bad, stats=st)
    write_jsonl(keep, records)
    log(f"teacher: {st.summary()} in {time.perf_counter() - t0:.0f}s → {keep}")
    return records
