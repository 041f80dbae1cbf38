"""Atomic writes of files and directories: at every instant either the old or the new content
is in place, never a half-written one (a run killed at any moment, even by SIGKILL, leaves one
of the two). Everything poa_keras writes goes through here: presets, exports, checkpoints,
sweeps, recipes, reports.

Files and directories get the permissions that ``open`` / ``mkdir`` would give them (0o666 /
0o777 less the umask), not the owner-only ones of ``tempfile``.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
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


def replace_directory(tmp, target):
    """Renames the finished directory ``tmp`` to ``target`` (a sibling). An existing ``target``
    is first moved aside, then deleted, so ``target`` is never half written."""
    tmp, target = Path(tmp), Path(target)
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.replace(target, old / target.name)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


@contextlib.contextmanager
def staged_directory(target):
    """Yields an empty temporary directory beside ``target`` to fill; when the block finishes,
    it (and every directory in it) gets mkdir's permissions and replaces ``target``
    (``replace_directory``). On an exception it is deleted and ``target`` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
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
           "replace_directory", "staged_directory", "umask_mode"]
