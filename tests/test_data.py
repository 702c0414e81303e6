"""Training data: crop boxes that select the cropped pixels, batches built in loader workers with one
gather per batch, store/data alignment, DDP sharding, ReaL label order."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trt_relabel.classes import ClassList, classes_metadata, default_classes, map_folder_classes
from trt_relabel.data import (
    ShardedBatchSampler,
    TrainBatches,
    TrainTransform,
    aligned_store,
    batch_loader,
    folder_entries,
    real_labels,
    trainable_rows,
)
from trt_relabel.errors import RelabelError
from trt_relabel.images import ImageEntry, list_images
from trt_relabel.shards import FolderInputs
from trt_relabel.store import LabelStore, create_store
from trt_relabel.store_format import StoreSpec

NUM_CLASSES = 10
MAP_SIZE = 6
TOPK = 3


def label_maps(class_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k logits float32 and classes int64 [k, h, w] of an image of folder class c: class c
    dominates (logit 6) except in the left third of the map, where class c + 3 does."""
    values = np.empty((TOPK, MAP_SIZE, MAP_SIZE), np.float32)
    indices = np.empty((TOPK, MAP_SIZE, MAP_SIZE), np.int64)
    values[:] = np.array([6.0, 3.0, 1.0])[:, None, None]
    indices[:] = np.array([class_index, class_index + 3, 9])[:, None, None]
    indices[:2, :, : MAP_SIZE // 3] = np.array([class_index + 3, class_index])[:, None, None]
    return values, indices


#: The test teacher's classes: the sample folders are its classes 0, 1, 2.
TEACHER_CLASSES = ClassList(
    ("cat", "coffee", "uniform", *(f"c{i}" for i in range(3, NUM_CLASSES))),
    ("cat", "coffee", "uniform", *(f"class {i}" for i in range(3, NUM_CLASSES))),
)


def build_store(
    folder: Path, path: Path, failed: tuple[int, ...] = (), classes: ClassList | None = TEACHER_CLASSES
) -> Path:
    """A complete store of `folder` (rows in list_images order) by a 10-class teacher with the maps
    of label_maps (of the folder position); the rows in `failed` are marked failed. `classes`: the
    teacher's classes in the manifest (None: the default ids '0'..'9')."""
    samples, _ = map_folder_classes(list_images(folder), classes or default_classes(NUM_CLASSES))
    spec = StoreSpec("test-teacher", "0" * 64, "1" * 64, 64, (MAP_SIZE, MAP_SIZE), TOPK, NUM_CLASSES)
    writer = create_store(path, spec, samples, extra_manifest=classes_metadata(classes))
    rows = [i for i in range(len(samples)) if i not in failed]
    positions = list_images(folder)
    maps = [label_maps(positions[i].class_index) for i in rows]
    writer.write(np.array(rows), np.stack([m[0] for m in maps]), np.stack([m[1] for m in maps]))
    for row in failed:
        writer.mark_failed(row, "not an image Pillow can identify")
    writer.finish()
    return path


@pytest.fixture(scope="session")
def label_store(image_folder, tmp_path_factory) -> Path:
    return build_store(image_folder, tmp_path_factory.mktemp("labels") / "store")


def coordinate_image(width: int = 240, height: int = 180) -> Image.Image:
    """R = x, G = y of each pixel, B = 0."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8))


def test_crop_box_maps_back_to_the_cropped_pixels():
    torch.manual_seed(0)
    size = 48
    transform = TrainTransform(size, (0, 0, 0), (1 / 255, 1 / 255, 1), color_jitter=0.0)
    img = coordinate_image()
    flips = set()
    for _ in range(30):
        crop, box, flipped = transform(img)
        flips.add(flipped)
        x1, y1, x2, y2 = box * np.array([240, 180, 240, 180])
        assert 0 <= x1 < x2 <= 240 and 0 <= y1 < y2 <= 180
        # Output pixel (i, j) samples the image at the centre of its cell of the box.
        centres = (np.arange(size) + 0.5) / size
        expect_x = x1 + centres * (x2 - x1) - 0.5
        expect_y = y1 + centres * (y2 - y1) - 0.5
        if flipped:
            expect_x = expect_x[::-1]
        inner = slice(2, size - 2)  # resampling kernels are clipped at the crop's edges
        got_x, got_y = crop[0].numpy(), crop[1].numpy()
        np.testing.assert_allclose(got_x[inner, inner], np.broadcast_to(expect_x, (size, size))[inner, inner], atol=1.0)
        np.testing.assert_allclose(
            got_y[inner, inner], np.broadcast_to(expect_y[:, None], (size, size))[inner, inner], atol=1.0
        )
    assert flips == {True, False}


def test_batches_are_built_in_workers_with_the_stores_rows(image_folder, label_store):
    entries = list_images(image_folder)
    transform = TrainTransform(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    store = LabelStore(label_store)
    dataset = TrainBatches(FolderInputs(image_folder), entries, transform, store)
    assert len(pickle.dumps(dataset)) < 10_000  # the open store is not pickled to (spawned) workers
    assert pickle.loads(pickle.dumps(dataset))[[0]].values.shape == (1, *store.spec.row_shape)  # it reopens
    sampler = ShardedBatchSampler(range(len(entries)), 5, shuffle=True, drop_last=False, seed=3)
    loader = batch_loader(dataset, sampler, workers=2, generator=torch.Generator().manual_seed(0))
    seen = []
    for batch_rows, batch in zip(sampler, loader, strict=True):
        assert batch.images.shape == (len(batch_rows), 3, 32, 32) and batch.images.dtype == torch.float32
        assert batch.boxes.shape == (len(batch_rows), 4) and batch.flipped.dtype == torch.bool
        assert batch.labels.tolist() == [entries[r].class_index for r in batch_rows]
        np.testing.assert_array_equal(batch.values.numpy(), store.values[batch_rows])
        np.testing.assert_array_equal(batch.indices.numpy(), store.indices[batch_rows])
        seen += batch_rows
    assert sorted(seen) == list(range(len(entries)))
    without_maps = TrainBatches(FolderInputs(image_folder), entries, transform, None)[[1, 2]]
    assert without_maps.values is None and without_maps.indices is None


def test_sharded_batches_split_every_epoch_between_processes():
    rows = np.arange(100, 111)  # 11 rows, 2 processes: padded to 12
    shards = [ShardedBatchSampler(rows, 3, shuffle=True, drop_last=True, seed=7, rank=r, world_size=2) for r in (0, 1)]
    for epoch in (0, 1):
        for shard in shards:
            shard.set_epoch(epoch)
        batches = [list(shard) for shard in shards]
        assert [len(b) for b in batches] == [2, 2] == [len(s) for s in shards]
        together = sorted(sum((sum(b, []) for b in batches), []))
        assert set(together) == set(rows.tolist()) and len(together) == 12
    epoch0 = list(shards[0])
    shards[0].set_epoch(0)
    assert list(shards[0]) != epoch0  # a new order per epoch
    evaluation = [ShardedBatchSampler(rows, 4, shuffle=False, drop_last=False, rank=r, world_size=2) for r in (0, 1)]
    assert [len(list(s)) for s in evaluation] == [2, 2]
    assert sorted(sum((sum(list(s), []) for s in evaluation), [])) == rows.tolist()  # no padding


def test_store_must_label_the_same_images(image_folder, label_store, tmp_path):
    entries = list_images(image_folder)
    store = LabelStore(label_store)
    aligned_store(entries, store, image_folder)
    renamed = list(entries)
    renamed[4] = ImageEntry("coffee/renamed.jpg", 1)
    with pytest.raises(RelabelError, match=r"row 4: '.*' in the store, 'coffee/renamed.jpg' in the data") as e:
        aligned_store(renamed, store, image_folder)
    assert "\n" not in str(e.value)
    with pytest.raises(RelabelError, match=r"row 12: '\(no more rows\)'"):
        aligned_store([*entries, ImageEntry("uniform/zzz.jpg", 2)], store, image_folder)


def test_failed_and_non_finite_rows_are_skipped(image_folder, tmp_path):
    from test_store import poison

    path = build_store(image_folder, tmp_path / "store", failed=(2, 7))
    poison(path, {4: np.nan, 9: np.inf})
    rows, unlabelled, nonfinite = trainable_rows(LabelStore(path), 12)
    assert (unlabelled, nonfinite) == (2, 2) and rows.tolist() == [i for i in range(12) if i not in (2, 4, 7, 9)]
    assert trainable_rows(None, 12)[0].tolist() == list(range(12))


def test_image_folder_errors(tmp_path):
    with pytest.raises(RelabelError, match="--data is not a directory"):
        folder_entries(tmp_path / "missing", "--data")
    Image.new("RGB", (8, 8)).save(tmp_path / "flat.png")
    with pytest.raises(RelabelError, match="no class folders"):
        folder_entries(tmp_path, "--val")


def test_real_labels_follow_sorted_file_names(tmp_path):
    entries = [ImageEntry("b/x_2.jpg", 1), ImageEntry("a/x_3.jpg", 0), ImageEntry("a/x_1.jpg", 0)]
    labels = tmp_path / "real.json"
    labels.write_text(json.dumps([[5], [], [7, 8]]))  # for x_1, x_2, x_3
    assert real_labels(labels, entries) == [[], [7, 8], [5]]
    labels.write_text(json.dumps([[5]]))
    with pytest.raises(RelabelError, match="labels 1 images, the validation folder holds 3"):
        real_labels(labels, entries)
