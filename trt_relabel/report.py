"""The audit's HTML report: one static, self-contained page (inline CSS, SVG and a small sorting
script; no network) and the thumbnails of what it shows, written into the report folder.

Each gallery item has two small files in ``thumbs/``: ``row<N>.jpg``, the photo fitted into
THUMB_SIZE pixels, and ``row<N>.png``, its label map with one pixel per cell (the top-1 class's
colour, as `trt-relabel show` colours it; faint where the cell is not counted for the present set),
which the page stretches over the photo without smoothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from trt_relabel.fileio import write_atomic
from trt_relabel.images import ImageLoadError, load_rgb
from trt_relabel.visualize import _top1_colours

THUMB_SIZE = 240  # px: the longer side of a photo thumbnail
THUMBS = "thumbs"
COUNTED_ALPHA, FAINT_ALPHA = 0.55, 0.15  # overlay opacity of counted and other cells
_THUMB_NAME = re.compile(r"row\d+\.(jpg|png)")


@dataclass(frozen=True)
class GalleryItem:
    """One image of a gallery. `label`: (class, name, probability, rank), None without a folder
    class; `top5`: (class, name, probability) of the whole-image target; `present`: (class, name,
    cells), most cells first; `top1_map` int [h, w] and `counted` bool [h, w]: each cell's top-1
    class and whether it counts for the present set; `photo`: the file to read, or None."""

    row: int
    path: str
    label: tuple[int, str, float, int] | None
    top5: list[tuple[int, str, float]]
    present: list[tuple[int, str, int]]
    objects: int
    multi_object_score: float
    suspect: bool
    multi_object: bool
    top1_map: np.ndarray
    counted: np.ndarray
    photo: Path | None


@dataclass(frozen=True)
class Thumbnail:
    """What the page shows of one gallery row: the files (relative to the report folder), the
    displayed size (width, height), the colour of each top-1 class on the map and a note on the
    photo (why there is none)."""

    map_file: str
    photo_file: str | None
    size: tuple[int, int]
    colours: dict[int, str]
    note: str = ""


@dataclass(frozen=True)
class Chart:
    """A bar chart: `bars` (label, count) in display order."""

    title: str
    bars: list[tuple[str, int]]


@dataclass(frozen=True)
class ReportPage:
    """Everything index.html shows. `cards`: (title, value, note); `classes`: one dict per folder
    class (keys of the per-class table); `pairs`: (folder class, name, teacher class, name, images,
    share of the folder class)."""

    title: str
    store: str
    teacher: str
    rules: dict
    cards: list[tuple[str, str, str]]
    charts: list[Chart]
    suspects: list[GalleryItem]
    multi_object: list[GalleryItem]
    pairs: list[tuple[int, str, int, str, int, float]]
    classes: list[dict]
    files: dict[str, str]  # what -> file name in the report folder


def _hex(colour: tuple) -> str:
    return "#" + "".join(f"{round(255 * c):02x}" for c in colour[:3])


def _display_path(path: str) -> str:
    """A sample path as text (undecodable bytes of the file name shown as U+FFFD)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def draw_thumbnail(item: GalleryItem, folder: Path) -> Thumbnail:
    """Write the item's map (and photo) thumbnails into `folder`."""
    rgba, legend = _top1_colours(item.top1_map)
    rgba[..., 3] = np.where(item.counted, COUNTED_ALPHA, FAINT_ALPHA)
    colours = {c: _hex(colour) for c, _, colour in legend}
    map_file = f"row{item.row}.png"
    Image.fromarray(np.round(rgba * 255).astype(np.uint8), "RGBA").save(folder / map_file)
    map_only = partial(Thumbnail, f"{THUMBS}/{map_file}", None, (THUMB_SIZE, THUMB_SIZE), colours)
    if item.photo is None:
        return map_only("label map only (no --data folder given)")
    try:
        photo = load_rgb(item.photo)
    except ImageLoadError as e:
        return map_only(f"photo unavailable: {e}")
    photo.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.LANCZOS)
    photo_file = f"row{item.row}.jpg"
    photo.save(folder / photo_file, quality=85)
    return Thumbnail(f"{THUMBS}/{map_file}", f"{THUMBS}/{photo_file}", photo.size, colours)


def _clear_thumbnails(folder: Path) -> None:
    """Remove the thumbnails of an earlier report (only files named as this module names them)."""
    for path in folder.iterdir():
        if _THUMB_NAME.fullmatch(path.name):
            path.unlink()


def render(page: ReportPage, thumbnails: dict[int, Thumbnail]) -> str:
    """The HTML text of `page` with the `thumbnails` of its gallery rows (Jinja2, autoescaped)."""
    import jinja2

    template = resources.files("trt_relabel").joinpath("templates", "report.html").read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["display_path"] = _display_path
    return env.from_string(template).render(page=page, thumbnails=thumbnails)


def write_report(out: Path, page: ReportPage) -> Path:
    """Write `out`/index.html and the thumbnails of the gallery rows (each once) into `out`/thumbs
    (replacing an earlier report's); returns the path of index.html."""
    folder = out / THUMBS
    folder.mkdir(parents=True, exist_ok=True)
    _clear_thumbnails(folder)
    thumbnails: dict[int, Thumbnail] = {}
    for item in page.suspects + page.multi_object:
        if item.row not in thumbnails:
            thumbnails[item.row] = draw_thumbnail(item, folder)
    index = out / "index.html"
    write_atomic(index, render(page, thumbnails))
    return index
