"""DDP on CPU (gloo): 2 processes at micro-batch 4 give the same losses as 1 process at batch 8
(the same global batch), launched with torchrun and with the `--nproc` convenience; only rank 0
writes files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pretrain_data import ROOT, assets, env, run_cli, train_losses

pytestmark = pytest.mark.integration  # a long integration test: `make test-all` runs it, `make test` does not

ARGS = ["--preset", "tiny", "--model", "dim=64", "--model", "n_layers=2", "--model", "ffn_dim=128", "--seq-len", "64",
        "--dtype", "fp32", "--max-steps", "8", "--log-every", "1", "--warmup-steps", "2", "--eval-batches", "2",
        "--eval-every", "4", "--save-every", "4", "--keep", "0"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "one"
    r = run_cli("pretrain", assets() / "tokens", "-o", out, *ARGS, "--batch-size", "8")
    assert r.returncode == 0, r.stderr
    return out


def check_same(single, out, stderr):
    one, two = train_losses(single), train_losses(out)
    assert sorted(two) == list(range(1, 9))
    for step in one:
        assert abs(one[step] - two[step]) < 2e-5, (step, one[step], two[step])
    # rank 0 alone wrote: each step logged once, one header, one final line
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if not l.get("eval")] == list(range(1, 9))
    assert len([l for l in lines if l.get("eval")]) == 2
    ev1 = [l["val_loss"] for l in (json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()) if l.get("eval")]
    ev2 = [l["val_loss"] for l in lines if l.get("eval")]
    assert ev1 == pytest.approx(ev2, abs=2e-5)
    assert stderr.count("pretrain: ") == 1 and stderr.count("done: step 8") == 1
    info = json.loads((out / "latest" / "trainer.json").read_text())
    assert info["world_size"] == 2 and info["step"] == 8
    assert sorted(p.name for p in out.iterdir()) == ["latest", "metrics.jsonl", "step-000004", "step-000008"]


def test_torchrun_two_processes_equal_one(single, tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tiaoyu_cli", "pretrain", str(assets() / "tokens"), "-o", str(out), *ARGS, "--batch-size", "4"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "2 process(es)" in r.stderr
    check_same(single, out, r.stderr)


def test_nproc_convenience_equals_one(single, tmp_path):
    out = tmp_path / "two"
    r = run_cli("pretrain", assets() / "tokens", "-o", out, *ARGS, "--batch-size", "4", "--nproc", "2")
    assert r.returncode == 0, r.stderr
    check_same(single, out, r.stderr)


def test_two_nodes_of_one_process_equal_one(single, tmp_path):
    """--nnodes 2: two launchers (here both on localhost, as two machines would be) form one job of
    global ranks 0 and 1; data is sharded by global rank and only global rank 0 writes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "nodes"
    base = [sys.executable, "-m", "tiaoyu_cli", "pretrain", str(assets() / "tokens"), "-o", str(out), *ARGS,
            "--batch-size", "4", "--nnodes", "2", "--nproc", "1", "--master-addr", "127.0.0.1",
            "--master-port", str(port)]
    nodes = [subprocess.Popen(base + ["--node-rank", str(r)], env=env(), cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    errs = [p.communicate(timeout=300)[1] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], errs
    assert "pretrain: " not in errs[1] and "done:" not in errs[1]  # node 1 (global rank 1) prints nothing of its own
    check_same(single, out, errs[0])


def test_nproc_sigterm_saves_once_and_resumes(tmp_path):
    """SIGTERM to the launcher reaches both processes once: they agree on the step, rank 0 saves and
    reports, everybody exits 143; --resume (again with --nproc 2) carries on from that step."""
    import signal
    import time

    from pretrain_data import tiaoyu_cmd

    out = tmp_path / "run"
    args = [a if a != "8" else "100000" for a in ARGS]  # --max-steps: longer than we wait
    proc = subprocess.Popen(tiaoyu_cmd("pretrain", assets() / "tokens", "-o", out, *args, "--batch-size", "4",
                                       "--nproc", "2"), env=env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.count("error:") == 1 and "interrupted at step" in err and "Traceback" not in err, err
    import re

    step = int(re.search(r"interrupted at step (\d+)", err).group(1))
    assert (out / "latest").resolve().name == f"step-{step:06d}"  # (--save-every 4 may have saved earlier ones)
    resume_args = [a if a != "100000" else str(step + 3) for a in args]
    r = run_cli("pretrain", assets() / "tokens", "-o", out, *resume_args, "--batch-size", "4", "--nproc", "2", "--resume")
    assert r.returncode == 0, r.stderr
    assert sorted(train_losses(out)) == list(range(1, step + 4))
