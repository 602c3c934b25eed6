"""multitag/allocator.py: the CLI tells glibc's malloc to keep freed memory, unless the user chose otherwise."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from multitag import allocator
from multitag.cli import main

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's mallopt")

# In a fresh process: run the CLI (a cheap command), then hold a 64 MiB block and report how many bytes
# glibc serves from mmap (mallinfo2().hblkhd); glibc's default mmaps every block of this size.
PROBE = """
import ctypes, sys
from multitag import allocator
from multitag.cli import main
main(["recipes"])
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks "
                                                "fordblks keepcost").split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
block = bytearray(64 << 20)
print(libc.mallinfo2().hblkhd >> 20, allocator.state, file=sys.stderr)
"""


def _probe(**env) -> tuple[int, str]:
    base = allocator.without_user_choice()
    err = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True,
                         timeout=120, check=True).stderr.strip().splitlines()[-1]
    mib, state = err.split(" ", 1)
    return int(mib), state


@glibc
def test_cli_keeps_large_blocks_off_mmap():
    mmapped, state = _probe()
    assert mmapped < 64, state                     # the 64 MiB block came from the heap
    assert state.startswith("glibc, freed memory kept")


@glibc
@pytest.mark.parametrize("env, reason", [({"MULTITAG_MALLOC": "default"}, "MULTITAG_MALLOC=default"),
                                         ({"MALLOC_ARENA_MAX": "2"}, "MALLOC_ARENA_MAX set by the user")])
def test_the_users_choice_leaves_glibc_as_it_is(env, reason):
    mmapped, state = _probe(**env)
    assert mmapped >= 64                           # glibc's default: a block this large is mmapped
    assert state == f"left as is ({reason})"


def test_an_unknown_choice_is_one_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("MULTITAG_MALLOC", "jemalloc")
    assert main(["recipes"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "MULTITAG_MALLOC='jemalloc' is not a choice" in err and "kept" in err and "default" in err
