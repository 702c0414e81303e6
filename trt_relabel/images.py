"""Finding and decoding images: the one decode path shared by `generate` and the trainer.

The label map of an image is computed on exactly the RGB picture the trainer later crops, so both
go through :func:`load_rgb`. EXIF orientation is *not* applied (as torchvision's ImageFolder loader
and the official ReLabel maps): pixel rows are used as stored.
"""

from __future__ import annotations

import errno
import os
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

#: The formats Pillow may decode (its format ids; JPEG includes the MPO of cameras, PPM covers
#: PBM/PGM/PPM): a file is opened by its bytes, never by its name, so that nothing else (EPS, PDF,
#: ...) is ever decoded.
RASTER_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF", "PPM")

#: Parts of the libjpeg warnings that lose no pixel (stray bytes between segments, unusual
#: metadata): such a JPEG is decoded as usual. Every other libjpeg warning fails the input.
HARMLESS_JPEG_WARNINGS = ("extraneous bytes before marker", "unknown JFIF revision", "thumbnail image size")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

#: Interpolation names of the teacher configs, as Pillow filters (Pillow's resize is antialiased).
PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageLoadError(Exception):
    """An input that cannot be turned into an RGB picture; the message is the one-line reason."""


@dataclass(frozen=True)
class ImageEntry:
    """One input image: `path` relative to the data root (POSIX separators) and its class index
    (position of its class folder in the sorted folder names; -1 for a flat folder)."""

    path: str
    class_index: int


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


_SUFFIXES = frozenset(IMAGE_EXTENSIONS)


def _has_image_suffix(name: str) -> bool:
    """Whether the file name's suffix, as Path.suffix reads it (from the last dot, which must not
    be the first character), is an image extension in any case."""
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in _SUFFIXES


def _is_input(entry: os.DirEntry) -> bool:
    """Whether a directory entry with an image suffix is an input: a regular file (or a link to
    one), or a link whose target cannot be reached (missing, a loop, no permission), which is an
    input that fails with its reason. Links to folders and special files are not inputs."""
    try:
        if entry.is_file():
            return True
        if not entry.is_symlink():
            return False
        os.stat(entry.path)  # the target exists, and is a folder or a special file
        return False
    except OSError:
        return True


def _is_folder(entry: os.DirEntry) -> bool:
    """A folder, not a link to one."""
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _walk(root: str) -> tuple[list[str], list[str], bool]:
    """One os.scandir pass over `root` (links to folders are not followed, as Path.rglob does):
    (unsorted relative paths of the inputs, with one path per sub-folder that cannot be listed;
    names of the first-level folders, links to folders included; whether an input sits directly
    under `root`)."""
    with os.scandir(root) as it:
        top = list(it)
    classes = []
    for entry in top:
        try:
            if entry.is_dir():
                classes.append(entry.name)
        except OSError:
            pass
    found: list[str] = []
    loose = False
    pending: list[tuple[str, list[os.DirEntry]]] = [("", top)]
    while pending:
        prefix, entries = pending.pop()
        for entry in entries:
            if _is_folder(entry):
                folder = prefix + entry.name
                try:
                    with os.scandir(entry.path) as it:
                        pending.append((folder + "/", list(it)))
                except OSError:
                    found.append(folder)  # one input that fails: "folder that cannot be listed"
            elif _has_image_suffix(entry.name) and _is_input(entry):
                found.append(prefix + entry.name)
                loose = loose or not prefix
    return found, classes, loose


def list_images(root: str | Path) -> list[ImageEntry]:
    """List the inputs under `root` in sorted relative-path order.

    ImageFolder layout (every input sits in a first-level sub-folder): class index = position of
    the folder among the sorted sub-folder names, as torchvision does. Otherwise (inputs directly
    under `root`, or no sub-folders) the folder is flat: inputs are found recursively and the
    class index is -1.

    Inputs are the files with an image suffix (:data:`IMAGE_EXTENSIONS`), and also what the listing
    meets but cannot read, so that it fails with its reason instead of vanishing: a link with an
    image suffix whose target is missing or loops, and a sub-folder that cannot be listed (one
    input named by the folder's path). Links to folders are not followed. Raises
    FileNotFoundError when `root` is not a directory, PermissionError (OSError) when it cannot be
    listed.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    found, classes, loose = _walk(str(root))
    found.sort()
    if not classes or loose:
        return [ImageEntry(f, -1) for f in found]
    class_index = {name: i for i, name in enumerate(sorted(classes))}
    return [ImageEntry(f, class_index[f.split("/", 1)[0]]) for f in found]


def first_difference(a: Sequence, b: Sequence) -> int | None:
    """The first position where the lists `a` and `b` differ (the shorter one's length when it
    is a prefix of the other); None when they are equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def read_file_list(list_file: str | Path) -> list[ImageEntry]:
    """Entries from a text file: one `relative/path` or `relative/path<TAB>class_index` per line,
    relative to the data root; blank lines and lines starting with '#' are skipped. Sorted by path.

    The list is UTF-8; a byte that is not (a name in another encoding) is kept as it is, as the
    folder listing keeps such names (Python's surrogateescape), so the list names the same file.
    Raises ValueError naming the list and line for a bad class index or a NUL byte (not a text list).
    """
    entries = []
    text = Path(list_file).read_text(encoding="utf-8", errors="surrogateescape")
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "\0" in line:
            raise ValueError(f"{list_file}:{n}: holds a NUL byte (a file list is UTF-8 text, one path a line)")
        path, _, label = line.partition("\t")
        try:
            entries.append(ImageEntry(path, int(label) if label else -1))
        except ValueError:
            raise ValueError(f"{list_file}:{n}: class index {label!r} is not an integer") from None
    return sorted(entries, key=lambda e: e.path)


def _flatten_alpha(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit int) greyscale: scale to 8 bits instead of clipping.
        arr = np.asarray(img, dtype=np.uint32)
        scale = 257 if img.mode.startswith("I;16") or arr.max(initial=0) <= 65535 else 16843009
        return Image.fromarray((arr // scale).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        arr = np.clip(np.asarray(img, dtype=np.float32), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        return _flatten_alpha(img)
    return img.convert("RGB")


def _stat_reason(path: Path, error: OSError) -> str:
    """The one-line reason an input cannot be opened, from the error of stat()/open()."""
    if error.errno == errno.ENOENT:
        if path.is_symlink():
            return f"broken symbolic link (target not found: {os.readlink(path)})"
        return "file not found"
    if error.errno == errno.ELOOP:
        return "symbolic link loop (too many levels of symbolic links)"
    if error.errno == errno.EACCES:
        return "permission denied"
    return f"cannot read the file: {error.strerror}"


def _folder_reason(path: Path) -> str:
    """The reason a folder named as an input fails: the listing names a sub-folder it cannot list."""
    try:
        with os.scandir(path):
            pass
    except OSError as e:
        return f"folder that cannot be listed ({_stat_reason(path, e)}); its images are unknown"
    return "is a directory, not a file"


def _check_input(path: Path) -> None:
    """Raise ImageLoadError unless `path` is a non-empty regular file (or a link to one)."""
    try:
        info = path.stat()
    except OSError as e:
        raise ImageLoadError(_stat_reason(path, e)) from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageLoadError(_folder_reason(path))
    if not stat.S_ISREG(info.st_mode):
        raise ImageLoadError("not a regular file")
    if info.st_size == 0:
        raise ImageLoadError("empty file (0 bytes)")


def _strict_jpeg(data: bytes, rgb: bool) -> np.ndarray | None:
    """Decode a JPEG with libjpeg-turbo (simplejpeg), refusing one whose data is damaged.

    libjpeg *warns* and fills grey where data is missing (a scan cut short, even when the file
    still ends in an EOI marker; a header that claims more pixels than the data holds): such a
    warning raises ImageLoadError, except the :data:`HARMLESS_JPEG_WARNINGS`, which lose no pixel.
    Returns, with `rgb`, uint8 [H, W, 3] RGB (the pixels Pillow decodes, bit for bit); without, it
    only checks (a 1/8-scale CMYK decode, for CMYK / YCCK JPEGs) and returns None. None too when a
    harmless warning stopped libjpeg-turbo: Pillow decodes the file then.
    """
    options = {"colorspace": "RGB"} if rgb else {"colorspace": "CMYK", "min_height": 1, "min_width": 1}
    try:
        pixels = simplejpeg.decode_jpeg(data, strict=True, **options)
    except ValueError as e:
        message = str(e).split("(): ", 1)[-1]
        if not any(harmless in message for harmless in HARMLESS_JPEG_WARNINGS):
            raise ImageLoadError(f"corrupt or truncated JPEG (libjpeg: {message})") from None
        return None
    return pixels if rgb else None


def _decode(file: BinaryIO) -> Image.Image:
    """Decode an open file of one of the :data:`RASTER_FORMATS` into a Pillow image (any mode)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(file, formats=RASTER_FORMATS)
    if img.format in ("JPEG", "MPO"):
        file.seek(0)
        pixels = _strict_jpeg(file.read(), rgb=img.mode in ("RGB", "L"))
        if pixels is not None:
            img.close()
            return Image.fromarray(pixels)
    img.load()
    return img


def load_rgb(path: str | Path) -> Image.Image:
    """Decode `path` into an 8-bit RGB Pillow image.

    Only the :data:`RASTER_FORMATS` are decoded, whatever the file's name (an EPS named .jpg never
    reaches Ghostscript). JPEGs are decoded by libjpeg-turbo through simplejpeg with its warnings
    as errors (see :func:`_strict_jpeg`); other formats by Pillow. CMYK, greyscale, palette and
    16-bit images are converted; transparency is composited onto white. Raises
    :class:`ImageLoadError` with a one-line reason for missing, unreadable, empty, corrupt or
    truncated files, broken or looping links, folders, other formats, and images over Pillow's
    `Image.MAX_IMAGE_PIXELS` (decompression bombs are refused before their pixels are allocated).
    """
    path = Path(path)
    _check_input(path)
    try:
        with open(path, "rb") as file:
            return decode_rgb(file)
    except OSError as e:
        raise ImageLoadError(_stat_reason(path, e)) from None


def decode_rgb(file: BinaryIO) -> Image.Image:
    """Decode an open binary file (or ``io.BytesIO``) as :func:`load_rgb` decodes a file: 8-bit
    RGB, or :class:`ImageLoadError` with the one-line reason (an OSError of the file itself,
    one with an errno, is raised as it is)."""
    try:
        with _decode(file) as img:
            return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(f"decompression bomb refused: {e}") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"not an image of an accepted format ({', '.join(RASTER_FORMATS)})") from None
    except OSError as e:
        if e.errno is not None:
            raise
        raise ImageLoadError(f"corrupt or truncated image: {e}") from None
    except (ValueError, SyntaxError, MemoryError) as e:
        raise ImageLoadError(f"cannot decode image: {e}") from None


def resize_whole(img: Image.Image, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """Resize the whole picture (no crop, aspect ratio not kept) to `size` x `size`.

    Returns uint8 [size, size, 3] (HWC, RGB). Pillow's filters are antialiased when shrinking.
    """
    resized = img.resize((size, size), PIL_FILTERS[interpolation])
    return np.array(resized, dtype=np.uint8)
