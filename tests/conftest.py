"""Shared session fixtures: the synthetic corpus, a tokenizer, token shards, and a tiny pretrained
base model that every stage test (sft, lora, rlhf, distill, reason, eval …) starts from.

Built once per test session (about a minute on 2 cores). For development, set
TIAOYU_TEST_CACHE=/some/dir to keep them between runs; the cache key covers the source files
that determine them and the CPU capability torch runs at (ATEN_CPU_CAPABILITY), so edits there rebuild
it. CI does not set it. Under pytest-xdist (`make test` runs `pytest -n auto --dist loadfile`) the
workers share one build in the session's temp folder.

The base trains in fp32 on every machine: `--dtype auto` would pick bf16 autocast on CPUs with
AVX512-BF16 or AMX and fp32 elsewhere, and the stage tests start from this model. It still differs a little
between CPUs (torch's kernels, the BLAS build), so tests that compare losses with stored values start from
a checkpoint kept in the repository instead (tests/test_stages.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "tiaoyu_cli"

# One CPU thread in every test process and the subprocesses it starts (set before torch is imported): tiny
# models run fastest on one thread, and no result may depend on how busy the machine is — the automatic
# thread choice of the Trainer looks at the load average.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Budget of the shared base model (tiny preset): enough to learn the synthetic world's patterns.
BASE_STEPS = int(os.environ.get("TIAOYU_TEST_BASE_STEPS", "400"))
BASE_BATCH = 16
BASE_SEQ = 128
VOCAB = 1024


def _source_key() -> str:
    import torch

    h = hashlib.sha256(f"{BASE_STEPS}-{BASE_BATCH}-{BASE_SEQ}-{VOCAB}-{torch.backends.cpu.get_cpu_capability()}".encode())
    for sub in ("data/synth.py", "data/synth_world.py", "data/synth_docs.py", "tokenizer", "model", "train/engine",
                "train/losses/lm.py", "train/objectives/pretrain.py", "data/shards.py"):
        p = PKG / sub
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in files:
            if f.exists():
                h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _build(root: Path) -> None:
    """synth → tokenizer → shards → tiny base, all through the library API (the CLI tests cover the CLI)."""
    import torch

    from tiaoyu_cli.data.shards import open_tokens
    from tiaoyu_cli.data.synth import SynthConfig, write_corpus
    from tiaoyu_cli.model import Transformer, preset
    from tiaoyu_cli.tokenizer import train_tokenizer
    from tiaoyu_cli.tokenizer.encode import encode_corpus
    from tiaoyu_cli.train.objectives.pretrain import PretrainConfig, PretrainStage
    from tiaoyu_cli.train.engine.trainer import TrainConfig, Trainer

    data = root / "synth"
    write_corpus(data, SynthConfig(seed=0, text_mb=1.5, records=2000, val_records=200))
    inputs = [str(data / f"{k}.train.jsonl") for k in ("text", "chat", "reasoning")]
    tok = train_tokenizer(inputs, root / "tok", vocab_size=VOCAB)
    encode_corpus([str(data / "text.train.jsonl")], root / "tok", root / "tokens",
                  val_inputs=[str(data / "text.val.jsonl")], workers=1)
    train, val = open_tokens(root / "tokens")
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size))
    stage = PretrainStage(train, val, PretrainConfig(seq_len=BASE_SEQ), batch_size=BASE_BATCH, seed=0)
    cfg = TrainConfig(out=str(root / "base"), max_steps=BASE_STEPS, batch_size=BASE_BATCH, lr=2e-3,
                      warmup_steps=30, log_every=50, dtype="fp32", device="cpu", keep=1)
    Trainer(model, stage, cfg, tokenizer=tok, log=lambda m: None).fit()


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    """Folder with synth/ (corpus), tok/, tokens/, base/ (tiny pretrained run; base/latest)."""
    cache = os.environ.get("TIAOYU_TEST_CACHE")
    if not cache and os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N`: the workers build it once, together
        cache = str(tmp_path_factory.getbasetemp().parent / "shared-assets")
    if not cache:
        root = tmp_path_factory.mktemp("assets")
        _build(root)
        return root
    root = Path(cache) / f"assets-{_source_key()}"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "DONE").exists():
            tmp = root.with_name(root.name + ".building")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            _build(tmp)
            # the run folder records absolute paths only in trainer.json; the `latest` link is relative
            shutil.rmtree(root, ignore_errors=True)
            tmp.rename(root)
            (root / "DONE").write_text("ok")
    return root


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """In-process torch work on one thread in every test module: tiny matrices run fastest on one, and two
    spinning OpenMP threads on a busy core run many times slower than one. (OMP_NUM_THREADS above covers
    the processes tests start; this puts back a count some code under test may have changed.)"""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def synth_dir(assets) -> Path:
    return assets / "synth"


@pytest.fixture(scope="session")
def tok_dir(assets) -> Path:
    return assets / "tok"


@pytest.fixture(scope="session")
def tokens_dir(assets) -> Path:
    return assets / "tokens"


@pytest.fixture(scope="session")
def base_ckpt(assets) -> Path:
    """The tiny pretrained base checkpoint folder (base/latest resolved)."""
    from tiaoyu_cli.checkpoint import resolve_checkpoint

    return resolve_checkpoint(assets / "base")


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `tiaoyu ARGS…` in this process (no interpreter start-up): (returncode, stdout, stderr) as
    `main()` leaves them — exit 2 and one line for a user error."""
    import io
    import types

    from tiaoyu_cli.cli.main import main

    def run(*args, stdin: str | None = None):
        capsys.readouterr()
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin.encode("utf-8")), encoding="utf-8"))
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out = capsys.readouterr()
        return types.SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run
