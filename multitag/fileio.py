"""Atomic file writes: write beside the target, then rename, so a crash never leaves half a file."""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

from multitag.errors import UserError

# A full disk or an exhausted quota is the user's to fix, not a bug: say so in one line.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# So are a read-only filesystem, a missing permission and a directory (or a file) where the other belongs.
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EEXIST)


class DiskFullError(UserError):
    """A write failed for lack of disk space or quota; the file's previous content is intact."""


class NotWritableError(UserError):
    """A path could not be written for a reason the user fixes (permissions, read-only, a directory)."""


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
        error = write_error(path, e)
        if error is None:
            raise
        raise error from None


def append_line(path: str | Path, line: str) -> None:
    """Append ``line`` + newline to a text file (e.g. metrics.jsonl), all of it or nothing.

    Rewriting a growing log on every append would cost O(n²); an append is cheap but a full disk
    can cut it half-way. So the file's length is noted first and restored when the write fails:
    readers never see a partial last line, and the lines before it are intact.
    """
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)   # unbuffered: nothing left to flush later
    try:
        before = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:                         # os.write may write part of it (e.g. the disk fills)
                view = view[os.write(fd, view):]
        except BaseException as e:
            os.ftruncate(fd, before)            # shrinking needs no free space
            if is_disk_full(e):
                raise disk_full_error(path) from None
            raise
    finally:
        os.close(fd)


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a file written by append_line, one per line, or [] when it does not exist.
    A line that is not a JSON object (cut short by a power loss, or by a version before append_line) is left
    out rather than failing the reader."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def disk_full_error(path: str | Path) -> DiskFullError:
    """The one-line error for a write to ``path`` that failed for lack of space or quota."""
    path = Path(path)
    return DiskFullError(f"cannot write {path}: the disk or your quota is full; free disk space there "
                         f"and try again (the previous {path.name}, if any, is unchanged)")


def not_writable_error(path: str | Path, reason: str,
                       fix: str = "choose a location you can write to or change its permissions") -> NotWritableError:
    return NotWritableError(f"cannot write {path}: {reason}; {fix}")


def safe_name(text: str) -> str:
    """``text`` as a file name part: runs of characters other than letters, digits, ``_ . -`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _reason(e: OSError) -> str:
    """The OS's reason for ``e`` in a sentence: 'read-only file system', 'permission denied'."""
    return (e.strerror or str(e)).lower()


def write_error(path: str | Path, e: BaseException) -> UserError | None:
    """The one-line error for a failed write to ``path`` that is the user's to fix, or None (a bug: re-raise)."""
    if is_disk_full(e):
        return disk_full_error(path)
    if isinstance(e, OSError) and e.errno in _NOT_WRITABLE:
        return not_writable_error(path, _reason(e))
    return None


def os_error(e: OSError) -> UserError | None:
    """A permission or read-only error from any file access (a write that bypasses atomic_write, a read of
    a file the user may not open) as one line naming the file, or None when it is not one of those."""
    if e.errno not in _NOT_WRITABLE or e.errno == errno.EEXIST or not e.filename:
        return None
    return UserError(f"{e.filename}: {_reason(e)}; check its permissions, "
                     "or choose another location")


def check_writable(path: str | Path, directory: bool = False) -> None:
    """Raise NotWritableError now, before work whose result would be lost at the write, when ``path``
    (a file, or with ``directory`` a folder to write files in) cannot be written: a directory where a
    file is asked for, or a folder (the nearest one that exists) where a trial file cannot be made."""
    path = Path(path)
    if not directory and path.is_dir():
        raise not_writable_error(path, "it is a directory", "name a file in it instead")
    folder = path if directory else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise not_writable_error(path, f"{folder} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        reason = _reason(e)
        raise not_writable_error(path, reason if folder == path else f"{folder}: {reason}") from None


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC/EDQUOT as an OSError, or inside a Rust library's error: safetensors raises a
    SafetensorError "... No space left on device (os error 28)" without an errno."""
    if isinstance(e, OSError):
        return e.errno in _DISK_FULL
    return isinstance(e, Exception) and any(f"(os error {code})" in str(e) for code in _DISK_FULL)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_json_object(path: str | Path) -> dict:
    """The JSON object in ``path``, or {} when there is none yet or it is not one (e.g. a file from a version
    that wrote without atomic_write, cut short by a kill): such files hold measurements, which are simply
    taken again."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update_json_object(path: str | Path, key: str, value) -> dict:
    """Set ``key`` in the JSON object file ``path`` and return the whole object as written.

    Several processes may measure at once (two runs started together, the ranks of a distributed run planning
    their conv gradients), each adding its own keys: the file is read afresh and rewritten under an exclusive
    lock on ``path``.lock, so none of them drops another's entries, and atomically, so a reader never sees
    half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)        # released when the file closes, also when the process is killed
        data = read_json_object(path)
        data[key] = value
        atomic_write_text(path, json.dumps(data, indent=1))
    return data


def json_safe(value: Any) -> Any:
    """Plain JSON types; non-finite floats become the strings "nan"/"inf" so files and --json output
    stay standard JSON (json.dumps writes NaN, which JSON parsers reject). Tensors and numpy values
    become lists and numbers."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "tolist") and callable(value.tolist):     # torch tensors, numpy arrays and scalars
        return json_safe(value.tolist())
    return value
