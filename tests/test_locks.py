"""Row-slice locks of a store: a real second process holds a slice; sharing slices are refused
with its pid and host, disjoint ones are free, and its death (kill -9) leaves no stale lock."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from trt_relabel.locks import RowsBusyError, check_no_writer, claim_rows

HOLDER = """
import sys
from pathlib import Path
from trt_relabel.locks import claim_rows
index, count = map(int, sys.argv[2].split("/"))
with claim_rows(Path(sys.argv[1]), (index, count), 100):
    print("holding", flush=True)
    sys.stdin.read()
"""


def test_rows_of_a_live_writer_are_refused_others_free(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path), "1/4"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline() == b"holding\n"
        for shard in ((1, 4), (1, 2), (0, 1), (5, 8), (0, 3)):  # row 9 is in 0/3 and 1/4
            with pytest.raises(RowsBusyError) as busy, claim_rows(tmp_path, shard, 100):
                pass
            assert f"process {holder.pid} on {socket.gethostname()} (since " in str(busy.value)
            assert busy.value.exit_code == 2 and "a second writer of the same rows is refused" in str(busy.value)
        for shard, rows in (((0, 2), 100), ((3, 4), 100), ((2, 8), 100), ((0, 3), 9)):  # 0/3 of 9 rows: 0, 3, 6
            with claim_rows(tmp_path, shard, rows):
                pass
        with pytest.raises(RowsBusyError, match=f"process {holder.pid} .* the store cannot be deleted now"):
            check_no_writer(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    check_no_writer(tmp_path)  # the kernel released the killed holder's lock: nothing stale
    with claim_rows(tmp_path, (1, 4), 100), claim_rows(tmp_path, (3, 4), 100):
        pass


def test_a_process_holds_its_slice_once(tmp_path):
    busy = pytest.raises(RowsBusyError, match=f"process {os.getpid()}")
    with claim_rows(tmp_path, (0, 2), 10), busy, claim_rows(tmp_path, (0, 2), 10):
        pass
