"""How torch's idle OpenMP threads wait, chosen per command before torch loads: a process-wide CPU lever.

libgomp (the OpenMP of torch's CPU wheels) reads ``OMP_WAIT_POLICY`` once, when torch loads. By default
a thread that has finished its share of a parallel region spins for a few milliseconds before it
sleeps, so the next op's region starts without a futex wake-up; ``PASSIVE`` puts it to sleep at once.
A training step is hundreds of back-to-back regions, and on an idle 2-core machine spinning made it
1.05-1.33x faster than PASSIVE (benchmarks/RESULTS.md, run O: ResNet-18 layout 1.24x @128 and 1.09x
@224, Inception-ResNet-v1 small 1.33x, EfficientNet-Lite0 1.10x, airbench 1.05x). With a second
2-thread torch training job on the same cores, spinning was faster too, for both jobs; and under load the
runtime's measured thread count picks 1 thread, where no helper thread waits at all. So the commands that
train or score with torch's own kernels get libgomp's default.

PASSIVE is kept for the commands that answer requests or run ONNX Runtime beside torch (``PASSIVE_COMMANDS``):
there torch's spinning threads take the cores from ORT's and, on a loaded machine, made eager batch-1
latency 100x its best (benchmarks/bench_inference.py). Left alone when the user set ``OMP_WAIT_POLICY`` or
``GOMP_SPINCOUNT``, and when torch is loaded already (libgomp has read its settings; nothing to choose).
"""
from __future__ import annotations

import os
import sys

PASSIVE_COMMANDS = frozenset({"predict", "serve", "app", "export"})
_USER_KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

# What choose_wait_policy() did (tests read it; the bench records the variable libgomp read instead,
# which also says the right thing when multitag is used as a library).
state = "not chosen (multitag's CLI chooses it)"


def _torch_loaded() -> bool:
    return "torch" in sys.modules


def choose_wait_policy(command: str) -> str:
    """Set OMP_WAIT_POLICY for ``command`` (see the module text) unless the user chose; returns what was done."""
    global state
    if any(k in os.environ for k in _USER_KNOBS):
        state = f"{wait_setting()} (set by the user)"
    elif _torch_loaded():
        state = "as libgomp read it when torch loaded (before the command ran)"
    elif command in PASSIVE_COMMANDS:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        state = "OMP_WAIT_POLICY=PASSIVE (idle threads sleep at once)"
    else:
        state = "libgomp's default (idle threads spin a few ms, then sleep)"
    return state


def wait_setting() -> str:
    """How libgomp in this process was told to wait, from the environment torch loaded under: the runtime's
    choice cache key and every benchmark figure record this, so all say it the same way."""
    knobs = [f"{k}={os.environ[k]}" for k in _USER_KNOBS if k in os.environ]
    return ", ".join(knobs) or "libgomp's default"
