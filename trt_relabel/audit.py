"""Audit a data set's labels with its label store: likely wrong folder labels, multi-object images.

Per labelled row of a store, computed in chunks of rows (memory bounded whatever the store size):

- the **whole-image target**: LabelPooling over the full image, then the trainer's softmax over
  all classes (:func:`trt_relabel.visualize.soft_targets`); from it the folder class's probability
  ``label_prob`` and rank ``label_rank`` (1 + the classes more likely; a class in no cell's top-k
  ranks after every class in one, since the classes outside the top-k share one pooled score, 0),
  and the top-1 and its probability.
- the **cell probabilities**: each cell of the map as its own target, the same softmax over the
  cell's dense logits (its top-k logits, 0 for the other classes) :func:`cell_probabilities`.
- the **present set** (:class:`AuditRules`): a class is present when it is the top-1 of at least
  ``present_cells`` cells with a cell probability of at least ``present_prob``; listed by cells,
  most first. These sets, one per store row, are ``labels.json`` in ImageNet ReaL's layout.
- the **objects**: present classes the teacher treats as alternatives for the same region are one
  object (class B is an alternative of A when B is in the top-k of at least ``alternative_share``
  of A's counted cells, either way round; fine-grained look-alikes such as tabby / tiger cat);
  an object's cells are its classes' counted cells.
- ``multi_object`` = at least two objects of ``object_cells`` cells or more; the multi-object
  score is the share of the map's cells counted for objects other than the largest.
- ``suspect`` = the folder class is neither present nor among the teacher's top ``suspect_rank``
  classes of the whole image.

audit.csv lists the rows with a folder class first, ordered by how likely the folder label is
wrong: rows whose folder class is not present before those where it is, then by ``label_prob``
ascending (the self-confidence of cleanlab / Northcutt et al. 2021), then by the teacher's top-1
probability descending. Rows without a folder class follow, by multi-object score descending.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from trt_relabel.classes import store_classes
from trt_relabel.errors import RelabelError, UsageError
from trt_relabel.fileio import atomic_file
from trt_relabel.interop import ProgressCallback
from trt_relabel.report import Chart, GalleryItem, ReportPage, write_report
from trt_relabel.store import LabelStore, nonfinite_rows
from trt_relabel.store_format import FAILED, LABELLED, PENDING
from trt_relabel.visualize import FULL_BOX, soft_targets

CSV_NAME, LABELS_NAME = "audit.csv", "labels.json"
TEXT_CHUNK = 65536  # lines of audit.csv / labels.json formatted at a time
CSV_COLUMNS = (
    "path", "row", "label", "label_name", "label_prob", "label_rank", "label_cells", "teacher_top1",
    "teacher_top1_name", "teacher_top1_prob", "present", "present_names", "objects", "suspect", "multi_object",
    "multi_object_score",
)  # fmt: skip


@dataclass(frozen=True)
class AuditRules:
    """The thresholds of the rules in the module docstring. Defaults chosen on 200 ImageNet photos
    and 50 2x2 mosaics of them with the bundled teacher at 475 (15 x 15 maps, see README)."""

    present_cells: int = 4  # m: a present class is the top-1 of >= m cells ...
    present_prob: float = 0.4  # p: ... each with a cell probability >= p
    alternative_share: float = 0.1  # t: B in the top-k of >= t of A's cells: one object
    object_cells: int = 8  # an object counts for multi_object with >= this many cells
    suspect_rank: int = 5  # suspect: folder class absent and ranked below this

    def check(self) -> None:
        """Raise UsageError for thresholds outside their ranges."""
        if self.present_cells < 1 or self.object_cells < 1 or self.suspect_rank < 1:
            raise UsageError("--present-cells, --object-cells and --suspect-rank must be >= 1")
        if not (0 < self.present_prob <= 1 and 0 < self.alternative_share <= 1):
            raise UsageError("--present-prob and --alternative-share must lie in (0, 1]")


@dataclass
class AuditTable:
    """The audit of the labelled rows of a store with finite scores, one entry per row in store order
    (n rows; rows with a NaN or an infinity, from older versions or edits, are left out and listed).

    ``present_classes[present_offsets[i]:present_offsets[i + 1]]`` is row i's present set (most
    cells first) and ``present_cells`` the matching cell counts. Rows without a folder class have
    label -1, label_prob NaN and label_rank 0."""

    rows: np.ndarray  # int64 [n]: store rows
    label: np.ndarray  # int32 [n]: folder class, -1 without
    label_prob: np.ndarray  # float32 [n]
    label_rank: np.ndarray  # int32 [n]: 1 = teacher's top-1 (see the module docstring)
    label_cells: np.ndarray  # int32 [n]: counted cells (present rule) of the folder class
    top1: np.ndarray  # int32 [n]
    top1_prob: np.ndarray  # float32 [n]
    present_offsets: np.ndarray  # int64 [n + 1]
    present_classes: np.ndarray  # int32 [P]
    present_cells: np.ndarray  # int32 [P]
    objects: np.ndarray  # int32 [n]: objects of >= object_cells cells
    multi_object_score: np.ndarray  # float32 [n]
    suspect: np.ndarray  # bool [n]
    multi_object: np.ndarray  # bool [n]
    label_present: np.ndarray  # bool [n]: folder class in the present set
    nonfinite: np.ndarray  # int64: labelled store rows left out, their scores not finite (NaN or inf)

    def present(self, i: int) -> list[tuple[int, int]]:
        """Row i's present set as (class, cells), most cells first."""
        span = slice(self.present_offsets[i], self.present_offsets[i + 1])
        return list(zip(self.present_classes[span].tolist(), self.present_cells[span].tolist(), strict=True))


def cell_probabilities(values: np.ndarray, num_classes: int) -> np.ndarray:
    """values float [B, k, h, w] (top-k logits) -> float32 [B, k, h, w]: the probability of each
    top-k class of a cell under the softmax of the cell's dense logits (0 for the num_classes - k
    classes outside its top-k), the trainer's softmax applied to one cell."""
    values = values.astype(np.float32)
    shift = np.maximum(values.max(axis=1, keepdims=True), 0.0)
    exp = np.exp(values - shift)
    return exp / (exp.sum(axis=1, keepdims=True) + (num_classes - values.shape[1]) * np.exp(-shift))


def _components(num_nodes: int, edges: np.ndarray) -> np.ndarray:
    """int64 [E, 2] undirected edges -> int64 [num_nodes]: each node's component, named by its
    smallest node."""
    labels = np.arange(num_nodes)
    while True:
        merged = labels.copy()
        np.minimum.at(merged, edges[:, 0], labels[edges[:, 1]])
        np.minimum.at(merged, edges[:, 1], labels[edges[:, 0]])
        merged = merged[merged]
        if np.array_equal(merged, labels):
            return labels
        labels = merged


def _map_rules(values: np.ndarray, indices: np.ndarray, rules: AuditRules, num_classes: int) -> dict:
    """The present sets and objects of B maps (see the module docstring): values float [B, k, h, w],
    indices int [B, k, h, w] (k descending). Returns arrays: counts lookup ``counts`` [B * C] (counted
    cells of each (row, class)), present ``pair_row``, ``pair_class``, ``pair_cells`` sorted by row,
    cells descending, class; per row ``objects`` and ``multi_object_score``."""
    batch, ranks = indices.shape[:2]
    classes = indices.reshape(batch, ranks, -1).astype(np.int64)
    cells = classes.shape[2]
    probs = cell_probabilities(values, num_classes).reshape(batch, ranks, cells)
    counted = probs[:, 0] >= rules.present_prob  # [B, h*w]: confident top-1 cells
    row_base = np.arange(batch)[:, None] * num_classes
    keys = (row_base + classes[:, 0])[counted]
    counts = np.bincount(keys, minlength=batch * num_classes)
    pair_keys = np.flatnonzero(counts >= rules.present_cells)  # sorted: row, then class
    pair_row, pair_class = np.divmod(pair_keys, num_classes)
    pair_cells = counts[pair_keys]

    # Alternatives: (A, B) for each counted cell of present A whose top-k holds present B.
    in_present = counts[keys] >= rules.present_cells
    node_a = np.searchsorted(pair_keys, keys[in_present])
    edge_keys = []
    for rank in range(1, ranks):
        other = (row_base + classes[:, rank])[counted][in_present]
        hit = counts[other] >= rules.present_cells
        edge_keys.append(node_a[hit] * len(pair_keys) + np.searchsorted(pair_keys, other[hit]))
    edges, shared = np.unique(np.concatenate(edge_keys), return_counts=True)
    edges = np.stack(np.divmod(edges, len(pair_keys)), axis=1)
    edges = edges[shared >= rules.alternative_share * pair_cells[edges[:, 0]]]
    component = _components(len(pair_keys), edges)

    object_cells = np.bincount(component, weights=pair_cells, minlength=len(pair_keys)).astype(np.int64)
    root = component == np.arange(len(pair_keys))
    big = root & (object_cells >= rules.object_cells)
    largest = np.zeros(batch, np.int64)
    np.maximum.at(largest, pair_row[root], object_cells[root])
    total = np.bincount(pair_row, weights=pair_cells, minlength=batch)
    order = np.lexsort((pair_class, -pair_cells, pair_row))
    return {
        "counts": counts,
        "pair_row": pair_row[order],
        "pair_class": pair_class[order],
        "pair_cells": pair_cells[order],
        "objects": np.bincount(pair_row[big], minlength=batch),
        "multi_object_score": ((total - largest) / cells).astype(np.float32),
    }


def _audit_chunk(values: np.ndarray, indices: np.ndarray, labels: np.ndarray, rules: AuditRules, num_classes: int):
    """Per-row audit fields of one chunk (see :class:`AuditTable`) and its present pairs."""
    batch = len(values)
    targets = soft_targets(values, indices, np.tile(FULL_BOX, (batch, 1)), num_classes)  # [B, C]
    maps = _map_rules(values, indices, rules, num_classes)
    with_class = labels >= 0
    safe_labels = np.where(with_class, labels, 0)
    label_prob = np.where(with_class, targets[np.arange(batch), safe_labels], np.nan).astype(np.float32)
    in_map = np.zeros_like(targets, dtype=bool)  # [B, C]: the classes in some cell's top-k
    in_map[np.arange(batch)[:, None], indices.reshape(batch, -1)] = True
    label_rank = np.where(
        in_map[np.arange(batch), safe_labels],
        (targets > label_prob[:, None]).sum(axis=1) + 1,
        in_map.sum(axis=1) + 1,  # not in the map: after every class in it
    )
    label_rank = np.where(with_class, label_rank, 0)
    label_cells = np.where(with_class, maps["counts"][np.arange(batch) * num_classes + safe_labels], 0)
    label_present = with_class & (label_cells >= rules.present_cells)
    fields = {
        "label": labels.astype(np.int32),
        "label_prob": label_prob,
        "label_rank": label_rank.astype(np.int32),
        "label_cells": label_cells.astype(np.int32),
        "top1": targets.argmax(axis=1).astype(np.int32),
        "top1_prob": targets.max(axis=1),
        "objects": maps["objects"].astype(np.int32),
        "multi_object_score": maps["multi_object_score"],
        "suspect": with_class & ~label_present & (label_rank > rules.suspect_rank),
        "multi_object": maps["objects"] >= 2,
        "label_present": label_present,
    }
    return fields, (maps["pair_row"], maps["pair_class"].astype(np.int32), maps["pair_cells"].astype(np.int32))


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run torch on one thread inside (restored after): a chunk's pooling works on small tensors,
    where torch's thread pool costs more than it gains (4x slower on 2 busy cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def audit_table(
    store: LabelStore,
    rules: AuditRules | None = None,
    *,
    chunk_rows: int = 2048,
    progress: ProgressCallback | None = None,
) -> AuditTable:
    """Audit the labelled rows of `store`, `chunk_rows` at a time (memory: O(chunk_rows * C) for
    the chunk, plus a few numbers per row). `progress` is called with (rows done, rows to do)."""
    rules = rules or AuditRules()
    rules.check()
    labelled = np.flatnonzero(store.status() == LABELLED)
    all_labels = store.samples.classes  # int64 [N], -1: no folder class (no path decoded)
    audited, left_out, chunks, pairs = [], [], [], []
    with _one_torch_thread():
        for start in range(0, len(labelled), chunk_rows):
            rows = labelled[start : start + chunk_rows]
            values, indices = store.gather(rows)
            finite = ~nonfinite_rows(values)
            left_out.append(rows[~finite])
            rows, values, indices = rows[finite], values[finite], indices[finite]
            if len(rows):
                fields, (pair_row, pair_class, pair_cells) = _audit_chunk(
                    values, indices, all_labels[rows], rules, store.num_classes
                )
                chunks.append(fields)
                pairs.append((pair_row + sum(map(len, audited)), pair_class, pair_cells))
                audited.append(rows)
            if progress:
                progress(start + len(finite), len(labelled))
    if not audited:
        raise RelabelError(f"{store.path}: no labelled rows with finite scores to audit")
    rows = np.concatenate(audited)
    pair_row, pair_class, pair_cells = (np.concatenate(parts) for parts in zip(*pairs, strict=True))
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(np.bincount(pair_row, minlength=len(rows)), out=offsets[1:])
    merged = {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}
    return AuditTable(
        rows=rows, present_offsets=offsets, present_classes=pair_class, present_cells=pair_cells,
        nonfinite=np.concatenate(left_out), **merged,
    )  # fmt: skip


def error_order(table: AuditTable) -> np.ndarray:
    """Positions in `table` of audit.csv's lines: rows with a folder class, the most likely wrong
    first (folder class absent before present, label_prob ascending, top-1 probability descending),
    then rows without, by multi-object score descending."""
    with_class = np.flatnonzero(table.label >= 0)
    ranked = with_class[
        np.lexsort((-table.top1_prob[with_class], table.label_prob[with_class], table.label_present[with_class]))
    ]
    without = np.flatnonzero(table.label < 0)
    return np.concatenate([ranked, without[np.argsort(-table.multi_object_score[without], kind="stable")]])


def multi_object_order(table: AuditTable) -> np.ndarray:
    """Positions of the multi-object rows, highest multi-object score first."""
    flagged = np.flatnonzero(table.multi_object)
    return flagged[np.argsort(-table.multi_object_score[flagged], kind="stable")]


def _csv_lines(table: AuditTable, store: LabelStore, names: list[str], positions: np.ndarray) -> Iterator[tuple]:
    """The audit.csv lines (:data:`CSV_COLUMNS`) of the rows at `positions` of `table`."""
    rows, labels, ranks, label_cells, top1, objects, suspect, multi = (
        column[positions].tolist()
        for column in (table.rows, table.label, table.label_rank, table.label_cells, table.top1, table.objects,
                       table.suspect.view(np.uint8), table.multi_object.view(np.uint8))
    )  # fmt: skip
    label_prob, top1_prob, score = (a[positions].tolist() for a in (table.label_prob, table.top1_prob,
                                                                    table.multi_object_score))  # fmt: skip
    starts, ends = table.present_offsets[positions].tolist(), table.present_offsets[positions + 1].tolist()
    for n, label in enumerate(labels):
        classes = table.present_classes[starts[n] : ends[n]].tolist()
        has = label >= 0
        yield (
            store.samples[rows[n]].path, rows[n], label, names[label] if has else "",
            f"{label_prob[n]:.6g}" if has else "", ranks[n] if has else "", label_cells[n] if has else "",
            top1[n], names[top1[n]], f"{top1_prob[n]:.6g}", " ".join(map(str, classes)),
            "; ".join(names[c] for c in classes), objects[n], suspect[n], multi[n], f"{score[n]:.4g}",
        )  # fmt: skip


def write_csv(table: AuditTable, store: LabelStore, path: Path, order: np.ndarray) -> None:
    """audit.csv (columns :data:`CSV_COLUMNS`), lines in `order` (positions in `table`), written
    TEXT_CHUNK lines at a time (sample paths as samples.tsv keeps them: UTF-8, undecodable bytes
    as they are)."""
    names = list(store_classes(store).names)
    with atomic_file(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
        writer = csv.writer(text)
        writer.writerow(CSV_COLUMNS)
        for start in range(0, len(order), TEXT_CHUNK):
            writer.writerows(_csv_lines(table, store, names, order[start : start + TEXT_CHUNK]))
        text.flush()
        text.detach()


def write_real_labels(table: AuditTable, num_rows: int, path: Path) -> None:
    """labels.json: a JSON list with one list of present classes per store row (ImageNet ReaL's
    layout); rows without audited labels (failed, pending, non-finite) get []."""
    position = np.full(num_rows, -1, np.int64)
    position[table.rows] = np.arange(len(table.rows))
    with atomic_file(path) as f:
        f.write(b"[\n")
        for start in range(0, num_rows, TEXT_CHUNK):
            lines = []
            for i in position[start : start + TEXT_CHUNK].tolist():
                span = table.present_classes[table.present_offsets[i] : table.present_offsets[i + 1]] if i >= 0 else ()
                lines.append("[" + ", ".join(map(str, span)) + "]")
            last = start + TEXT_CHUNK >= num_rows
            f.write((",\n".join(lines) + ("\n" if last else ",\n")).encode())
        f.write(b"]\n")


@dataclass(frozen=True)
class AuditSummary:
    """The headline numbers of an audit and the files written (`num_labelled`: the rows audited,
    labelled with finite scores)."""

    store: str
    out: str
    num_samples: int
    num_labelled: int
    num_failed: int
    num_pending: int
    num_nonfinite: int  # labelled rows left out: scores not finite
    first_nonfinite: int | None  # the first of those rows
    num_with_class: int
    num_agree: int  # teacher top-1 == folder class
    num_label_present: int  # folder class in the present set
    num_suspects: int
    num_multi_object: int
    rules: dict

    def to_dict(self) -> dict:
        return asdict(self)


def summarise(store: LabelStore, table: AuditTable, out: Path, rules: AuditRules) -> AuditSummary:
    status = store.status()
    with_class = table.label >= 0
    return AuditSummary(
        store=str(store.path),
        out=str(out),
        num_samples=len(store),
        num_labelled=len(table.rows),
        num_failed=int((status == FAILED).sum()),
        num_pending=int((status == PENDING).sum()),
        num_nonfinite=len(table.nonfinite),
        first_nonfinite=int(table.nonfinite[0]) if len(table.nonfinite) else None,
        num_with_class=int(with_class.sum()),
        num_agree=int((table.top1 == table.label)[with_class].sum()),
        num_label_present=int(table.label_present.sum()),
        num_suspects=int(table.suspect.sum()),
        num_multi_object=int(table.multi_object.sum()),
        rules=asdict(rules),
    )


def class_rows(table: AuditTable, names: list[str]) -> list[dict]:
    """The per-class table: one dict per folder class with images (index, name, images, agreement,
    present, suspects, multi_object, teacher_class, teacher_name, teacher_share), by class index."""
    with_class = table.label >= 0
    labels, top1 = table.label[with_class].astype(np.int64), table.top1[with_class].astype(np.int64)
    classes, images = np.unique(labels, return_counts=True)

    def per_class(flags: np.ndarray) -> np.ndarray:
        return np.bincount(labels, weights=flags[with_class], minlength=len(names))[classes]

    agree, present = per_class(table.top1 == table.label), per_class(table.label_present)
    suspects, multi = per_class(table.suspect), per_class(table.multi_object)
    pairs, counts = np.unique(labels * len(names) + top1, return_counts=True)
    pair_label, pair_top1 = np.divmod(pairs, len(names))
    order = np.lexsort((-counts, pair_label))  # per folder class, the most frequent top-1 first
    first = order[np.searchsorted(pair_label[order], classes)]
    return [
        {
            "index": int(c),
            "name": names[c],
            "images": int(n),
            "agreement": float(agree[i] / n),
            "present": float(present[i] / n),
            "suspects": int(suspects[i]),
            "multi_object": int(multi[i]),
            "teacher_class": int(pair_top1[first[i]]),
            "teacher_name": names[pair_top1[first[i]]],
            "teacher_share": float(counts[first[i]] / n),
        }  # fmt: skip
        for i, (c, n) in enumerate(zip(classes.tolist(), images.tolist(), strict=True))
    ]


def confused_pairs(table: AuditTable, names: list[str], top: int) -> list[tuple[int, str, int, str, int, float]]:
    """The `top` most frequent (folder class, teacher top-1) pairs that disagree: (folder class,
    name, teacher class, name, images, share of the folder class's images), most images first."""
    with_class = table.label >= 0
    labels, top1 = table.label[with_class].astype(np.int64), table.top1[with_class].astype(np.int64)
    images = np.bincount(labels, minlength=len(names))
    wrong = labels != top1
    pairs, counts = np.unique(labels[wrong] * len(names) + top1[wrong], return_counts=True)
    order = np.lexsort((pairs, -counts))[:top]
    result = []
    for pair, count in zip(pairs[order].tolist(), counts[order].tolist(), strict=True):
        label, teacher = divmod(pair, len(names))
        result.append((label, names[label], teacher, names[teacher], count, count / images[label]))
    return result


def gallery_items(
    store: LabelStore, table: AuditTable, positions: np.ndarray, rules: AuditRules, data: str | Path | None
) -> list[GalleryItem]:
    """The gallery entries of the rows at `positions` of `table` (in that order)."""
    if not len(positions):
        return []
    names = list(store_classes(store).names)
    rows = table.rows[positions]
    values, indices = store.gather(rows)
    targets = soft_targets(values, indices, np.tile(FULL_BOX, (len(rows), 1)), store.num_classes)
    top1_prob = cell_probabilities(values, store.num_classes)[:, 0]
    items = []
    for n, (i, row) in enumerate(zip(positions.tolist(), rows.tolist(), strict=True)):
        label = int(table.label[i])
        folder = (label, names[label], float(table.label_prob[i]), int(table.label_rank[i])) if label >= 0 else None
        top5 = np.argsort(-targets[n], kind="stable")[:5].tolist()
        sample_path = store.samples[row].path
        items.append(
            GalleryItem(
                row=row,
                path=sample_path,
                label=folder,
                top5=[(c, names[c], float(targets[n, c])) for c in top5],
                present=[(c, names[c], cells) for c, cells in table.present(i)],
                objects=int(table.objects[i]),
                multi_object_score=float(table.multi_object_score[i]),
                suspect=bool(table.suspect[i]),
                multi_object=bool(table.multi_object[i]),
                top1_map=indices[n, 0].astype(np.int64),
                counted=top1_prob[n] >= rules.present_prob,
                photo=Path(data) / sample_path if data is not None else None,
            )
        )
    return items


def _share(count: int, total: int) -> str:
    return f"{count / total:.1%}" if total else "-"


def _bucket_chart(title: str, values: np.ndarray, edges: list[int], labels: list[str]) -> Chart:
    """Counts of `values` in the buckets [edges[i], edges[i + 1]) (the last one open)."""
    counts = np.bincount(np.searchsorted(edges, values, side="right") - 1, minlength=len(edges))
    return Chart(title, list(zip(labels, counts.tolist(), strict=True)))


def build_page(
    store: LabelStore, table: AuditTable, summary: AuditSummary, rules: AuditRules, data, top: int
) -> ReportPage:
    """The content of index.html."""
    names = list(store_classes(store).names)
    s = summary
    sizes = np.diff(table.present_offsets)
    suspects = error_order(table)
    cards = [
        ("images", f"{s.num_samples:,}", f"{s.num_labelled:,} labelled, {s.num_failed:,} failed, "
                   f"{s.num_pending:,} pending" + (f", {s.num_nonfinite:,} left out (scores not finite)"
                                                   if s.num_nonfinite else "")),
        ("with a folder class", f"{s.num_with_class:,}", _share(s.num_with_class, s.num_labelled) + " of the labelled"),
        ("teacher top-1 = folder class", _share(s.num_agree, s.num_with_class), f"{s.num_agree:,} images"),
        ("folder class present", _share(s.num_label_present, s.num_with_class), f"{s.num_label_present:,} images"),
        ("suspect labels", f"{s.num_suspects:,}", _share(s.num_suspects, s.num_with_class) + " of those with a class"),
        ("multi-object images", f"{s.num_multi_object:,}",
                                _share(s.num_multi_object, s.num_labelled) + " of the labelled"),
        ("mean present-set size", f"{sizes.mean():.2f}", "classes per image"),
    ]  # fmt: skip
    charts = [
        _bucket_chart("present-set size", sizes, [0, 1, 2, 3, 4, 5], ["0", "1", "2", "3", "4", "5+"]),
        _bucket_chart("objects per image", table.objects, [0, 1, 2, 3, 4], ["0", "1", "2", "3", "4+"]),
    ]
    if s.num_with_class:
        ranks = table.label_rank[table.label >= 0]
        charts.insert(0, _bucket_chart("rank of the folder class", ranks, [1, 2, 3, 6, 11, 101],
                                       ["1", "2", "3-5", "6-10", "11-100", ">100"]))  # fmt: skip
    return ReportPage(
        title=store.path.name,
        store=str(store.path),
        teacher=store.spec.teacher,
        rules=asdict(rules),
        cards=cards,
        charts=charts,
        suspects=gallery_items(store, table, suspects[table.suspect[suspects]][:top], rules, data),
        multi_object=gallery_items(store, table, multi_object_order(table)[:top], rules, data),
        pairs=confused_pairs(table, names, top),
        classes=class_rows(table, names),
        files={"one line per image": CSV_NAME, "present sets, ImageNet ReaL layout": LABELS_NAME},
    )


def audit(
    store: str | Path,
    out: str | Path,
    *,
    data: str | Path | None = None,
    top: int = 50,
    rules: AuditRules | None = None,
    chunk_rows: int = 2048,
    progress: ProgressCallback | None = None,
) -> AuditSummary:
    """Audit the store at `store` into the folder `out`: audit.csv, labels.json and index.html (with
    thumbnails of the `top` first suspects and multi-object images; photos read from the data folder
    `data`, the label maps alone without it). Raises UsageError for bad arguments, RelabelError when
    the store cannot be read or the report written."""
    if top < 0:
        raise UsageError(f"--top {top}: must be >= 0")
    rules = rules or AuditRules()
    label_store = LabelStore(store)
    table = audit_table(label_store, rules, chunk_rows=chunk_rows, progress=progress)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_csv(table, label_store, out / CSV_NAME, error_order(table))
        write_real_labels(table, len(label_store), out / LABELS_NAME)
        summary = summarise(label_store, table, out, rules)
        write_report(out, build_page(label_store, table, summary, rules, data, top))
    except OSError as e:
        raise RelabelError(f"{e.filename or out}: cannot write the report: {e.strerror}") from None
    return summary
