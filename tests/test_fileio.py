"""File writes: shared JSON caches keep concurrent writers' entries; unwritable targets are one-line user errors."""
import json
import subprocess
import sys

from multitag.fileio import read_json_object, update_json_object

WRITER = """
import sys
from multitag.fileio import update_json_object
for i in range(int(sys.argv[3])):
    update_json_object(sys.argv[1], f"{sys.argv[2]}-{i}", [i])
"""


def test_concurrent_writers_keep_every_entry(tmp_path):
    path, writers, each = tmp_path / "plans.json", 4, 40
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"w{w}", str(each)]) for w in range(writers)]
    assert [p.wait(timeout=120) for p in procs] == [0] * writers
    assert sorted(json.loads(path.read_text())) == sorted(f"w{w}-{i}" for w in range(writers) for i in range(each))


def test_update_returns_what_others_wrote_too(tmp_path):
    path = tmp_path / "plans.json"
    update_json_object(path, "a", 1)
    path.write_text(json.dumps({"a": 1, "b": 2}))          # another process, meanwhile
    assert update_json_object(path, "c", 3) == {"a": 1, "b": 2, "c": 3}


def test_unreadable_files_read_as_empty(tmp_path):
    assert read_json_object(tmp_path / "none.json") == {}
    for text in ('{"a": [tr', "[1, 2]", ""):
        (tmp_path / "x.json").write_text(text)
        assert read_json_object(tmp_path / "x.json") == {}


def test_unwritable_targets_are_one_line_user_errors(tmp_path, monkeypatch, capsys):
    """A read-only filesystem, a missing permission or a directory in the way: the user's to fix, said in one
    line naming the target (not the temporary file), with the old content intact."""
    import errno
    import tempfile

    import pytest

    from multitag import cli
    from multitag.fileio import NotWritableError, atomic_write_text, check_writable, os_error

    target = tmp_path / "model.json"
    target.write_text("old")

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".model.json.x.tmp"))

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", read_only)
        with pytest.raises(NotWritableError, match=f"^cannot write {target}: read-only file system;"):
            atomic_write_text(target, "new")
        m.setattr(tempfile, "TemporaryFile", read_only)
        with pytest.raises(NotWritableError, match=f"cannot write {tmp_path}: read-only file system"):
            check_writable(tmp_path, directory=True)
        with pytest.raises(NotWritableError, match=f"cannot write {tmp_path / 'new' / 'p.csv'}: {tmp_path}: read-only"):
            check_writable(tmp_path / "new" / "p.csv")
    assert target.read_text() == "old"
    with pytest.raises(NotWritableError, match="it is a directory"):
        check_writable(tmp_path)
    check_writable(tmp_path / "a" / "b" / "c.csv")                   # folders that do not exist yet are fine
    assert not (tmp_path / "a").exists()
    # the CLI's last net: a permission error from a write that bypasses atomic_write, or a read
    denied = PermissionError(errno.EACCES, "Permission denied", "/srv/x.png")
    assert str(os_error(denied)) == "/srv/x.png: permission denied; check its permissions, or choose another location"
    assert os_error(FileNotFoundError(errno.ENOENT, "No such file", "/x")) is None      # a bug: kept as a traceback

    def handler(args):
        raise denied

    monkeypatch.setitem(cli.HANDLERS, "models", handler)
    assert cli.main(["models"]) == 2
    assert capsys.readouterr().err == f"multitag models: error: {os_error(denied)}\n"
