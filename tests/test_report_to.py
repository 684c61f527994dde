"""`--report-to tensorboard,wandb` on the training commands: the loggers receive exactly the lines of
metrics.jsonl (read back from TensorBoard's event files and W&B's offline run file after tiny runs), a
resumed run's event files read back as its metrics.jsonl does, and a missing package or an unknown
logger is one clear error before anything is trained."""

from __future__ import annotations

import glob
import json
import math
import struct
import sys
from pathlib import Path

import pytest
import torch

from tiaoyu_cli import checkpoint as ckpt_io
from tiaoyu_cli.cli.main import main
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.train.engine.config import TrainConfig
from tiaoyu_cli.train.engine.report_to import parse_report_to

TINY = ["--preset", "tiny", "--model", "dim=64", "--model", "n_layers=2", "--model", "ffn_dim=128",
        "--seq-len", "64", "--batch-size", "4", "--warmup-steps", "1", "--eval-batches", "2", "--log-every", "1",
        "--dtype", "fp32", "--device", "cpu"]


def pretrain(tokens_dir, tok_dir, out: Path, *extra: str) -> int:
    with pytest.raises(SystemExit) as e:
        main(["pretrain", str(tokens_dir), "--tokenizer", str(tok_dir), "-o", str(out), *TINY, *extra])
    return e.value.code or 0


def expected(run: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as {tag: {step: value}}: every numeric key, train/ or eval/ by the line's kind."""
    want: dict[str, dict[int, float]] = {}
    for raw in (run / "metrics.jsonl").read_text().splitlines():
        line = json.loads(raw)
        prefix = "eval/" if line.get("eval") else "train/"
        for k, v in line.items():
            if k not in ("step", "eval") and isinstance(v, (int, float)) and not isinstance(v, bool):
                want.setdefault(prefix + k, {})[line["step"]] = float(v)
    return want


def read_tensorboard(run: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    got: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), (tag, steps)  # each step once (a resume repeats none)
        got[tag] = {e.step: e.value for e in events}
    return got


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))
    for tag, series in want.items():
        assert set(got[tag]) == set(series), (tag, sorted(got[tag]), sorted(series))
        for step, v in series.items():  # event files hold float32
            assert math.isclose(got[tag][step], v, rel_tol=1e-6, abs_tol=1e-6), (tag, step, got[tag][step], v)


def test_tensorboard_event_files_equal_metrics_jsonl_and_resume_continues_them(tokens_dir, tok_dir, tmp_path):
    run = tmp_path / "run"
    assert pretrain(tokens_dir, tok_dir, run, "--max-steps", "3", "--eval-every", "2", "--save-every", "2",
                    "--keep", "0", "--report-to", "tensorboard") == 0
    want = expected(run)
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/val_loss"} <= set(want)
    assert sorted(want["train/loss"]) == [1, 2, 3] and sorted(want["eval/val_loss"]) == [2, 3]
    assert_same(read_tensorboard(run), want)

    # the process "died" after logging step 3 but before saving it: resume from step 2 rewrites steps 3…
    import shutil

    shutil.rmtree(run / "step-000003")
    ckpt_io.set_latest(run, "step-000002")
    assert pretrain(tokens_dir, tok_dir, run, "--max-steps", "4", "--eval-every", "2", "--save-every", "2",
                    "--keep", "0", "--report-to", "tensorboard", "--resume") == 0
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 2  # a new event file beside the first
    want = expected(run)
    assert sorted(want["train/loss"]) == [1, 2, 3, 4] and sorted(want["eval/val_loss"]) == [2, 4]
    assert_same(read_tensorboard(run), want)  # the first process's step-3 lines are purged, as in metrics.jsonl


def wandb_records(run_file: str) -> list:
    """The records of an offline W&B run file (a LevelDB-style log of protobuf Records after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and n == 0:
            break
        buf += data[pos:pos + n]
        pos += n
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def test_wandb_offline_run_holds_the_metrics_and_config(tokens_dir, tok_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb"), "WANDB_PROJECT": "tiaoyu-test",
                 "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true"}.items():
        monkeypatch.setenv(k, v)
    (tmp_path / "wb").mkdir()
    run = tmp_path / "tiny-run"
    assert pretrain(tokens_dir, tok_dir, run, "--max-steps", "3", "--eval-every", "2", "--report-to", "wandb") == 0
    files = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    recs = wandb_records(files[0])
    head = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
    assert head.project == "tiaoyu-test" and head.display_name == "tiny-run"
    assert head.run_id == (run / "wandb-run-id").read_text().strip()
    config = {}
    for r in recs:
        items = r.run.config.update if r.WhichOneof("record_type") == "run" else (
            r.config.update if r.WhichOneof("record_type") == "config" else [])
        config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    cfg = {k: (v["value"] if isinstance(v, dict) and "value" in v else v) for k, v in config.items()}
    assert cfg["stage"] == "pretrain" and cfg["train_config"]["max_steps"] == 3
    assert cfg["train_config"]["report_to"] == "wandb" and cfg["stage_config"]["seq_len"] == 64
    got: dict[str, dict[int, float]] = {}
    for r in recs:
        if r.WhichOneof("record_type") != "history":
            continue
        row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for k, v in row.items():
            if not k.startswith("_") and k != "train/global_step":
                got.setdefault(k, {})[row["train/global_step"]] = float(v)
    assert_same(got, expected(run))

    # --resume continues the same W&B run (its id kept in the run folder)
    assert pretrain(tokens_dir, tok_dir, run, "--max-steps", "4", "--report-to", "wandb", "--resume") == 0
    files = sorted(glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(files) == 2 and {Path(f).name for f in files} == {f"run-{head.run_id}.wandb"}, files


def test_missing_package_is_a_clear_error_before_training(tokens_dir, tok_dir, tmp_path, monkeypatch, capsys):
    for pkg in ("tensorboard", "wandb"):
        monkeypatch.setitem(sys.modules, pkg, None)  # `import pkg` raises ImportError
        with pytest.raises(TiaoyuError, match=rf"--report-to {pkg} needs the {pkg} package: "
                                              rf"pip install 'tiaoyu\[{pkg}\]'"):
            TrainConfig(max_steps=1, report_to=f"{pkg}").validate()
        run = tmp_path / pkg
        assert pretrain(tokens_dir, tok_dir, run, "--max-steps", "3", "--report-to", pkg) != 0
        err = capsys.readouterr().err
        assert f"pip install 'tiaoyu[{pkg}]'" in err and "Traceback" not in err
        assert not run.exists()  # refused at the start: nothing was loaded, trained or written
    assert parse_report_to("all") == []  # neither installed: all = none


def test_report_to_names():
    assert parse_report_to("none") == [] and parse_report_to("") == []
    assert parse_report_to(" TensorBoard , wandb,tensorboard") == ["tensorboard", "wandb"]
    with pytest.raises(TiaoyuError, match="unknown 'mlflow'"):
        parse_report_to("tensorboard,mlflow")
    with pytest.raises(TiaoyuError, match="unknown 'none'"):
        parse_report_to("none,wandb")


@pytest.mark.parametrize("cmd", [["pretrain"], ["sft"], ["lora", "train"], ["rlhf", "reward"], ["rlhf", "dpo"],
                                 ["rlhf", "ppo"], ["rlhf", "grpo"], ["distill"], ["reason"]])
def test_every_training_command_has_the_flag(cmd, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code in (0, None)
    assert "--report-to" in capsys.readouterr().out
