"""A full disk under a store (run by test_store.py on a tiny tmpfs in a private mount namespace).

Usage: store_full_disk_helper.py DIR, DIR being an empty file system of about 256 KiB. Prints one
line per step; exits non-zero on any unexpected outcome.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from test_store import SPEC, random_labels

from trt_relabel.images import ImageEntry
from trt_relabel.store import LabelStore, create_store
from trt_relabel.store_format import StoreError


def samples(n: int) -> list[ImageEntry]:
    return [ImageEntry(f"img{i:04d}.jpg", -1) for i in range(n)]


def fill(path: Path) -> None:
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(4096))
        except OSError:
            pass


def main(root: Path) -> None:
    # A store larger than the disk is refused when its space is reserved, and leaves nothing behind.
    try:
        create_store(root / "big", SPEC, samples(1000))
        raise SystemExit("a store larger than the disk was created")
    except StoreError as e:
        print(f"create: {e}")
    assert list(root.iterdir()) == [], list(root.iterdir())

    # A store that fits, one failed input; then the disk fills up.
    writer = create_store(root / "small", SPEC, samples(10))
    writer.mark_failed(9, "empty file (0 bytes)")
    fill(root / "filler")
    writer.write(np.arange(4), *random_labels(4, seed=0))  # its rows were reserved: still fine
    try:  # a line longer than what is left of errors.jsonl's page: written in part, then ENOSPC
        writer.mark_failed(4, "corrupt or truncated image: " + "x" * 5000)
        raise SystemExit("recorded a failure on a full disk")
    except StoreError as e:
        print(f"full: {e}")
    assert writer.status()[4] == 0, "a row marked failed without its whole line"
    assert not (root / "small" / "errors.jsonl").read_bytes().endswith(b"\n"), "expected a torn line"

    # Space again: reopening resumes with what was written before; the torn line goes at finish.
    (root / "filler").unlink()
    resumed = create_store(root / "small", SPEC, samples(10))
    assert resumed.pending_rows().tolist() == list(range(4, 9))
    resumed.mark_failed(4, "empty file (0 bytes)")
    resumed.write(np.arange(5, 9), *random_labels(4, seed=1))
    assert resumed.finish()
    store = LabelStore(root / "small")
    assert store.labelled().sum() == 8 and [e["path"] for e in store.errors()] == ["img0004.jpg", "img0009.jpg"]
    assert (root / "small" / "errors.jsonl").read_text().count("\n") == 2
    print("resumed: complete")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
