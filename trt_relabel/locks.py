"""Which process labels which rows of a store: one lock file per row slice, inside the store.

A writer of the rows with ``row % n == i`` (a plain run: 0/1; torchrun rank r of N: r/N;
``--shard i/n``) holds ``STORE/.rows-{i}-of-{n}.lock`` with flock (the kernel releases it when the
process ends, kill -9 included, so no lock is ever stale) and writes its pid, host and start time
into it. It also looks at the other slices' lock files: slices i/n and j/m share rows when some
row < N has ``row % n == i`` and ``row % m == j``. A held lock of the same or a sharing slice means
a second writer of the same rows, refused with :class:`RowsBusyError` (exit code 2) naming that
process; writers of disjoint slices (torchrun ranks, the shards of one split) share the store.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from trt_relabel.errors import RelabelError

LOCK_PATTERN = re.compile(r"\.rows-(\d+)-of-(\d+)\.lock")
#: Tries (20 ms apart) to take a slice's lock: another writer's look at it holds it for microseconds.
LOCK_TRIES = 10


class RowsBusyError(RelabelError):
    """Another live process labels rows of the store that this one would write: exit code 2."""

    exit_code = 2


def lock_name(shard: tuple[int, int]) -> str:
    """The lock file of the rows with row % shard[1] == shard[0]."""
    return f".rows-{shard[0]}-of-{shard[1]}.lock"


def _shares_rows(a: tuple[int, int], b: tuple[int, int], num_rows: int) -> bool:
    """Whether some row < num_rows lies in both slices (row % n == i)."""
    (i, n), (j, m) = a, b
    if (i - j) % math.gcd(n, m):
        return False
    return any(row % m == j for row in range(i, min(num_rows, i + math.lcm(n, m)), n))


def _slice_text(shard: tuple[int, int]) -> str:
    return "all rows" if shard[1] == 1 else f"the rows of shard {shard[0]}/{shard[1]}"


def _process(holder: dict) -> str:
    """'process PID on HOST (since TIME)', from what a lock's holder wrote about itself."""
    if not holder:
        return "another process"
    return f"process {holder['pid']} on {holder['host']}" + (f" (since {holder['since']})" if "since" in holder else "")


def _busy(store: Path, mine: tuple[int, int], theirs: tuple[int, int], holder: dict) -> RowsBusyError:
    shared = "" if mine == theirs else f", which share rows with {_slice_text(mine)}"
    return RowsBusyError(
        f"{store}: {_process(holder)} is labelling {_slice_text(theirs)}{shared}; a second writer of "
        "the same rows is refused: wait for it to end or stop it"
    )


def _holder(fd: int) -> dict:
    """The pid, host and since that a lock file's holder wrote ({} while it has not yet)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) and {"pid", "host"} <= holder.keys() else {}


def _held_by(path: Path) -> dict | None:
    """None when nobody holds the lock file `path`, else what its holder wrote about itself."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fd)
        return None
    finally:
        os.close(fd)


def _locks(store: Path) -> Iterator[tuple[tuple[int, int], Path]]:
    """(slice, path) of every lock file in the store."""
    for path in store.iterdir():
        match = LOCK_PATTERN.fullmatch(path.name)
        if match:
            yield (int(match[1]), int(match[2])), path


def check_no_writer(store: Path) -> None:
    """Raise :class:`RowsBusyError` when a live process holds any slice of the store (e.g. before
    deleting it)."""
    for shard, path in _locks(store):
        holder = _held_by(path)
        if holder is not None:
            raise RowsBusyError(
                f"{store}: {_process(holder)} is labelling {_slice_text(shard)}; the store cannot be "
                "deleted now: wait for it to end or stop it"
            )


def remove_lock_files(store: Path) -> None:
    """Delete the store's lock files (when no process holds them: see :func:`check_no_writer`)."""
    for _, path in list(_locks(store)):
        path.unlink(missing_ok=True)


@contextmanager
def claim_rows(store: Path, shard: tuple[int, int], num_rows: int) -> Iterator[None]:
    """Hold the lock of the rows with row % shard[1] == shard[0] of the store at `store` (of
    `num_rows` rows) for the duration; raise :class:`RowsBusyError` when a live process labels any
    of these rows."""
    path = store / lock_name(shard)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    try:
        for attempt in range(LOCK_TRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == LOCK_TRIES - 1:
                    raise _busy(store, shard, shard, _holder(fd)) from None
                time.sleep(0.02)
        since = datetime.now(UTC).isoformat(timespec="seconds")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        _check_sharing_slices(store, shard, num_rows, but=shard)
        yield
    finally:
        os.close(fd)


def check_rows_free(store: Path, shard: tuple[int, int], num_rows: int) -> None:
    """Raise :class:`RowsBusyError` when a live process labels any row of the slice `shard` (a
    look before the slow start of a run; :func:`claim_rows` decides)."""
    _check_sharing_slices(store, shard, num_rows)


def _check_sharing_slices(
    store: Path, shard: tuple[int, int], num_rows: int, but: tuple[int, int] | None = None
) -> None:
    for other, path in _locks(store):
        if other != but and _shares_rows(shard, other, num_rows):
            holder = _held_by(path)
            if holder is not None:
                raise _busy(store, shard, other, holder)
