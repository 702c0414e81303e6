"""Checks of `generate`'s output store before the (slow) backend start: writable, not busy, resumable, same teacher."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from rich.text import Text

from trt_relabel.errors import UsageError
from trt_relabel.images import ImageEntry
from trt_relabel.locks import check_no_writer, check_rows_free, claim_rows
from trt_relabel.store import LabelStore, StoreWriter, check_resumable
from trt_relabel.store_format import MANIFEST, STORE_FILES, StoreError
from trt_relabel.terminal import console

if TYPE_CHECKING:
    from trt_relabel.backends import Backend


def check_writable(out: Path) -> None:
    """Fail before the (slow) backend start when the store cannot be written: `out` (and its files)
    or, for a new store, its nearest existing parent must be writable."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    targets = [existing, *(existing / name for name in STORE_FILES if (existing / name).exists())]
    for target in targets:
        if not os.access(target, os.W_OK):
            reason = "read-only file system" if _read_only_fs(target) else "permission denied"
            raise StoreError(f"{target}: cannot write the store there ({reason})")


def check_not_busy(out: Path, split: tuple[int, int], num_rows: int, overwrite: bool) -> None:
    """Fail before the (slow) backend start when a live process labels rows of the existing store
    that this run would write (with `overwrite`: any row); claim_rows decides later."""
    if not (out / MANIFEST).is_file():
        return
    if overwrite:
        check_no_writer(out)
    else:
        check_rows_free(out, split, num_rows)


def _read_only_fs(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def check_existing_store(
    out: Path,
    data: Path,
    samples: list[ImageEntry],
    teacher: str,
    size: int | None,
    topk: int,
    overwrite: bool,
    retry_failed: bool,
    shard: tuple[int, int],
) -> LabelStore | None:
    """Refuse a mismatched store before the (slow) backend start; the teacher hash is checked later.
    With `retry_failed`, a store whose only difference is folders it could not list, which now
    can be, is rebuilt for the new input list (:mod:`trt_relabel.relist`). Returns the existing
    store (None: there is none, or it was rebuilt)."""
    if overwrite or not (out / MANIFEST).is_file():
        return None
    from trt_relabel.teacher import get_teacher_config

    config = get_teacher_config(teacher, size)
    fields = {"teacher": config.name, "input_size": config.input_size, "topk": topk}
    try:
        return check_resumable(out, samples, **fields)
    except StoreError as mismatch:
        if not _relist(out, data, samples, fields, retry_failed, shard):
            raise mismatch from None
    return None


def _relist(
    out: Path, data: Path, samples: list[ImageEntry], fields: dict, retry_failed: bool, shard: tuple[int, int]
) -> bool:
    """Rebuild the store `out` (built with the StoreSpec `fields`) for `samples` when they differ
    only by folders it failed to list, which now can be listed (with `retry_failed`; a one-line
    error without). False: another difference."""
    from trt_relabel.relist import listed_folders, relist_folders

    store = LabelStore(out)
    if any(getattr(store.spec, name) != value for name, value in fields.items()):
        return False
    folders = listed_folders(store, data, samples)
    if not folders:
        return False
    which = f"{folders[0]!r}" + (f" and {len(folders) - 1} more folders" if len(folders) > 1 else "")
    if not retry_failed:
        raise StoreError(
            f"{store.path}: {which} could not be listed when the store was made and now can: "
            "pass --retry-failed to label its images into this store"
        ) from None
    if shard[1] > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError(
            f"{store.path}: {which} can now be listed: run --retry-failed once without --shard or torchrun "
            "to take its images into the store"
        )
    with claim_rows(out, (0, 1), len(store)):  # no process may label the store while its files are replaced
        relist_folders(store, data, samples)
    console.print(Text(f"{store.path}: {which} can now be listed: the store lists its images (labels kept)"))
    return True


def check_same_teacher(writer: StoreWriter, backend: Backend) -> None:
    """One store never mixes two teachers: refuse to label with a graph the store's may not be continued
    by (see :func:`trt_relabel.backends.graph_may_continue`)."""
    from trt_relabel.backends import graph_may_continue

    started = writer.spec.graph_sha256
    if not graph_may_continue(started, backend):
        raise StoreError(
            f"{writer.path}: labelled with graph sha256 {started[:16]}, which is not a graph of this teacher here "
            f"({backend.name} runs {backend.graph_sha256[:16]}); resume it with the engines folder that labelled "
            "it, or relabel it with --overwrite"
        )
