"""benchmarks/gpu_check.sh on CPU: argument checks and the one JSON file it writes. Without CUDA every
step is recorded as skipped with the reason; --dry-run records each step's command and runs nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # a long integration test: `make test-all` runs it, `make test` does not

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["cuda_tests", "data", "pretrain_bf16", "torchrun_nccl", "fsdp", "decode", "open"]


def run(*args, cwd=None, **env_extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update({"PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **env_extra})
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=120)


def test_no_cuda_records_every_step_skipped(tmp_path):
    out = tmp_path / "gc"
    r = run(out)
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "gpu_check.json").read_text())
    assert list(doc["steps"]) == STEPS
    assert doc["ok"] is True and doc["failed"] == [] and doc["dry_run"] is False
    assert doc["host"]["gpus"] == 0
    for name, s in doc["steps"].items():
        assert s["status"] == "skipped" and s["reason"] == "no CUDA" and s["rc"] is None, name
        assert s["command"], name
    assert not (out / "work").exists()  # nothing ran
    assert json.loads(r.stdout.strip().splitlines()[-1])["steps"] == {n: "skipped" for n in STEPS}


def test_dry_run_lists_commands(tmp_path):
    r = run("--dry-run", tmp_path / "d")
    assert r.returncode == 0, r.stderr
    steps = json.loads((tmp_path / "d" / "gpu_check.json").read_text())["steps"]
    assert [s["status"] for s in steps.values()] == ["dry-run"] * len(STEPS)
    assert "-m cuda" in steps["cuda_tests"]["command"]
    assert "torch.distributed.run" in steps["torchrun_nccl"]["command"] and "--device cuda" in steps["torchrun_nccl"]["command"]
    assert "--fsdp" in steps["fsdp"]["command"]
    assert "bench_pretrain.py" in steps["pretrain_bf16"]["command"] and "--dtype bf16" in steps["pretrain_bf16"]["command"]
    assert "bench_decode.py" in steps["decode"]["command"]
    assert "bench_open.py" in steps["open"]["command"] and "--device cuda" in steps["open"]["command"]


def test_out_env_is_the_default_folder(tmp_path):
    r = run(OUT=str(tmp_path / "from-env"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "from-env" / "gpu_check.json").exists()


def test_bad_arguments_exit_2_and_write_nothing(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = {("--bogus",): "unknown option '--bogus'",
             (tmp_path / "a", tmp_path / "b"): "one output folder at most",
             (a_file,): "is not a folder"}
    for args, msg in cases.items():
        r = run(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert msg in r.stderr, (args, r.stderr)
    assert not (tmp_path / "a").exists()
    r = run(tmp_path / "c", PYTHON="/nonexistent/python")
    assert r.returncode == 2 and "not found" in r.stderr
    assert not (tmp_path / "c").exists()
