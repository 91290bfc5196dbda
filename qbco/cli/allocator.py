"""`qbco train` and `qbco eval` run under mimalloc on Linux.

A training step on a CPU allocates and frees hundreds of MiB of activations through malloc. glibc's malloc
returns large blocks to the kernel and maps them afresh the next time (a page fault for every 4 KiB touched),
and fragments what it keeps. mimalloc, told to keep freed pages (MIMALLOC_PURGE_DELAY=-1), reuses them. In the
W1 benchmark (docs/performance.md) qbco's peak RSS was 1,534 MiB under mimalloc against 2,326 MiB under glibc,
at the same speed (96.5 and 95.6 tokens/s).

The allocator is fixed when a process starts, so the command restarts itself once, before it loads anything,
with LD_PRELOAD naming libmimalloc from the cmeel-mimalloc wheel (a dependency on x86-64 Linux).
QBCO_ALLOCATOR=system keeps the C library's allocator; without the wheel, or off Linux, nothing changes.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path

ENV = "QBCO_ALLOCATOR"


def mimalloc_library() -> Path | None:
    """libmimalloc.so from the cmeel-mimalloc wheel, or None when it is not installed."""
    try:
        files = metadata.distribution("cmeel-mimalloc").files or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name.startswith("libmimalloc.so"):
            path = Path(file.locate())
            if path.is_file():
                return path
    return None


def restart_environment(environ: dict[str, str]) -> dict[str, str] | None:
    """The environment to restart this process under, or None when no restart is due (already restarted,
    QBCO_ALLOCATOR set by the user, not Linux, or no mimalloc)."""
    if environ.get(ENV) or not sys.platform.startswith("linux"):
        return None
    library = mimalloc_library()
    if library is None:
        return None
    env = dict(environ)
    env[ENV] = "mimalloc"
    env["LD_PRELOAD"] = ":".join(p for p in (str(library), environ.get("LD_PRELOAD", "")) if p)
    env.setdefault("MIMALLOC_PURGE_DELAY", "-1")  # freed pages stay for reuse; a user's own setting wins
    return env


def restart_under_mimalloc() -> None:
    """Replace this process by the same command under mimalloc (same pid, argv and stdio). Only the `qbco`
    command itself restarts (a Python program that calls the CLI in-process, such as a test runner, is never
    replaced), and only where restart_environment says so."""
    env = restart_environment(dict(os.environ))
    if env is None or Path(sys.argv[0]).name != "qbco":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def active() -> str:
    """'mimalloc' when this process has libmimalloc mapped, else 'system'."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "mimalloc" if "libmimalloc" in maps else "system"
