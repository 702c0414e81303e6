"""Finding and decoding images: the one decode path shared by `generate` and the trainer.

The label map of an image is computed on exactly the RGB picture the trainer later crops, so both
go through :func:`load_rgb`. EXIF orientation is *not* applied (as torchvision's ImageFolder loader
and the official ReLabel maps): pixel rows are used as stored.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

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


def list_images(root: str | Path) -> list[ImageEntry]:
    """List the images under `root` in sorted relative-path order.

    ImageFolder layout (every image sits in a first-level sub-folder): class index = position of
    the folder among the sorted sub-folder names, as torchvision does. Otherwise (images directly
    under `root`, or no sub-folders) the folder is flat: images are found recursively and the
    class index is -1.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    files = sorted(
        (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and is_image_file(p)),
    )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    image_folder = bool(classes) and all("/" in f for f in files)
    if not image_folder:
        return [ImageEntry(f, -1) for f in files]
    class_index = {name: i for i, name in enumerate(classes)}
    return [ImageEntry(f, class_index[f.split("/", 1)[0]]) for f in files]


def first_difference(a: Sequence, b: Sequence) -> int | None:
    """The first position where the lists `a` and `b` differ (the shorter one's length when it
    is a prefix of the other); None when they are equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def read_file_list(list_file: str | Path) -> list[ImageEntry]:
    """Entries from a text file: one `relative/path` or `relative/path<TAB>class_index` per line,
    relative to the data root; blank lines and lines starting with '#' are skipped. Sorted by path."""
    entries = []
    for n, line in enumerate(Path(list_file).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
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


def load_rgb(path: str | Path) -> Image.Image:
    """Decode `path` into an 8-bit RGB Pillow image.

    CMYK, greyscale, palette and 16-bit images are converted; transparency is composited onto
    white. Raises :class:`ImageLoadError` with a one-line reason for missing, unreadable, empty,
    corrupt or truncated files, non-images, and images over Pillow's `Image.MAX_IMAGE_PIXELS`
    (decompression bombs are refused before their pixels are allocated).
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageLoadError("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return _to_rgb(img)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(f"decompression bomb refused: {e}") from None
    except UnidentifiedImageError:
        raise ImageLoadError("not an image Pillow can identify") from None
    except FileNotFoundError:
        raise ImageLoadError("file not found") from None
    except IsADirectoryError:
        raise ImageLoadError("is a directory, not a file") from None
    except PermissionError:
        raise ImageLoadError("permission denied") from None
    except OSError as e:
        raise ImageLoadError(f"corrupt or truncated image: {e}") from None
    except (ValueError, SyntaxError, MemoryError) as e:
        raise ImageLoadError(f"cannot decode image: {e}") from None


def resize_whole(img: Image.Image, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """Resize the whole picture (no crop, aspect ratio not kept) to `size` x `size`.

    Returns uint8 [size, size, 3] (HWC, RGB). Pillow's filters are antialiased when shrinking.
    """
    resized = img.resize((size, size), PIL_FILTERS[interpolation])
    return np.array(resized, dtype=np.uint8)
