"""Atomic file writes: write beside the target, then rename, so a crash never leaves half a file."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable

from multitag.errors import UserError

# A full disk or an exhausted quota is the user's to fix, not a bug: say so in one line.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(UserError):
    """A write failed for lack of disk space or quota; the file's previous content is intact."""


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``.

    Until the rename, ``path`` keeps its previous content: a crash, a kill or a full disk
    half-way leaves the old file whole and removes the temporary one. Running out of disk
    space or quota raises DiskFullError (a UserError) naming the file.

    The file gets the usual permissions (0666 minus the umask), not mkstemp's private 0600, so a
    served report or a shared run directory stays readable.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            write(tmp)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except Exception as e:
        if not _is_disk_full(e):
            raise
        raise DiskFullError(f"cannot write {path}: the disk or your quota is full; free disk space there "
                            f"and try again (the previous {path.name}, if any, is unchanged)") from None


def _is_disk_full(e: Exception) -> bool:
    """ENOSPC/EDQUOT as an OSError, or inside a Rust library's error: safetensors raises a
    SafetensorError "... No space left on device (os error 28)" without an errno."""
    if isinstance(e, OSError):
        return e.errno in _DISK_FULL
    return any(f"(os error {code})" in str(e) for code in _DISK_FULL)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
