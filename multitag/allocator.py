"""glibc's malloc told to keep freed memory for reuse: a process-wide CPU lever, set by the CLI.

PyTorch's CPU tensors come from malloc. glibc serves every block above its mmap threshold (at most
32 MiB) with a fresh mmap and unmaps it on free, so each training step's large activations (EfficientNet-Lite0
at batch 32, 224 px: 32x96x112x112 fp32 = 154 MB) are new pages that the kernel faults in and zeroes
again: profiled, a ``fill_`` of a 64 MB padded activation took 46 ms (1.4 GB/s). With mmap off
(``M_MMAP_MAX`` 0) and the heap never trimmed (``M_TRIM_THRESHOLD`` at its maximum) the same blocks are
reused from the heap. Training step img/s, kept vs glibc's defaults, each in its own process
(benchmarks/bench_allocator.py; benchmarks/RESULTS.md): EfficientNet-Lite0 @224 1.41x, airbench at
batch 1024 1.25x, ResNet-18 layout 1.13x @128 and 1.23x @224 (its fp32 NCHW naive loop 1.08x),
Inception-ResNet-v1 small 1.05x; peak RSS 0-14 % higher (freed blocks stay in the heap).
This is what jemalloc or tcmalloc under LD_PRELOAD give (Intel's launcher for PyTorch does that),
without a library to install.

It is left alone when the user chose: ``MULTITAG_MALLOC=default`` (glibc as it is), any ``MALLOC_*``
variable or ``glibc.malloc`` tunable set, or another allocator preloaded.
"""
from __future__ import annotations

import ctypes
import os
import sys

from multitag.errors import UserError

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4            # glibc malloc.h
_INT_MAX = 2**31 - 1                             # mallopt takes an int
CHOICES = ("kept", "default")                    # $MULTITAG_MALLOC
_PRELOADED = ("jemalloc", "tcmalloc", "mimalloc")

state = "glibc defaults"                         # what keep_freed_memory() did, for logs and the bench


def _user_choice() -> str | None:
    """Why the allocator is the user's business here, or None."""
    choice = os.environ.get("MULTITAG_MALLOC", "kept")
    if choice not in CHOICES:
        raise UserError(f"MULTITAG_MALLOC={choice!r} is not a choice; use kept (the default: freed memory "
                        f"kept for reuse) or default (glibc's malloc as it is).")
    if choice == "default":
        return "MULTITAG_MALLOC=default"
    for name in sorted(os.environ):
        if name.startswith("MALLOC_"):           # glibc's own: MALLOC_MMAP_MAX_, MALLOC_ARENA_MAX, ...
            return f"{name} set by the user"
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES set by the user"
    preload = os.environ.get("LD_PRELOAD", "")
    for lib in _PRELOADED:
        if lib in preload:
            return f"{lib} preloaded"
    return None


def without_user_choice(environ=os.environ) -> dict[str, str]:
    """``environ`` without what makes the allocator the user's business (MULTITAG_MALLOC, glibc's MALLOC_*
    variables): the environment for a child process that should get the CLI's own setting, or — with
    MULTITAG_MALLOC=default added — glibc's. (GLIBC_TUNABLES and LD_PRELOAD are left: they carry more.)"""
    return {k: v for k, v in environ.items() if not (k.startswith("MALLOC_") or k == "MULTITAG_MALLOC")}


def keep_freed_memory() -> str:
    """Switch glibc's malloc to keep freed blocks (see the module text); returns what was done."""
    global state
    reason = _user_choice()
    if reason:
        state = f"left as is ({reason})"
        return state
    if not sys.platform.startswith("linux"):
        state = "system default (not glibc)"
        return state
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, _INT_MAX) == 1
    except (OSError, AttributeError):            # musl and other C libraries without mallopt
        ok = False
    state = "glibc, freed memory kept (no mmap, no trim)" if ok else "system default (mallopt unavailable)"
    return state
