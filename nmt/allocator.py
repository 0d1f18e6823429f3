"""The memory allocator training runs on: jemalloc where it is installed, else glibc's malloc.

A training step frees tensors of many sizes, and glibc's malloc keeps the freed pages between
live blocks: resident memory of the Bible run climbs to several GB of free heap within minutes
(`release_free_heap` in nmt/train_state.py returns it, but only when called). jemalloc reuses
and returns such memory by itself, and measured no slower. `nmt train` therefore restarts itself
with jemalloc preloaded when the library is there (Debian: libjemalloc2) and the process was not
started with it; NMT_ALLOCATOR=system keeps the C library's allocator.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

ENV = "NMT_ALLOCATOR"  # "jemalloc" (default where installed) or "system"
_SEARCH = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
           "/usr/local/lib")  # fmt: skip


def jemalloc_library() -> str | None:
    """The path of an installed libjemalloc, or None."""
    for folder in _SEARCH:
        for name in ("libjemalloc.so.2", "libjemalloc.so"):
            if (Path(folder) / name).is_file():
                return str(Path(folder) / name)
    found = ctypes.util.find_library("jemalloc")
    return found if found and Path(found).is_absolute() else None


def allocator_in_use() -> str:
    """ "jemalloc" if this process has it loaded, else "system"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "jemalloc" if "libjemalloc" in maps else "system"


def restart_with_jemalloc(argv: list[str]) -> None:
    """Replaces this process by `python -m nmt.cli ARGV` with jemalloc preloaded, where that
    applies (Linux, jemalloc installed, not loaded yet, NMT_ALLOCATOR not "system"); else
    returns. Call it before any work is done: the process is started again from scratch."""
    choice = os.environ.get(ENV, "jemalloc").strip().lower()
    if choice not in ("jemalloc", "system"):
        raise ValueError(f"{ENV} must be 'jemalloc' or 'system', got {choice!r}")
    if choice == "system" or not sys.platform.startswith("linux"):
        return
    library = jemalloc_library()
    if library is None or allocator_in_use() == "jemalloc":
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (library, env.get("LD_PRELOAD", "")) if p)
    env[ENV] = "jemalloc"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "nmt.cli", *argv], env)
