"""Atomic writes (poa_keras/files.py): the old or the new content, never half of either, with
the permissions open() / mkdir() would give; a directory save killed at any step of its swap
leaves the old or the new directory loadable, and nothing that the next save does not clean."""
import json
import os
import subprocess
import sys

import pytest

from poa_keras import files
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


# -- a save killed at every step of the directory swap ------------------------------------------
# Runs in a fresh interpreter that loads files.py alone (no Keras: a quick start), replaces the
# directory with a staged one holding version.txt = "new", and dies with os._exit (like a
# SIGKILL: no exception handler, no cleanup) at the `kill_at`-th rename or delete of the swap.
_KILLED_SAVE = r"""
import importlib.util, os, shutil, sys
spec = importlib.util.spec_from_file_location("files_alone", sys.argv[1])
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
target, kill_at, copy_from = sys.argv[2], int(sys.argv[3]), sys.argv[4]
calls = [0]

def step(real):
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            os._exit(9)
        return real(*args, **kwargs)
    return wrapped

os.replace, os.rename = step(os.replace), step(os.rename)
shutil.rmtree = step(shutil.rmtree)
with files.staged_directory(target) as tmp:
    if copy_from:
        shutil.copytree(copy_from, tmp, dirs_exist_ok=True)
    else:
        (tmp / "version.txt").write_text("new")
print(calls[0])
"""


def killed_save(target, kill_at, copy_from=""):
    """Saves into ``target`` in a child process killed at the kill_at-th step of the swap (0:
    never); returns the child's exit status."""
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, files.__file__, str(target),
                           str(kill_at), str(copy_from)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode in (0, 9), proc.stderr
    return proc.returncode


@pytest.mark.parametrize("kill_at, expected", [(1, "old"), (2, "old"), (3, "new"),
                                               (0, "new")])
def test_a_save_killed_at_any_step_leaves_the_old_or_the_new_directory(tmp_path, kill_at,
                                                                       expected):
    """The swap is: rename the old directory aside (step 1), rename the new one in (2), delete
    the old one (3). A kill between 1 and 2 leaves no directory at the path: the next load
    (recover_directory) puts the old one back. Stale temporaries of the dead writer are deleted
    by the next save; a live writer's are kept."""
    target = tmp_path / "preset"
    target.mkdir()
    (target / "version.txt").write_text("old")
    status = killed_save(target, kill_at)
    assert status == (9 if kill_at else 0)
    files.recover_directory(target)   # what loading a preset does first
    assert (target / "version.txt").read_text() == expected
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "preset")
    assert all(name.startswith(".preset.") for name in leftovers)
    live = tmp_path / f".preset.tmp-{files.owner_tag()}-livewrit"   # this (live) process
    live.mkdir()
    with staged_directory(target) as tmp:
        (tmp / "version.txt").write_text("newer")
    assert (target / "version.txt").read_text() == "newer"
    # the dead writer's temporaries are gone, the live one's kept
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "preset"]


def test_recovery_of_the_layout_older_releases_left(tmp_path):
    """Before owners were recorded, the old directory went to .<name>.old-XXXXXXXX/<name>: a
    save killed between the renames left nothing at the path ("unknown preset")."""
    aside = tmp_path / ".preset.old-abcd_123"
    (aside / "preset").mkdir(parents=True)
    (aside / "preset" / "version.txt").write_text("old")
    (tmp_path / ".preset.tmp-zz9_abcd").mkdir()   # its staged copy, of an unknown owner
    assert files.recover_directory(tmp_path / "preset")
    assert (tmp_path / "preset" / "version.txt").read_text() == "old"
    assert not aside.exists()
    assert not files.recover_directory(tmp_path / "preset")   # nothing to do now
    assert not files.recover_directory(tmp_path / "absent")
