"""Tar shards (WebDataset layout: KEY.jpg [+ KEY.cls]) made here from the packaged photos: generate
labels them as it labels the same files in a folder (rows by shard and key, samples.tsv naming
SHARD/KEY), resumes, splits, retries failed members, and train reads the same shards."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_generate import engines, label, run_main  # noqa: F401 (engines: a fixture)
from test_trainer import one_thread, tiny_config  # noqa: F401 (one_thread: a fixture)

from trt_relabel.data import TrainBatches, TrainTransform, data_entries
from trt_relabel.errors import UsageError
from trt_relabel.images import list_images
from trt_relabel.shards import FolderInputs, list_shards, open_inputs
from trt_relabel.store import LabelStore
from trt_relabel.trainer import train

#: The sample folders' teacher classes (tabby cat, espresso, military uniform): the shards' .cls.
CLASS_MAP = {"cat": 281, "coffee": 967, "uniform": 652}


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, root: Path, broken: str | None = None) -> dict[str, str]:
    """The images of the ImageFolder `folder` as two shards under `root` (the first 7 files in
    train-000.tar, the rest in train-001.tar), keys <class folder>_<stem>, members written in
    reverse key order; the image of key `broken` holds bytes no decoder reads. Returns {sample
    path in the shards: path in `folder`}."""
    root.mkdir(parents=True, exist_ok=True)
    files = [entry.path for entry in list_images(folder)]
    classes = {path: CLASS_MAP[path.split("/")[0]] for path in files}
    names = {}
    for shard, part in (("train-000.tar", files[:7]), ("train-001.tar", files[7:])):
        with tarfile.open(root / shard, "w") as tar:
            for path in reversed(part):
                folder_name, file_name = path.split("/")
                stem, suffix = file_name.split(".")
                key = f"{folder_name}_{stem}"
                data = b"\xff\xd8\xff not an image" if key == broken else (folder / path).read_bytes()
                add_member(tar, f"{key}.{suffix}", data)
                add_member(tar, f"{key}.cls", f"{classes[path]}\n".encode())
                names[f"{shard}/{key}"] = path
    return names


@pytest.fixture(scope="module")
def folder_store(image_folder, engines, tmp_path_factory) -> Path:  # noqa: F811
    """The 12 photos labelled from their folder, its folders mapped to CLASS_MAP's teacher classes:
    what the shards' rows must equal."""
    out = tmp_path_factory.mktemp("shards") / "folder-store"
    class_map = out.parent / "classes.tsv"
    class_map.write_text("".join(f"{folder}\t{index}\n" for folder, index in CLASS_MAP.items()))
    label(image_folder, out, engines, class_map=class_map)
    return out


def assert_rows_equal_the_folder_store(store: LabelStore, folder_store: Path, names: dict[str, str]) -> None:
    folder = LabelStore(folder_store)
    row_of = {sample.path: row for row, sample in enumerate(folder.samples)}
    for row, sample in enumerate(store.samples):
        other = row_of[names[sample.path]]
        assert sample.class_index == folder.samples[other].class_index, sample.path
        assert np.array_equal(store.values[row], folder.values[other]), sample.path
        assert np.array_equal(store.indices[row], folder.indices[other]), sample.path


def test_generate_and_train_read_tar_shards(image_folder, folder_store, engines, tmp_path, one_thread):  # noqa: F811
    names = write_shards(image_folder, tmp_path / "shards")
    out = tmp_path / "store"

    result = label(tmp_path / "shards", out, engines)  # detected: a folder of .tar files

    assert (result.rows, result.labelled, result.failed, result.complete) == (12, 12, 0, True)
    store = LabelStore(out)
    assert [s.path for s in store.samples] == sorted(names)  # by shard, then key
    assert store.samples[0].path == "train-000.tar/cat_chelsea" and store.samples[0].class_index == 281
    assert (out / "samples.tsv").read_text().splitlines()[0] == "train-000.tar/cat_chelsea\t281"
    assert_rows_equal_the_folder_store(store, folder_store, names)

    entries, inputs = data_entries(tmp_path / "shards", "--data")
    assert entries == store.samples
    transform = TrainTransform(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    folder_entries = list_images(image_folder)
    folder_rows = [folder_entries.index(next(e for e in folder_entries if e.path == names[s.path])) for s in entries]
    torch.manual_seed(0)
    from_shards = TrainBatches(inputs, entries, transform, store)[[0, 5, 11]]
    torch.manual_seed(0)
    from_files = TrainBatches(FolderInputs(image_folder), folder_entries, transform, None)[
        [folder_rows[0], folder_rows[5], folder_rows[11]]
    ]
    assert torch.equal(from_shards.images, from_files.images)
    assert torch.equal(from_shards.boxes, from_files.boxes)
    assert np.array_equal(from_shards.values.numpy(), store.values[[0, 5, 11]])

    run = train(tiny_config(tmp_path / "shards", out, tmp_path / "run", epochs=1))
    assert run.epochs == 1 and np.isfinite(run.metrics[0]["train_loss"]) and run.metrics[0]["unreadable"] == 0


def test_shard_jobs_and_retry_failed_work_on_tar_shards(
    image_folder,
    folder_store,
    engines,  # noqa: F811
    tmp_path,
    monkeypatch,
    capfd,
):
    broken = "coffee_coffee_crop"
    names = write_shards(image_folder, tmp_path / "shards", broken=broken)
    (tmp_path / "shards.txt").write_text("train-001.tar\ntrain-000.tar\n")
    out = tmp_path / "store"
    args = ["generate", str(tmp_path / "shards"), "--out", str(out), "--format", "wds", "--file-list",
            str(tmp_path / "shards.txt"), "--size", "475", "--backend", "onnxruntime", "--engines-dir", str(engines),
            "--workers", "1", "--batch-size", "4"]  # fmt: skip

    code, err = run_main(monkeypatch, capfd, [*args, "--shard", "1/2"])
    assert code == 1 and "labelled 5 of 6 images, 1 failed" in err and "incomplete" in err, err  # row 5 broke
    code, err = run_main(monkeypatch, capfd, [*args, "--shard", "0/2"])
    assert code == 0 and "labelled 6 of 6 images" in err and "complete" in err, err
    store = LabelStore(out)
    assert store.complete
    (error,) = store.errors()
    assert error["path"] == f"train-000.tar/{broken}" and "JPEG" in error["reason"]

    write_shards(image_folder, tmp_path / "shards")  # the member fixed (the offsets move)
    code, err = run_main(monkeypatch, capfd, [*args, "--retry-failed"])
    assert code == 0 and "labelled 12 of 12 images" in err, err
    store = LabelStore(out)
    assert store.labelled().all() and store.errors() == []
    assert_rows_equal_the_folder_store(store, folder_store, names)


def test_shard_listing_and_bad_shards(tmp_path):
    """Bad shards are one-line usage errors; long names and one shard as DATA are read."""
    with tarfile.open(tmp_path / "twice.tar", "w") as tar:
        add_member(tar, "a.jpg", b"1")
        add_member(tar, "a.png", b"2")
    with pytest.raises(UsageError, match=r"twice.tar: holds two images of the key 'a'"):
        list_shards(tmp_path, ["twice.tar"])
    with tarfile.open(tmp_path / "label.tar", "w") as tar:
        add_member(tar, "a.jpg", b"1")
        add_member(tar, "a.cls", b"cat")
    with pytest.raises(UsageError, match=r"label.tar: a.cls holds 'cat', not a class index"):
        list_shards(tmp_path, ["label.tar"])
    (tmp_path / "cut.tar").write_bytes(b"x" * 2048)
    with pytest.raises(UsageError, match=r"cut.tar: cannot read the tar shard"):
        list_shards(tmp_path, ["cut.tar"])
    with tarfile.open(tmp_path / "one.tar", "w") as tar:
        add_member(tar, "dir/a.b.JPG", b"1")
        add_member(tar, f"{'d' * 120}/b.jpg", b"2")  # a long name: a pax header, listed by tarfile
        add_member(tar, f"{'d' * 120}/b.cls", b"7")
    samples, inputs = open_inputs(tmp_path / "one.tar")  # one shard as DATA; the key ends at the first dot
    assert [(s.path, s.class_index) for s in samples] == [(f"one.tar/{'d' * 120}/b", 7), ("one.tar/dir/a", -1)]
    assert [inputs.read(row, sample) for row, sample in enumerate(samples)] == [b"2", b"1"]
    (tmp_path / "folder").mkdir()
    assert open_inputs(tmp_path) is None  # a sub-folder: not a folder of shards
    with pytest.raises(UsageError, match=r"names no tar shard"):
        open_inputs(tmp_path / "folder", data_format="wds")
