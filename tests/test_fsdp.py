"""FSDP2 (--fsdp) on CPU with gloo: 2 sharded processes give DDP's losses (1e-5, fp32) over 20 steps, the
checkpoint is the same plain folder (transformers-shaped model.safetensors), and --resume continues
exactly when the number of processes changes, 2 → 1 → 2."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from pretrain_data import assets, run_cli, train_losses

pytestmark = pytest.mark.integration  # a long integration test: `make test-all` runs it, `make test` does not

ARGS = ["--preset", "tiny", "--model", "dim=64", "--model", "n_layers=2", "--model", "ffn_dim=128", "--seq-len", "64",
        "--dtype", "fp32", "--log-every", "1", "--warmup-steps", "0", "--schedule", "constant", "--eval-batches", "2",
        "--eval-every", "0", "--save-every", "0", "--keep", "0", "--device", "cpu", "--optim", "adamw"]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "ddp"
    r = run_cli("pretrain", assets() / "tokens", "-o", out, *ARGS, "--batch-size", "4", "--nproc", "2",
                "--max-steps", "20")
    assert r.returncode == 0, r.stderr
    return out


def test_fsdp_equals_ddp_and_writes_the_same_checkpoint(ddp, tmp_path):
    out = tmp_path / "fsdp"
    r = run_cli("pretrain", assets() / "tokens", "-o", out, *ARGS, "--batch-size", "4", "--nproc", "2", "--fsdp",
                "--max-steps", "20")
    assert r.returncode == 0, r.stderr
    a, b = train_losses(ddp), train_losses(out)
    assert sorted(b) == list(range(1, 21))
    for s in a:
        assert abs(a[s] - b[s]) < 1e-5, (s, a[s], b[s])
    wa = load_file(str(ddp / "latest" / "model.safetensors"))
    wb = load_file(str(out / "latest" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].shape == wb[k].shape and (wa[k] - wb[k]).abs().max() < 1e-4, k


def test_fsdp_resume_across_process_counts(ddp, tmp_path):
    out = tmp_path / "run"
    steps = [(8, ["--nproc", "2", "--fsdp", "--batch-size", "4"]),
             (14, ["--batch-size", "8"]),  # one process, the same global batch
             (20, ["--nproc", "2", "--fsdp", "--batch-size", "4"])]
    for i, (n, extra) in enumerate(steps):
        r = run_cli("pretrain", assets() / "tokens", "-o", out, *ARGS, *extra, "--max-steps", str(n),
                    *(["--resume"] if i else []))
        assert r.returncode == 0, r.stderr
    a, b = train_losses(ddp), train_losses(out)
    assert sorted(b) == list(range(1, 21))
    for s in a:
        assert abs(a[s] - b[s]) < 2e-5, (s, a[s], b[s])
