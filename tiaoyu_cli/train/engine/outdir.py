"""The -o run folder: is there a run already, can we write there; the final adapter at its top."""

from __future__ import annotations

import os
from pathlib import Path

from tiaoyu_cli import checkpoint as ckpt_io
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.io import atomic_write_bytes
from tiaoyu_cli.model import lora as L


def run_in_folder(out: Path) -> list[str]:
    """What in `out` shows that a run already lives there (empty list: nothing)."""
    if not out.is_dir():
        return []
    found = [p.name for p in ckpt_io.step_dirs(out)]
    if (out / "latest").is_symlink() or (out / "latest").exists():
        found.append("latest")
    if (out / "metrics.jsonl").exists():
        found.append("metrics.jsonl")
    return found


def check_output(out: str | os.PathLike, resume: bool) -> None:
    """Refuse -o folders that would mix runs: a run already there without --resume, or --resume with
    nothing to resume. Read-only (safe on every DDP rank, and before launching processes)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TiaoyuError(f"-o {out}: is a file, not a run folder")
    near = out
    while not near.exists() and near != near.parent:
        near = near.parent
    if not near.is_dir():
        raise TiaoyuError(f"-o {out}: cannot write there ({near} is a file)")
    if not os.access(near, os.W_OK | os.X_OK):
        raise TiaoyuError(f"-o {out}: cannot write there (permission denied on {near})")
    if resume:
        if not out.exists():
            raise TiaoyuError(f"--resume: {out} does not exist, nothing to resume (start without --resume)")
        if not ckpt_io.step_dirs(out) and not ckpt_io.has_weights(out / "latest"):
            raise TiaoyuError(f"--resume: {out} holds no checkpoint to resume from (start without --resume)")
        return
    found = run_in_folder(out)
    if found:
        shown = ", ".join(found[:3]) + (", …" if len(found) > 3 else "")
        raise TiaoyuError(f"-o {out} already holds a run ({shown}): pass --resume to continue it, "
                          f"or choose another -o")


def check_writable(out: str | os.PathLike) -> None:
    """Create `out` and write a probe file there, or raise a clear error."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise TiaoyuError(f"-o {out}: cannot write there ({e.strerror or e})") from None


def publish_final_adapter(run: Path, log=print) -> None:
    """Copy the newest step's adapter files to the top of the run folder (atomically, file by file)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    src = L.resolve_adapter_dir(run / "latest") if (run / "latest").exists() else L.resolve_adapter_dir(run)
    for name in (L.ADAPTER_WEIGHTS, L.BASE_INFO, L.ADAPTER_CONFIG):  # config last: it marks the folder as an adapter
        if (src / name).exists():
            atomic_write_bytes(run / name, (src / name).read_bytes())
    log(f"adapter: {run}/{L.ADAPTER_WEIGHTS} + {L.ADAPTER_CONFIG} (PEFT layout)")
