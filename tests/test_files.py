"""Atomic writes (poa_keras/files.py): the old or the new content, never half of either, with
the permissions open() / mkdir() would give."""
import json
import os

import pytest

from poa_keras.files import (atomic_path, atomic_write_bytes, atomic_write_json,
                             atomic_write_text, staged_directory, umask_mode)


class Boom(RuntimeError):
    pass


def test_atomic_file_writes_replace_or_keep(tmp_path):
    target = tmp_path / "sub" / "report.json"
    atomic_write_json(target, {"a": 1})   # creates the parent
    assert json.loads(target.read_text()) == {"a": 1}
    assert (target.stat().st_mode & 0o777) == umask_mode(0o666)
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            assert tmp.suffix == ".json" and tmp.parent == target.parent
            raise Boom()
    assert target.read_bytes() == b"\x00\x01"   # the old content, untouched
    assert sorted(os.listdir(target.parent)) == ["report.json"]   # no temporary file left


def test_json_that_cannot_be_written_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "x.json", {"a": object()})
    assert os.listdir(tmp_path) == []


def test_staged_directory_replaces_a_whole_directory(tmp_path):
    target = tmp_path / "export"
    with staged_directory(target) as tmp:
        (tmp / "inner").mkdir()
        (tmp / "inner" / "a.txt").write_text("1")
    assert (target / "inner" / "a.txt").read_text() == "1"
    for directory in (target, target / "inner"):   # not mkdtemp's owner-only 0o700
        assert (directory.stat().st_mode & 0o777) == umask_mode(0o777)
    with pytest.raises(Boom):
        with staged_directory(target) as tmp:
            (tmp / "b.txt").write_text("2")
            raise Boom()
    assert sorted(os.listdir(target)) == ["inner"]   # the old directory, whole
    with staged_directory(target) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(os.listdir(target)) == ["b.txt"]   # replaced, not merged
    assert sorted(os.listdir(tmp_path)) == ["export"]   # nothing left beside it
