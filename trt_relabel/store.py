"""The label store (format v1): memory-mapped top-k label maps, one row per input image.

A store is a directory:

- ``manifest.json``: format, teacher, teacher_hash, graph_sha256, input_size, map_size [h, w], topk,
  num_classes, value_kind ("logits"), num_samples, num_failed, complete, started_at, finished_at,
  tool_version, plus optional free keys.
- ``values.npy`` float16 [N, k, h, w] and ``indices.npy`` int16 [N, k, h, w]: the k largest logits
  of each label-map cell (descending along k) and their class indices. Rows of failed inputs stay 0.
- ``samples.tsv``: line i is ``relative/path<TAB>class_index`` of row i (-1 without class folders).
- ``errors.jsonl``: one ``{"path": ..., "reason": ...}`` object per input that could not be labelled.
- ``status.npy`` uint8 [N]: 0 = pending, 1 = labelled, 2 = failed (the resume state).

Every array is preallocated at creation (and its disk space reserved), so labelling only writes
rows in place. A row's labels are written before its status, so after a crash (even kill -9) a row
marked labelled holds its labels and a pending row is simply labelled again.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap

from trt_relabel import __version__
from trt_relabel.errors import RelabelError
from trt_relabel.fileio import remove_stale, temporary_dir, umask, write_atomic
from trt_relabel.images import ImageEntry, first_difference
from trt_relabel.locks import check_no_writer, remove_lock_files

FORMAT = "trt-relabel-store/1"

MANIFEST = "manifest.json"
VALUES = "values.npy"
INDICES = "indices.npy"
SAMPLES = "samples.tsv"
ERRORS = "errors.jsonl"
STATUS = "status.npy"
STORE_FILES = (MANIFEST, VALUES, INDICES, SAMPLES, ERRORS, STATUS)

PENDING, LABELLED, FAILED = 0, 1, 2
FLOAT16_MAX = float(np.finfo(np.float16).max)

REQUIRED_KEYS = (
    "format",
    "teacher",
    "teacher_hash",
    "graph_sha256",
    "input_size",
    "map_size",
    "topk",
    "num_classes",
    "value_kind",
    "num_samples",
    "num_failed",
    "complete",
    "started_at",
    "finished_at",
    "tool_version",
)


class StoreError(RelabelError):
    """A store that cannot be read, created or resumed; the message names the store path and the cause."""


@dataclass(frozen=True)
class StoreSpec:
    """What labelled a store. A resume must match every field but `graph_sha256` (the graph that started
    it: generate lets only a graph of the same teacher continue it, see
    :func:`trt_relabel.backends.graph_may_continue`)."""

    teacher: str
    teacher_hash: str
    graph_sha256: str
    input_size: int
    map_size: tuple[int, int]
    topk: int
    num_classes: int = 1000

    def __post_init__(self) -> None:
        object.__setattr__(self, "map_size", (int(self.map_size[0]), int(self.map_size[1])))

    @classmethod
    def from_manifest(cls, manifest: dict) -> StoreSpec:
        return cls(
            teacher=manifest["teacher"],
            teacher_hash=manifest["teacher_hash"],
            graph_sha256=manifest["graph_sha256"],
            input_size=int(manifest["input_size"]),
            map_size=(int(manifest["map_size"][0]), int(manifest["map_size"][1])),
            topk=int(manifest["topk"]),
            num_classes=int(manifest["num_classes"]),
        )

    @property
    def row_shape(self) -> tuple[int, int, int]:
        """(k, h, w): the shape of one row of values / indices."""
        return (self.topk, *self.map_size)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _read_samples(path: Path) -> list[ImageEntry]:
    """samples.tsv -> entries (the class index is the last tab-separated field)."""
    samples = []
    text = path.read_text(encoding="utf-8", errors="surrogateescape")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    for n, line in enumerate(lines, 1):
        rel, sep, label = line.rpartition("\t")
        if not sep or not label.lstrip("-").isdigit():
            raise StoreError(f"{path}:{n}: not 'path<TAB>class_index': {line[:80]!r}")
        samples.append(ImageEntry(rel, int(label)))
    return samples


def _write_samples(path: Path, samples: list[ImageEntry]) -> None:
    text = "".join(f"{s.path}\t{s.class_index}\n" for s in samples)
    path.write_text(text, encoding="utf-8", errors="surrogateescape")


def _load_array(path: Path, mode: str, dtype: type, shape: tuple[int, ...]) -> np.memmap:
    """Memory-map a .npy file and check its dtype and shape against the manifest."""
    try:
        array = np.load(path, mmap_mode=mode)
    except FileNotFoundError:
        raise StoreError(f"{path}: missing") from None
    except OSError as e:
        raise StoreError(f"{path}: cannot open ({e.strerror})") from None
    except ValueError as e:
        raise StoreError(f"{path}: not a readable .npy file ({e})") from None
    if array.dtype != dtype or array.shape != shape:
        raise StoreError(
            f"{path}: holds {array.dtype} {list(array.shape)}, the manifest says {np.dtype(dtype)} {list(shape)}"
        )
    return array


def _write_manifest(path: Path, manifest: dict) -> None:
    write_atomic(path / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        problem = f"not a label store (no {MANIFEST})" if path.exists() else "no such store (the path does not exist)"
        raise StoreError(f"{path}: {problem}") from None
    except (OSError, ValueError) as e:
        raise StoreError(f"{file}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict):
        raise StoreError(f"{file}: the manifest is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise StoreError(f"{file}: format is {manifest.get('format')!r}, not {FORMAT!r}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise StoreError(f"{file}: missing keys {', '.join(missing)}")
    try:
        StoreSpec.from_manifest(manifest)
        int(manifest["num_samples"])
    except (TypeError, ValueError, IndexError) as e:
        raise StoreError(f"{file}: malformed values ({e})") from None
    return manifest


class LabelStore:
    """Read side of a store, memory-mapped (opening reads only the manifest and samples.tsv).

    Raises :class:`StoreError` when the manifest is missing or malformed, or when an array or
    samples.tsv disagrees with it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        self.spec = StoreSpec.from_manifest(self.manifest)
        n = int(self.manifest["num_samples"])
        shape = (n, *self.spec.row_shape)
        self.values = _load_array(self.path / VALUES, "r", np.float16, shape)
        self.indices = _load_array(self.path / INDICES, "r", np.int16, shape)
        self._status = _load_array(self.path / STATUS, "r", np.uint8, (n,))
        try:
            self.samples = _read_samples(self.path / SAMPLES)
        except OSError as e:
            raise StoreError(f"{self.path / SAMPLES}: unreadable ({e.strerror})") from None
        if len(self.samples) != n:
            raise StoreError(f"{self.path / SAMPLES}: {len(self.samples)} lines, the manifest says {n} samples")
        self.topk = self.spec.topk
        self.map_size = self.spec.map_size
        self.num_classes = self.spec.num_classes
        self.complete = bool(self.manifest["complete"])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Row `row`: values float16 [k, h, w], indices int16 [k, h, w]."""
        return np.asarray(self.values[row]), np.asarray(self.indices[row])

    def gather(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """Rows `rows` (any int sequence, repeats allowed): values float16 [B, k, h, w], indices
        int16 [B, k, h, w], in the given order. The memmap is read once per distinct row, in
        ascending order."""
        unique, inverse = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
        if unique.size and (unique[0] < 0 or unique[-1] >= len(self)):
            raise IndexError(f"{self.path}: rows must lie in [0, {len(self)}), got {unique[[0, -1]].tolist()}")
        return self.values[unique][inverse], self.indices[unique][inverse]

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
        """The parsed lines of errors.jsonl ({"path": ..., "reason": ...}); [] when there is none."""
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
    """The parsed lines of the store's errors.jsonl; [] when there is none."""
    try:
        lines = (path / ERRORS).read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def _samples_mismatch(stored: list[ImageEntry], samples: list[ImageEntry]) -> str | None:
    row = first_difference(stored, samples)
    if row is None:
        return None
    if len(stored) != len(samples):
        return f"{len(stored)} inputs (this run: {len(samples)})"
    return f"row {row} is {stored[row]} (this run: {samples[row]})"


def check_resumable(path: str | Path, samples: list[ImageEntry], **spec_fields) -> LabelStore:
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


def _new_manifest(spec: StoreSpec, num_samples: int, extra: dict | None) -> dict:
    return {
        "format": FORMAT,
        **asdict(spec),
        "value_kind": "logits",
        "num_samples": num_samples,
        "num_failed": 0,
        "complete": False,
        "started_at": _now(),
        "finished_at": None,
        "tool_version": __version__,
        **(extra or {}),
    }


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


def _build(path: Path, spec: StoreSpec, samples: list[ImageEntry], extra: dict | None) -> None:
    """Write a complete new store in a temporary sibling directory, then rename it to `path`
    (atomic: concurrent creators and crashes never leave a half-built store at `path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with temporary_dir(path.parent, f".{path.name}.creating-") as tmp:
        shape = (len(samples), *spec.row_shape)
        _preallocate(tmp / VALUES, np.float16, shape)
        _preallocate(tmp / INDICES, np.int16, shape)
        _preallocate(tmp / STATUS, np.uint8, (len(samples),))
        _write_samples(tmp / SAMPLES, samples)
        (tmp / ERRORS).touch()
        _write_manifest(tmp, _new_manifest(spec, len(samples), extra))
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
    samples: list[ImageEntry],
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
    with_newline = next((s.path for s in samples if "\n" in s.path), None)
    if with_newline is not None:
        raise StoreError(f"{path}: cannot store the file name {with_newline!r} (it holds a newline)")
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
        self._samples = store.samples
        shape = (self.num_samples, *self.spec.row_shape)
        self._values = _load_array(self.path / VALUES, "r+", np.float16, shape)
        self._indices = _load_array(self.path / INDICES, "r+", np.int16, shape)
        self._status = _load_array(self.path / STATUS, "r+", np.uint8, (self.num_samples,))

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
                manifest = _read_manifest(self.path)
                manifest.update(complete=False, finished_at=None)
                _write_manifest(self.path, manifest)
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
        errors.jsonl, then status 2."""
        line = json.dumps({"path": self._samples[row].path, "reason": reason}) + "\n"
        errors = self.path / ERRORS
        try:
            fd = os.open(errors, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
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
            manifest = _read_manifest(self.path)
            if manifest["complete"]:
                return True
            failed = np.flatnonzero(status == FAILED)
            self._rewrite_errors(failed)
            manifest.update(num_failed=int(failed.size), complete=True, finished_at=_now())
            _write_manifest(self.path, manifest)
            return True
        except OSError as e:
            raise StoreError(f"{e.filename or self.path}: cannot finish the store: {e.strerror}") from None

    def _rewrite_errors(self, failed_rows: np.ndarray) -> None:
        """errors.jsonl without the duplicates a crash between a line and its status can leave."""
        reasons = {entry["path"]: entry["reason"] for entry in _read_errors(self.path)}
        lines = []
        for row in failed_rows:
            path = self._samples[row].path
            lines.append(json.dumps({"path": path, "reason": reasons.get(path, "reason not recorded")}) + "\n")
        write_atomic(self.path / ERRORS, "".join(lines))
