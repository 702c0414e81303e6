"""The label store's reader (LabelStore) and writer (create_store, StoreWriter): memory-mapped top-k
label maps, one row per input image; the format is described in :mod:`trt_relabel.store_format`.

Every array is preallocated at creation (and its disk space reserved), so labelling only writes
rows in place. A row's labels are written before its status, so after a crash (even kill -9) a row
marked labelled holds its labels and a pending row is simply labelled again.

Opening a store checks the manifest (keys, types, values), the arrays' dtypes and shapes and every
status byte; class indices are checked on the rows read (:meth:`LabelStore.gather`), since a
scan of a whole ImageNet store (2.9 GB) would cost seconds at every open.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap

from trt_relabel.fileio import remove_stale, temporary_dir, umask, write_atomic
from trt_relabel.images import ImageEntry
from trt_relabel.locks import check_no_writer, remove_lock_files
from trt_relabel.sample_table import SamplesError, SampleTable
from trt_relabel.store_format import (
    ERRORS,
    FAILED,
    FLOAT16_MAX,
    INDICES,
    LABELLED,
    MANIFEST,
    PENDING,
    READABLE_FORMATS,
    SAMPLES,
    STATUS,
    STORE_FILES,
    VALUES,
    StoreError,
    StoreSpec,
    load_array,
    new_manifest,
    read_manifest,
    utc_now,
    write_manifest,
)


def _random_rows(array: np.memmap) -> np.memmap:
    """`array` advised MADV_RANDOM: a page fault reads that page only, not the default read-ahead
    (megabytes for 2 KB rows)."""
    array._mmap.madvise(mmap.MADV_RANDOM)
    return array


def _read_rows(array: np.memmap, rows: np.ndarray) -> np.ndarray:
    """array[rows] (`rows` ascending), the pages of every row requested at once (MADV_WILLNEED)
    before the copy, so that cold rows are read in parallel rather than one fault after another."""
    row_bytes = array.strides[0]
    starts = array.offset % mmap.ALLOCATIONGRANULARITY + rows * row_bytes  # within the mapping
    first_page = starts - starts % mmap.PAGESIZE
    for start, length in zip(first_page.tolist(), (starts + row_bytes - first_page).tolist(), strict=True):
        array._mmap.madvise(mmap.MADV_WILLNEED, start, length)
    return array[rows]


class LabelStore:
    """Read side of a store, memory-mapped (opening reads the manifest, the status bytes and
    samples.tsv; the label arrays are read on access).

    Raises :class:`StoreError` when the manifest is missing or malformed, when an array or
    samples.tsv disagrees with it, when a status byte is not 0, 1 or 2, and (on the rows read)
    when a class index lies outside [0, num_classes).

    `values` and `indices` map the arrays with the kernel's default read-ahead (for reading long
    runs of rows); :meth:`gather` reads scattered rows through a second mapping advised
    MADV_RANDOM, so that a cold random batch reads a few pages per row instead of megabytes.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.spec = StoreSpec.from_manifest(self.manifest)
        n = self.manifest["num_samples"]
        self._shape = (n, *self.spec.row_shape)
        self.values = load_array(self.path / VALUES, "r", np.float16, self._shape)
        self.indices = load_array(self.path / INDICES, "r", np.int16, self._shape)
        self._status = load_array(self.path / STATUS, "r", np.uint8, (n,))
        self._random: tuple[np.memmap, np.memmap] | None = None
        self._check_status()
        try:
            self.samples = SampleTable.read(self.path / SAMPLES, escaped=READABLE_FORMATS[self.manifest["format"]])
        except SamplesError as e:
            raise StoreError(str(e)) from None
        if len(self.samples) != n:
            raise StoreError(f"{self.path / SAMPLES}: {len(self.samples)} lines, the manifest says {n} samples")
        self.topk = self.spec.topk
        self.map_size = self.spec.map_size
        self.num_classes = self.spec.num_classes
        self.complete = self.manifest["complete"]

    def _check_status(self) -> None:
        status = self.status()
        if status.size and status.max() > FAILED:
            row = int(np.argmax(status > FAILED))
            raise StoreError(
                f"{self.path / STATUS}: row {row} has status {status[row]}, not 0 (pending), 1 (labelled) or 2 (failed)"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Row `row`: values float16 [k, h, w], indices int16 [k, h, w] (checked as by :meth:`gather`)."""
        values, indices = self.gather([row + len(self) if row < 0 else row])
        return values[0], indices[0]

    def gather(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """Rows `rows` (any int sequence, repeats allowed): values float16 [B, k, h, w], indices
        int16 [B, k, h, w], in the given order. The arrays are read once per distinct row, in
        ascending order: scattered rows through the MADV_RANDOM mapping (all their pages requested
        at once), dense runs (at least one row in four of their span) through the default one.
        :class:`StoreError` when a row read holds a class index outside [0, num_classes)."""
        unique, inverse = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
        if unique.size and (unique[0] < 0 or unique[-1] >= len(self)):
            raise IndexError(f"{self.path}: rows must lie in [0, {len(self)}), got {unique[[0, -1]].tolist()}")
        if unique.size == 0 or unique[-1] - unique[0] < 4 * unique.size:
            values, indices = self.values[unique], self.indices[unique]
        else:
            values, indices = (_read_rows(array, unique) for array in self._random_mappings())
        self._check_indices(unique, indices)
        return values[inverse], indices[inverse]

    def _random_mappings(self) -> tuple[np.memmap, np.memmap]:
        if self._random is None:
            self._random = (
                _random_rows(load_array(self.path / VALUES, "r", np.float16, self._shape)),
                _random_rows(load_array(self.path / INDICES, "r", np.int16, self._shape)),
            )
        return self._random

    def _check_indices(self, rows: np.ndarray, indices: np.ndarray) -> None:
        """StoreError naming the first of `rows` whose class indices (int16 [B, k, h, w]) leave
        [0, num_classes)."""
        if not indices.size or (indices.min() >= 0 and indices.max() < self.num_classes):
            return
        outside = ((indices < 0) | (indices >= self.num_classes)).reshape(len(rows), -1)
        position = int(np.argmax(outside.any(axis=1)))
        value = int(indices[position].reshape(-1)[np.argmax(outside[position])])
        raise StoreError(
            f"{self.path / INDICES}: row {rows[position]} holds class index {value}, "
            f"outside [0, {self.num_classes}) (num_classes in {MANIFEST})"
        )

    def status(self) -> np.ndarray:
        """uint8 [N]: each row's status, PENDING, LABELLED or FAILED."""
        return np.asarray(self._status)

    def labelled(self) -> np.ndarray:
        """bool [N]: the rows that hold labels (status labelled)."""
        return self.status() == LABELLED

    def nonfinite(self, chunk_rows: int = 16384) -> np.ndarray:
        """bool [N]: the rows whose values hold a NaN or an infinity (the writer refuses them, but
        stores of older versions or edited ones may hold them). Reads every row once."""
        return np.concatenate(
            [nonfinite_rows(self.values[start : start + chunk_rows]) for start in range(0, len(self), chunk_rows)]
            or [np.zeros(0, bool)]
        )

    def errors(self) -> list[dict]:
        """The lines of errors.jsonl ({"path": ..., "reason": ...}); [] when there is none. Torn
        lines (a crash or a full disk in the middle of a line) are skipped."""
        return _read_errors(self.path)


def nonfinite_rows(values: np.ndarray) -> np.ndarray:
    """bool [B]: the rows of float16 `values` [B, ...] that hold a NaN or an infinity (all five
    exponent bits set), ~5x faster than np.isfinite on float16."""
    if values.dtype != np.float16:
        raise TypeError(f"nonfinite_rows takes float16 values, not {values.dtype}")
    bits = np.ascontiguousarray(values).view(np.uint16).reshape(len(values), -1)
    return ((bits & 0x7C00) == 0x7C00).any(axis=1)


def _nonfinite_reason(values: np.ndarray) -> str:
    """Why a row of scores (any float [k, h, w]) cannot be stored as float16."""
    values = np.asarray(values, dtype=np.float64)
    if np.isnan(values).any():
        return "the teacher's scores are not finite (NaN); labels not stored"
    if np.isinf(values).any():
        return "the teacher's scores are not finite (inf); labels not stored"
    return (
        f"a teacher score of {np.abs(values).max():.6g} overflows float16 (at most {FLOAT16_MAX:g}); labels not stored"
    )


def _read_errors(path: Path) -> list[dict]:
    """The complete {"path": str, "reason": str} lines of the store's errors.jsonl, skipping torn
    ones; [] when there is none."""
    try:
        lines = (path / ERRORS).read_bytes().split(b"\n")
    except FileNotFoundError:
        return []
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("reason"), str):
            entries.append(entry)
    return entries


def _append_line(file: Path, line: bytes) -> None:
    """Append `line` (ending in LF) to `file` whole, retrying short writes; after a torn line (a
    crash or a full disk in the middle of an earlier append) it starts on a line of its own.
    OSError when it cannot be written whole (the part written is then a torn line)."""
    fd = os.open(file, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        written = 0
        while written < len(line):
            count = os.write(fd, line[written:])
            if count == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
            written += count
    finally:
        os.close(fd)


def _samples_mismatch(stored: SampleTable, samples: Sequence[ImageEntry]) -> str | None:
    try:
        row = stored.first_difference(samples)
    except SamplesError as e:  # a name that a format 1 store cannot hold
        return str(e)
    if row is None:
        return None
    if len(stored) != len(samples):
        return f"{len(stored)} inputs (this run: {len(samples)})"
    return f"row {row} is {stored[row]} (this run: {samples[row]})"


def check_resumable(path: str | Path, samples: Sequence[ImageEntry], **spec_fields) -> LabelStore:
    """The store at `path` when it was built from exactly `samples` with the given StoreSpec
    fields (e.g. topk=5); else :class:`StoreError` explaining the difference."""
    try:
        store = LabelStore(path)
    except StoreError as e:
        raise StoreError(f"{e}; pass --overwrite to start over") from None
    problems = [
        f"{name}={getattr(store.spec, name)!r} (this run: {value!r})"
        for name, value in spec_fields.items()
        if getattr(store.spec, name) != value
    ]
    different_inputs = _samples_mismatch(store.samples, samples)
    if different_inputs:
        problems.append(f"a different input list: {different_inputs}")
    if problems:
        raise StoreError(
            f"{store.path}: the store was built with {'; '.join(problems)}; pass --overwrite to start over"
        )
    return store


def _preallocate(path: Path, dtype: type, shape: tuple[int, ...]) -> None:
    """An all-zero .npy file of `shape` whose disk space is reserved (so writing rows later cannot
    hit a full disk)."""
    array = open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    del array
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # filesystems without fallocate
                raise


def _build(path: Path, spec: StoreSpec, samples: SampleTable, extra: dict | None) -> None:
    """Write a complete new store in a temporary sibling directory, then rename it to `path`
    (atomic: concurrent creators and crashes never leave a half-built store at `path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with temporary_dir(path.parent, f".{path.name}.creating-") as tmp:
        shape = (len(samples), *spec.row_shape)
        _preallocate(tmp / VALUES, np.float16, shape)
        _preallocate(tmp / INDICES, np.int16, shape)
        _preallocate(tmp / STATUS, np.uint8, (len(samples),))
        samples.write(tmp / SAMPLES)
        (tmp / ERRORS).touch()
        write_manifest(tmp, new_manifest(spec, len(samples), extra))
        tmp.chmod(0o777 & ~umask())
        try:
            os.rename(tmp, path)  # replaces `path` only when it is an empty directory
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise


def _remove_leftovers(path: Path) -> None:
    """Remove what killed writers of the store at `path` left: a half-built ``.NAME.creating-*``
    beside it and temporaries of its files (see trt_relabel.fileio.remove_stale)."""
    remove_stale(path.parent, f".{path.name}.creating-")
    if path.is_dir():
        for name in STORE_FILES:
            remove_stale(path, f".{name}.", ".tmp")


def _remove_store(path: Path) -> None:
    """Delete the store files at `path` (and the directory once empty); other files are kept."""
    for name in STORE_FILES:
        (path / name).unlink(missing_ok=True)
    for leftover in path.glob(".*.tmp"):
        leftover.unlink(missing_ok=True)
    remove_lock_files(path)
    if not any(path.iterdir()):
        path.rmdir()


def create_store(
    path: str | Path,
    spec: StoreSpec,
    samples: Sequence[ImageEntry],
    *,
    overwrite: bool = False,
    extra_manifest: dict | None = None,
) -> StoreWriter:
    """Create the store at `path` for `samples` (row i = samples[i]), or reopen it for resume.

    A new store is preallocated (all rows pending). An existing store built with the same spec (but
    graph_sha256) from the same samples is reopened as it is; any other existing store raises
    :class:`StoreError` unless `overwrite`, which deletes it first. Several processes may call this
    at once for the same store (the first to finish building wins, the others reopen it); with
    `overwrite`, only one process may.
    """
    path = Path(path)
    if not samples:
        raise StoreError(f"{path}: no input to label")
    try:
        samples = SampleTable.from_entries(samples)
    except SamplesError as e:
        raise StoreError(f"{path}: {e}") from None
    matched = {name: value for name, value in asdict(spec).items() if name != "graph_sha256"}
    try:
        _remove_leftovers(path)
        if overwrite and (path / MANIFEST).exists():
            check_no_writer(path)
            _remove_store(path)
        if path.exists() and not path.is_dir():
            raise StoreError(f"{path}: exists and is not a directory")
        if path.is_dir() and not (path / MANIFEST).exists() and any(path.iterdir()):
            raise StoreError(f"{path}: not a label store and not empty; choose another --out")
        if not (path / MANIFEST).exists():
            _build(path, spec, samples, extra_manifest)
        return StoreWriter(check_resumable(path, samples, **matched))
    except OSError as e:
        raise StoreError(f"{e.filename or path}: cannot create the store: {e.strerror}") from None


class StoreWriter:
    """Write side of an existing store (made by :func:`create_store`): rows are written in place
    into the memmaps. Several processes may write disjoint rows of the same store at once.
    """

    def __init__(self, store: LabelStore) -> None:
        self.path = store.path
        self.spec = store.spec
        self.num_samples = len(store)
        self.samples = store.samples  # a SampleTable: row i's ImageEntry
        shape = (self.num_samples, *self.spec.row_shape)
        self._values = load_array(self.path / VALUES, "r+", np.float16, shape)
        self._indices = load_array(self.path / INDICES, "r+", np.int16, shape)
        self._status = load_array(self.path / STATUS, "r+", np.uint8, (self.num_samples,))

    def status(self) -> np.ndarray:
        """uint8 [N]: each row's status as now written (by every process), PENDING, LABELLED or FAILED."""
        return np.asarray(self._status)

    def pending_rows(self, shard: tuple[int, int] = (0, 1)) -> np.ndarray:
        """int64 [M], ascending: the rows still pending whose row % shard[1] == shard[0]."""
        return self._rows(PENDING, shard)

    def _rows(self, status: int, shard: tuple[int, int]) -> np.ndarray:
        index, count = shard
        rows = np.flatnonzero(self.status() == status)
        return rows[rows % count == index]

    def retry_failed(self, shard: tuple[int, int] = (0, 1)) -> int:
        """Make the failed rows whose row % shard[1] == shard[0] pending again (their errors.jsonl
        lines go at the next finish, unless they fail again); the store is no longer complete.
        Returns how many rows."""
        rows = self._rows(FAILED, shard)
        if rows.size:
            try:
                self._status[rows] = PENDING
                self._status.flush()
                manifest = read_manifest(self.path)
                manifest.update(complete=False, finished_at=None)
                write_manifest(self.path, manifest)
            except OSError as e:
                raise StoreError(f"{e.filename or self.path}: cannot reopen failed rows: {e.strerror}") from None
        return int(rows.size)

    def write(self, rows: np.ndarray, values: np.ndarray, indices: np.ndarray) -> int:
        """Store the labels of `rows` (int [B]): values any float [B, k, h, w] (cast to float16),
        indices any int [B, k, h, w] (cast to int16); then mark the rows labelled. A row whose
        values are not finite in float16 (NaN, inf, or beyond +-65504) is marked failed instead,
        with the reason. Returns how many rows failed so."""
        rows = np.asarray(rows, dtype=np.int64)
        expected = (len(rows), *self.spec.row_shape)
        if values.shape != expected or indices.shape != expected:
            raise ValueError(
                f"{self.path}: labels of shape {list(values.shape)} / {list(indices.shape)}, "
                f"the store holds rows of {list(expected)}"
            )
        with np.errstate(over="ignore"):  # overflow becomes inf, refused below
            half = values.astype(np.float16, copy=False)
        bad = nonfinite_rows(half)
        if bad.any():
            for row, row_values in zip(rows[bad], values[bad], strict=True):
                self.mark_failed(int(row), _nonfinite_reason(row_values))
            rows, half, indices = rows[~bad], half[~bad], indices[~bad]
        self._values[rows] = half
        self._indices[rows] = indices.astype(np.int16, copy=False)
        self._status[rows] = LABELLED
        return int(bad.sum())

    def mark_failed(self, row: int, reason: str) -> None:
        """Mark `row` failed: one line {"path", "reason"} (the row's sample path) appended to
        errors.jsonl, then status 2. The status is set only once the whole line is written: when
        the line cannot be (a full disk), :class:`StoreError` and the row stays pending."""
        line = json.dumps({"path": self.samples[row].path, "reason": reason}) + "\n"
        errors = self.path / ERRORS
        try:
            _append_line(errors, line.encode())
        except OSError as e:
            raise StoreError(f"{errors}: cannot record a failed input: {e.strerror}") from None
        self._status[row] = FAILED

    def finish(self) -> bool:
        """Flush the arrays. When no row is pending, rewrite errors.jsonl (one line per failed row,
        in row order) and mark the manifest complete (num_failed, finished_at). Returns whether the
        store is complete. Idempotent."""
        try:
            for array in (self._values, self._indices, self._status):
                array.flush()
            status = np.asarray(self._status)
            if (status == PENDING).any():
                return False
            manifest = read_manifest(self.path)
            if manifest["complete"]:
                return True
            failed = np.flatnonzero(status == FAILED)
            self._rewrite_errors(failed)
            manifest.update(num_failed=int(failed.size), complete=True, finished_at=utc_now())
            write_manifest(self.path, manifest)
            return True
        except OSError as e:
            raise StoreError(f"{e.filename or self.path}: cannot finish the store: {e.strerror}") from None

    def _rewrite_errors(self, failed_rows: np.ndarray) -> None:
        """errors.jsonl without the duplicates a crash between a line and its status can leave, and
        without torn lines."""
        reasons = {entry["path"]: entry["reason"] for entry in _read_errors(self.path)}
        lines = []
        for row in failed_rows:
            path = self.samples[row].path
            lines.append(json.dumps({"path": path, "reason": reasons.get(path, "reason not recorded")}) + "\n")
        write_atomic(self.path / ERRORS, "".join(lines))
