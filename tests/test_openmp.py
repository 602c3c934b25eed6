"""multitag/openmp.py: the CLI leaves libgomp's spin-then-sleep default to the commands that train, makes
OpenMP's idle threads sleep at once where ONNX Runtime or requests share the cores, and leaves the user's
setting alone. libgomp reads it when torch loads, so torch must not load before the CLI has chosen."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from multitag import openmp

# In a fresh process: the CLI's imports and argument parsing must not load torch; then run a command
# and report what it left in the environment for libgomp.
PROBE = """
import os, sys
from multitag import cli, openmp
cli.build_parser().parse_args(sys.argv[1:])
assert "torch" not in sys.modules, "torch loaded before the CLI chose OpenMP's wait policy"
cli.main(sys.argv[1:])
print(os.environ.get("OMP_WAIT_POLICY", "-"), "|", openmp.state, file=sys.stderr)
"""


def _probe(*argv: str, **env) -> tuple[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    err = subprocess.run([sys.executable, "-c", PROBE, *argv], env={**base, **env}, capture_output=True, text=True,
                         timeout=120).stderr.strip().splitlines()[-1]
    policy, state = err.split(" | ", 1)
    return policy, state


def test_commands_that_train_keep_libgomps_default_and_serving_ones_sleep_at_once(tmp_path):
    assert _probe("recipes") == ("-", "libgomp's default (idle threads spin a few ms, then sleep)")
    policy, state = _probe("predict", str(tmp_path / "no-run"), str(tmp_path / "no.jpg"))   # fails, after choosing
    assert policy == "PASSIVE" and state.startswith("OMP_WAIT_POLICY=PASSIVE")
    assert _probe("recipes", OMP_WAIT_POLICY="ACTIVE") == ("ACTIVE", "OMP_WAIT_POLICY=ACTIVE (set by the user)")


@pytest.mark.parametrize("command", ["train", "bench", "demo", "serve", "predict"])
def test_the_users_setting_and_a_loaded_torch_are_left_alone(monkeypatch, command):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")
    monkeypatch.setattr(openmp, "_torch_loaded", lambda: False)
    assert openmp.choose_wait_policy(command) == "GOMP_SPINCOUNT=1000 (set by the user)"
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setattr(openmp, "_torch_loaded", lambda: True)        # libgomp has read its settings already
    assert openmp.choose_wait_policy(command).startswith("as libgomp read it")
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setattr(openmp, "_torch_loaded", lambda: False)
    openmp.choose_wait_policy(command)
    assert os.environ.get("OMP_WAIT_POLICY") == ("PASSIVE" if command in ("serve", "predict") else None)


def test_the_wait_setting_says_what_libgomp_reads(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert openmp.wait_setting() == "libgomp's default"
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")
    assert openmp.wait_setting() == "OMP_WAIT_POLICY=PASSIVE, GOMP_SPINCOUNT=1000"
