"""Where the inputs' bytes come from: a folder of image files, or tar shards (WebDataset layout).

A WebDataset shard is a ``.tar`` whose members are grouped by key (the member name up to the
first dot after its last slash): ``KEY.jpg`` (or any name ending in an image suffix) holds the image and an optional
``KEY.cls`` its class index as text. Rows are ordered by (shard, key): shards in sorted path
order, keys in sorted order within a shard; the sample path of a row is ``SHARD/KEY`` (SHARD
relative to the data root, e.g. ``train-0001.tar/n01440764_10026``) and its class the ``.cls``
value (-1 without one).

Reading: the tar headers are read once (:func:`list_shards`) into an index of each image member's
offset and size; a row's bytes are then one ``os.pread`` at that offset (random access for
training). `generate` reads its rows in row order, so each decoding process reads its batch's
members in file order when the shard was written in key order (as WebDataset writers do).
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from trt_relabel.errors import UsageError
from trt_relabel.images import IMAGE_EXTENSIONS, ImageEntry, ImageLoadError, decode_rgb, load_rgb

FORMATS = ("auto", "folder", "wds")


class FolderInputs:
    """The images of a folder: sample paths are relative to `root`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def name(self, row: int, sample: ImageEntry) -> str:
        """What an error message calls the input."""
        return str(self.root / sample.path)

    def read(self, row: int, sample: ImageEntry) -> bytes:
        """The file's bytes (OSError when it cannot be read)."""
        return (self.root / sample.path).read_bytes()

    def load(self, row: int, sample: ImageEntry) -> Image.Image:
        """8-bit RGB (:func:`trt_relabel.images.load_rgb`), or ImageLoadError."""
        return load_rgb(self.root / sample.path)


class ShardInputs:
    """The images of tar shards, read through an index: row i is `size[i]` bytes at `offset[i]` of
    shard `shards[shard[i]]` (paths relative to `root`). Picklable (each process opens its own
    files)."""

    def __init__(self, root: str | Path, shards: Sequence[str], shard: np.ndarray, offset: np.ndarray,
                 size: np.ndarray) -> None:  # fmt: skip
        self.root = Path(root)
        self.shards = list(shards)
        self.shard, self.offset, self.size = shard, offset, size
        self._files: dict[int, int] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}

    def name(self, row: int, sample: ImageEntry) -> str:
        return str(self.root / sample.path)

    def read(self, row: int, sample: ImageEntry) -> bytes:
        """The image member's bytes (OSError when the shard cannot be read)."""
        if self._pid != os.getpid():  # a forked process: its own file descriptors
            self._files, self._pid = {}, os.getpid()
        index = int(self.shard[row])
        if index not in self._files:
            self._files[index] = os.open(self.root / self.shards[index], os.O_RDONLY)
        data = os.pread(self._files[index], int(self.size[row]), int(self.offset[row]))
        if len(data) != self.size[row]:
            raise OSError(f"{self.shards[index]} ends inside the member of {sample.path}")
        return data

    def load(self, row: int, sample: ImageEntry) -> Image.Image:
        """8-bit RGB (:func:`trt_relabel.images.decode_rgb` of the member's bytes), or ImageLoadError."""
        try:
            data = self.read(row, sample)
        except OSError as e:
            raise ImageLoadError(f"cannot read the shard: {e.strerror or e}") from None
        if not data:
            raise ImageLoadError("empty file (0 bytes)")
        try:
            return decode_rgb(io.BytesIO(data))
        except OSError as e:
            raise ImageLoadError(f"cannot decode image: {e}") from None


def is_shard_folder(data: str | Path) -> bool:
    """Whether `data` is a tar shard or a folder of them (``*.tar`` directly inside, no sub-folder)."""
    data = Path(data)
    if data.is_file():
        return data.suffix == ".tar"
    if not data.is_dir():
        return False
    with os.scandir(data) as entries:
        kinds = [(entry.name.endswith(".tar"), entry.is_dir()) for entry in entries]
    return any(tar for tar, _ in kinds) and not any(folder for _, folder in kinds)


def shard_names(data: Path, file_list: str | Path | None) -> list[str]:
    """The shards to read, relative to `data`, sorted: `file_list` (one shard path a line) or
    every ``*.tar`` directly in `data`."""
    if file_list is not None:
        lines = Path(file_list).read_text(encoding="utf-8", errors="surrogateescape").splitlines()
        names = sorted({line.strip() for line in lines if line.strip() and not line.startswith("#")})
    else:
        names = sorted(entry.name for entry in os.scandir(data) if entry.name.endswith(".tar"))
    if not names:
        raise UsageError(f"{file_list or data}: names no tar shard")
    return names


def list_shards(root: str | Path, shards: Sequence[str]) -> tuple[list[ImageEntry], ShardInputs]:
    """Read the headers of `shards` (paths relative to `root`, in the given order): the samples,
    ordered by (shard, key), and the index of their image members. UsageError naming the shard
    for one that cannot be read or holds a key twice."""
    root = Path(root)
    samples: list[ImageEntry] = []
    where: list[tuple[int, int, int]] = []
    for index, name in enumerate(shards):
        for key, (offset, size, label) in sorted(_shard_members(root / name).items()):
            samples.append(ImageEntry(f"{name}/{key}", label))
            where.append((index, offset, size))
    if not samples:
        raise UsageError(f"{root}: the tar shards hold no image ({' '.join(IMAGE_EXTENSIONS)})")
    shard, offset, size = (np.array(column, dtype=np.int64) for column in zip(*where, strict=True))
    return samples, ShardInputs(root, shards, shard.astype(np.int32), offset, size)


def _shard_members(path: Path) -> dict[str, tuple[int, int, int]]:
    """key -> (offset, size, class index or -1) of the image members of one shard.

    Reads the 512-byte headers alone (one pread each, the header and a small member together),
    never the images, ~2x faster than iterating a tarfile.TarFile. A shard with GNU long names,
    pax headers or a header whose unsigned checksum fails is listed by :mod:`tarfile` (which
    refuses a damaged one)."""
    images: dict[str, tuple[int, int]] = {}
    labels: dict[str, int] = {}
    try:
        with open(path, "rb") as file:
            fd, length, offset = file.fileno(), os.fstat(file.fileno()).st_size, 0
            while offset + 512 <= length:
                block = os.pread(fd, 1024, offset)
                header = block[:512]
                if not header.strip(b"\0"):  # the end-of-archive blocks
                    break
                kind = header[156:157]
                if kind in (b"L", b"K", b"x", b"g") or not _checksum_ok(header):
                    return _members_by_tarfile(path)  # it refuses a bad header
                name = header[:100].rstrip(b"\0").decode("utf-8", "surrogateescape")
                prefix = header[345:500].rstrip(b"\0") if header[257:262] == b"ustar" else b""
                if prefix:
                    name = f"{prefix.decode('utf-8', 'surrogateescape')}/{name}"
                size = tarfile.nti(header[124:136])
                if offset + 512 + size > length:
                    raise UsageError(f"{path}: cannot read the tar shard (cut short inside {name})")
                if kind in (b"0", b"\0", b"7"):
                    data = block[512 : 512 + size] if size <= 512 else os.pread(fd, size, offset + 512)
                    _add_member(path, name, offset + 512, size, lambda data=data: data, images, labels)
                offset += 512 + -(-size // 512) * 512
    except (OSError, ValueError, tarfile.TarError) as e:
        raise UsageError(f"{path}: cannot read the tar shard ({e})") from None
    return {key: (offset, size, labels.get(key, -1)) for key, (offset, size) in images.items()}


def _checksum_ok(header: bytes) -> bool:
    """The header's unsigned checksum (the sum of its bytes, the checksum field counted as spaces)."""
    try:
        return int(header[148:156].strip(b" \0"), 8) == sum(header) - sum(header[148:156]) + 256
    except ValueError:
        return False


def _members_by_tarfile(path: Path) -> dict[str, tuple[int, int, int]]:
    """:func:`_shard_members` through tarfile (long names, pax headers)."""
    images: dict[str, tuple[int, int]] = {}
    labels: dict[str, int] = {}
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if member.isfile():
                read = lambda member=member: tar.extractfile(member).read()  # noqa: E731
                _add_member(path, member.name, member.offset_data, member.size, read, images, labels)
    return {key: (offset, size, labels.get(key, -1)) for key, (offset, size) in images.items()}


def _add_member(path: Path, name: str, offset: int, size: int, read, images: dict, labels: dict) -> None:
    """Record the member `name` of the shard `path`: an image (offset, size) or a class (read() is
    its bytes); other members are ignored."""
    folder, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    if dot and f".{suffix.rsplit('.', 1)[-1].lower()}" in IMAGE_EXTENSIONS:
        if key in images:
            raise UsageError(f"{path}: holds two images of the key {key!r}")
        images[key] = (offset, size)
    elif suffix == "cls":
        text = read().decode("utf-8", "replace").strip()
        try:
            labels[key] = int(text)
        except ValueError:
            raise UsageError(f"{path}: {name} holds {text[:40]!r}, not a class index") from None


def open_inputs(
    data: str | Path, file_list: str | Path | None = None, data_format: str = "auto"
) -> tuple[list[ImageEntry], FolderInputs | ShardInputs] | None:
    """Tar shards under `data` (format "wds", or "auto" and :func:`is_shard_folder`): their
    samples and inputs; None for a folder of images (the caller lists it)."""
    if data_format not in FORMATS:
        raise UsageError(f"--format {data_format!r}: expected one of {', '.join(FORMATS)}")
    data = Path(data)
    if data_format == "folder" or (data_format == "auto" and not is_shard_folder(data)):
        return None
    if data.is_file():  # one shard
        return list_shards(data.parent, [data.name])
    if not data.is_dir():
        raise UsageError(f"{data}: no such directory")
    return list_shards(data, shard_names(data, file_list))
