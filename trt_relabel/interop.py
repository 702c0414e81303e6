"""Interoperability with the official ReLabel maps, and teacher ensembles of label stores.

The official maps of "Re-labeling ImageNet" (EfficientNet-L2 teacher) come as one file per
training image, ``RELABEL_ROOT/<wnid>/<image stem>.pt``: a float tensor [2, 5, 15, 15] saved with
torch.save, where [0] holds the top-5 logits of each of the 15 x 15 cells and [1] their class
indices (integral floats in [0, 1000)). :func:`import_relabel` turns them into a label store aligned
with an ImageFolder listing, :func:`export_relabel` writes a store back in that layout, and
:func:`merge_stores` averages the logits of several teachers.

A store keeps float16 values: official float32 logits are rounded to float16 on import, so an
import -> export -> import round trip is bit-exact (and export reproduces the official tensors
exactly wherever they are float16-representable).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from trt_relabel.classes import classes_from_metadata, classes_metadata, imagenet_classes, map_folder_classes
from trt_relabel.errors import UsageError
from trt_relabel.fileio import write_atomic
from trt_relabel.images import ImageEntry, first_difference, list_images
from trt_relabel.store import LabelStore, StoreWriter, create_store
from trt_relabel.store_format import ERRORS, FAILED, FLOAT16_MAX, MANIFEST, StoreError, StoreSpec

#: What labelled the official maps: EfficientNet-L2 at 475 px, top-5 of 15 x 15 cells.
RELABEL_SPEC = StoreSpec(
    teacher="relabel_imagenet_official",
    teacher_hash="official",
    graph_sha256="",
    input_size=475,
    map_size=(15, 15),
    topk=5,
    num_classes=1000,
)
RELABEL_SHAPE = (2, RELABEL_SPEC.topk, *RELABEL_SPEC.map_size)
#: Written by export-relabel beside the maps: the StoreSpec of the teacher that made them (JSON), so
#: that import-relabel keeps its name and hash.
TEACHER_FILE = "trt-relabel-teacher.json"

#: Called with (rows done, rows to do) as the work of one call progresses.
ProgressCallback = Callable[[int, int], None]


class RelabelMapError(Exception):
    """An official map file that cannot be imported; the message is the one-line reason."""


@dataclass(frozen=True)
class ImportSummary:
    """Result of :func:`import_relabel`: `imported` rows in this run, `failed` rows in the whole
    store (this run and earlier ones), `already_done` rows labelled by an earlier run."""

    store: Path
    num_samples: int
    imported: int
    failed: int
    already_done: int
    complete: bool

    @property
    def errors_path(self) -> Path:
        return self.store / ERRORS


def relabel_map_path(relabel_root: Path, image_path: str) -> Path:
    """The official map of the image at relative path `image_path` (``<wnid>/<stem>.<ext>``):
    ``relabel_root/<wnid>/<stem>.pt``. Raises :class:`StoreError` for a path that could leave the root."""
    relative = PurePosixPath(image_path)
    if relative.is_absolute() or ".." in relative.parts:
        raise StoreError(f"{image_path}: sample path is not a plain relative path")
    return relabel_root / relative.with_suffix(".pt")


def shared_map_files(samples: list[ImageEntry]) -> list[list[int]]:
    """Groups of two or more rows whose samples have one official map file (same folder and stem,
    e.g. ``a/x.JPEG`` and ``a/x.png``): the official layout cannot tell these images apart."""
    stems = [posixpath.splitext(sample.path)[0] for sample in samples]
    counts = Counter(stems)
    groups: dict[str, list[int]] = {}
    for row, stem in enumerate(stems):
        if counts[stem] > 1:
            groups.setdefault(stem, []).append(row)
    return list(groups.values())


def _fail_shared_map_files(writer: StoreWriter, samples: list[ImageEntry], pending: np.ndarray) -> np.ndarray:
    """Mark failed the pending rows whose map file another sample has too; return the other pending rows."""
    is_pending = np.zeros(len(samples), dtype=bool)
    is_pending[pending] = True
    for group in shared_map_files(samples):
        for row in group:
            if is_pending[row]:
                other = samples[next(r for r in group if r != row)].path
                reason = f"its official map file is also {other}'s (same folder and stem)"
                writer.mark_failed(row, reason)
                is_pending[row] = False
    return np.flatnonzero(is_pending)


def _load_failure(error: Exception) -> str:
    """One line out of torch.load's (multi-line) error: the innermost unpickler message, if any."""
    inner = error.__context__ if isinstance(error.__context__, Exception) else error
    detail = " ".join(str(inner).split()).split(". Please")[0] or type(inner).__name__
    return f"corrupt or not a plain tensor file: torch.load(weights_only=True) failed ({detail[:160]})"


def read_relabel_map(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one official map file safely (torch.load with weights_only=True: no arbitrary object
    is ever unpickled) and check it.

    Returns values float32 [5, 15, 15] (logits) and indices int16 [5, 15, 15]. Raises
    :class:`RelabelMapError` when the file is missing, corrupt, unsafe (a pickle of a custom
    class), not a float tensor [2, 5, 15, 15], holds scores that float16 cannot keep, or class
    indices that are not integers in [0, 1000).
    """
    import torch

    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RelabelMapError("missing") from None
    except Exception as e:  # torch.load raises many types for damaged files
        raise RelabelMapError(_load_failure(e)) from None
    if not isinstance(tensor, torch.Tensor):
        raise RelabelMapError(f"holds a {type(tensor).__name__}, not a tensor")
    if tuple(tensor.shape) != RELABEL_SHAPE or not tensor.is_floating_point():
        raise RelabelMapError(
            f"{tensor.dtype} tensor {list(tensor.shape)}, expected a float tensor {list(RELABEL_SHAPE)}"
        )
    scores, classes = tensor.to(torch.float64).numpy()
    if not (np.abs(scores) <= FLOAT16_MAX).all():
        raise RelabelMapError("scores that are not finite in float16")
    bad = (classes != np.round(classes)) | (classes < 0) | (classes >= RELABEL_SPEC.num_classes)
    if bad.any():
        raise RelabelMapError(
            f"class index {classes[bad][0]:g}: indices must be integers in [0, {RELABEL_SPEC.num_classes})"
        )
    return scores.astype(np.float32), classes.astype(np.int16)


def _read_map_or_reason(path: Path) -> tuple[np.ndarray, np.ndarray] | str:
    """:func:`read_relabel_map` for a worker process: the labels, or the reason it failed."""
    try:
        return read_relabel_map(path)
    except RelabelMapError as e:
        return f"label map {path}: {e}"


def _chunks(rows: np.ndarray, size: int, progress: ProgressCallback | None) -> Iterator[np.ndarray]:
    """`rows` `size` at a time; `progress` (rows done, rows to do) after each chunk's work."""
    for start in range(0, len(rows), size):
        yield rows[start : start + size]
        if progress:
            progress(min(start + size, len(rows)), len(rows))


def _parallel_map(func: Callable, items: list, pool: ProcessPoolExecutor | None) -> list:
    """`func` over `items` in order: in the worker processes of `pool`, or here when it is None."""
    if pool is None:
        return [func(item) for item in items]
    return list(pool.map(func, items, chunksize=64))


def _worker_pool(workers: int) -> ProcessPoolExecutor | None:
    """Loading and saving .pt files is Python-bound (~1 ms a file): processes scale it. Forked
    where possible: the workers start at once (spawned ones import torch anew, seconds each) and
    only run torch.load / torch.save, which is fork-safe."""
    if workers <= 1:
        return None
    import multiprocessing

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))


def import_relabel(
    relabel_root: str | Path,
    data_dir: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    retry_failed: bool = False,
    workers: int = 1,
    chunk_rows: int = 2048,
    progress: ProgressCallback | None = None,
) -> ImportSummary:
    """Import the official maps under `relabel_root` into the store `out`, one row per image of
    the ImageFolder `data_dir` (trt_relabel.images.list_images order); wnid folders get their
    ImageNet class index in samples.tsv, for any subset of the classes (others -1).

    The map of ``data_dir/<wnid>/<stem>.<ext>`` is ``relabel_root/<wnid>/<stem>.pt`` (see
    :func:`read_relabel_map`); a missing or bad one marks its row failed with the reason in
    errors.jsonl. Resumable: an existing store is reopened and only its pending rows are read
    (and its failed ones, with `retry_failed`). `workers` > 1 reads the files in that many
    processes. Logits are stored as float16.
    """
    relabel_root, data_dir = Path(relabel_root), Path(data_dir)
    for folder in (relabel_root, data_dir):
        if not folder.is_dir():
            raise UsageError(f"{folder}: not a directory")
    samples, _ = map_folder_classes(list_images(data_dir), imagenet_classes())
    spec = _exported_spec(relabel_root)
    writer = create_store(out, spec, samples, overwrite=overwrite, extra_manifest={"source": "import-relabel"})
    if retry_failed:
        writer.retry_failed()
    pending = writer.pending_rows()
    already_done = len(samples) - len(pending)
    pending = _fail_shared_map_files(writer, samples, pending)
    imported = 0
    pool = _worker_pool(workers)
    try:
        for rows in _chunks(pending, chunk_rows, progress):
            paths = [relabel_map_path(relabel_root, samples[row].path) for row in rows]
            imported += _write_chunk(writer, rows, _parallel_map(_read_map_or_reason, paths, pool))
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    complete = writer.finish()
    return ImportSummary(
        store=Path(out),
        num_samples=len(samples),
        imported=imported,
        failed=_num_failed(writer),
        already_done=already_done,
        complete=complete,
    )


def _exported_spec(relabel_root: Path) -> StoreSpec:
    """The teacher of maps that export-relabel wrote (its TEACHER_FILE), else :data:`RELABEL_SPEC`
    (the official maps). Maps of another shape than the official one are refused."""
    path = relabel_root / TEACHER_FILE
    if not path.is_file():
        return RELABEL_SPEC
    try:
        spec = StoreSpec.from_manifest(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise StoreError(f"{path}: unreadable teacher file ({type(e).__name__}: {e})") from None
    official = (RELABEL_SPEC.row_shape, RELABEL_SPEC.num_classes)
    if (spec.row_shape, spec.num_classes) != official:
        raise UsageError(
            f"{path}: the maps hold top-{spec.topk} of {spec.map_size[0]}x{spec.map_size[1]} cells over "
            f"{spec.num_classes} classes; import-relabel reads the official top-5 of 15x15 over 1000 classes"
        )
    return spec


def _num_failed(writer: StoreWriter) -> int:
    """Rows of the store marked failed."""
    return int((writer.status() == FAILED).sum())


def _write_chunk(writer: StoreWriter, rows: np.ndarray, results: list) -> int:
    """Write the maps read for `rows`; mark the rows whose result is a reason failed. Returns the
    number of rows written."""
    good = [i for i, result in enumerate(results) if not isinstance(result, str)]
    for i, result in enumerate(results):
        if isinstance(result, str):
            writer.mark_failed(int(rows[i]), result)
    if good:
        writer.write(
            rows[good],
            np.stack([results[i][0] for i in good]),
            np.stack([results[i][1] for i in good]),
        )
    return len(good)


def _save_map(item: tuple[Path, np.ndarray]) -> None:
    import torch

    path, tensor = item
    torch.save(torch.from_numpy(tensor), path)


def export_relabel(
    store_path: str | Path,
    out_root: str | Path,
    *,
    workers: int = 1,
    chunk_rows: int = 2048,
    progress: ProgressCallback | None = None,
) -> int:
    """Write the labelled rows of a store in the official layout: ``out_root/<dir>/<stem>.pt`` for
    the sample ``<dir>/<stem>.<ext>``, a float32 tensor [2, k, h, w] ([0] logits, [1] class indices
    as floats) saved with torch.save. Failed and pending rows are skipped. Returns the number of
    files written."""
    store = LabelStore(store_path)
    out_root = Path(out_root)
    labelled = store.labelled()
    rows = np.flatnonzero(labelled)
    for group in shared_map_files(store.samples):
        written = [row for row in group if labelled[row]]
        if len(written) > 1:
            first, second = (store.samples[row].path for row in written[:2])
            raise StoreError(
                f"{store_path}: {first} and {second} would both be written to {relabel_map_path(out_root, first)} "
                "(same folder and stem); the official layout cannot hold both"
            )
    pool = _worker_pool(workers)
    try:
        for chunk in _chunks(rows, chunk_rows, progress):
            values, indices = store.gather(chunk)
            tensors = np.stack([values, indices], axis=1).astype(np.float32)  # [B, 2, k, h, w]
            paths = [relabel_map_path(out_root, store.samples[row].path) for row in chunk]
            for folder in {path.parent for path in paths}:
                folder.mkdir(parents=True, exist_ok=True)
            _parallel_map(_save_map, list(zip(paths, tensors, strict=True)), pool)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    out_root.mkdir(parents=True, exist_ok=True)
    write_atomic(out_root / TEACHER_FILE, json.dumps(asdict(store.spec), indent=2) + "\n")
    return len(rows)


def merge_maps(
    values: list[np.ndarray], indices: list[np.ndarray], weights: np.ndarray, topk: int
) -> tuple[np.ndarray, np.ndarray]:
    """Ensemble the top-k maps of T teachers, cell by cell.

    values[t] float [B, k_t, h, w] (logits) and indices[t] int [B, k_t, h, w] of teacher t;
    `weights` float [T] summing to 1. For every class of the union of the teachers' top-k in a
    cell, the merged logit is the weighted mean of the teachers' logits for it; a teacher that did
    not keep that class in that cell counts with its smallest kept logit there (its k-th value: an
    upper bound of its true logit, so a class only some teachers rank is never favoured). Returns
    the `topk` largest merged logits float32 [B, topk, h, w] (descending; ties keep the class of
    the earlier teacher first) and their classes [B, topk, h, w] (the dtype of `indices`).
    """
    candidates = np.concatenate(indices, axis=1)  # [B, K, h, w], K = sum of k_t
    merged = np.zeros(candidates.shape, np.float32)
    for teacher_values, teacher_indices, weight in zip(values, indices, weights, strict=True):
        logits = teacher_values.astype(np.float32)
        teacher_logits = np.repeat(logits.min(axis=1, keepdims=True), candidates.shape[1], axis=1)
        for j in range(logits.shape[1]):  # k_t passes over [B, K, h, w]: no [B, K, k_t, h, w] temporary
            np.copyto(teacher_logits, logits[:, j : j + 1], where=candidates == teacher_indices[:, j : j + 1])
        merged += weight * teacher_logits
    # A class kept by several teachers is one candidate: drop its later occurrences.
    for j in range(candidates.shape[1] - 1):
        np.copyto(merged[:, j + 1 :], -np.inf, where=candidates[:, j + 1 :] == candidates[:, j : j + 1])
    order = np.argsort(-merged, axis=1, kind="stable")[:, :topk]
    return np.take_along_axis(merged, order, axis=1), np.take_along_axis(candidates, order, axis=1)


def _check_aligned(stores: list[LabelStore]) -> None:
    """Raise :class:`StoreError` naming the first store whose samples, map size or number of
    classes differ from the first store's, or that is not complete."""
    first = stores[0]
    for store in stores:
        if not store.complete:
            raise StoreError(f"{store.path}: the store is not complete (label or import it to the end first)")
        for what, theirs, ours in (
            ("map size", store.map_size, first.map_size),
            ("number of classes", store.num_classes, first.num_classes),
            ("number of samples", len(store), len(first)),
        ):
            if theirs != ours:
                raise StoreError(f"{store.path}: {what} {theirs} differs from {first.path} ({ours})")
        theirs, ours = _classes(store).ids, _classes(first).ids
        differing = first_difference(theirs, ours)
        if differing is not None:
            raise StoreError(
                f"{store.path}: class {differing} is {theirs[differing]!r}, in {first.path} {ours[differing]!r}: "
                "the teachers have different classes"
            )
        row = first_difference(store.samples, first.samples)
        if row is not None:
            raise StoreError(
                f"{store.path}: sample {row} is {store.samples[row].path!r} class "
                f"{store.samples[row].class_index}, in {first.path} {first.samples[row].path!r} class "
                f"{first.samples[row].class_index}: the stores are not aligned"
            )


def _classes(store: LabelStore):
    return classes_from_metadata(store.manifest, store.num_classes)


def _normalised_weights(weights: list[float] | None, count: int) -> np.ndarray:
    if weights is None:
        return np.full(count, 1 / count)
    array = np.asarray(weights, dtype=np.float64)
    if len(array) != count:
        raise UsageError(f"{len(array)} weights for {count} stores")
    if not (np.isfinite(array).all() and (array > 0).all()):
        raise UsageError(f"weights must be positive numbers, got {weights}")
    return array / array.sum()


def _merged_spec(stores: list[LabelStore], weights: np.ndarray, topk: int) -> StoreSpec:
    """teacher 'merge(a,b,...)'; teacher_hash: sha256 of the inputs' hashes, the weights and k;
    input_size: the largest input size."""
    key = json.dumps(
        {"teacher_hashes": [s.spec.teacher_hash for s in stores], "weights": weights.tolist(), "topk": topk}
    )
    return StoreSpec(
        teacher=f"merge({','.join(s.spec.teacher for s in stores)})",
        teacher_hash=hashlib.sha256(key.encode()).hexdigest(),
        graph_sha256="",
        input_size=max(s.spec.input_size for s in stores),
        map_size=stores[0].map_size,
        topk=topk,
        num_classes=stores[0].num_classes,
    )


def _check_same_merge(out: Path, merged_from: list[dict], topk: int) -> None:
    """Refuse to resume an earlier merge into `out` of other inputs, weights or k, naming the first
    field that differs (the merged teacher hash would only say that something does)."""
    if not (out / MANIFEST).is_file():
        return
    earlier = LabelStore(out).manifest
    before = earlier.get("merged_from")
    if not isinstance(before, list):
        return  # not a merge: create_store says how it differs
    differences = [f"topk {earlier['topk']} (this run: {topk})"] if earlier["topk"] != topk else []
    if len(before) != len(merged_from):
        differences.append(f"{len(before)} input stores (this run: {len(merged_from)})")
    for number, (old, new) in enumerate(zip(before, merged_from, strict=False), start=1):
        differences += [
            f"input {number} {field} {_short(old.get(field))} (this run: {_short(new[field])})"
            for field in ("path", "teacher", "teacher_hash", "weight")
            if old.get(field) != new[field]
        ]
    if differences:
        raise StoreError(
            f"{out}: an earlier merge into this store had {differences[0]}; pass --overwrite to start over"
        )


def _short(value: object) -> str:
    """A manifest value for a message: hashes cut to 12 hex digits, weights to 4 significant ones."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return value[:12] if isinstance(value, str) and len(value) == 64 else str(value)


@dataclass(frozen=True)
class MergeSummary:
    """Result of :func:`merge_stores`: rows `merged` in this run, `failed` rows of the output."""

    store: Path
    num_samples: int
    merged: int
    failed: int
    complete: bool


def merge_stores(
    inputs: list[str | Path],
    out: str | Path,
    *,
    weights: list[float] | None = None,
    topk: int | None = None,
    overwrite: bool = False,
    chunk_rows: int = 1024,
    progress: ProgressCallback | None = None,
) -> MergeSummary:
    """Merge complete, aligned stores (same samples, map size and classes) into the store `out`
    with :func:`merge_maps`: a weighted mean of the logits (`weights` normalised to sum 1; equal
    by default) keeping the top `topk` (default: the largest k of the inputs; at most that).

    A row failed in any input is failed in the output. Resumable like any store.
    """
    if len(inputs) < 2:
        raise UsageError("merge needs at least two stores")
    if Path(out).resolve() in {Path(p).resolve() for p in inputs}:
        raise UsageError(f"{out}: the output must not be one of the inputs")
    stores = [LabelStore(p) for p in inputs]
    _check_aligned(stores)
    normalised = _normalised_weights(weights, len(stores))
    largest_k = max(s.topk for s in stores)
    topk = largest_k if topk is None else topk
    if not 1 <= topk <= largest_k:
        raise UsageError(f"--topk {topk}: must lie in [1, {largest_k}] (the largest k of the inputs)")
    manifest = {
        **classes_metadata(_classes(stores[0]) if stores[0].manifest.get("class_ids") else None),
        "merged_from": [
            {"path": str(s.path), "teacher": s.spec.teacher, "teacher_hash": s.spec.teacher_hash, "weight": w}
            for s, w in zip(stores, normalised.tolist(), strict=True)
        ],
    }
    samples = stores[0].samples
    if not overwrite:
        _check_same_merge(Path(out), manifest["merged_from"], topk)
    writer = create_store(
        out, _merged_spec(stores, normalised, topk), samples, overwrite=overwrite, extra_manifest=manifest
    )
    pending = writer.pending_rows()
    labelled_in = [s.labelled() for s in stores]
    labelled = np.logical_and.reduce(labelled_in)
    merged = 0
    for rows in _chunks(pending, chunk_rows, progress):
        for row in rows[~labelled[rows]]:
            failed_in = next(s.path for s, ok in zip(stores, labelled_in, strict=True) if not ok[row])
            writer.mark_failed(int(row), f"failed in the input store {failed_in}")
        good = rows[labelled[rows]]
        if len(good):
            gathered = [s.gather(good) for s in stores]
            merged_values, merged_indices = merge_maps(
                [v for v, _ in gathered], [i for _, i in gathered], normalised, topk
            )
            writer.write(good, merged_values, merged_indices)
            merged += len(good)
    complete = writer.finish()
    return MergeSummary(
        store=Path(out), num_samples=len(samples), merged=merged, failed=_num_failed(writer), complete=complete
    )
