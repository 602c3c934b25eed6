"""multitag's own C++ CPU kernels (multitag/kernels/): built once per machine, loaded on first use.

They are for the memory-bound ops of a bf16 channels_last training step that neither ATen nor inductor runs
near the memory's pace on this project's CPUs (benchmarks/RESULTS.md, run S): BatchNorm + residual +
ReLU(6) (fused_batchnorm.py) and the ResNet stem's max-pool (max_pool.py). Each is a layer tweak
(layer_tweaks.py), measured at start-up and kept only where the step is faster.

Built with ``torch.utils.cpp_extension`` (the ``ninja`` wheel, the machine's C++ compiler, ``-march=native``;
~30 s, once) into ``<cache root>/kernels/``, keyed by the sources, torch's version, the flags and the CPU —
a binary built for one CPU is never loaded on another. Without a compiler (or when the build fails) the
tweaks are unavailable, and multitag says so once on stderr (where the build notice goes too, so that
``--json`` output stays JSON).
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
from functools import lru_cache
from pathlib import Path

import torch

from multitag.config import cache_root

KERNELS = Path(__file__).with_name("kernels")
SOURCES = [KERNELS / name for name in ("module.cpp", "batchnorm_act.cpp", "max_pool.cpp")]
_said_unavailable = False


def _cflags() -> list[str]:
    flags = ["-O3", "-march=native", "-fopenmp"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        # gcc keeps to 256-bit vectors on AVX-512 CPUs unless told; 512 made the BatchNorm kernel 1.1-1.3x faster
        flags.append("-mprefer-vector-width=512")
    return flags


def _build_key() -> str:
    from multitag.runtime import machine_fingerprint      # runtime imports the tweaks, which import this
    text = "\n".join([*(p.read_text() for p in [*SOURCES, KERNELS / "kernels.h"]), torch.__version__,
                      " ".join(_cflags()), machine_fingerprint(torch.device("cpu"))])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@lru_cache(maxsize=None)
def _load() -> tuple[object | None, str]:
    """(the compiled extension, "") or (None, why it could not be built)."""
    try:
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)   # "no CUDA runtime" on CPU torch
        from torch.utils import cpp_extension
        try:                           # the `ninja` wheel's binary, for a venv that is not activated
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
        key = _build_key()
        build_dir = cache_root() / "kernels" / f"cpu_kernels-{key}"
        build_dir.mkdir(parents=True, exist_ok=True)
        if not any(build_dir.glob("*.so")):
            print("multitag: compiling its CPU kernels for this machine (once, ~30 s)", file=sys.stderr, flush=True)
        module = cpp_extension.load(f"multitag_cpu_kernels_{key}", [str(p) for p in SOURCES],
                                    extra_cflags=_cflags(), extra_include_paths=[str(KERNELS)],
                                    build_directory=str(build_dir), verbose=False)
        return module, ""
    except Exception as e:      # no compiler, no ninja, a failed build: the tweaks are then unavailable
        lines = str(e).strip().splitlines()
        return None, f"{type(e).__name__}: {lines[0] if lines else ''}"


def kernels():
    """The compiled extension, or None where it could not be built (unavailable_reason says why)."""
    return _load()[0]


def takes(t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    """Whether the kernels can take ``t`` as a map (what kernels.h's check_map demands): a 4-d channels_last
    CPU tensor of one of ``dtypes`` — and they are built, and no torch.compile trace is being recorded
    (inductor then sees the layers' own ops)."""
    return (t.device.type == "cpu" and t.dtype in dtypes and t.dim() == 4
            and t.is_contiguous(memory_format=torch.channels_last) and not torch.compiler.is_compiling()
            and kernels() is not None)


def unavailable_reason() -> str:
    """Why the kernels cannot be used here ("" when they can); builds them on first call, says once if not."""
    global _said_unavailable
    module, reason = _load()
    if module is None and not _said_unavailable:
        _said_unavailable = True
        print(f"multitag: its CPU kernels are unavailable ({reason}); BatchNorm and max-pool run on ATen's",
              file=sys.stderr)
    return reason
