"""The run of `tiaoyu distill`: black box (the teacher answers, the student is fine-tuned on the answers)
or white box (DistillStage over chat records or token shards), through the one run path.

    tiaoyu distill --teacher ckpt/big --student-preset tiny chat.jsonl -o ckpt/student --mode white
    tiaoyu distill --teacher ckpt/big --student ckpt/small prompts.jsonl -o ckpt/student --mode black
    tiaoyu distill --teacher http://localhost:8000/v1 --student ckpt/small prompts.jsonl -o ckpt/student --mode black

A black-box teacher is a checkpoint or an OpenAI-compatible endpoint (teacher_data.py beside this module: both answer into
the same answer file, and the SFT stage trains on it the same way).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn as nn

from tiaoyu_cli.checkpoint import (load_config, load_model, load_tokenizer, load_trainer_info, resolve_checkpoint,
                                   weights_source)
from tiaoyu_cli.data.chat import ChatDataset
from tiaoyu_cli.data.shards import check_fingerprint, open_tokens
from tiaoyu_cli.device import resolve_device
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.infer.endpoint import Endpoint, check_url, is_endpoint
from tiaoyu_cli.infer.sampling import SamplingParams
from tiaoyu_cli.infer.session import ChatModel, GenerationOptions
from tiaoyu_cli.model import Transformer, parse_overrides, preset
from tiaoyu_cli.tokenizer import has_tokenizer, model_token_ids, open_tokenizer
from tiaoyu_cli.tokenizer.core import check_same_tokenizer
from tiaoyu_cli.train.engine.config import TrainConfig
from tiaoyu_cli.train.engine.run import Plan, run_stage
from tiaoyu_cli.train.objectives.distill import DistillConfig, DistillStage
from tiaoyu_cli.train.objectives.pretrain import PretrainConfig, PretrainStage
from tiaoyu_cli.train.objectives.sft import SFTConfig, SFTStage
from tiaoyu_cli.train.stages.distill.teacher_data import (EndpointTeacher, LocalTeacher, TeacherAnswerStats,
                                                          collect_answers, read_answers, read_prompts)

# ---- a whole run: what `tiaoyu distill` calls -------------------------------------------------------

@dataclass(kw_only=True)
class Config:
    """Everything `tiaoyu distill` takes besides the loop's TrainConfig; the white box's hyper-parameters are the
    objective's own `DistillConfig`."""

    data: Path | None = field(default=None, metadata={"help": "chat/prompt JSONL (or a token folder, same as --data)"})
    teacher: str = field(metadata={"help": "teacher checkpoint, or an OpenAI-compatible endpoint http(s)://HOST:PORT/v1 "
                                           "(black box; API key from OPENAI_API_KEY)"})
    teacher_model: str | None = field(default=None, metadata={
        "help": "endpoint teacher: the model to ask (default: the one model the server lists)"})
    teacher_concurrency: int = field(default=8, metadata={"help": "endpoint teacher: requests in flight at once"})
    teacher_retries: int = field(default=5, metadata={
        "help": "endpoint teacher: retries of a request after a connection error, 429 or 5xx (exponential back-off "
                "with jitter)"})
    teacher_timeout: float = field(default=300.0, metadata={"help": "endpoint teacher: seconds one request may take"})
    student: Path | None = field(default=None, metadata={"help": "student checkpoint to start from"})
    student_preset: str | None = field(default=None, metadata={
        "help": "build a fresh student from a preset (tiny | small | …); it takes the teacher's tokenizer, or "
                "--tokenizer's"})
    tokenizer: Path | None = field(default=None, metadata={
        "help": "tokenizer (or checkpoint) folder of a --student-preset student; needed behind an endpoint teacher"})
    model: Optional[List[str]] = field(default=None, metadata={
        "help": "override a field of the preset student, KEY=VALUE (repeatable), e.g. dim=64, n_layers=2"})
    tokens: Path | None = field(default=None, metadata={
        "help": "token folder from `tiaoyu tokenize encode`: white-box distillation during pretraining"})
    mode: str = field(default="white", metadata={"help": "white (teacher logits) | black (teacher answers, then SFT)"})
    distill: DistillConfig = field(default_factory=DistillConfig)
    keep_teacher_data: Path | None = field(default=None, metadata={
        "help": "black: the teacher's answers, appended to this JSONL as they come (chat records; default: inside "
                "-o); a rerun asks only for prompts without an answer"})
    val: Path | None = field(default=None, metadata={
        "help": "held-out chat JSONL: loss on its answers and answer accuracy"})
    eval_samples: int = field(default=200, metadata={
        "help": "questions of --val answered by generation at each evaluation"})
    seq_len: int = field(default=0, metadata={"help": "tokens per sequence (0 = the student's max_seq_len)"})
    max_new_tokens: int = field(default=256, metadata={"help": "black: most tokens per teacher answer"})
    gen_batch_size: int = field(default=32, metadata={"help": "black, checkpoint teacher: prompts it answers together"})
    gen_temperature: float = field(default=0.0, metadata={"help": "black: teacher sampling temperature (0 = greedy)"})
    skip_bad: bool = field(default=False, metadata={"help": "skip (and count) bad records instead of stopping",
                                                    "negatable": False})

    @property
    def remote(self) -> bool:
        return is_endpoint(self.teacher)

# the white box's options as `tiaoyu distill` shows them
DISTILL_HELP = {
    "alpha": "white: weight of the CE on the data; 1 − α on the teacher term",
    "temperature": "white: softening temperature T (the teacher term is × T²); T = 1 measured best here",
    "divergence": "white: forward KL(teacher‖student) | reverse | jsd",
    "cache_topk": "white, chat data: run the teacher once and keep its top-k logits (safetensors in -o) for every "
                  "epoch; 0 = run it every step",
}


def is_token_folder(path: Path) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "train").is_dir() or (p / "meta.json").exists())


def build_student(opts: Config, teacher_tok, teacher_cfg, train: TrainConfig):
    """(student model, its tokenizer, parent path or None). A preset student takes the teacher's tokenizer
    (or --tokenizer's) and context length (the preset's behind an endpoint); `--resume` rebuilds the
    architecture the run started with."""

    if (opts.student is None) == (opts.student_preset is None):
        raise TiaoyuError("give the student once: --student CKPT (an existing model) or --student-preset NAME "
                          "(a fresh one with the teacher's tokenizer, or --tokenizer's)")
    overrides = parse_overrides(opts.model or [])
    if opts.student is not None and (overrides or opts.tokenizer is not None):
        raise TiaoyuError("--model and --tokenizer shape a --student-preset student; an existing --student keeps "
                          "its architecture and tokenizer")
    if train.resume:
        ckpt = resolve_checkpoint(train.out)
        return Transformer(load_config(ckpt)), load_tokenizer(ckpt), str(opts.student) if opts.student else None
    if opts.student is not None:
        net, folder = load_model(opts.student)
        return net, load_tokenizer(folder), str(folder)
    tok = student_tokenizer(opts.tokenizer) if opts.tokenizer is not None else teacher_tok
    if tok is None:
        raise TiaoyuError("--student-preset behind an HTTP teacher needs --tokenizer DIR (a tokenizer or checkpoint "
                          "folder): an API gives text, not its vocabulary")
    fields = {"vocab_size": tok.vocab_size, **model_token_ids(tok), **overrides}
    if teacher_cfg is not None:
        fields.setdefault("max_seq_len", teacher_cfg.max_seq_len)
    return Transformer(preset(opts.student_preset, **fields)), tok, None


def student_tokenizer(path: Path):
    """A tokenizer folder (`tiaoyu tokenize train`'s, an open model's) or the tokenizer of a checkpoint."""
    p = Path(path)
    if not p.exists():
        raise TiaoyuError(f"--tokenizer {p}: no such folder")
    return open_tokenizer(p) if has_tokenizer(p) else load_tokenizer(p)


def teacher_identity(folder: Path) -> str:
    """Path, size and mtime of the teacher's weights: enough to tell a cache made from other weights."""
    w = weights_source(Path(folder))
    st = w.stat()
    return f"{w.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def check_options(opts: Config) -> tuple[Path, bool]:
    """Option and data-path checks that need no model. Returns (data path, is it a token folder)."""
    if opts.mode not in ("white", "black"):
        raise TiaoyuError(f"--mode {opts.mode!r}: choose white or black")
    if opts.remote:
        check_url(str(opts.teacher))
        if opts.mode == "white":
            raise TiaoyuError(f"--teacher {opts.teacher} is an HTTP endpoint: it gives answers, not logits, so "
                              f"distil from it with --mode black (white box needs a teacher checkpoint)")
        if opts.teacher_concurrency < 1 or opts.teacher_retries < 0 or not opts.teacher_timeout > 0:
            raise TiaoyuError("--teacher-concurrency must be at least 1, --teacher-retries not negative and "
                              "--teacher-timeout positive")
    elif opts.teacher_model is not None:
        raise TiaoyuError("--teacher-model names the model of an HTTP teacher (--teacher http://HOST:PORT/v1); "
                          "a checkpoint teacher is its folder")
    if opts.mode == "white":
        opts.distill.validate()
    elif opts.distill.cache_topk:
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
    if tokens and opts.distill.cache_topk:
        raise TiaoyuError("--cache-topk needs a finite chat dataset; with token shards every step draws new "
                          "windows, so the teacher runs every step")
    return data, tokens


def prepare_distill(opts: Config, train: TrainConfig, log) -> Plan:
    """Load teacher and student, check that they fit together, and build the stage."""
    data, tokens = check_options(opts)
    teacher, tdir, ttok = None, None, None
    if not opts.remote:
        teacher, tdir = load_model(opts.teacher)
        ttok = load_tokenizer(tdir)
    torch.manual_seed(train.seed)  # before the student is built: its init weights depend on it
    student, stok, parent = build_student(opts, ttok, teacher.config if teacher is not None else None, train)
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
    if opts.remote:
        endpoint = open_endpoint(opts, train, log)
        shown = f"{endpoint.model} at {endpoint.url}"
    else:
        shown = f"{tdir} ({teacher.num_parameters() / 1e6:.2f}M)"
    lines = [f"distill ({opts.mode} box): teacher {shown} → student {student.num_parameters() / 1e6:.2f}M parameters"
             + (f" from {parent}" if parent else " (new)")]
    if tokens:
        stage = token_stage(data, teacher, stok, opts, train, seq_len)
    elif opts.mode == "white":
        stage = chat_stage(data, stok, opts, train, seq_len, lines.append, name="distill-inner")
        stage = DistillStage(stage, teacher, opts.distill, vocab_size=stok.vocab_size,
                             cache_path=Path(train.out) / "teacher-topk.safetensors", teacher_id=teacher_identity(tdir))
    else:
        if opts.remote:
            records = black_box_data(lambda: endpoint_teacher(endpoint, opts, train), stok, data, opts,
                                     train, log)
        else:
            records = black_box_data(lambda: local_teacher(teacher, ttok, tdir, opts, train, log), ttok, data, opts,
                                     train, log)
        del teacher
        stage = chat_stage(records, stok, opts, train, seq_len, lines.append, name="distill")
    # the teacher's own figures (teacher_*) are not the student's starting point
    return Plan(student, stage, stok, parent=parent or (shown if opts.remote else str(tdir)), lines=lines,
                eval_before=opts.val is not None or tokens, before_drop_prefix="teacher_")


def run(opts: Config, train: TrainConfig, log=print) -> dict:
    """`tiaoyu distill`: white box (DistillStage over chat records or token shards) or black box (the
    teacher answers, then the SFT stage trains the student on the answers)."""
    if opts.data is not None and opts.tokens is not None:
        raise TiaoyuError("give the data once: a JSONL file as the argument, or a token folder with --data")
    if opts.tokens is not None:
        opts = dataclasses.replace(opts, data=opts.tokens, tokens=None)
    if opts.data is None:
        raise TiaoyuError("no data: give a chat/prompt JSONL file, or --data tokens/ for token shards")
    check_options(opts)
    return run_stage("distill", train, lambda: prepare_distill(opts, train, log), default_epochs=1.0,
                     log=log)


def token_stage(data: Path, teacher: nn.Module, tok, opts: Config, train: TrainConfig, seq_len: int):
    """White box during pretraining: PretrainStage windows, every token a distillation target."""

    train_sh, val_sh = open_tokens(data)
    check_fingerprint(train_sh, tok)
    if train_sh.num_tokens < seq_len + 2:
        raise TiaoyuError(f"{data} holds {train_sh.num_tokens} training tokens, fewer than one window of "
                          f"--seq-len {seq_len} + 1")
    inner = PretrainStage(train_sh, val_sh, PretrainConfig(seq_len=seq_len), batch_size=train.batch_size,
                          seed=train.seed)
    return DistillStage(inner, teacher, opts.distill, vocab_size=tok.vocab_size)


def chat_stage(source, tok, opts: Config, train: TrainConfig, seq_len: int, log, name: str):
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


def open_endpoint(opts: Config, train: TrainConfig, log) -> Endpoint:
    """The endpoint teacher, its model named (--teacher-model, else the one model the server lists)."""
    ep = Endpoint(str(opts.teacher), opts.teacher_model, timeout=opts.teacher_timeout, retries=opts.teacher_retries,
                  seed=train.seed)
    if ep.model is None:
        try:
            names = ep.models()
        except TiaoyuError as e:
            raise TiaoyuError(f"--teacher {ep.url}: cannot list its models ({e}); name one with --teacher-model") \
                from None
        if len(names) != 1:
            listed = ", ".join(names[:10]) or "none"
            raise TiaoyuError(f"--teacher {ep.url} serves {len(names)} models ({listed}): choose one with "
                              f"--teacher-model")
        ep.model = names[0]
        log(f"teacher: {ep.url} serves {ep.model}")
    return ep


def endpoint_teacher(endpoint: Endpoint, opts: Config, train: TrainConfig) -> EndpointTeacher:
    return EndpointTeacher(endpoint, opts.max_new_tokens, opts.gen_temperature, opts.teacher_concurrency,
                           seed=train.seed, name=str(opts.data), skip_bad=opts.skip_bad)


def local_teacher(teacher: nn.Module, ttok, tdir: Path, opts: Config, train: TrainConfig,
                  log) -> LocalTeacher:
    stage = load_trainer_info(tdir).get("stage")
    if stage == "pretrain":
        log(f"warning: the teacher {tdir} is a pretrained base model (stage pretrain); it never learned to answer "
            f"in the chat template")
    teacher.to(resolve_device(train.device)).eval()
    cm = ChatModel(teacher, ttok, tdir, stage if isinstance(stage, str) else None, "chat")
    options = GenerationOptions(max_new_tokens=opts.max_new_tokens,
                                sampling=SamplingParams(temperature=opts.gen_temperature), seed=train.seed)
    return LocalTeacher(cm, teacher_identity(tdir), options, opts.gen_batch_size, name=str(opts.data))


def black_box_data(make_teacher, prompt_tok, data: Path, opts: Config, train: TrainConfig,
                   log) -> list[dict]:
    """The teacher's answers as chat records, in --keep-teacher-data (default -o/teacher.jsonl). Prompts already
    answered there are not asked again; a resumed run, and the processes of a --nproc run (their launcher asked
    the teacher before starting them), read the answers back instead of asking (exact resume needs the same
    data). `prompt_tok` checks (and, for a checkpoint teacher, renders) the prompts."""

    keep = Path(opts.keep_teacher_data) if opts.keep_teacher_data else Path(train.out) / "teacher.jsonl"
    if (train.resume or "RANK" in os.environ) and keep.exists():
        log(f"teacher: reusing its answers in {keep}")
        return read_answers(keep)
    st = TeacherAnswerStats()
    prompts = read_prompts(data, prompt_tok, opts.skip_bad, st)
    return collect_answers(make_teacher(), prompts, keep, str(data), st, log)
