"""Atomic writes of files and directories: at every instant either the old or the new content
is in place, never a half-written one (a run killed at any moment, even by SIGKILL, leaves one
of the two). Everything poa_keras writes goes through here: presets, exports, checkpoints,
sweeps, recipes, reports.

Files and directories get the permissions that ``open`` / ``mkdir`` would give them (0o666 /
0o777 less the umask), not the owner-only ones of ``tempfile``.

A directory is replaced in two renames (POSIX has no atomic exchange of two directories):
the old one is renamed aside to ``.<name>.old-<owner>-<random>``, then the new one, staged in
``.<name>.tmp-<owner>-<random>``, is renamed into place, then the aside copy is deleted. A
process killed between the two renames leaves no directory at the path, only the complete old
one aside: ``recover_directory`` (which every preset load and every directory save calls) puts
it back, so at every instant the old or the new directory can be loaded. ``<owner>`` is the
writer's process id and a hash of its host name: temporaries of a writer that no longer runs
(on this host; of another host: older than a day) are deleted by the next save of the same
directory (``clean_stale_temporaries``); a live writer's are never touched.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path


def umask_mode(base=0o777):
    """``base`` less the process umask: the mode ``mkdir`` (0o777) or ``open`` (0o666) gives."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside ``path`` (same suffix, so writers that check it are
    content); when the block finishes, the file written there replaces ``path`` in one
    ``os.replace``. On an exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path, data: bytes):
    """Writes ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)   # the umask applies
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path, text: str):
    """Writes ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, value, indent=2, default=None):
    """Writes ``value`` as JSON to ``path`` atomically; returns the path."""
    return atomic_write_text(path, json.dumps(value, indent=indent, default=default))


# -- directories ------------------------------------------------------------------------------
STALE_FOREIGN_SECONDS = 24 * 3600   # temporaries of an unknown owner count as stale after a day
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-"
                        r"[^/]*$")
# Written by poa_keras before 0.x recorded the owner: ".<name>.tmp-XXXXXXXX" and
# ".<name>.old-XXXXXXXX/<name>" (tempfile.mkdtemp names).
_LEGACY_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[a-z0-9_]{8}$")


def _host_tag():
    return hashlib.sha1(socket.gethostname().encode("utf-8")).hexdigest()[:8]


def owner_tag():
    """``<pid>-<host hash>``: who owns a temporary directory (part of its name)."""
    return f"{os.getpid()}-{_host_tag()}"


def _pid_running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:   # e.g. PermissionError: it runs under another user
        return True
    return True


def _young(path):
    try:
        return time.time() - path.lstat().st_mtime < STALE_FOREIGN_SECONDS
    except OSError:
        return False


def temporaries(target):
    """[(path, kind, content, owner alive)] of the temporaries of ``target`` beside it:
    ``kind`` "tmp" (a staged new directory, complete or not) or "old" (the complete old one,
    renamed aside: ``content`` is where it lies). ``owner alive``: its writer may still run
    (on this host: its process exists; another host's, or of an unknown owner: the directory
    is younger than ``STALE_FOREIGN_SECONDS``)."""
    target = Path(target)
    parent = target.parent
    try:
        names = [n for n in os.listdir(parent) if n.startswith(f".{target.name}.")]
    except OSError:
        return []
    found, host = [], _host_tag()
    for name in sorted(names):
        path = parent / name
        match = _TEMPORARY.match(name)
        if match and match["name"] == target.name:
            alive = (_pid_running(int(match["pid"])) if match["host"] == host
                     else _young(path))
            found.append((path, match["kind"], path, alive))
            continue
        match = _LEGACY_TEMPORARY.match(name)
        if match and match["name"] == target.name:
            content = path / target.name if match["kind"] == "old" else path
            found.append((path, match["kind"], content, _young(path)))
    return found


def recover_directory(target, wait_seconds=2.0):
    """Puts back the old copy of ``target`` when a replacement was killed between its two
    renames (``target`` missing, its old copy aside). A live writer is given ``wait_seconds``
    to finish its swap first. Returns True when it restored one."""
    target = Path(target)
    if not target.name or os.path.lexists(target):
        return False
    deadline = time.monotonic() + wait_seconds
    while True:
        aside = [(path, content, alive) for path, kind, content, alive in temporaries(target)
                 if kind == "old" and content.is_dir()]
        if not aside:
            return False
        if not any(alive for *_, alive in aside) or time.monotonic() >= deadline:
            break
        time.sleep(0.05)   # a running writer is between its two renames: a moment
        if os.path.lexists(target):
            return False
    try:
        path, content, _ = max(aside, key=lambda a: a[1].lstat().st_mtime)
        os.rename(content, target)
    except OSError:   # another process restored it (or saved a new one) meanwhile
        return False
    if path != content:   # the legacy layout: an empty wrapper directory is left
        shutil.rmtree(path, ignore_errors=True)
    return True


def clean_stale_temporaries(target):
    """Deletes the temporaries of ``target`` that killed writers left (see ``temporaries``;
    a live writer's are kept), after ``recover_directory``: an old copy aside is deleted only
    once ``target`` exists. Returns the deleted paths."""
    target = Path(target)
    recover_directory(target)
    exists = os.path.lexists(target)
    removed = []
    for path, kind, _, alive in temporaries(target):
        if not alive and (kind == "tmp" or exists):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def replace_directory(tmp, target):
    """Renames the finished directory ``tmp`` to ``target`` (a sibling). An existing ``target``
    is first renamed aside, then ``tmp`` takes its place, then the aside copy is deleted: at
    every instant ``target`` is the old or the new directory, or missing with the old one
    aside, which ``recover_directory`` puts back (see the module docstring)."""
    tmp, target = Path(tmp), Path(target)
    recover_directory(target)
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.parent / f".{target.name}.old-{owner_tag()}-{uuid.uuid4().hex[:8]}"
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            if not target.exists():
                os.replace(old, target)   # undo: the old directory is back in place
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(target):
    """Yields an empty temporary directory beside ``target`` to fill; when the block finishes,
    it (and every directory in it) gets mkdir's permissions and replaces ``target``
    (``replace_directory``). On an exception it is deleted and ``target`` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(target)   # what killed saves of this directory left behind
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-{owner_tag()}-"))
    try:
        yield tmp
        mode = umask_mode()
        for directory in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            os.chmod(directory, mode)
        replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
           "clean_stale_temporaries", "owner_tag", "recover_directory", "replace_directory",
           "staged_directory", "temporaries", "umask_mode"]
