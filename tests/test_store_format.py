"""Store format 1.1: samples.tsv escaping (every file name round-trips, plain TSV readers read it),
format 1 stores still read and resumed, validation on open, torn errors.jsonl lines."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_store import SAMPLES, SPEC, random_labels

from trt_relabel.images import ImageEntry
from trt_relabel.sample_table import SampleTable, escape_path, unescape_path
from trt_relabel.store import LabelStore, create_store
from trt_relabel.store_format import FAILED, FORMAT, PENDING, StoreError

#: File names Linux allows that broke samples.tsv (or generic TSV readers), as os.listdir gives them.
ODD_NAMES = [
    "cr\rname.jpg",
    "lf\nname.jpg",
    "tab\tname.jpg",
    "back\\slash\\t.jpg",
    os.fsdecode(b"latin1-\xe9t\xe9.jpg"),  # not UTF-8: a surrogate escape
    "esc\x1bname.jpg",
    "nel\x85 line\u2028sep.jpg",
    '"quoted".jpg',
    "caf\u00e9 ok.jpg",
]


def test_escaping_is_the_documented_one():
    name = "a\\b\tc\nd\re\x1bf" + os.fsdecode(b"\xe9") + "g\u2028h\x85\u00e9"
    assert escape_path(name) == r"a\\b\tc\nd\re\x1bf\xe9g\u2028h\u0085" + "\u00e9"
    assert unescape_path(escape_path(name)) == name
    assert escape_path("plain/path.jpg") == "plain/path.jpg"
    with pytest.raises(ValueError, match="backslash"):
        unescape_path("bad\\q")


def test_sample_table_round_trip_and_plain_readers(tmp_path):
    entries = [ImageEntry(f"cls{i % 2}/{name}", i % 2 - (i == 3)) for i, name in enumerate(ODD_NAMES)]
    table = SampleTable.from_entries(entries)
    assert list(table) == entries and table == entries and len(table) == len(entries)
    assert table[-1] == entries[-1] and table[1:3] == entries[1:3]
    assert table.classes.tolist() == [e.class_index for e in entries]
    path = tmp_path / "samples.tsv"
    table.write(path)
    assert SampleTable.read(path, escaped=True) == table
    _assert_plain_readers_agree(path, entries)


def _assert_plain_readers_agree(path: Path, entries: list[ImageEntry]) -> None:
    """csv, np.loadtxt and str.splitlines see one row of two fields per entry, and unescaping the
    first field gives the name back."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert [(unescape_path(p), int(c)) for p, c in rows] == [(e.path, e.class_index) for e in entries]
    loaded = np.loadtxt(path, dtype=str, delimiter="\t", comments=None, encoding="utf-8", ndmin=2)
    assert loaded.shape == (len(entries), 2)
    assert loaded[:, 1].astype(int).tolist() == [e.class_index for e in entries]
    assert len(path.read_text(encoding="utf-8").splitlines()) == len(entries)


def test_odd_names_end_to_end_through_generate(bundled_graphs, image_folder, tmp_path):
    """Real files with CR, LF, TAB, backslash, non-UTF-8 bytes, ... in their names: labelled,
    stored, read back (LabelStore, stats, a resumed run) and readable by plain TSV readers."""
    from trt_relabel.generate import generate
    from trt_relabel.visualize import store_stats

    data = tmp_path / "data"
    (data / "odd").mkdir(parents=True)
    source = image_folder / "coffee" / "coffee_small.JPEG"
    for name in ODD_NAMES:
        shutil.copy(source, data / "odd" / name)
    shutil.copy(image_folder / "cat" / "chelsea_small.JPEG", data / "odd" / "plain.jpg")
    out = tmp_path / "store"

    def run(**options):
        return generate(data, out, size=475, backend="onnxruntime", engines_dir=bundled_graphs.fp32.parent,
                        batch_size=5, workers=0, progress=False, **options)  # fmt: skip

    result = run()
    assert (result.rows, result.labelled, result.failed, result.complete) == (10, 10, 0, True)
    names = sorted(f"odd/{name}" for name in os.listdir(data / "odd"))
    store = LabelStore(out)
    assert store.manifest["format"] == FORMAT == "trt-relabel-store/1.1"
    assert [s.path for s in store.samples] == names
    assert all((data / s.path).is_file() for s in store.samples)
    assert store_stats(store).num_labelled == 10
    assert run().processed == 0  # the stored list is the listed one: resumed, nothing to do
    _assert_plain_readers_agree(out / "samples.tsv", [ImageEntry(n, -1) for n in names])  # odd/: no teacher class


def _make_format_1(store: Path, entries: list[ImageEntry]) -> None:
    """Turn a store into what format 1 wrote: raw paths in samples.tsv, format "trt-relabel-store/1"."""
    lines = "".join(f"{e.path}\t{e.class_index}\n" for e in entries)
    (store / "samples.tsv").write_bytes(lines.encode("utf-8", "surrogateescape"))
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps({**manifest, "format": "trt-relabel-store/1"}))


def test_format_1_stores_read_and_resume(tmp_path):
    # Names format 1 could hold (no LF): CR, TAB, backslash and non-UTF-8 bytes stored raw.
    entries = [ImageEntry(f"c/{name}", 0) for name in ODD_NAMES if "\n" not in name]
    out = tmp_path / "store"
    create_store(out, SPEC, entries).write(np.array([0]), *random_labels(1, seed=0))
    _make_format_1(out, entries)
    store = LabelStore(out)
    assert store.samples == entries and list(store.samples) == entries
    resumed = create_store(out, SPEC, entries)  # the same list: resumed, not refused
    assert resumed.pending_rows().tolist() == list(range(1, len(entries)))
    resumed.mark_failed(1, "empty file (0 bytes)")
    resumed.write(np.arange(2, len(entries)), *random_labels(len(entries) - 2, seed=1))
    assert resumed.finish()
    store = LabelStore(out)
    assert store.complete and store.manifest["format"] == "trt-relabel-store/1"
    assert store.errors() == [{"path": entries[1].path, "reason": "empty file (0 bytes)"}]
    with pytest.raises(StoreError, match="different input list"):
        create_store(out, SPEC, [*entries[:-1], ImageEntry("c/other.jpg", 0)])


def _edit_manifest(store: Path, **changes) -> None:
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps({**manifest, **changes}))


def _set_status(store: Path, row: int, value: int) -> None:
    status = np.load(store / "status.npy", mmap_mode="r+")
    status[row] = value
    status.flush()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: _edit_manifest(d, complete="false"), r'complete is "false", expected true or false'),
        (lambda d: _edit_manifest(d, num_classes="1000"), r'num_classes is "1000", expected an integer'),
        (lambda d: _edit_manifest(d, num_classes=0), r"num_classes is 0, expected an integer in \[1, 32768\]"),
        (lambda d: _edit_manifest(d, topk=1001), r"topk 1001 exceeds num_classes 1000"),
        (lambda d: _edit_manifest(d, input_size=True), r"input_size is true, expected an integer >= 1"),
        (lambda d: _edit_manifest(d, map_size=[7]), r"map_size is \[7\], expected \[h, w\]"),
        (lambda d: _edit_manifest(d, num_failed=11), r"num_failed is 11, expected an integer in \[0, num_samples\]"),
        (lambda d: _edit_manifest(d, value_kind="probabilities"), r'value_kind is "probabilities"'),
        (lambda d: _edit_manifest(d, teacher=None), r"teacher is null, expected a string"),
        (lambda d: _set_status(d, 3, 7), r"status.npy: row 3 has status 7, not 0 \(pending\)"),
        (lambda d: (d / "samples.tsv").write_bytes(b"a\\qb\t0\n" * 10), r"samples.tsv:1: a backslash without"),
        (lambda d: (d / "samples.tsv").write_bytes(b"a\tb\t0\n" * 10), r"samples.tsv:1: more than one TAB"),
        (lambda d: (d / "samples.tsv").write_bytes(b"a\xe9\t0\n" * 10), r"samples.tsv:1: not UTF-8"),
        (lambda d: (d / "samples.tsv").write_bytes(b"a\t0\n" * 9 + b"b\tx\n"), r"samples.tsv:10: the class index"),
    ],
)
def test_open_validates(tmp_path, damage, message):
    out = tmp_path / "store"
    create_store(out, SPEC, SAMPLES)
    damage(out)
    with pytest.raises(StoreError, match=message) as info:
        LabelStore(out)
    assert str(out) in str(info.value) and "\n" not in str(info.value)


def test_class_indices_checked_on_the_rows_read(tmp_path, monkeypatch, capfd):
    from trt_relabel.cli import main
    from trt_relabel.visualize import store_stats

    out = tmp_path / "store"
    writer = create_store(out, SPEC, SAMPLES)
    values, indices = random_labels(10, seed=4)
    indices[2, 0, 0, 0] = 5000
    writer.write(np.arange(10), values, indices)
    writer.finish()
    store = LabelStore(out)  # opening does not scan the index range
    assert store.gather([0, 1, 3])[1].shape == (3, 5, 7, 7)
    message = r"indices.npy: row 2 holds class index 5000, outside \[0, 1000\)"
    for read in (lambda: store.gather([9, 2]), lambda: store[2], lambda: store_stats(store)):
        with pytest.raises(StoreError, match=message):
            read()
    _edit_manifest(out, num_classes=10)  # a manifest that understates the classes
    with pytest.raises(StoreError, match=r"row 0 holds class index \d+, outside \[0, 10\)"):
        LabelStore(out).gather(np.arange(10))
    monkeypatch.setattr("sys.argv", ["trt-relabel", "stats", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capfd.readouterr().err
    assert exit_info.value.code == 1 and "outside [0, 10)" in err and "Traceback" not in err


def _write_patched(monkeypatch, behaviour):
    """Replace os.write for the store's files by `behaviour(real_write, fd, data)`."""
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: behaviour(real_write, fd, data))


def test_short_writes_of_an_error_line_are_completed(tmp_path, monkeypatch):
    out = tmp_path / "store"
    writer = create_store(out, SPEC, SAMPLES)
    _write_patched(monkeypatch, lambda write, fd, data: write(fd, data[: max(1, len(data) // 3)]))
    writer.mark_failed(4, "empty file (0 bytes)")
    monkeypatch.undo()
    assert writer.status()[4] == FAILED
    assert LabelStore(out).errors() == [{"path": SAMPLES[4].path, "reason": "empty file (0 bytes)"}]


def test_full_disk_in_the_middle_of_an_error_line(tmp_path, monkeypatch):
    """The disk fills after part of a line: the row stays pending (StoreError), the torn line is
    skipped by readers, the next line starts on its own, a later run fails the row again and
    finish leaves a clean errors.jsonl."""
    out = tmp_path / "store"
    writer = create_store(out, SPEC, SAMPLES)
    writes = []

    def part_then_full(write, fd, data):
        if writes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        writes.append(data)
        return write(fd, data[:12])

    _write_patched(monkeypatch, part_then_full)
    with pytest.raises(StoreError, match="errors.jsonl: cannot record a failed input: No space left on device"):
        writer.mark_failed(4, "empty file (0 bytes)")
    monkeypatch.undo()
    assert writer.status()[4] == PENDING
    assert (out / "errors.jsonl").read_bytes() == writes[0][:12]  # a torn line
    assert LabelStore(out).errors() == []

    writer.mark_failed(6, "not an image Pillow can identify")  # space again
    resumed = create_store(out, SPEC, SAMPLES)
    assert 4 in resumed.pending_rows()
    resumed.mark_failed(4, "empty file (0 bytes)")
    rows = resumed.pending_rows()
    resumed.write(rows, *random_labels(len(rows), seed=5))
    assert resumed.finish()
    store = LabelStore(out)
    assert store.errors() == [
        {"path": SAMPLES[4].path, "reason": "empty file (0 bytes)"},
        {"path": SAMPLES[6].path, "reason": "not an image Pillow can identify"},
    ]
    lines = (out / "errors.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == store.errors() and store.manifest["num_failed"] == 2


def test_torn_last_line_of_a_killed_run_is_repaired(tmp_path):
    out = tmp_path / "store"
    create_store(out, SPEC, SAMPLES[:3])
    with open(out / "errors.jsonl", "ab") as f:  # killed in the middle of a line
        f.write(b'{"path": "cls0/img0')
    resumed = create_store(out, SPEC, SAMPLES[:3])
    resumed.mark_failed(0, "empty file (0 bytes)")
    resumed.write(np.array([1, 2]), *random_labels(2, seed=6))
    assert resumed.finish()
    assert LabelStore(out).errors() == [{"path": SAMPLES[0].path, "reason": "empty file (0 bytes)"}]
    assert (out / "errors.jsonl").read_text().count("\n") == 1
