"""`tiaoyu pretrain` end to end, through the real command line (subprocesses):
it learns (val loss far below the unigram baseline; greedy decoding continues training
sentences), continued pretraining with --init, a real SIGTERM/SIGINT mid-run saves and --resume
reproduces the uninterrupted losses exactly, plain progress lines off a terminal, and every bad
input ends in one clear message and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from pretrain_data import (FIXED, assets, env, facts, greedy, other_tokenizer, read_metrics, run_cli, tiaoyu_cmd,
                           train_losses, unigram_entropy)

FAST = ["--preset", "tiny", "--model", "dim=64", "--model", "n_layers=2", "--model", "ffn_dim=128",
        "--seq-len", "64", "--batch-size", "4", "--warmup-steps", "5", "--eval-batches", "2"]


@pytest.fixture(scope="module")
def data() -> Path:
    return assets()


# ---------------------------------------------------------------------------- it learns
@pytest.fixture(scope="module")
def learned(data, tmp_path_factory) -> Path:
    """The tiny preset trained for 120 steps of 16×128 tokens on the structured corpus (~25 s of one CPU core)."""
    out = tmp_path_factory.mktemp("learn") / "run"
    r = run_cli("pretrain", data / "tokens", "-o", out, "--preset", "tiny", "--seq-len", "128", "--batch-size", "16",
                "--lr", "3e-3", "--warmup-steps", "20", "--max-steps", "120", "--eval-every", "60", "--log-every", "20",
                "--dtype", "fp32", timeout=600)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
def test_learns_far_below_unigram_entropy(learned, data):
    info = json.loads((learned / "latest" / "trainer.json").read_text())
    val_loss = info["eval"]["val_loss"]
    h1 = unigram_entropy(data / "tokens")
    assert h1 > 3.0, h1  # sanity: the corpus is not trivial for a context-free model
    assert val_loss < 0.2 * h1, (val_loss, h1)
    evals = [m["val_loss"] for m in read_metrics(learned) if m.get("eval")]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert info["eval"]["val_bpb"] > 0


@pytest.mark.slow
def test_greedy_decoding_continues_training_sentences(learned):
    """A plain greedy loop: the fixed sentences come out word for word after their first three
    words, and most name facts ("Carol likes the colour" → " green.") come out right."""
    from tiaoyu_cli.checkpoint import load_model, load_tokenizer

    model, folder = load_model(learned)
    tok = load_tokenizer(folder)

    def continues(prompt: str, want: str) -> bool:
        got = tok.decode(greedy(model, [tok.bos_id] + tok.encode(prompt), len(tok.encode(want)) + 1))
        return got.startswith(want)

    for sentence in FIXED:
        words = sentence.split(" ")
        assert continues(" ".join(words[:3]), " " + " ".join(words[3:])), sentence
    right = 0
    for fact in facts()[:-len(FIXED)]:
        head, last = fact.rsplit(" ", 1)
        right += continues(head, " " + last)
    assert right >= 0.75 * (len(facts()) - len(FIXED)), right


@pytest.mark.slow
def test_init_continues_from_parent_weights(learned, data, tmp_path):
    """--init: continued pretraining starts where the parent stopped (loss at step 1 ≈ the parent's)."""
    parent = read_metrics(learned)
    parent_loss = [m["loss"] for m in parent if not m.get("eval")][-1]
    out = tmp_path / "cpt"
    r = run_cli("pretrain", data / "tokens", "-o", out, "--init", learned, "--seq-len", "128", "--batch-size", "16",
                "--max-steps", "3", "--log-every", "1", "--lr", "1e-4", "--warmup-steps", "0", "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    first = train_losses(out)[1]
    assert abs(first - parent_loss) < 0.25, (first, parent_loss)
    assert first < 0.5 * math.log(400)  # far from a fresh model's ~ln(vocab)
    info = json.loads((out / "latest" / "trainer.json").read_text())
    assert info["parent"] == str(learned)
    # the same architecture as the parent, and the parent's tokenizer
    assert json.loads((out / "latest" / "config.json").read_text()) == json.loads((learned / "latest" / "config.json").read_text())
    assert (out / "latest" / "tokenizer.model").read_bytes() == (learned / "latest" / "tokenizer.model").read_bytes()


# ---------------------------------------------------------------------------- kill and resume
# constant LR after warmup: the run we kill can be given an endless budget (so the signal always lands
# mid-run, however fast the machine) and still follow the uninterrupted 40-step run exactly. (Exact
# resume of a cosine schedule is checked in test_trainer.py.)
RESUME_ARGS = [*FAST, "--model", "dropout=0.1", "--dtype", "fp32", "--schedule", "constant", "--log-every", "1",
               "--eval-every", "0", "--save-every", "0"]


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("straight") / "run"
    r = run_cli("pretrain", data / "tokens", "-o", out, *RESUME_ARGS, "--max-steps", "40")
    assert r.returncode == 0, r.stderr
    return train_losses(out)


@pytest.mark.integration  # real processes, signalled: `make test-all`
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_then_resume_matches_uninterrupted(sig, data, straight, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(tiaoyu_cmd("pretrain", data / "tokens", "-o", out, *RESUME_ARGS, "--max-steps", "100000"), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until training is under way
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err
    assert "interrupted at step" in err and "--resume" in err, err
    saved = sorted(p.name for p in out.glob("step-*"))
    assert len(saved) == 1 and (out / "latest").resolve().name == saved[0]
    stopped_at = int(saved[0].split("-")[1])
    assert 3 <= stopped_at < 40

    r = run_cli("pretrain", data / "tokens", "-o", out, *RESUME_ARGS, "--max-steps", "40", "--resume")
    assert r.returncode == 0, r.stderr
    assert f"resumed from" in r.stderr and f"at step {stopped_at}" in r.stderr
    resumed = train_losses(out)
    assert sorted(resumed) == list(range(1, 41))  # one line per step: nothing lost, nothing twice
    assert resumed == straight


# ---------------------------------------------------------------------------- output format
def test_plain_progress_lines_on_stderr_when_not_a_terminal(data, tmp_path):
    r = run_cli("pretrain", data / "tokens", "-o", tmp_path / "run", *FAST, "--max-steps", "6", "--log-every", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""  # stdout is for data only
    lines = r.stderr.splitlines()
    steps = [l for l in lines if l.startswith("pretrain step ")]
    assert [l.split()[2] for l in steps] == ["1/6", "3/6", "6/6"], lines
    for l in steps:
        assert " loss " in l and " lr " in l and "tok/s" in l and " eta " in l
    assert not any("\x1b[" in l for l in lines)  # no terminal escape codes
    assert any(l.startswith("done: step 6") for l in lines)


# ---------------------------------------------------------------------------- bad input
def _make_checkpoint(folder: Path, data: Path) -> Path:
    from tiaoyu_cli.model import Transformer, preset
    from tiaoyu_cli.tokenizer import Tokenizer
    from tiaoyu_cli.checkpoint import save_checkpoint

    tok = Tokenizer.load(data / "tok")
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size, dim=32, n_layers=1, ffn_dim=64))
    return save_checkpoint(folder, 1, model, tok)


@pytest.fixture(scope="module")
def bad_cases(data, tmp_path_factory) -> dict[str, list]:
    tmp = tmp_path_factory.mktemp("bad")
    tokens = data / "tokens"
    base = ["pretrain", tokens, *FAST, "--max-steps", "2"]
    good = _make_checkpoint(tmp / "good", data)
    trunc = shutil.copytree(good, tmp / "truncated")
    blob = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    broken = shutil.copytree(good, tmp / "broken-config")
    (broken / "config.json").write_text('{"hidden_size": 32, "num_hidden', encoding="utf-8")
    nomodel = shutil.copytree(good, tmp / "no-model")
    (nomodel / "model.safetensors").unlink()
    a_file = tmp / "a-file"
    a_file.write_text("x")
    existing = tmp / "existing"
    (existing / "step-000005").mkdir(parents=True)
    (existing / "step-000005" / "model.safetensors").write_bytes(b"")
    (existing / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    empty = tmp / "empty"
    empty.mkdir()
    bad_shard = shutil.copytree(tokens, tmp / "bad-tokens")
    shard = next((bad_shard / "train").glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return {
        "unknown preset": [*base, "-o", tmp / "o1", "--preset", "huge"],
        "cuda missing": [*base, "-o", tmp / "o2", "--device", "cuda"],
        "seq len": [*base, "-o", tmp / "o3", "--seq-len", "100000"],
        "other tokenizer": [*base, "-o", tmp / "o4", "--tokenizer", other_tokenizer()],
        "truncated weights": [*base, "-o", tmp / "o5", "--init", trunc],
        "broken config": [*base, "-o", tmp / "o6", "--init", broken],
        "missing weights": [*base, "-o", tmp / "o7", "--init", nomodel],
        "missing init": [*base, "-o", tmp / "o8", "--init", tmp / "nowhere"],
        "unwritable output": [*base, "-o", a_file / "run"],
        "output is a file": [*base, "-o", a_file],
        "run exists": [*base, "-o", existing],
        "nothing to resume": [*base, "-o", empty, "--resume"],
        "resume missing folder": [*base, "-o", tmp / "never", "--resume"],
        "no token folder": ["pretrain", tmp / "no-tokens", "-o", tmp / "o9", "--max-steps", "2"],
        "corrupt shard": ["pretrain", bad_shard, *FAST, "--max-steps", "2", "-o", tmp / "o10"],
        "unknown model option": [*base, "-o", tmp / "o11", "--model", "wings=2"],
        "no budget": ["pretrain", tokens, "-o", tmp / "o12"],
        "bad schedule": [*base, "-o", tmp / "o13", "--schedule", "zigzag"],
    }


def run_main(args: list, capsys) -> tuple[int, str]:
    """Run the `tiaoyu` entry point in this process (the same main() the console script calls)."""
    from tiaoyu_cli.cli.main import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code, capsys.readouterr().err


BAD = {
    "unknown preset": "unknown preset 'huge'",
    "cuda missing": "CUDA is not available",
    "seq len": "exceeds the model's max_seq_len",
    "other tokenizer": "tokenizer mismatch",
    "truncated weights": "corrupt or unreadable safetensors",
    "broken config": "config.json: corrupt JSON",
    "missing weights": "missing model.safetensors",
    "missing init": "no such checkpoint folder",
    "unwritable output": "cannot write there",
    "output is a file": "is a file",
    "run exists": "already holds a run",
    "nothing to resume": "holds no checkpoint to resume from",
    "resume missing folder": "nothing to resume",
    "no token folder": "does not exist",
    "corrupt shard": "truncated",
    "unknown model option": "unknown model option(s): wings",
    "no budget": "no training budget",
    "bad schedule": "choose cosine, wsd or constant",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_clear_error(case, bad_cases, capsys):
    """Through main() in-process (fast); the subprocess test below proves the same for real processes."""
    if case == "cuda missing" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, err = run_main(bad_cases[case], capsys)
    assert code == 2, (code, err)
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, err
    assert BAD[case] in " ".join(err.split()), err


def test_bad_input_in_real_processes_exits_2_without_traceback(bad_cases):
    cases = ["truncated weights", "other tokenizer", "run exists"]
    with ThreadPoolExecutor(max_workers=3) as pool:
        runs = dict(zip(cases, pool.map(lambda c: run_cli(*bad_cases[c], timeout=240), cases)))
    for case, r in runs.items():
        assert r.returncode == 2, (case, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
        assert r.stdout == ""
        assert BAD[case] in " ".join(r.stderr.split()), r.stderr
    folder = Path(bad_cases["run exists"][bad_cases["run exists"].index("-o") + 1])
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.jsonl", "step-000005"]  # left untouched
    assert folder.joinpath("metrics.jsonl").read_text() == '{"step": 1, "loss": 5.0}\n'
