"""Writing files so that readers never see half of one, and removing what killed writers left.

Temporaries carry their writer in their names, ``{prefix}{host}-{pid}-{random}{suffix}``, and are
flock-ed while written: :func:`remove_stale` removes those of a process that is gone (kill -9,
power loss) and never a live writer's.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def umask() -> int:
    """The process's file-mode creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _writer_tag() -> str:
    """``{host}-{pid}-``: the part of a temporary's name that says which process writes it."""
    return f"{socket.gethostname()}-{os.getpid()}-"


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Write `path` atomically through the yielded binary file: a temporary file
    ``.{name}.{host}-{pid}-{random}.tmp`` in the same directory (mode 0666 less the umask, as
    open() would give, flock-ed while written), then os.replace. The temporary is removed on
    failure; after a kill, :func:`remove_stale` removes it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_writer_tag()}", suffix=".tmp")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes | str) -> None:
    """Replace `path` by `data` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


@contextmanager
def temporary_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A new directory ``parent/{prefix}{host}-{pid}-{random}``, flock-ed while the block runs and
    removed after it (unless the block renamed it away); after a kill, :func:`remove_stale`
    removes it."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix + _writer_tag()))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)


def remove_stale(directory: Path, prefix: str, suffix: str = "") -> list[Path]:
    """Remove the temporaries ``directory/{prefix}{host}-{pid}-{random}{suffix}`` (of
    :func:`atomic_file` with prefix ``.{name}.`` and suffix ``.tmp``, or of :func:`temporary_dir`)
    whose writer is gone: written on this host by a process id that no process has now (or this
    process's own), and not flock-ed. A live writer's temporaries are kept, and so are those of
    another host and names without a host and pid (older versions). Returns the removed paths."""
    host = socket.gethostname()
    try:
        entries = sorted(directory.iterdir())
    except OSError:
        return []
    removed = []
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(suffix)) or len(name) <= len(prefix) + len(suffix):
            continue
        writer = name[len(prefix) : len(name) - len(suffix)].rsplit("-", 2)
        if len(writer) != 3 or writer[0] != host or not writer[1].isdigit():
            continue
        pid = int(writer[1])
        if (pid == os.getpid() or not _alive(pid)) and _remove_unlocked(entry):
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_unlocked(path: Path) -> bool:
    """Remove the file or directory `path` unless someone holds a flock on it (or it is a symlink)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)
