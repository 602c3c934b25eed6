"""Shared JSON caches (runtime choices, conv-gradient plans): concurrent writers keep each other's entries."""
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
