"""`join`: the stores of `--shard I/N` jobs on separate machines (no shared filesystem) joined into
one store, byte for byte the store of one process; parts of another run are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_generate import engines, label, run_main  # noqa: F401 (engines: a fixture)

from trt_relabel.join import join_stores
from trt_relabel.store import LabelStore
from trt_relabel.store_format import StoreError


@pytest.fixture(scope="module")
def runs(image_folder, engines, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    """Over the 12 photos and one JPEG that cannot be decoded: a one-process store and the stores
    of the two jobs of --shard 0/2 and 1/2, each in its own folder."""
    root = tmp_path_factory.mktemp("join")
    data = root / "data"
    shutil.copytree(image_folder, data)
    (data / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    stores = {name: root / name for name in ("one", "part0", "part1")}
    assert label(data, stores["one"], engines).failed == 1
    label(data, stores["part0"], engines, shard=(0, 2), batch_size=3)
    label(data, stores["part1"], engines, shard=(1, 2), batch_size=5)
    return stores


def assert_same_bytes(a: Path, b: Path) -> None:
    for name in ("values.npy", "indices.npy", "status.npy", "samples.tsv", "errors.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_joined_shards_equal_one_process_byte_for_byte(runs, tmp_path, monkeypatch, capfd):
    parts = LabelStore(runs["part0"]), LabelStore(runs["part1"])
    assert not parts[0].complete and not parts[1].complete
    assert parts[0].labelled().any() and parts[1].labelled().any()
    out = tmp_path / "joined"

    code, err = run_main(monkeypatch, capfd, ["join", str(runs["part1"]), str(runs["part0"]), "--out", str(out)])

    assert code == 1, err  # the bad JPEG failed
    assert "12 of 13 rows labelled, 1 failed" in err and "complete" in err
    assert_same_bytes(out, runs["one"])
    joined = LabelStore(out)
    assert joined.complete and joined.manifest["num_failed"] == 1
    assert joined.manifest["joined_from"] == [str(runs["part1"]), str(runs["part0"])]
    assert json.loads((out / "errors.jsonl").read_text())["path"] == "cat/broken.jpg"


def test_a_missing_part_leaves_rows_pending_and_a_resumable_store(runs, engines, tmp_path):  # noqa: F811
    half = tmp_path / "half"
    shutil.copytree(runs["part0"], half)
    summary = join_stores([half, runs["part0"]], tmp_path / "joined")  # part 1 is missing
    assert (summary.pending, summary.complete) == (6, False)
    assert summary.labelled + summary.failed == 7


def edited_copy(store: Path, where: Path, edit) -> Path:
    """A copy of `store` at `where`, changed by edit(path)."""
    shutil.copytree(store, where)
    edit(where)
    return where


def set_manifest(**fields):
    def edit(path: Path) -> None:
        manifest = json.loads((path / "manifest.json").read_text())
        (path / "manifest.json").write_text(json.dumps(manifest | fields))

    return edit


def rename_first_sample(path: Path) -> None:
    lines = (path / "samples.tsv").read_text().splitlines(keepends=True)
    (path / "samples.tsv").write_text("".join(["cat/other.jpg\t0\n", *lines[1:]]))


def change_a_labelled_value(path: Path) -> None:
    values = np.load(path / "values.npy", mmap_mode="r+")
    values[0, 0, 0, 0] += 1
    values.flush()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (set_manifest(teacher="timm:resnet50"), r"part1: not a part of the same run: teacher 'timm:resnet50'"),
        (set_manifest(graph_sha256="0" * 64), r"not a part of the same run: graph_sha256 '0000"),
        (rename_first_sample, r"not a part of the same run: input 0 is 'cat/other.jpg'"),
    ],
)
def test_parts_of_another_run_are_refused(runs, tmp_path, edit, message):
    other = edited_copy(runs["part1"], tmp_path / "part1", edit)
    with pytest.raises(StoreError, match=message):
        join_stores([runs["part0"], other], tmp_path / "joined")
    assert not (tmp_path / "joined").exists()


def test_a_row_labelled_differently_by_two_parts_is_refused(runs, tmp_path):
    other = edited_copy(runs["one"], tmp_path / "one", change_a_labelled_value)
    with pytest.raises(StoreError, match=r"one: row 0 \('cat/.*'\) differs from the same row in .*part0"):
        join_stores([runs["part0"], other], tmp_path / "joined")
    summary = join_stores([runs["part0"], runs["one"]], tmp_path / "joined")  # the same labels: accepted
    assert summary.complete
    assert_same_bytes(tmp_path / "joined", runs["one"])
