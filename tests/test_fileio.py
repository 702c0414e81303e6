"""Atomic writes and the removal of what killed writers left: real processes, killed with SIGKILL
while they write, and live ones whose temporaries must survive."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from trt_relabel.fileio import atomic_file, remove_stale

#: A process that writes `argv[1]` through atomic_file (or, with argv[2] == "dir", builds a
#: temporary_dir in it) and then either dies with SIGKILL ("kill") or waits for stdin ("live").
WRITER = """
import os, signal, sys
from pathlib import Path
from trt_relabel.fileio import atomic_file, temporary_dir
target, kind, end = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
opened = temporary_dir(target, ".store.creating-") if kind == "dir" else atomic_file(target)
with opened as f:
    if kind == "dir":
        (f / "values.npy").write_bytes(bytes(4096))
    else:
        f.write(bytes(4096)); f.flush()
    print("writing", flush=True)
    if end == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.read()
"""


def start_writer(target: Path, kind: str = "file", end: str = "live") -> subprocess.Popen:
    """A real process in the middle of writing `target` (kind "file": atomic_file; "dir": a
    temporary_dir inside the folder `target`). end="kill": it is killed with SIGKILL there and
    reaped; end="live": it stays there until killed."""
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target), kind, end], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert process.stdout.readline() == b"writing\n"
    if end == "kill":
        assert process.wait(timeout=60) == -signal.SIGKILL
    return process


def stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()


def leftovers(directory: Path) -> list[str]:
    """The hidden names in `directory` but a store's row locks (.rows-I-of-N.lock, kept for good)."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock"))


def test_killed_writers_leftovers_are_removed_live_ones_kept(tmp_path):
    host = socket.gethostname()
    killed = start_writer(tmp_path / "errors.jsonl", end="kill")
    killed_dir = start_writer(tmp_path, kind="dir", end="kill")
    live = start_writer(tmp_path / "errors.jsonl")
    live_dir = start_writer(tmp_path, kind="dir")
    try:
        old_style = tmp_path / ".errors.jsonl.k2j4x9_q.tmp"  # before names said who writes: never provably stale
        other_host = tmp_path / f".errors.jsonl.not-{host}-{killed.pid}-abcdefgh.tmp"
        for path in (old_style, other_host):
            path.write_bytes(b"")
        names = leftovers(tmp_path)
        assert len(names) == 6
        assert f".errors.jsonl.{host}-{killed.pid}-" in " ".join(names)
        assert f".store.creating-{host}-{killed_dir.pid}-" in " ".join(names)

        removed = remove_stale(tmp_path, ".errors.jsonl.", ".tmp") + remove_stale(tmp_path, ".store.creating-")
        assert sorted(p.name for p in removed) == sorted(set(names) - set(leftovers(tmp_path)))
        assert [p.name.split("-")[-2] for p in removed] == [str(killed.pid), str(killed_dir.pid)]
        assert remove_stale(tmp_path, ".errors.jsonl.", ".tmp") == []  # the live writers' stay
        assert len(leftovers(tmp_path)) == 4 and old_style.exists() and other_host.exists()
    finally:
        stop(live)
        stop(live_dir)
    # Once they are gone too, theirs are removed.
    assert len(remove_stale(tmp_path, ".errors.jsonl.", ".tmp") + remove_stale(tmp_path, ".store.creating-")) == 2
    assert leftovers(tmp_path) == sorted([old_style.name, other_host.name])


def test_own_pid_leftovers_go_unless_being_written(tmp_path):
    target = tmp_path / "manifest.json"
    with atomic_file(target) as f:
        f.write(b"{}")
        assert remove_stale(tmp_path, ".manifest.json.", ".tmp") == []  # flock-ed: being written
    assert target.read_bytes() == b"{}" and leftovers(tmp_path) == []
    # A dead process that had this process's id (ids are reused, e.g. by a fresh container) left one.
    reused = tmp_path / f".manifest.json.{socket.gethostname()}-{os.getpid()}-abcdefgh.tmp"
    reused.write_bytes(b"{")
    assert remove_stale(tmp_path, ".manifest.json.", ".tmp") == [reused] and leftovers(tmp_path) == []
