"""Training and validation data: the images of an ImageFolder aligned with the rows of a label store.

Row i of the store (line i of samples.tsv) labels the i-th image of
``trt_relabel.images.list_images(DIR)``; :func:`aligned_store` checks that before any step.
Images are decoded with :func:`trt_relabel.images.load_rgb`, the decode path of labelling; they
are files of an ImageFolder or members of tar shards (:mod:`trt_relabel.shards`).

A training batch is built whole in a loader worker: :class:`TrainBatches` is indexed by a list of
rows (the batches of :class:`ShardedBatchSampler`), decodes and augments those images, and reads
their top-k maps with ONE :meth:`LabelStore.gather` call. The store is opened lazily in each
worker (memmaps are not pickled).

Coordinates: a crop box is (x1, y1, x2, y2) normalised to [0, 1] in the frame of the whole decoded
image (x to the right, y downwards; x1 = left / W, x2 = (left + width) / W), the frame of the label
map, which the teacher computed on the whole picture resized to a square.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from torchvision.transforms import functional as TF

from trt_relabel.classes import (
    StudentClasses,
    classes_from_metadata,
    folder_of,
    read_class_map,
    student_classes,
)
from trt_relabel.errors import RelabelError
from trt_relabel.images import ImageEntry, ImageLoadError, list_images
from trt_relabel.sample_table import SampleTable
from trt_relabel.shards import FolderInputs, ShardInputs, open_inputs
from trt_relabel.store import LabelStore

Inputs = FolderInputs | ShardInputs


class TrainBatch(NamedTuple):
    """One training batch of B images (CPU tensors from the loader).

    images: float32 [B, 3, S, S], normalised. labels: int64 [B], the folder classes.
    boxes: float32 [B, 4], crop boxes (x1, y1, x2, y2) in [0, 1] of the image frame.
    flipped: bool [B], whether the crop was mirrored (after cropping).
    values: float16 [B, k, h, w] and indices: int16 [B, k, h, w], the top-k label maps
    (None when the label mode does not read the store).
    unreadable: "path: reason" of the batch's images that could not be decoded, left out of it
    (B counts only the others; B = 0 when none was readable).
    """

    images: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor
    flipped: torch.Tensor
    values: torch.Tensor | None
    indices: torch.Tensor | None
    unreadable: tuple[str, ...] = ()


class EvalBatch(NamedTuple):
    """images: float32 [B, 3, S, S]; labels: int64 [B]; positions: int64 [B], the images'
    indices in the evaluated entry list; unreadable: as :attr:`TrainBatch.unreadable`."""

    images: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    unreadable: tuple[str, ...] = ()


class TrainTransform:
    """RandomResizedCrop that also returns its box, horizontal flip, colour jitter, normalisation.

    Maps a PIL RGB image to (float32 [3, S, S], box float32 [4] (x1, y1, x2, y2) in [0, 1] of the
    image frame, flipped). The crop is drawn by torchvision's ``RandomResizedCrop.get_params``
    (area fraction in `scale`, aspect ratio in `ratio`, log-uniform). A flip mirrors the crop
    after cropping: the box (the region pooled for a global target) is unchanged; the flag tells
    where a spatial target must be mirrored along x. All randomness comes from torch's RNG.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_prob: float = 0.5,
        color_jitter: float = 0.4,
        interpolation: str = "bilinear",
    ) -> None:
        self.size = [image_size, image_size]
        self.scale = scale
        self.ratio = ratio
        self.flip_prob = flip_prob
        self.interpolation = transforms.InterpolationMode(interpolation)
        self.jitter = transforms.ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter else None
        self.normalize = transforms.Normalize(mean, std)

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, np.ndarray, bool]:
        top, left, height, width = transforms.RandomResizedCrop.get_params(img, self.scale, self.ratio)
        img_w, img_h = img.size
        box = np.array([left / img_w, top / img_h, (left + width) / img_w, (top + height) / img_h], dtype=np.float32)
        crop = TF.resized_crop(img, top, left, height, width, self.size, self.interpolation, antialias=True)
        flipped = bool(torch.rand(()) < self.flip_prob)
        if flipped:
            crop = TF.hflip(crop)
        if self.jitter is not None:
            crop = self.jitter(crop)
        return self.normalize(TF.to_tensor(crop)), box, flipped


class EvalTransform:
    """Resize the short side to round(S / crop_pct), centre-crop S x S, normalise: PIL RGB ->
    float32 [3, S, S]."""

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        crop_pct: float = 0.875,
        interpolation: str = "bilinear",
    ) -> None:
        self.transform = transforms.Compose(
            [
                transforms.Resize(round(image_size / crop_pct), transforms.InterpolationMode(interpolation)),
                transforms.CenterCrop(image_size),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        )

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.transform(img)


def load_readable(
    inputs: Inputs, entries: Sequence[ImageEntry], positions: Sequence[int]
) -> tuple[list[int], list[Image.Image], tuple[str, ...]]:
    """Decode the images `entries[i]` for i in `positions` (``inputs.load``, i.e. :func:`load_rgb`
    of a file or a shard member): (the positions that decoded, their RGB images, "path: reason"
    of each one that did not). A bad image (empty, damaged after labelling, ...) is left out of
    its batch, never raised."""
    readable, images, unreadable = [], [], []
    for i in positions:
        try:
            images.append(inputs.load(i, entries[i]))
            readable.append(i)
        except ImageLoadError as e:
            unreadable.append(f"{inputs.name(i, entries[i])}: {e}")
    return readable, images, tuple(unreadable)


class TrainBatches(Dataset):
    """Training batches, indexed by a list of rows (store rows = positions in `entries`, whose
    bytes `inputs` reads: a folder or tar shards).

    `store` is the open label store (None: no label maps, for the label modes that only use the
    folder classes). Forked loader workers share it; a pickled copy (a spawned worker) reopens it
    from its directory. `entries` are held as a :class:`SampleTable` (a few NumPy buffers, no
    Python object per row), so that forked workers share their pages instead of copying them.
    """

    def __init__(
        self, inputs: Inputs, entries: Sequence[ImageEntry], transform: TrainTransform, store: LabelStore | None
    ) -> None:
        self.inputs = inputs
        self.entries = SampleTable.from_entries(entries)
        self.transform = transform
        self.store_path = store.path if store is not None else None
        self._store = store

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None}

    def _open_store(self) -> LabelStore:
        if self._store is None:
            self._store = LabelStore(self.store_path)
        return self._store

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, rows: Sequence[int]) -> TrainBatch:
        rows, pictures, unreadable = load_readable(self.inputs, self.entries, rows)
        crops = [self.transform(picture) for picture in pictures]
        size = self.transform.size
        images = torch.stack([c[0] for c in crops]) if crops else torch.empty(0, 3, *size)
        values = indices = None
        if self.store_path is not None:
            values, indices = (torch.from_numpy(a) for a in self._open_store().gather(rows))
        return TrainBatch(
            images=images,
            labels=torch.from_numpy(self.entries.classes[rows]),
            boxes=torch.from_numpy(np.stack([c[1] for c in crops]) if crops else np.empty((0, 4), np.float32)),
            flipped=torch.tensor([c[2] for c in crops], dtype=torch.bool),
            values=values,
            indices=indices,
            unreadable=unreadable,
        )


class EvalBatches(Dataset):
    """Evaluation batches, indexed by a list of positions in `entries` (held as a SampleTable, read
    by `inputs`)."""

    def __init__(self, inputs: Inputs, entries: Sequence[ImageEntry], transform: EvalTransform) -> None:
        self.inputs = inputs
        self.entries = SampleTable.from_entries(entries)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, positions: Sequence[int]) -> EvalBatch:
        positions, pictures, unreadable = load_readable(self.inputs, self.entries, positions)
        images = [self.transform(picture) for picture in pictures]
        return EvalBatch(
            images=torch.stack(images) if images else torch.empty(0),
            labels=torch.from_numpy(self.entries.classes[positions]),
            positions=torch.tensor(positions, dtype=torch.int64),
            unreadable=unreadable,
        )


class ShardedBatchSampler(Sampler[list[int]]):
    """Batches of `rows` for process `rank` of `world_size` (DistributedSampler's sharding).

    With `shuffle`, each epoch permutes the rows with a seed derived from (seed, epoch), the same
    in every process; the order is padded by wrapping around to a multiple of `world_size` and
    process `rank` takes every world_size-th row from `rank` on, so every process runs the same
    number of batches. Without `shuffle` (evaluation) nothing is padded: process `rank` takes
    rows[rank::world_size]. `drop_last` drops a final incomplete batch.
    """

    def __init__(
        self,
        rows: Sequence[int],
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.rows = np.asarray(rows, dtype=np.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shard(self) -> np.ndarray:
        if not self.shuffle:
            return self.rows[self.rank :: self.world_size]
        order = self.rows[np.random.default_rng((self.seed, self.epoch)).permutation(len(self.rows))]
        padded = np.resize(order, -(-len(order) // self.world_size) * self.world_size)
        return padded[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        shard = self._shard()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield shard[start : start + self.batch_size].tolist()

    def __len__(self) -> int:
        per_process = -(-len(self.rows) // self.world_size) if self.shuffle else len(self._shard())
        if self.drop_last:
            return per_process // self.batch_size
        return -(-per_process // self.batch_size)


class SharingLoader(DataLoader):
    """A DataLoader whose forked workers keep sharing the parent's memory: the parent's objects are
    kept out of the workers' garbage collection (gc.freeze while the workers fork, as the gc module
    advises), since a collection in a worker writes to the header of every object it traverses and
    so copies nearly every page of the parent (~80 MB a worker after torch is imported)."""

    def __iter__(self):
        gc.freeze()
        try:
            return super().__iter__()
        finally:
            gc.unfreeze()  # the parent collects its own objects as before


def batch_loader(
    dataset: Dataset,
    sampler: ShardedBatchSampler,
    *,
    workers: int,
    pin_memory: bool = False,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """A DataLoader whose every item is a whole batch built by `dataset[list of rows]` in a worker
    (a :class:`SharingLoader`). `generator` draws the workers' seeds (each worker's torch RNG is
    seeded from it); by default a private one, so that iterating never draws from the global torch
    RNG."""
    return SharingLoader(
        dataset,
        batch_size=None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        generator=generator if generator is not None else torch.Generator(),
    )


def folder_entries(root: str | Path, what: str) -> SampleTable:
    """The images of the ImageFolder `root` (sorted paths, class folders) as a SampleTable, or a
    one-line RelabelError (`what` names the option, e.g. "--data")."""
    try:
        entries = list_images(root)
    except FileNotFoundError:
        raise RelabelError(f"{root}: {what} is not a directory") from None
    except OSError as e:
        raise RelabelError(f"{root}: cannot list {what} ({e.strerror})") from None
    if not entries:
        raise RelabelError(f"{root}: {what} holds no images")
    if entries[0].class_index < 0:
        raise RelabelError(f"{root}: {what} has no class folders (ImageFolder layout: DIR/CLASS/IMAGE)")
    return SampleTable.from_entries(entries)


def data_entries(root: str | Path, what: str) -> tuple[SampleTable, Inputs]:
    """The images of `root` and where their bytes are: tar shards (a .tar or a folder of only
    .tar files, classes from their .cls members) or an ImageFolder (:func:`folder_entries`); a
    one-line RelabelError for images without classes."""
    shards = open_inputs(root)
    if shards is None:
        return folder_entries(root, what), FolderInputs(root)
    entries, inputs = shards
    if any(e.class_index < 0 for e in entries):
        missing = next(e.path for e in entries if e.class_index < 0)
        raise RelabelError(f"{root}: {what} has an image without a class ({missing}: no KEY.cls member)")
    return SampleTable.from_entries(entries), inputs


def aligned_store(entries: Sequence[ImageEntry], store: LabelStore, root: str | Path) -> None:
    """Raise a one-line RelabelError unless row i of `store` labels the image `entries[i]` (same
    relative paths in the same order), naming the first differing path."""
    row = store.samples.first_difference(entries, classes=False)
    if row is None:
        return
    in_store = store.samples.path(row) if row < len(store) else "(no more rows)"
    in_data = entries[row].path if row < len(entries) else "(no more images)"
    raise RelabelError(
        f"{store.path}: does not label the images of {root} ({len(store)} rows, {len(entries)} images); "
        f"first difference at row {row}: {in_store!r} in the store, {in_data!r} in the data"
    )


def trainable_rows(store: LabelStore | None, num_rows: int) -> tuple[np.ndarray, int, int]:
    """(rows to train on int64 [M], rows not labelled, labelled rows with non-finite scores): with a
    store, the rows it labelled with finite scores (failed, pending and non-finite rows are
    skipped); without one, every row."""
    if store is None:
        return np.arange(num_rows, dtype=np.int64), 0, 0
    labelled = store.labelled()
    nonfinite = labelled & store.nonfinite()
    return np.flatnonzero(labelled & ~nonfinite), int((~labelled).sum()), int(nonfinite.sum())


def real_labels(path: str | Path, entries: Sequence[ImageEntry]) -> list[list[int]]:
    """ImageNet-ReaL labels of `entries`, from timm's ``imagenet_real_labels.json`` (a list, in
    sorted val-file-name order, of lists of correct classes). Image i of `entries` takes the
    labels at the position of its file name among the sorted file names; the lengths must agree."""
    try:
        labels = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise RelabelError(f"{path}: cannot read the ReaL labels ({e})") from None
    if not isinstance(labels, list) or not all(isinstance(x, list) for x in labels):
        raise RelabelError(f"{path}: not a JSON list of lists of class indices")
    if len(labels) != len(entries):
        raise RelabelError(f"{path}: labels {len(labels)} images, the validation folder holds {len(entries)}")
    by_name = sorted(range(len(entries)), key=lambda i: (Path(entries[i].path).name, entries[i].path))
    ordered: list[list[int]] = [[] for _ in entries]
    for rank, i in enumerate(by_name):
        ordered[i] = [int(c) for c in labels[rank]]
    return ordered


class TrainData(NamedTuple):
    """What a training run reads. `entries` (and `val_entries`, or None) are the images with the
    student output of their class as class index (-1: none; training images of folders that are
    no teacher class only), `inputs` / `val_inputs` where their bytes are. `store`: the label
    store, or None. `classes`: the student's outputs. `num_classes`: C of the target scores (the
    teacher's with relabel targets, else the number of outputs). `unmapped`: training class folders
    that are no teacher class."""

    entries: SampleTable
    inputs: Inputs
    val_entries: SampleTable | None
    val_inputs: Inputs | None
    store: LabelStore | None
    classes: StudentClasses
    num_classes: int
    unmapped: list[str]


def _folders(entries: Sequence[ImageEntry]) -> list[str]:
    return sorted({folder_of(e) for e in entries} - {None})


def open_train_data(
    data: Path, labels: Path | None, val: Path | None, class_map: Path | None, label_mode: str
) -> TrainData:
    """List, align and label the training (and validation) images of a run.

    ImageFolders: label modes with relabel targets map each class folder to the store's teacher
    classes (:func:`trt_relabel.classes.student_classes`): N folders that are N teacher classes
    train an N-way student; folders that are no teacher class (and no `class_map` entry) make the
    student learn all the teacher's classes ("relabel"), or raise RelabelError
    ("relabel+original"). Other label modes train one output per folder. Validation folders take
    the output of their class; one without raises RelabelError. Tar shards give their classes
    (teacher indices): the student has the teacher's classes (or max class + 1 without a store)."""
    entries, inputs = data_entries(data, "--data")
    val_entries, val_inputs = data_entries(val, "--val") if val is not None else (None, None)
    store = LabelStore(labels) if labels is not None else None
    if store is not None:
        aligned_store(entries, store, data)
    if not isinstance(inputs, FolderInputs):
        outputs = store.num_classes if store is not None else int(entries.classes.max()) + 1
        plan = StudentClasses(tuple(str(i) for i in range(outputs)), None, {})
        return TrainData(entries, inputs, val_entries, val_inputs, store, plan, outputs, [])
    teacher = None
    if "relabel" in label_mode and store is not None:
        teacher = classes_from_metadata(store.manifest, store.num_classes)
    val_folders = _folders(val_entries) if val_entries is not None else []
    try:
        plan = student_classes(
            _folders(entries),
            val_folders,
            classes=teacher,
            class_map=read_class_map(class_map, teacher) if class_map is not None and teacher is not None else None,
            teacher=store.spec.teacher if store is not None else "",
            folder_labels=label_mode != "relabel",
        )
    except RelabelError as e:
        raise RelabelError(f"{data}: --label-mode {label_mode}: {e}") from None
    unmapped = [f for f in _folders(entries) if plan.labels[f] < 0]
    missing = next((f for f in val_folders if plan.labels[f] < 0), None)
    if missing is not None:
        raise RelabelError(
            f"{val}: --val class folder {missing!r} is no class of the student (its {len(plan.names)} outputs are "
            f"{'the teacher classes' if teacher is not None else 'the class folders'} of --data)"
        )
    num_classes = store.num_classes if teacher is not None else len(plan.names)
    val_entries = _with_outputs(val_entries, plan) if val_entries is not None else None
    return TrainData(_with_outputs(entries, plan), inputs, val_entries, val_inputs, store, plan, num_classes, unmapped)


def _with_outputs(entries: Sequence[ImageEntry], plan: StudentClasses) -> SampleTable:
    """`entries` with the student output of their class folder as class index."""
    return SampleTable.from_entries([replace(e, class_index=plan.labels[folder_of(e)]) for e in entries])


def student_real_labels(real: list[list[int]], classes: StudentClasses) -> list[list[int]]:
    """ImageNet-ReaL labels (teacher class indices) as student outputs; classes without an output
    are dropped."""
    outputs = [[classes.output_of_teacher_class(c) for c in labels] for labels in real]
    return [[o for o in labels if o >= 0] for labels in outputs]
