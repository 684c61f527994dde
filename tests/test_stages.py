"""One table, every training stage (as torchtune keeps one per recipe), from one fixed start, on CPU:

* the first 3 logged losses equal stored golden values (within GOLDEN_ABS): a change to a stage's
  objective or data order shows up here, on purpose (regenerate with TIAOYU_WRITE_GOLDEN=1 after a
  deliberate change);
* 2 steps, then --resume to 4, logs the same losses as 4 steps straight;
* what trains changes between step 2 and step 4, every 2-D weight of it;
* an OSError while saving (a full disk) ends the run with one clear line naming the folder, the last
  good checkpoint stays, and --resume continues once the disk has room again;
* SIGTERM mid-run leaves a loadable checkpoint and exits 143.

Every stage runs through the one run path (train/engine/run.py), so these hold for every command alike.

The stages start from a small checkpoint kept in the repository (tests/fixtures/golden_start; pretrain from
its seeded initialisation), not from the shared test base: a model trained here for hundreds of steps comes
out different on every CPU (torch's kernels per ATEN_CPU_CAPABILITY, the BLAS build), and with it a stage's
first losses and the RL stages' rewards. TIAOYU_WRITE_GOLDEN_START=1 rebuilds that checkpoint (then write
the losses too).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_fixtures import one_thread, read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).with_name("golden_losses.json")
GOLDEN_START = Path(__file__).parent / "fixtures" / "golden_start"
# measured from the same start under ATEN_CPU_CAPABILITY=default|avx2|avx512 (benchmarks/RESULTS.md,
# "golden losses across CPUs"): a few times the largest difference seen
GOLDEN_ABS = 3e-5
LOOP = ["--device", "cpu", "--dtype", "fp32", "--seed", "0", "--log-every", "1", "--save-every", "2", "--keep", "0",
        "--schedule", "constant", "--warmup-steps", "0", "--batch-size", "4",
        "--weight-decay", "0"]  # no decay: a weight that changes got a gradient
RL = ["--max-new-tokens", "8", "--eval-size", "2", "--no-eval-before", "--val-frac", "0"]


@pytest.fixture(scope="module")
def files(assets, tmp_path_factory) -> dict[str, Path]:
    if os.environ.get("TIAOYU_WRITE_GOLDEN_START"):
        build_golden_start(assets, tmp_path_factory.mktemp("golden-start"), GOLDEN_START)
    d = tmp_path_factory.mktemp("stage-data")
    s = assets / "synth"
    pick = {"chat": "chat.train.jsonl", "cls": "classification.train.jsonl", "pref": "preference.train.jsonl",
            "ver": "verifiable.train.jsonl", "trace": "reasoning.train.jsonl"}
    out = {k: write_jsonl(d / f"{k}.jsonl", read_jsonl(s / name)[:24]) for k, name in pick.items()}
    out.update(base=GOLDEN_START, sft=GOLDEN_START, tokens=assets / "tokens", tok=assets / "tok")
    # The RL stages learn only from rewards that differ (equal rewards in a group: zero advantages, an exactly
    # zero gradient): they run on questions whose reference answer is the start's own greedy answer, which
    # sampled answers match often, but not always.
    out["ver"] = write_jsonl(d / "ver-own.jsonl", greedy_answers(GOLDEN_START, read_jsonl(out["ver"])))
    return out


# The start: a small model (the distill student's shape), pretrained, then fine-tuned on the chat and
# verifiable records, so that it answers in the chat template (a black-box teacher) and gets rewards that
# differ in the RL stages.
START_MODEL = ["--model", "dim=64", "--model", "n_layers=2", "--model", "n_heads=2", "--model", "n_kv_heads=1",
               "--model", "ffn_dim=192"]
START_ARGS = ["--device", "cpu", "--dtype", "fp32", "--seed", "0", "--keep", "1", "--log-every", "100",
              "--batch-size", "16", "--lr", "3e-3"]
START_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json")


def build_golden_start(assets: Path, work: Path, dest: Path) -> None:
    """Train the start from the session's corpus and tokenizer and keep its model files in `dest`."""
    import shutil

    from rlhf_fixtures import as_chat, run_cli

    s = assets / "synth"
    with one_thread():
        run_cli(["pretrain", assets / "tokens", "--tokenizer", assets / "tok", "--preset", "tiny", *START_MODEL,
                 "-o", work / "base", "--seq-len", "128", "--warmup-steps", "20", "--max-steps", "400",
                 "--eval-every", "0", "--eval-batches", "1", *START_ARGS])
        mix = write_jsonl(work / "mix.jsonl", read_jsonl(s / "chat.train.jsonl")
                          + [as_chat(r) for r in read_jsonl(s / "verifiable.train.jsonl")])
        run_cli(["sft", work / "base", mix, "-o", work / "sft", "--warmup-steps", "10", "--max-steps", "200",
                 "--no-eval-before", *START_ARGS])
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in START_FILES:
        shutil.copy(work / "sft" / "latest" / name, dest / name)
    (dest / "trainer.json").write_text(json.dumps({"stage": "sft", "step": 200}) + "\n")


def greedy_answers(ckpt: Path, records: list[dict]) -> list[dict]:
    from tiaoyu_cli.infer.sampling import SamplingParams
    from tiaoyu_cli.infer.session import GenerationOptions, answer_records, load_chat_model

    cm = load_chat_model(ckpt, device="cpu", mode="chat")
    opts = GenerationOptions(max_new_tokens=8, sampling=SamplingParams(temperature=0.0))
    with one_thread():
        answers = list(answer_records(cm, [(i + 1, {"prompt": r["prompt"]}) for i, r in enumerate(records)], opts))
    out = [{"prompt": r["prompt"], "answer": a["response"].strip()} for r, a in zip(records, answers)]
    return [r for r in out if r["answer"]]


# stage → argv after `tiaoyu` (without -o and the budget); {name} is filled from `files`
STAGES: dict[str, list[str]] = {
    "pretrain": ["pretrain", "{tokens}", "--tokenizer", "{tok}", "--preset", "tiny", "--model", "dim=64", "--model", "n_layers=2",
                 "--seq-len", "32", "--eval-every", "0", "--eval-batches", "1"],
    "sft": ["sft", "{base}", "{chat}", "--max-len", "96", "--no-eval-before"],
    "classify": ["sft", "{base}", "{cls}", "--task", "classify", "--max-len", "64", "--no-eval-before"],
    "lora": ["lora", "{base}", "{chat}", "--rank", "4", "--max-len", "96", "--no-eval-before"],
    "reward": ["rlhf", "reward", "{base}", "{pref}", "--val-frac", "0", "--max-len", "128"],
    "dpo": ["rlhf", "dpo", "{base}", "{pref}", "--val-frac", "0", "--max-len", "128"],
    "ppo": ["rlhf", "ppo", "{sft}", "{ver}", "--reward", "verifiable", "--rollout-batch-size", "4", *RL],
    "grpo": ["rlhf", "grpo", "{sft}", "{ver}", "--group-size", "4", "--rollout-batch-size", "4", *RL],
    "distill-white": ["distill", "--teacher", "{base}", "--student-preset", "tiny", "--model", "dim=64",
                      "--model", "n_layers=2", "{chat}", "--mode", "white", "--seq-len", "96"],
    "distill-black": ["distill", "--teacher", "{base}", "--student-preset", "tiny", "--model", "dim=64",
                      "--model", "n_layers=2", "{chat}", "--mode", "black", "--max-new-tokens", "8",
                      "--seq-len", "96"],
    "reason": ["reason", "{base}", "{trace}", "--max-len", "128"],
    "reason-rl": ["reason", "{sft}", "{ver}", "--rl", "--group-size", "4", "--rollout-batch-size", "4",
                  "--max-new-tokens", "8", "--eval-samples", "2"],
}


def argv(stage: str, files: dict, out: Path, *extra) -> list[str]:
    return [a.format(**files) for a in STAGES[stage]] + ["-o", str(out), *LOOP, *map(str, extra)]


def run(args: list[str]) -> tuple[int, str]:
    """`tiaoyu ARGS` in this process: (exit code, what went to stderr is checked by the callers' capsys)."""
    from tiaoyu_cli.cli.main import main

    with one_thread():
        try:
            main(args)
        except SystemExit as e:
            return int(e.code or 0), ""
    return 0, ""


def losses(out: Path) -> dict[int, float]:
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return {l["step"]: l["loss"] for l in lines if not l.get("eval") and "loss" in l}


def weights(step_dir: Path) -> dict[str, torch.Tensor]:
    f = step_dir / "model.safetensors"
    if not f.exists():  # a LoRA run's step folders hold the adapter only
        f = step_dir / "adapter_model.safetensors"
    return load_file(str(f))


@pytest.fixture(scope="module")
def straight(files, tmp_path_factory) -> dict[str, Path]:
    """Every stage, 4 steps straight (module-scoped: the tests below read these runs)."""
    root = tmp_path_factory.mktemp("straight")
    outs = {}
    for stage in STAGES:
        out = root / stage
        code, _ = run(argv(stage, files, out, "--max-steps", "4"))
        assert code == 0, stage
        outs[stage] = out
    return outs


def golden_meta() -> dict:
    """What decides the golden losses besides the code: the start, library versions, the CPU kernels torch runs."""
    import hashlib

    import numpy
    import sentencepiece

    from tiaoyu_cli.device import cpu_has_fast_bf16

    start = GOLDEN_START / "model.safetensors"
    return {"start": hashlib.sha256(start.read_bytes()).hexdigest()[:12] if start.exists() else None,
            "torch": torch.__version__, "numpy": numpy.__version__, "sentencepiece": sentencepiece.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_bf16": cpu_has_fast_bf16()}


@pytest.mark.parametrize("stage", list(STAGES))
def test_golden_losses(stage, straight):
    got = [losses(straight[stage])[s] for s in (1, 2, 3)]
    if os.environ.get("TIAOYU_WRITE_GOLDEN"):
        table = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        table[stage] = got
        table["_meta"] = golden_meta()
        GOLDEN.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    table = json.loads(GOLDEN.read_text())
    want = table[stage]
    assert got == pytest.approx(want, abs=GOLDEN_ABS), (
        f"{stage}: got {got}, golden {want}; golden written with {table.get('_meta')}, this run {golden_meta()}")


# PPO's and GRPO's losses say little alone (GRPO's first is 0 by construction: a group's advantages sum to 0; the
# first steps are on-policy, ratio 1, no KL yet), so their goldens also hold what the update saw, from runs that
# make it move: a larger lr, two passes over each rollout, short rollouts (a second one by step 3, with KL)
RL_STATS = {  # stage: (steps, extra flags, statistics)
    "grpo": (4, ["--lr", "1e-3", "--rollout-batch-size", "2"],
             ("clipfrac", "kl", "kl_k3", "reward", "reward_std", "adv_abs", "flat_groups")),
    "ppo": (6, ["--lr", "1e-3", "--ppo-epochs", "2"],
            ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "vf_clipfrac", "kl", "adv_mean", "adv_std",
             "returns_mean", "value_mean")),
}


@pytest.fixture(scope="module")
def rl_runs(files, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rl-stats")
    outs = {}
    for stage, (steps, extra, _) in RL_STATS.items():
        code, _ = run(argv(stage, files, root / stage, "--max-steps", str(steps), *extra))
        assert code == 0, stage
        outs[stage] = root / stage
    return outs


@pytest.mark.parametrize("stage", list(RL_STATS))
def test_golden_rl_statistics(stage, rl_runs):
    lines = [json.loads(l) for l in (rl_runs[stage] / "metrics.jsonl").read_text().splitlines()]
    by_step = {l["step"]: l for l in lines if not l.get("eval") and "loss" in l}
    steps, _, keys = RL_STATS[stage]
    got = {str(s): {k: round(float(by_step[s][k]), 6) for k in keys} for s in range(1, steps + 1)}
    key = f"{stage}:stats"
    if os.environ.get("TIAOYU_WRITE_GOLDEN"):
        table = json.loads(GOLDEN.read_text())
        table[key] = got
        GOLDEN.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    table = json.loads(GOLDEN.read_text())
    want = table[key]
    for k in ("clipfrac", "kl"):  # the statistics this golden exists for moved
        assert any(abs(st[k]) > 1e-4 for st in want.values()), f"{stage}: {k} never moves in the golden run"
    for s in want:
        assert got[s] == pytest.approx(want[s], abs=GOLDEN_ABS), (
            f"{stage} step {s}: got {got[s]}, golden {want[s]}; golden written with {table.get('_meta')}")


@pytest.mark.parametrize("stage", list(STAGES))
def test_resume_equals_straight(stage, straight, files, tmp_path):
    out = tmp_path / "run"
    assert run(argv(stage, files, out, "--max-steps", "2"))[0] == 0
    assert run(argv(stage, files, out, "--max-steps", "4", "--resume"))[0] == 0
    a, b = losses(straight[stage]), losses(out)
    assert sorted(b) == [1, 2, 3, 4]
    for s in (1, 2, 3, 4):
        assert abs(a[s] - b[s]) < 1e-5, (stage, s, a[s], b[s])


@pytest.mark.parametrize("stage", list(STAGES))
def test_what_trains_changes(stage, straight):
    w2, w4 = weights(straight[stage] / "step-000002"), weights(straight[stage] / "step-000004")
    mats = [k for k, v in w2.items() if v.ndim == 2 and v.is_floating_point()]
    assert mats, stage
    if stage in ("lora",):  # only B of each pair learns from zero; A and B both move after step 2
        assert all(not torch.equal(w2[k], w4[k]) for k in mats), stage
        return
    changed = [k for k in mats if not torch.equal(w2[k], w4[k])]
    # every 2-D weight the stage trains moved (embedding rows of unseen tokens may not: count matrices)
    assert len(changed) == len(mats), (stage, sorted(set(mats) - set(changed)))


def test_frozen_parts_stay_bit_identical(files, tmp_path):
    out = tmp_path / "ffn"
    assert run(argv("sft", files, out, "--max-steps", "2", "--train", "ffn"))[0] == 0
    from tiaoyu_cli.checkpoint import resolve_checkpoint

    base = load_file(str(resolve_checkpoint(files["base"]) / "model.safetensors"))
    after = weights(out / "step-000002")
    ffn = [k for k in base if ".mlp." in k]
    rest = [k for k in base if ".mlp." not in k]
    assert ffn and rest
    assert all(not torch.equal(base[k], after[k]) for k in ffn)
    assert all(torch.equal(base[k], after[k]) for k in rest)


@pytest.mark.parametrize("stage", list(STAGES))
def test_full_disk_during_save_is_one_clear_line_then_resume(stage, files, tmp_path, monkeypatch, capsys):
    import safetensors.torch as st

    real = st.save_file
    calls = {"n": 0}

    def full_disk(tensors, path, *a, **k):
        if str(path).endswith("train_state.safetensors"):
            calls["n"] += 1
            if calls["n"] > 1:  # the step-2 save completes, the step-4 save hits a full disk
                raise OSError(28, "No space left on device", path)
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(st, "save_file", full_disk)
    out = tmp_path / "run"
    code, _ = run(argv(stage, files, out, "--max-steps", "4"))
    err = capsys.readouterr().err
    assert code == 2, (stage, err)
    assert "Traceback" not in err
    msg = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(msg) == 1 and "No space left on device" in msg[0] and str(out) in msg[0], err
    assert os.readlink(out / "latest") == "step-000002"
    assert not list(out.glob(".step-*")), "a half-written step folder was left behind"
    monkeypatch.setattr(st, "save_file", real)
    assert run(argv(stage, files, out, "--max-steps", "4", "--resume"))[0] == 0
    assert os.readlink(out / "latest") == "step-000004"


@pytest.mark.integration  # real processes per stage: `make test-all`
@pytest.mark.parametrize("stage", list(STAGES))
def test_sigterm_saves_a_loadable_checkpoint_and_exits_143(stage, files, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = argv(stage, files, out, "--max-steps", "100000")
    proc = subprocess.Popen([sys.executable, "-m", "tiaoyu_cli", *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        m = out / "metrics.jsonl"
        if m.exists() and any(not json.loads(l).get("eval") for l in m.read_text().splitlines() if l.strip()):
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err
    from tiaoyu_cli.checkpoint import load_model, resolve_checkpoint

    latest = resolve_checkpoint(out)
    if (latest / "model.safetensors").exists():
        load_model(latest)
    else:  # LoRA: the adapter folder
        assert (latest / "adapter_model.safetensors").exists()


def test_a_second_run_on_a_held_folder_is_refused_at_once(files, tmp_path, capsys):
    from tiaoyu_cli.train.engine.run import RunLock

    out = tmp_path / "run"
    lock = RunLock(out)
    lock.acquire()
    try:
        t0 = time.monotonic()
        code, _ = run(argv("sft", files, out, "--max-steps", "2"))
        err = capsys.readouterr().err
        assert code == 2 and "in use by another running tiaoyu process" in err, err
        assert time.monotonic() - t0 < 30
    finally:
        lock.release()
    assert run(argv("sft", files, out, "--max-steps", "2"))[0] == 0  # free again


def test_a_killed_holder_leaves_no_lock(tmp_path):
    out = tmp_path / "run"
    code = ("import sys, time; from pathlib import Path; from tiaoyu_cli.train.engine.run import RunLock; "
            "RunLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    from tiaoyu_cli.errors import TiaoyuError
    from tiaoyu_cli.train.engine.run import RunLock

    with pytest.raises(TiaoyuError, match="in use"):
        RunLock(out).acquire()
    proc.kill()
    proc.wait()
    lock = RunLock(out)
    lock.acquire()  # the OS released the dead holder's lock
    lock.release()


@pytest.mark.integration  # real processes per stage: `make test-all`
@pytest.mark.parametrize("stage", ["grpo", "dpo"])
def test_rl_stages_run_under_nproc(stage, files, tmp_path):
    """The RL stages take --nproc like every training command: each process samples its own rollouts (or
    pairs) and DDP averages the gradients; rank 0 alone writes."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "tiaoyu_cli", *argv(stage, files, out, "--max-steps", "2", "--nproc", "2")],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads((out / "latest" / "trainer.json").read_text())
    assert info["world_size"] == 2 and info["step"] == 2
    assert sorted(losses(out)) == [1, 2]
