"""What `generate` labels: the images of a folder, a file list or tar shards, with their teacher class indices."""

from __future__ import annotations

from pathlib import Path

from trt_relabel.classes import ClassList, default_classes, map_folder_classes, read_class_map
from trt_relabel.errors import UsageError
from trt_relabel.images import IMAGE_EXTENSIONS, ImageEntry, list_images, read_file_list
from trt_relabel.shards import FolderInputs, ShardInputs, open_inputs

Inputs = FolderInputs | ShardInputs


def parse_shard(text: str) -> tuple[int, int]:
    """Parse "I/N" into (I, N) with 0 <= I < N; UsageError otherwise."""
    index, sep, count = text.partition("/")
    if not (sep and index.isdigit() and count.isdigit()) or not 0 <= int(index) < int(count):
        raise UsageError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(index), int(count)


def find_inputs(data: str | Path, file_list: str | Path | None = None) -> list[ImageEntry]:
    """The images to label, sorted by relative path: an ImageFolder or flat folder under `data`, or
    the entries of `file_list` (paths relative to `data`)."""
    data = Path(data)
    if not data.is_dir():
        raise UsageError(f"{data}: no such directory")
    if file_list is not None:
        if not Path(file_list).is_file():
            raise UsageError(f"{file_list}: no such file list")
        try:
            samples = read_file_list(file_list)
        except (ValueError, OSError) as e:
            raise UsageError(str(e)) from None
        if not samples:
            raise UsageError(f"{file_list}: the file list names no image")
        return samples
    try:
        samples = list_images(data)
    except OSError as e:
        raise UsageError(f"{data}: cannot list the folder ({e.strerror})") from None
    if not samples:
        raise UsageError(f"{data}: no image files ({' '.join(IMAGE_EXTENSIONS)})")
    return samples


def open_data(
    data: str | Path, file_list: str | Path | None = None, data_format: str = "auto"
) -> tuple[list[ImageEntry], Inputs]:
    """The samples to label and where their bytes are: tar shards (:mod:`trt_relabel.shards`;
    `data_format` "wds", or "auto" and detected), else the folder `data` (:func:`find_inputs`)."""
    shards = open_inputs(data, file_list, data_format)
    if shards is not None:
        return shards
    return find_inputs(data, file_list), FolderInputs(data)


def teacher_class_indices(
    samples: list[ImageEntry],
    teacher: str,
    size: int | None,
    classes: ClassList | None,
    class_map: str | Path | None,
    listed: bool,
) -> tuple[list[ImageEntry], list[str]]:
    """The inputs with their folder's teacher class index, and the class folders that are no class
    of the teacher. Entries not `listed` from a folder (a file list, tar shards) keep the class
    indices they come with."""
    if not listed:
        if class_map is not None:
            raise UsageError("--class-map maps class folders; a --file-list or tar shards give class indices")
        return samples, []
    from trt_relabel.teacher import get_teacher_config

    classes = classes or default_classes(get_teacher_config(teacher, size).num_classes)
    mapping = read_class_map(class_map, classes) if class_map is not None else None
    return map_folder_classes(samples, classes, mapping)
