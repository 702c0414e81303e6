"""`join`: one store from the stores of `--shard I/N` jobs that ran without a shared filesystem.

Each job (`generate DATA --out PART --shard I/N` on its own machine) holds a whole store in which
only its rows are labelled or failed; the others stay pending. :func:`join_stores` copies every
row from the part that labelled (or failed) it into a new store, so the result equals, byte for
byte, the store one process would have written (values, indices, status, samples.tsv and
errors.jsonl; the manifest differs only in its times and in `joined_from`). Parts must agree on
everything that made their labels: teacher, teacher hash, graph, input size, map size, k,
classes and the input list. A row done in two parts must hold the same labels in both. Rows no
part labelled stay pending: the joined store resumes like any other (`generate` labels them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from trt_relabel.errors import UsageError
from trt_relabel.images import first_difference
from trt_relabel.store import LabelStore, create_store
from trt_relabel.store_format import FAILED, LABELLED, PENDING, REQUIRED_KEYS, StoreError


@dataclass(frozen=True)
class JoinSummary:
    """What :func:`join_stores` did: rows labelled, failed and still pending in the joined store."""

    store: Path
    num_samples: int
    labelled: int
    failed: int
    pending: int
    complete: bool


def join_stores(
    parts: list[str | Path],
    out: str | Path,
    *,
    overwrite: bool = False,
    chunk_rows: int = 16384,
    progress: Callable[[int, int], None] | None = None,
) -> JoinSummary:
    """Join the stores `parts` (same teacher, graph, spec and samples; each row labelled or failed
    in at most one of them, or identically in several) into the store `out`: every row from the
    part that labelled or failed it (with its reason). An existing `out` of the same teacher and
    samples is filled where it is pending (`overwrite` deletes it first). `progress(done, total)`
    after each chunk of `chunk_rows` rows.

    Raises UsageError (fewer than two parts, `out` among them) or StoreError (a part unreadable,
    of another teacher, graph or input list, or labelling a row differently from another part).
    """
    if len(parts) < 2:
        raise UsageError("join needs at least two stores")
    if Path(out).resolve() in {Path(p).resolve() for p in parts}:
        raise UsageError(f"{out}: the output must not be one of the parts")
    stores = [LabelStore(p) for p in parts]
    _check_same_run(stores)
    owner = _owners(stores, chunk_rows)
    first = stores[0]
    extra = {key: value for key, value in first.manifest.items() if key not in REQUIRED_KEYS}
    extra["joined_from"] = [str(store.path) for store in stores]
    writer = create_store(out, first.spec, first.samples, overwrite=overwrite, extra_manifest=extra)
    todo = writer.pending_rows()
    reasons = [{entry["path"]: entry["reason"] for entry in store.errors()} for store in stores]
    for start in range(0, len(todo), chunk_rows):
        rows = todo[start : start + chunk_rows]
        for part, store in enumerate(stores):
            mine = rows[owner[rows] == part]
            status = store.status()[mine]
            labelled = mine[status == LABELLED]
            if labelled.size:
                writer.write(labelled, store.values[labelled], store.indices[labelled])
            for row in mine[status == FAILED]:
                path = first.samples[row].path
                writer.mark_failed(int(row), reasons[part].get(path, "reason not recorded"))
        if progress:
            progress(min(start + chunk_rows, len(todo)), len(todo))
    complete = writer.finish()
    status = writer.status()
    return JoinSummary(
        store=Path(out),
        num_samples=len(status),
        labelled=int((status == LABELLED).sum()),
        failed=int((status == FAILED).sum()),
        pending=int((status == PENDING).sum()),
        complete=complete,
    )


def _check_same_run(stores: list[LabelStore]) -> None:
    """StoreError naming the first part whose teacher, graph, spec or input list differs from the
    first part's."""
    first = stores[0]
    ours = asdict(first.spec)
    for store in stores[1:]:
        theirs = asdict(store.spec)
        different = [
            f"{name} {theirs[name]!r} (in {first.path}: {ours[name]!r})" for name in ours if theirs[name] != ours[name]
        ]
        if different:
            raise StoreError(f"{store.path}: not a part of the same run: {'; '.join(different)}")
        row = first_difference(store.samples, first.samples)
        if row is not None:
            if len(store.samples) != len(first.samples):
                what = f"{len(store.samples)} inputs (in {first.path}: {len(first.samples)})"
            else:
                what = f"input {row} is {store.samples[row].path!r} (in {first.path}: {first.samples[row].path!r})"
            raise StoreError(f"{store.path}: not a part of the same run: {what}")


def _owners(stores: list[LabelStore], chunk_rows: int) -> np.ndarray:
    """int16 [N]: for each row, the first part that labelled or failed it (-1: none). StoreError
    when another part did it too with a different outcome or different labels."""
    owner = np.full(len(stores[0]), -1, dtype=np.int16)
    for part, store in enumerate(stores):
        done = store.status() != PENDING
        shared = np.flatnonzero(done & (owner >= 0))
        for start in range(0, len(shared), chunk_rows):
            rows = shared[start : start + chunk_rows]
            differing = rows[_differ(stores, owner[rows], part, rows)]
            if differing.size:
                row = differing[0]
                raise StoreError(
                    f"{store.path}: row {row} ({store.samples[row].path!r}) differs from the same row in "
                    f"{stores[owner[row]].path}: both parts labelled it, with different results"
                )
        owner[done & (owner < 0)] = part
    return owner


def _differ(stores: list[LabelStore], owners: np.ndarray, part: int, rows: np.ndarray) -> np.ndarray:
    """bool [len(rows)]: whether part `part` holds another status or other labels than the rows'
    owners do."""
    differ = np.zeros(len(rows), dtype=bool)
    store = stores[part]
    for other in np.unique(owners):
        mask = owners == other
        theirs, these = stores[other], rows[mask]
        differ[mask] = (
            (theirs.status()[these] != store.status()[these])
            | (theirs.values[these] != store.values[these]).reshape(len(these), -1).any(1)
            | (theirs.indices[these] != store.indices[these]).reshape(len(these), -1).any(1)
        )
    return differ
