"""Folders that could not be listed, once fixed: their images take the place of their row.

A sub-folder the listing cannot read is one failed input named by the folder's path (see
:func:`trt_relabel.images.list_images`): its images are unknown. Once it is readable, the listing
names its images instead, so the input list is longer than the store's. ``generate --retry-failed``
then rebuilds the store for the new list (:func:`relist_folders`): every other row keeps its labels,
or its failure and reason; the folder's images are pending, to be labelled by the same run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from trt_relabel.fileio import remove_stale, temporary_dir
from trt_relabel.images import ImageEntry
from trt_relabel.store import LabelStore, StoreWriter, create_store
from trt_relabel.store_format import FAILED, LABELLED, MANIFEST, REQUIRED_KEYS, STORE_FILES, StoreError

#: Rows copied from the old store to the new one at a time (bounds the memory of a relisting).
COPY_ROWS = 4096


def listed_folders(store: LabelStore, data: Path, samples: Sequence[ImageEntry]) -> list[str]:
    """The failed rows of `store` that name a folder under `data` which the listing `samples` now
    lists (their paths), when the store's rows are `samples` but for those folders' rows and the
    images under them; [] otherwise (same inputs, or another difference)."""
    current = set(samples)
    status = store.status()
    folders = [
        entry.path
        for entry, state in zip(store.samples, status, strict=True)
        if state == FAILED and entry not in current and (data / entry.path).is_dir()
    ]
    if not folders:
        return []
    prefixes = tuple(f"{folder}/" for folder in folders)
    dropped = set(folders)
    kept = [entry for entry in store.samples if entry.path not in dropped]
    others = [entry for entry in samples if not entry.path.startswith(prefixes)]
    return folders if kept == others else []


def relist_folders(old: LabelStore, data: Path, samples: Sequence[ImageEntry]) -> list[str]:
    """Rebuild the store `old` for the input list `samples` when it differs only by folders that
    can now be listed (:func:`listed_folders`): labelled rows keep their labels, failed rows their
    failure and reason, the folders' images are pending. Returns those folders ([]: the store is
    left as it is).

    The new store is built beside the old one (``.NAME.relisting-HOST-PID-RANDOM``, removed by the
    next relisting when a kill left it), then its files replace the old files one by one, manifest
    last. One process only: not under torchrun or with --shard.
    """
    store_path = old.path
    folders = listed_folders(old, data, samples)
    if not folders:
        return []
    prefix = f".{store_path.name}.relisting-"
    try:
        remove_stale(store_path.parent, prefix)  # what a killed relisting left
        with temporary_dir(store_path.parent, prefix) as building:
            extra = {key: value for key, value in old.manifest.items() if key not in REQUIRED_KEYS}
            writer = create_store(building / "store", old.spec, list(samples), extra_manifest=extra)
            _copy_rows(old, writer, samples)
            writer.finish()
            built = [name for name in STORE_FILES if name != MANIFEST and (building / "store" / name).exists()]
            for name in (*built, MANIFEST):
                os.replace(building / "store" / name, store_path / name)
    except OSError as e:
        raise StoreError(f"{store_path}: cannot rebuild the store for the listed folders: {e.strerror}") from None
    return folders


def _copy_rows(old: LabelStore, writer: StoreWriter, samples: Sequence[ImageEntry]) -> None:
    """Copy the labels of `old`'s labelled rows, and its failed rows (with their reasons), into
    `writer`, matched by path."""
    row_of = {entry.path: row for row, entry in enumerate(samples)}
    pairs = np.array(
        [(row, row_of[entry.path]) for row, entry in enumerate(old.samples) if entry.path in row_of], dtype=np.int64
    ).reshape(-1, 2)
    status = old.status()[pairs[:, 0]]
    labelled = pairs[status == LABELLED]
    for start in range(0, len(labelled), COPY_ROWS):
        old_rows, new_rows = labelled[start : start + COPY_ROWS].T
        writer.write(new_rows, old.values[old_rows], old.indices[old_rows])
    reasons = {entry["path"]: entry["reason"] for entry in old.errors()}
    for old_row, new_row in pairs[status == FAILED]:
        writer.mark_failed(int(new_row), reasons.get(old.samples[old_row].path, "reason not recorded"))
