"""A teacher's classes (ids and readable names) and how class folders map onto them.

ImageNet-1k class ids are WordNet ids ('n02123045'), in the sorted order of the ImageFolder, read
from the lists timm ships (``timm/data/_info``; read in place, without importing timm, which
imports torchvision's models: seconds). A teacher fine-tuned on other classes carries its own list
(``--class-names FILE``), stored in its graph metadata and in the manifest of its label stores.

A class folder whose name is one of the teacher's class ids gets that class's index, for any subset
of the classes; other folders get -1 unless a class map (``--class-map FILE``) maps them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cache, cached_property
from pathlib import Path

from trt_relabel.errors import RelabelError
from trt_relabel.images import ImageEntry

IMAGENET_NUM_CLASSES = 1000
#: Manifest / graph-metadata keys of a teacher's own class list (absent: the default classes).
CLASS_IDS_KEY, CLASS_NAMES_KEY = "class_ids", "class_names"


@dataclass(frozen=True)
class ClassList:
    """A teacher's classes in class-index order: `ids` (matched with folder names, e.g. ImageNet
    wnids) and short readable `names` (the ids when the teacher has no other names)."""

    ids: tuple[str, ...]
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)

    def index(self, key: str) -> int | None:
        """The class whose id is `key`, else whose (unique) name is `key`, else the integer `key`
        in [0, C); None when there is none. A name shared by several classes raises RelabelError."""
        if key in self.by_id:
            return self.by_id[key]
        named = [i for i, name in enumerate(self.names) if name == key]
        if len(named) > 1:
            shared = ", ".join(map(str, named))
            raise RelabelError(f"class name {key!r} names {len(named)} classes ({shared}); use its id")
        if named:
            return named[0]
        if key.isdigit() and int(key) < len(self):
            return int(key)
        return None

    @cached_property
    def by_id(self) -> dict[str, int]:
        """class id -> class index."""
        return {class_id: i for i, class_id in enumerate(self.ids)}

    def label(self, index: int) -> str:
        """'name (index)', or the reason there is no class for -1."""
        return f"{self.names[index]} ({index})" if index >= 0 else "not a teacher class"


def _timm_info_file(name: str) -> Path:
    spec = importlib.util.find_spec("timm")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("timm is not installed: it provides the ImageNet class names")
    return Path(spec.submodule_search_locations[0]) / "data" / "_info" / name


@cache
def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 WordNet ids ('n01440764', ...) in class-index order (the sorted ImageFolder order)."""
    return tuple(_timm_info_file("imagenet_synsets.txt").read_text().split())


@cache
def imagenet_classes() -> ClassList:
    """ImageNet-1k: wnids and their first WordNet lemma ('tabby' for 'tabby, tabby cat')."""
    lines = _timm_info_file("imagenet_synset_to_lemma.txt").read_text().splitlines()
    lemmas = dict(line.split("\t", 1) for line in lines if line.strip())
    synsets = imagenet_synsets()
    return ClassList(synsets, tuple(lemmas[s].split(",")[0].strip() for s in synsets))


def default_classes(num_classes: int) -> ClassList:
    """The classes of a teacher without its own list: ImageNet-1k for 1000 classes, else ids
    '0'..'C-1' named 'class <i>'."""
    if num_classes == IMAGENET_NUM_CLASSES:
        return imagenet_classes()
    return ClassList(tuple(str(i) for i in range(num_classes)), tuple(f"class {i}" for i in range(num_classes)))


def _data_lines(path: str | Path, what: str) -> Iterable[tuple[int, str]]:
    """(line number, line) of the lines of a UTF-8 text file that are not blank or '#' comments."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RelabelError(f"{path}: no such {what}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RelabelError(f"{path}: cannot read the {what} ({e})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.startswith("#"):
            yield n, line.rstrip("\r")


def read_class_names(path: str | Path) -> ClassList:
    """A teacher's classes from a text file (``--class-names``): line i (blank lines and '#'
    comments skipped) is class i, as ``id`` or ``id<TAB>readable name``. The id is what class
    folders are named. Raises RelabelError for an empty file or a repeated id."""
    ids, names = [], []
    for n, line in _data_lines(path, "class names file"):
        class_id, _, name = line.partition("\t")
        class_id = class_id.strip()
        if class_id in ids:
            raise RelabelError(f"{path}:{n}: class id {class_id!r} repeats line {ids.index(class_id) + 1} of the list")
        ids.append(class_id)
        names.append(name.strip() or class_id)
    if not ids:
        raise RelabelError(f"{path}: the class names file lists no class")
    return ClassList(tuple(ids), tuple(names))


def classes_metadata(classes: ClassList | None) -> dict[str, list[str]]:
    """The manifest / graph-metadata entries of a teacher's own class list ({} for the default)."""
    if classes is None:
        return {}
    return {CLASS_IDS_KEY: list(classes.ids), CLASS_NAMES_KEY: list(classes.names)}


def classes_from_metadata(metadata: dict, num_classes: int) -> ClassList:
    """The classes recorded by :func:`classes_metadata` in a manifest (or graph metadata), else the
    :func:`default_classes` of `num_classes`."""
    ids, names = metadata.get(CLASS_IDS_KEY), metadata.get(CLASS_NAMES_KEY)
    if not ids:
        return default_classes(num_classes)
    if len(ids) != num_classes or len(names or ()) != num_classes:
        raise RelabelError(f"{len(ids)} class ids for {num_classes} classes in the metadata")
    return ClassList(tuple(ids), tuple(names))


def store_classes(store) -> ClassList:
    """The classes of a label store's teacher (a LabelStore: its manifest's own list, else the
    default classes of its number of classes)."""
    return classes_from_metadata(store.manifest, store.num_classes)


def read_class_map(path: str | Path, classes: ClassList) -> dict[str, int]:
    """``--class-map``: a two-column TSV, ``folder<TAB>teacher class`` per line (blank lines and
    '#' comments skipped), where the teacher class is its id (e.g. a wnid), its name or its index.
    Returns folder name -> teacher class index. Raises RelabelError naming the line of a bad entry."""
    mapping: dict[str, int] = {}
    for n, line in _data_lines(path, "class map"):
        folder, sep, key = line.partition("\t")
        if not sep or not folder or not key.strip():
            raise RelabelError(f"{path}:{n}: expected 'folder<TAB>teacher class', got {line[:80]!r}")
        index = classes.index(key.strip())
        if index is None:
            raise RelabelError(f"{path}:{n}: {key.strip()!r} is no class id, name or index of the teacher")
        if folder in mapping and mapping[folder] != index:
            raise RelabelError(f"{path}:{n}: folder {folder!r} is mapped twice")
        mapping[folder] = index
    return mapping


def folder_of(entry: ImageEntry) -> str | None:
    """The class folder of an ImageFolder entry (the first component of its path); None for an
    entry without a class folder (class -1 from the listing)."""
    return entry.path.split("/", 1)[0] if entry.class_index >= 0 and "/" in entry.path else None


def folder_classes(
    folders: Iterable[str], classes: ClassList, class_map: dict[str, int] | None = None
) -> dict[str, int]:
    """Folder name -> teacher class index: from `class_map` when it names the folder, else the
    class whose id is the folder name, else -1."""
    class_map = class_map or {}
    by_id = classes.by_id
    return {folder: class_map.get(folder, by_id.get(folder, -1)) for folder in folders}


def map_folder_classes(
    entries: Sequence[ImageEntry], classes: ClassList, class_map: dict[str, int] | None = None
) -> tuple[list[ImageEntry], list[str]]:
    """Entries listed by :func:`trt_relabel.images.list_images` (class index = folder position)
    with the teacher's class index of their folder instead (see :func:`folder_classes`); entries
    without a class folder keep -1. Returns the entries and the sorted folders that are no class
    of the teacher (their entries get -1)."""
    folders = [folder_of(e) for e in entries]
    mapping = folder_classes(set(folders) - {None}, classes, class_map)
    mapped = [e if f is None else ImageEntry(e.path, mapping[f]) for e, f in zip(entries, folders, strict=True)]
    return mapped, sorted(folder for folder, index in mapping.items() if index < 0)


def unmapped_advice(folders: Sequence[str], teacher: str) -> str:
    """The one-line explanation that class folders are no classes of the teacher, and what to pass."""
    shown = ", ".join(repr(f) for f in folders[:3]) + (f" and {len(folders) - 3} more" if len(folders) > 3 else "")
    return (
        f"{len(folders)} class folder{'s' if len(folders) > 1 else ''} ({shown}) "
        f"{'are' if len(folders) > 1 else 'is'} no class of the teacher {teacher}, so folder labels cannot be "
        "compared with the teacher's; pass --class-map FILE (lines 'folder<TAB>teacher class id, name or index')"
    )


@dataclass(frozen=True)
class StudentClasses:
    """What the outputs of a student trained on class folders are.

    `names`: one per output (the folder names, or the teacher's class ids when the student learns
    all the teacher's classes). `teacher`: the teacher class index of each output; None when the
    outputs are the teacher's classes in their order, or when no teacher targets are used.
    `labels`: folder name -> output index of its images (-1: no output is its class).
    """

    names: tuple[str, ...]
    teacher: tuple[int, ...] | None
    labels: dict[str, int]

    def output_of_teacher_class(self, index: int) -> int:
        """The output that predicts teacher class `index`; -1 when the student has none."""
        if self.teacher is None:
            return index
        return self.teacher.index(index) if index in self.teacher else -1


def student_classes(
    folders: Sequence[str],
    other_folders: Sequence[str] = (),
    *,
    classes: ClassList | None = None,
    class_map: dict[str, int] | None = None,
    teacher: str = "",
    folder_labels: bool = True,
) -> StudentClasses:
    """The outputs of a student trained on the sorted class `folders` (`other_folders`, e.g. the
    validation folders, only get labels).

    Without teacher `classes` (no relabel targets): one output per folder. With them, each folder
    is mapped to a teacher class (:func:`folder_classes`): when every folder maps, one output per
    folder (an N-way student for N of the teacher's C classes; its targets keep those N classes);
    when some do not, the student learns all C teacher classes, which `folder_labels` (a label mode
    that also uses the folder classes) forbids with a RelabelError naming what to pass.
    """
    if classes is None:
        labels = {folder: i for i, folder in enumerate(folders)}
        return StudentClasses(tuple(folders), None, {f: labels.get(f, -1) for f in (*folders, *other_folders)})
    mapping = folder_classes((*folders, *other_folders), classes, class_map)
    unmapped = [f for f in folders if mapping[f] < 0]
    if unmapped and folder_labels:
        raise RelabelError(unmapped_advice(unmapped, teacher))
    subset = [mapping[f] for f in folders]
    if unmapped or subset == list(range(len(classes))):
        return StudentClasses(classes.ids, None, mapping)
    shared = next((c for c in subset if subset.count(c) > 1), None)
    if shared is not None:
        both = [f for f in folders if mapping[f] == shared]
        raise RelabelError(
            f"class folders {both[0]!r} and {both[1]!r} both map to the teacher class {classes.label(shared)}; "
            "one student output per teacher class: merge them or fix --class-map"
        )
    plan = StudentClasses(tuple(folders), tuple(subset), {})
    return replace(plan, labels={f: plan.output_of_teacher_class(c) if c >= 0 else -1 for f, c in mapping.items()})
