"""The label store: layout, validation on read, resume rules, crash leftovers, concurrent creation."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trt_relabel.images import ImageEntry
from trt_relabel.store import LabelStore, create_store
from trt_relabel.store_format import FORMAT, StoreError, StoreSpec

SPEC = StoreSpec(
    teacher="efficientnet_lite0",
    teacher_hash="a" * 64,
    graph_sha256="b" * 64,
    input_size=224,
    map_size=(7, 7),
    topk=5,
)
SAMPLES = [ImageEntry(f"cls{i % 3}/img{i:02d}.jpg", i % 3) for i in range(10)]


def random_labels(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 logits and int32 class indices [rows, 5, 7, 7], as a backend returns them."""
    rng = np.random.default_rng(seed)
    values = -np.sort(-rng.normal(size=(rows, 5, 7, 7)).astype(np.float32), axis=1)
    indices = rng.integers(0, 1000, size=(rows, 5, 7, 7), dtype=np.int32)
    return values, indices


def test_create_write_read_round_trip(tmp_path):
    out = tmp_path / "store"
    writer = create_store(out, SPEC, SAMPLES, extra_manifest={"source": "test"})
    assert writer.num_samples == 10
    assert writer.pending_rows().tolist() == list(range(10))
    values, indices = random_labels(4, seed=0)
    writer.write(np.array([7, 2, 9, 0]), values, indices)
    writer.mark_failed(5, "corrupt or truncated image: broken data stream")
    assert writer.pending_rows().tolist() == [1, 3, 4, 6, 8]
    assert writer.pending_rows((1, 2)).tolist() == [1, 3]
    assert writer.finish() is False

    store = LabelStore(out)
    assert store.manifest["format"] == FORMAT and store.manifest["complete"] is False
    assert store.manifest["source"] == "test" and store.spec == SPEC
    assert store.values.dtype == np.float16 and store.indices.dtype == np.int16
    assert store.values.shape == store.indices.shape == (10, 5, 7, 7)
    assert store.samples == SAMPLES and len(store) == 10
    assert store.labelled().tolist() == [i in (0, 2, 7, 9) for i in range(10)]
    np.testing.assert_array_equal(store[2][0], values[1].astype(np.float16))
    np.testing.assert_array_equal(store[9][1], indices[2])
    assert not store[1][0].any() and not store[5][1].any()  # pending and failed rows stay zero

    got_values, got_indices = store.gather([9, 0, 9, 7])
    np.testing.assert_array_equal(got_values, values[[2, 3, 2, 0]].astype(np.float16))
    np.testing.assert_array_equal(got_indices, indices[[2, 3, 2, 0]])
    with pytest.raises(IndexError):
        store.gather([3, 10])

    # numpy alone reads the arrays; samples.tsv is plain text.
    np.testing.assert_array_equal(np.load(out / "values.npy", mmap_mode="r"), store.values)
    assert (out / "samples.tsv").read_text().splitlines()[4] == "cls1/img04.jpg\t1"


def test_finish_completes_once_nothing_is_pending(tmp_path):
    out = tmp_path / "store"
    writer = create_store(out, SPEC, SAMPLES)
    values, indices = random_labels(8, seed=1)
    writer.write(np.array([0, 1, 2, 3, 4, 6, 7, 9]), values, indices)
    writer.mark_failed(8, "empty file (0 bytes)")
    writer.mark_failed(5, "not an image Pillow can identify")
    assert writer.finish() is True
    store = LabelStore(out)
    assert store.complete and store.manifest["num_failed"] == 2
    assert store.manifest["finished_at"] is not None
    assert store.errors() == [  # row order, not the order of failure
        {"path": SAMPLES[5].path, "reason": "not an image Pillow can identify"},
        {"path": SAMPLES[8].path, "reason": "empty file (0 bytes)"},
    ]
    manifest_text = (out / "manifest.json").read_text()
    assert writer.finish() is True  # idempotent
    assert (out / "manifest.json").read_text() == manifest_text
    assert (out / "manifest.json").stat().st_mode & stat.S_IRGRP  # not the 0600 of a temp file


def test_crash_leftovers_give_no_duplicate_error_lines(tmp_path):
    out = tmp_path / "store"
    writer = create_store(out, SPEC, SAMPLES[:3])
    # A process killed between its errors.jsonl line and the status byte leaves a line for a row
    # that is still pending: the resumed run fails that input again and appends a second line.
    with open(out / "errors.jsonl", "a") as f:
        f.write(json.dumps({"path": SAMPLES[1].path, "reason": "old reason"}) + "\n")
    resumed = create_store(out, SPEC, SAMPLES[:3])
    assert resumed.pending_rows().tolist() == [0, 1, 2]
    resumed.mark_failed(1, "new reason")
    resumed.write(np.array([0, 2]), *random_labels(2, seed=2))
    assert len(LabelStore(out).errors()) == 2
    assert writer.finish() is True
    assert LabelStore(out).errors() == [{"path": SAMPLES[1].path, "reason": "new reason"}]


def test_resume_rules(tmp_path):
    out = tmp_path / "store"
    writer = create_store(out, SPEC, SAMPLES)
    writer.write(np.array([3]), *random_labels(1, seed=3))
    # Another backend of the same teacher (another graph) may continue the store.
    other_graph = StoreSpec(**{**SPEC.__dict__, "graph_sha256": "c" * 64})
    assert create_store(out, other_graph, SAMPLES).pending_rows().size == 9

    other_k = StoreSpec(**{**SPEC.__dict__, "topk": 3})
    with pytest.raises(StoreError, match=r"topk=5 \(this run: 3\).*--overwrite") as info:
        create_store(out, other_k, SAMPLES)
    assert str(out) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(StoreError, match="teacher_hash"):
        create_store(out, StoreSpec(**{**SPEC.__dict__, "teacher_hash": "d" * 64}), SAMPLES)
    with pytest.raises(StoreError, match=r"different input list: 10 inputs \(this run: 9\)"):
        create_store(out, SPEC, SAMPLES[:9])
    renamed = [*SAMPLES[:4], ImageEntry("cls1/other.jpg", 1), *SAMPLES[5:]]
    with pytest.raises(StoreError, match="row 4 is"):
        create_store(out, SPEC, renamed)

    fresh = create_store(out, other_k, SAMPLES, overwrite=True)
    assert fresh.pending_rows().size == 10 and LabelStore(out).topk == 3


def test_refuses_what_is_not_a_store(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a label store and not empty"):
        create_store(tmp_path, SPEC, SAMPLES)
    with pytest.raises(StoreError, match="not a directory"):
        create_store(tmp_path / "notes.txt", SPEC, SAMPLES)
    with pytest.raises(StoreError, match="no input"):
        create_store(tmp_path / "empty", SPEC, [])
    with pytest.raises(StoreError, match="no manifest.json"):
        LabelStore(tmp_path)
    # An empty directory is a fine place for a new store.
    (tmp_path / "new").mkdir()
    assert create_store(tmp_path / "new", SPEC, SAMPLES).num_samples == 10


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: _edit_manifest(d, format="other/1"), r"manifest.json: format is 'other/1'"),
        (lambda d: _edit_manifest(d, topk=None), r"manifest.json: missing keys topk"),
        (lambda d: (d / "manifest.json").write_text("{"), r"manifest.json: unreadable manifest"),
        (lambda d: np.save(d / "values.npy", np.zeros((10, 5, 7, 6), np.float16)), r"values.npy: holds"),
        (lambda d: np.save(d / "indices.npy", np.zeros((10, 5, 7, 7), np.int32)), "indices.npy: holds int"),
        (lambda d: (d / "status.npy").unlink(), r"status.npy: missing"),
        (lambda d: (d / "values.npy").write_bytes(b"\x93NUMPY garbage"), r"values.npy: not a readable"),
        (lambda d: _drop_last_line(d / "samples.tsv"), r"samples.tsv: 9 lines, the manifest says 10"),
    ],
)
def test_read_side_validates(tmp_path, damage, message):
    create_store(tmp_path / "store", SPEC, SAMPLES)
    damage(tmp_path / "store")
    with pytest.raises(StoreError, match=message) as info:
        LabelStore(tmp_path / "store")
    assert "\n" not in str(info.value)


def _edit_manifest(store, **changes):
    manifest = json.loads((store / "manifest.json").read_text())
    manifest.update(changes)
    manifest = {k: v for k, v in manifest.items() if v is not None}
    (store / "manifest.json").write_text(json.dumps(manifest))


def _drop_last_line(path):
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))


def _create_and_label(args) -> list[int]:
    out, shard = args
    writer = create_store(out, SPEC, SAMPLES)
    rows = writer.pending_rows(shard)
    writer.write(rows, *random_labels(len(rows), seed=shard[0]))
    return rows.tolist()


def test_concurrent_creation_and_disjoint_writers(tmp_path):
    """Two processes create the same store at once: one builds it, the other reopens it; their
    disjoint rows (row % 2) all land in the one store."""
    out = tmp_path / "store"
    with multiprocessing.get_context("fork").Pool(2) as pool:
        even, odd = pool.map(_create_and_label, [(out, (0, 2)), (out, (1, 2))])
    store = LabelStore(out)
    assert store.labelled().all()
    assert sorted(even + odd) == list(range(10))
    np.testing.assert_array_equal(store.gather(odd)[1], random_labels(len(odd), seed=1)[1])
    assert [p.name for p in tmp_path.iterdir()] == ["store"]  # no temporary directory left


def test_full_disk(tmp_path):
    """On a 256 KiB tmpfs (private mount namespace): a store that does not fit is refused at creation
    with one line and leaves nothing; a disk that fills up later fails one write with one line, and
    the store resumes once there is space."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        pytest.skip("needs root and unshare to mount a small tmpfs in a private mount namespace")
    helper = Path(__file__).with_name("store_full_disk_helper.py")
    script = f'mount -t tmpfs -o size=256k tmpfs "{tmp_path}" && exec "{sys.executable}" "{helper}" "{tmp_path}"'
    done = subprocess.run([unshare, "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    create, full, resumed = done.stdout.splitlines()
    assert create == f"create: {tmp_path}/big: cannot create the store: No space left on device"
    assert full == f"full: {tmp_path}/small/errors.jsonl: cannot record a failed input: No space left on device"
    assert resumed == "resumed: complete"


def poison(store: Path, rows: dict[int, float]) -> None:
    """Edit a store as an older version or a hand could leave it: one score of each row set to the value."""
    values = np.load(store / "values.npy", mmap_mode="r+")
    for row, value in rows.items():
        values[row, 0, 3, 3] = value
    values.flush()


def test_writer_refuses_non_finite_scores(tmp_path):
    writer = create_store(tmp_path / "store", SPEC, SAMPLES)
    values, indices = random_labels(5, seed=3)
    values[1, 2, 0, 0] = np.nan
    values[2, 0, 6, 6] = 70000.0  # beyond float16's 65504: would become inf
    values[3, 4, 1, 1] = -np.inf
    values[4, 0, 0, 0] = 65504.0  # the largest float16: kept
    assert writer.write(np.arange(5), values, indices) == 3
    writer.write(np.arange(5, 10), *random_labels(5, seed=4))
    assert writer.finish()

    store = LabelStore(tmp_path / "store")
    assert store.status().tolist() == [1, 2, 2, 2, 1, 1, 1, 1, 1, 1]
    assert np.isfinite(store.values).all() and not store.nonfinite().any()
    assert not store.values[1:4].any()  # failed rows hold nothing
    assert store.values[4, 0, 0, 0] == 65504
    reasons = {entry["path"]: entry["reason"] for entry in store.errors()}
    assert "not finite (NaN)" in reasons[SAMPLES[1].path]
    assert "70000 overflows float16" in reasons[SAMPLES[2].path]
    assert "not finite (inf)" in reasons[SAMPLES[3].path]
    assert store.manifest["num_failed"] == 3

    poison(tmp_path / "store", {6: np.nan, 8: np.inf})
    assert np.flatnonzero(LabelStore(tmp_path / "store").nonfinite()).tolist() == [6, 8]
