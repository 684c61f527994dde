"""The numpy step's one-row loop compiled from C (decode_kernel.c): built on first use by the system C
compiler, cached per machine, loaded with ctypes (`c_kernel`). Without it `NumpyStep` runs the same loop
in numpy; tests/test_numpy_step.py compares both with `Transformer.forward`.

The compiled step is a shared library loaded into this process, so its cache is guarded: the folder
(~/.cache/tiaoyu, or $XDG_CACHE_HOME/tiaoyu) is created 0700 and must be this user's and writable by
no one else; a cached library that is not this user's regular file, or is writable by group or others,
is deleted and rebuilt; a build goes to a unique temp file in that folder and is renamed into place;
the library is opened once, checked on the open file, and loaded through that descriptor. The cache
key holds the source, the flags, the compiler's path and version and the CPU. When the compiled step
is unavailable (other than by TIAOYU_C_KERNEL=0) one warning on stderr says why
(tests/test_hardening_tools.py plants libraries and unsafe folders).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

_C: dict = {"fn": None, "tried": False}
C_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros",
           "-shared", "-fPIC"]


class KernelUnavailable(Exception):
    """Why the compiled step cannot be used (the message ends up in the one warning)."""


def c_kernel():
    """The one-row step compiled from decode_kernel.c (built once per machine into ~/.cache/tiaoyu by the
    system C compiler, ~1 s), or None — no compiler, a failed build, an unsafe cache, or
    TIAOYU_C_KERNEL=0 — and then the numpy code runs. Same function (tests compare both with the model's
    forward pass). Unavailable for a reason other than TIAOYU_C_KERNEL=0: one warning on stderr."""
    if not _C["tried"]:
        _C["tried"] = True
        if os.environ.get("TIAOYU_C_KERNEL", "1") != "0":
            why = None
            try:
                _C["fn"] = _build_kernel()
            except KernelUnavailable as e:
                why = str(e)
            except subprocess.CalledProcessError as e:
                err = (e.stderr or b"").decode("utf-8", "replace").strip().splitlines()
                why = f"the build failed ({err[0] if err else f'exit status {e.returncode}'})"
            except (OSError, subprocess.SubprocessError, AttributeError, RuntimeError) as e:
                why = f"{type(e).__name__}: {e}"
            if why is not None:
                _C["fn"] = None
                from tiaoyu_cli.console import warn

                warn(f"the compiled decode step is unavailable: {why}; decoding uses the numpy step "
                     "(TIAOYU_C_KERNEL=0 silences this)")
    return _C["fn"]


def kernel_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tiaoyu"


def _compiler_version(cc: str) -> str:
    """The first line of `cc --version` (part of the cache key: a new compiler builds anew); '' if it says nothing."""
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = out.stdout.decode("utf-8", "replace").strip().splitlines() if out.returncode == 0 else []
    return lines[0] if lines else ""


def _private_folder(folder: Path) -> None:
    """Create `folder` 0700; refuse one that is a link, not this user's, or writable by group or others."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode):
        raise KernelUnavailable(f"the cache {folder} is not a folder (a link?)")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise KernelUnavailable(f"the cache folder {folder} belongs to another user")
    if st.st_mode & 0o022:
        raise KernelUnavailable(f"the cache folder {folder} is writable by group or others (chmod 700 it)")


def _trusted(fd: int) -> bool:
    """The open file is this user's regular file, writable by no one else."""
    st = os.fstat(fd)
    return (stat.S_ISREG(st.st_mode) and not st.st_mode & 0o022
            and (not hasattr(os, "getuid") or st.st_uid == os.getuid()))


def _open_checked(so: Path) -> int | None:
    """A descriptor of the cached library when it is there and trusted; an untrusted one is deleted (None)."""
    try:
        fd = os.open(so, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError:  # a symbolic link (O_NOFOLLOW), or unreadable
        fd = -1
    if fd >= 0 and _trusted(fd):
        return fd
    if fd >= 0:
        os.close(fd)
    try:
        os.unlink(so)  # planted or tampered with: never loaded, rebuilt
    except FileNotFoundError:
        pass
    return None


def _build_kernel():
    src = Path(__file__).with_name("decode_kernel.c")
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise KernelUnavailable("no C compiler found (cc, gcc or clang; or set CC)")
    if not src.exists():
        raise KernelUnavailable(f"{src} is missing")
    cpu = ""  # -march=native: a build is only reused on the same kind of CPU
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line for line in f if line.startswith(("flags", "Features"))), "")
    key = src.read_bytes() + "\n".join([" ".join(C_FLAGS), cc, _compiler_version(cc), platform.machine(),
                                         platform.processor(), cpu]).encode()
    folder = kernel_folder()
    _private_folder(folder)
    so = folder / f"decode_kernel-{hashlib.sha256(key).hexdigest()[:16]}.so"
    fd = _open_checked(so)
    if fd is None:
        tmp_fd, tmp = tempfile.mkstemp(prefix=".decode_kernel-", suffix=".so", dir=folder)
        os.close(tmp_fd)
        try:
            subprocess.run([cc, *C_FLAGS, str(src), "-o", tmp, "-lm"], check=True, capture_output=True, timeout=120)
            os.chmod(tmp, 0o700)  # the linker may have made a new file with the umask's mode
            os.replace(tmp, so)  # whole or not at all: another process may be building the same file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        fd = _open_checked(so)
        if fd is None:
            raise KernelUnavailable(f"{so} changed while it was being built")
    try:
        # load the very file checked: through its descriptor where /proc has one, else its path (the folder
        # is this user's alone, so the name still points at it)
        via = f"/proc/self/fd/{fd}" if os.path.exists(f"/proc/self/fd/{fd}") else str(so)
        fn = ctypes.CDLL(via).tiaoyu_step
    finally:
        os.close(fd)
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p]
    return fn
