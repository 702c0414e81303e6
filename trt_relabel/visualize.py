"""Inspecting a label store: one image with its label map (:func:`show_label_map`) and whole-store
statistics of the global soft targets (:func:`store_stats`, :func:`plot_stats`).

The global target of an image is LabelPooling over the full image box: the mean over the cells of
the dense map rebuilt from the top-k (zeros elsewhere), then a softmax over the classes. Figures are
drawn with matplotlib's Agg canvas (no pyplot, no global backend) at exactly `width` x `height`
pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from trt_relabel.classes import read_class_map, store_classes
from trt_relabel.errors import RelabelError, UsageError
from trt_relabel.images import ImageLoadError, load_rgb
from trt_relabel.interop import ProgressCallback
from trt_relabel.store import LabelStore, nonfinite_rows
from trt_relabel.store_format import FAILED, LABELLED, PENDING
from trt_relabel.terminal import readable

FULL_BOX = (0.0, 0.0, 1.0, 1.0)
DPI = 100
OVERLAY_ALPHA = 0.5
OTHER_CLASSES_GREY = (0.5, 0.5, 0.5)  # the classes past the legend's
#: Figure file suffix -> matplotlib format.
FIGURE_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".svg": "svg", ".pdf": "pdf"}


#: Mean entropy of the global targets, as a fraction of log C, above which `stats` warns that
#: they are close to uniform.
NEAR_UNIFORM = 0.9


def soft_targets(
    values: np.ndarray, indices: np.ndarray, boxes: np.ndarray, num_classes: int, temperature: float = 1.0
) -> np.ndarray:
    """ReLabel soft targets of B images: values float [B, k, h, w] (logits), indices int [B, k, h, w],
    boxes float [B, 4] (x1, y1, x2, y2) normalised to [0, 1] in the image frame -> float32 [B, C]
    (softmax of :func:`trt_relabel.pooling.label_pooling` over each box / `temperature`, as
    `train --target-temperature`)."""
    import torch

    from trt_relabel.pooling import label_pooling
    from trt_relabel.targets import teacher_target

    pooled = label_pooling(
        torch.from_numpy(values.astype(np.float32)),
        torch.from_numpy(indices.astype(np.int64)),
        torch.from_numpy(np.asarray(boxes, dtype=np.float32)),
        num_classes,
    )
    return teacher_target(pooled, temperature=temperature).numpy()


def sample_classes(store: LabelStore, class_map: str | Path | None = None) -> np.ndarray:
    """int64 [N]: the teacher class of each row's folder: samples.tsv's class index, or, for a
    folder (first path component) that `class_map` names, its class there
    (:func:`trt_relabel.classes.read_class_map`)."""
    classes = np.array(store.samples.classes, dtype=np.int64)  # a writable copy
    if class_map is not None:
        mapping = read_class_map(class_map, store_classes(store))
        for row, sample in enumerate(store.samples):
            folder, sep, _ = sample.path.partition("/")
            if sep and folder in mapping:
                classes[row] = mapping[folder]
    return classes


@dataclass(frozen=True)
class StoreStats:
    """Statistics of a store's global soft targets (see the module docstring). Entropies in nats.

    `num_nonfinite`: rows labelled with scores that hold a NaN or an infinity (stores of older
    versions or edited ones; `nonfinite` lists them), left out: `num_labelled` counts the other
    labelled rows, which every figure below covers. `num_with_class`: those whose folder gives a
    teacher class (class index >= 0, e.g. ImageNet wnid folders of any subset, or folders mapped by
    a class map); `num_agree`: those whose global top-1 is that class. `unmapped_folders`: folders
    (first path component) of labelled rows without a class. `num_multi_label`: labelled rows
    whose second most likely class has a probability above `threshold`. Targets are
    softmax(pooled / `target_temperature`); `top_prob_mean` is the mean of their largest
    probability, `entropy_max` = log C, and `near_uniform` says the mean entropy exceeds
    NEAR_UNIFORM * log C. Ratios are None when their denominator is 0.
    """

    store: str
    teacher: str
    num_classes: int
    num_samples: int
    num_labelled: int
    num_failed: int
    num_pending: int
    num_nonfinite: int
    num_with_class: int
    num_agree: int
    agreement: float | None
    unmapped_folders: list[str]
    threshold: float
    num_multi_label: int
    multi_label_fraction: float | None
    entropy_mean: float | None
    entropy_quartiles: tuple[float, float, float] | None
    entropy_max: float
    top_prob_mean: float | None
    target_temperature: float
    near_uniform: bool
    entropies: np.ndarray = field(repr=False, compare=False)  # float32 [labelled finite rows], row order
    nonfinite: np.ndarray = field(repr=False, compare=False)  # int64 [num_nonfinite]: their rows

    def to_dict(self) -> dict:
        """The numbers (without the per-image entropies and rows), JSON-serialisable."""
        numbers = asdict(self)
        del numbers["entropies"], numbers["nonfinite"]
        return numbers


def _ratio(count: int, total: int) -> float | None:
    return count / total if total else None


def store_stats(
    store: LabelStore,
    *,
    threshold: float = 0.2,
    temperature: float = 1.0,
    class_map: str | Path | None = None,
    chunk_rows: int = 1024,
    progress: ProgressCallback | None = None,
) -> StoreStats:
    """Compute :class:`StoreStats` over the labelled rows of `store`, `chunk_rows` at a time, with
    targets at `temperature` and folder classes from :func:`sample_classes` (`class_map`).
    `progress`, if given, is called with (rows done, rows to do)."""
    if not 0 <= threshold < 1:
        raise UsageError(f"--threshold {threshold}: must lie in [0, 1)")
    if not temperature > 0:
        raise UsageError(f"--target-temperature {temperature}: must be > 0")
    status = store.status()
    labelled = np.flatnonzero(status == LABELLED)
    finite = np.ones(len(labelled), bool)
    top1 = np.empty(len(labelled), np.int64)
    top_prob = np.empty(len(labelled), np.float32)
    second = np.empty(len(labelled), np.float32)
    entropies = np.empty(len(labelled), np.float32)
    for start in range(0, len(labelled), chunk_rows):
        chunk = slice(start, start + chunk_rows)
        values, indices = store.gather(labelled[chunk])
        finite[chunk] = ~nonfinite_rows(values)
        boxes = np.tile(FULL_BOX, (len(values), 1))
        targets = soft_targets(values, indices, boxes, store.num_classes, temperature)
        best_two = -np.partition(-targets, 1, axis=1)[:, :2]
        top1[chunk] = targets.argmax(axis=1)
        top_prob[chunk] = best_two[:, 0]
        second[chunk] = best_two[:, 1]
        entropies[chunk] = -(targets * np.log(np.maximum(targets, np.finfo(np.float32).tiny))).sum(axis=1)
        if progress:
            progress(min(start + chunk_rows, len(labelled)), len(labelled))
    rows, top1, second, entropies = labelled[finite], top1[finite], second[finite], entropies[finite]
    top_prob = top_prob[finite]
    classes = sample_classes(store, class_map)[rows]
    with_class = classes >= 0
    num_agree = int((top1[with_class] == classes[with_class]).sum())
    num_multi = int((second > threshold).sum())
    paths = (store.samples[row].path for row in rows[~with_class])
    unmapped = sorted({path.split("/", 1)[0] for path in paths if "/" in path})
    entropy_mean = float(entropies.mean()) if len(rows) else None
    return StoreStats(
        store=str(store.path),
        teacher=store.spec.teacher,
        num_classes=store.num_classes,
        num_samples=len(store),
        num_labelled=len(rows),
        num_failed=int((status == FAILED).sum()),
        num_pending=int((status == PENDING).sum()),
        num_nonfinite=int((~finite).sum()),
        num_with_class=int(with_class.sum()),
        num_agree=num_agree,
        agreement=_ratio(num_agree, int(with_class.sum())),
        unmapped_folders=unmapped,
        threshold=threshold,
        num_multi_label=num_multi,
        multi_label_fraction=_ratio(num_multi, len(rows)),
        entropy_mean=entropy_mean,
        entropy_quartiles=tuple(float(q) for q in np.quantile(entropies, [0.25, 0.5, 0.75])) if len(rows) else None,
        entropy_max=float(np.log(store.num_classes)),
        top_prob_mean=float(top_prob.mean()) if len(rows) else None,
        target_temperature=temperature,
        near_uniform=bool(entropy_mean is not None and entropy_mean > NEAR_UNIFORM * np.log(store.num_classes)),
        entropies=entropies,
        nonfinite=labelled[~finite],
    )


def _figure(width: int, height: int):
    """A matplotlib Figure of exactly `width` x `height` pixels once saved (Agg canvas)."""
    from matplotlib.figure import Figure

    if width < 200 or height < 150:
        raise UsageError(f"figure size {width}x{height}: at least 200x150 pixels")
    return Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")


def figure_format(out: str | Path) -> str:
    """The matplotlib format of a figure file, named by its suffix (see :data:`FIGURE_FORMATS`);
    UsageError for any other suffix."""
    suffix = Path(out).suffix.lower()
    if suffix not in FIGURE_FORMATS:
        raise UsageError(f"{out}: cannot tell the figure format; name a {', '.join(FIGURE_FORMATS)} file")
    return FIGURE_FORMATS[suffix]


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    kind = figure_format(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=DPI, format=kind)
    except OSError as e:
        raise RelabelError(f"{out}: cannot write the figure: {e.strerror}") from None
    return out


def plot_stats(stats: StoreStats, out: str | Path, *, width: int = 1200, height: int = 600) -> Path:
    """A figure (format from the suffix of `out`, :func:`figure_format`) of `width` x `height`
    pixels: histogram of the global targets' entropies over [0, log C]
    (mean and quartiles marked) and bars of the top-1 agreement and multi-label fractions."""
    fig = _figure(width, height)
    hist, bars = fig.subplots(1, 2, width_ratios=[2, 1])
    hist.hist(stats.entropies, bins=60, range=(0, np.log(stats.num_classes)), color="tab:blue")
    if stats.entropy_quartiles:
        for value, style in zip(stats.entropy_quartiles, (":", "--", ":"), strict=True):
            hist.axvline(value, color="black", linestyle=style, linewidth=1)
        hist.axvline(stats.entropy_mean, color="tab:red", linewidth=1.5, label=f"mean {stats.entropy_mean:.3f}")
        hist.legend()
    hist.set(
        xlabel="entropy of the global soft target (nats)",
        ylabel="images",
        title=f"{stats.teacher}: {stats.num_labelled} labelled images",
    )
    names = ["top-1 = folder class", f"multi-label (2nd > {stats.threshold:g})"]
    fractions = [stats.agreement or 0.0, stats.multi_label_fraction or 0.0]
    counts = [f"{stats.num_agree}/{stats.num_with_class}", f"{stats.num_multi_label}/{stats.num_labelled}"]
    bars.bar(names, fractions, color=["tab:green", "tab:orange"])
    for x, (fraction, count) in enumerate(zip(fractions, counts, strict=True)):
        bars.annotate(f"{fraction:.1%}\n{count}", (x, fraction), ha="center", va="bottom")
    bars.set(ylim=(0, 1.15), ylabel="fraction of images")
    return _save(fig, out)


def _check_row(store: LabelStore, row: int) -> None:
    if not 0 <= row < len(store):
        raise UsageError(f"row {row}: the store {store.path} has rows 0 to {len(store) - 1}")


def locate_image(
    store: LabelStore, image: str | Path | None, data_dir: str | Path | None, row: int | None = None
) -> tuple[int, Path]:
    """The row of an image in `store` and the file to read its photo from; give `image` or `row`.

    `image` is either the relative path of a sample (as in samples.tsv) or a file path: taken
    relative to `data_dir` when given, otherwise (absolute paths only) matched with the longest
    sample path it ends with. Sample paths and `row` read the photo from `data_dir` (required).
    Raises :class:`UsageError` for missing arguments or a row out of range, and
    :class:`RelabelError` when no sample has the path.
    """
    if (image is None) == (row is None):
        raise UsageError("give either an image path or a row")
    if row is not None:
        _check_row(store, row)
        if data_dir is None:
            raise UsageError(f"row {row}: reading the photo of a row needs --data DIR")
        return row, Path(data_dir) / store.samples[row].path
    rows = {s.path: i for i, s in enumerate(store.samples)}
    path = Path(image)
    if not path.is_absolute() and path.as_posix() in rows:
        if data_dir is None:
            raise UsageError(f"{image}: a path relative to the data folder needs --data DIR")
        return rows[path.as_posix()], Path(data_dir) / path
    if data_dir is not None:
        try:
            key = path.resolve().relative_to(Path(data_dir).resolve()).as_posix()
        except ValueError:
            raise RelabelError(f"{image}: neither a sample of {store.path} nor a file inside {data_dir}") from None
    elif path.is_absolute():
        key = max((s for s in rows if path.as_posix().endswith("/" + s)), key=len, default=None)
    else:
        raise UsageError(f"{image}: a path relative to the data folder needs --data DIR")
    if key not in rows:
        raise RelabelError(f"{image}: no sample of {store.path} has this path")
    return rows[key], path


def _check_box(box: tuple[float, float, float, float]) -> np.ndarray:
    x1, y1, x2, y2 = box
    if not (0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1):
        raise UsageError(f"box {box}: need 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1 (normalised x1,y1,x2,y2)")
    return np.asarray(box, dtype=np.float32)


def class_palette() -> list[tuple[float, float, float]]:
    """The colours of the legend's classes, most frequent class first: tab20's 9 saturated colours,
    then their 9 light ones; tab20's greys are left out, grey marks the other classes."""
    from matplotlib import colormaps

    colours = [c for c in colormaps["tab20"].colors if len(set(c)) > 1]  # drop the greys (r == g == b)
    return colours[0::2] + colours[1::2]


def _top1_colours(top1: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int, tuple]]]:
    """Colour each cell by its top-1 class: the most frequent classes get the colours of
    :func:`class_palette`, the others one grey. Returns RGBA float [h, w, 4] and the legend entries
    (class, cells, colour), most frequent first."""
    classes, counts = np.unique(top1, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    palette = class_palette()
    colour_of = {
        int(classes[i]): palette[rank] if rank < len(palette) else OTHER_CLASSES_GREY for rank, i in enumerate(order)
    }
    rgba = np.array([[(*colour_of[int(c)], OVERLAY_ALPHA) for c in line] for line in top1])
    legend = [(int(classes[i]), int(counts[i]), colour_of[int(classes[i])]) for i in order]
    return rgba, legend


def show_label_map(
    store: LabelStore,
    row: int,
    photo: str | Path,
    out: str | Path,
    *,
    box: tuple[float, float, float, float] | None = None,
    width: int = 1200,
    height: int = 600,
) -> list[tuple[int, float]]:
    """Draw row `row` of `store` over its photo into a figure of exactly `width` x `height` pixels
    (format from the suffix of `out`, :func:`figure_format`).

    Left: the photo (read with trt_relabel.images.load_rgb) with the top-1 class of each label-map
    cell as semi-transparent colours (nearest-upsampled to the photo) and `box` outlined. Right:
    a legend of the top-1 classes (names of the store's teacher classes) and the bars of the 5 most
    likely classes of the soft target of `box` (x1, y1, x2, y2 normalised to [0, 1]; the whole
    image when None). Returns those 5 (class index, probability), most likely first.
    """
    _check_row(store, row)
    sample = store.samples[row]
    if not store.labelled()[row]:
        raise RelabelError(f"{sample.path} (row {row}) of {store.path} has no labels (failed or pending)")
    values, indices = store[row]
    if nonfinite_rows(values[None])[0]:
        raise RelabelError(f"{sample.path} (row {row}) of {store.path}: its scores are not finite (NaN or inf)")
    pool_box = _check_box(box or FULL_BOX)
    try:
        picture = np.asarray(load_rgb(photo))
    except ImageLoadError as e:
        raise RelabelError(f"{photo}: {e}") from None
    target = soft_targets(values[None], indices[None], pool_box[None], store.num_classes)[0]
    top5 = [(int(c), float(target[c])) for c in np.argsort(-target, kind="stable")[:5]]
    top1 = np.take_along_axis(indices, values.argmax(axis=0)[None], axis=0)[0]
    classes = store_classes(store)
    names = list(classes.names)

    rgba, legend = _top1_colours(top1)

    fig = _figure(width, height)
    axes = fig.subplot_mosaic([["image", "legend"], ["image", "bars"]], width_ratios=[3, 2])
    title = f"{readable(sample.path)} (row {row}), folder class: {classes.label(sample.class_index)}"
    _draw_photo(axes["image"], picture, rgba, box, title)
    _draw_legend(axes["legend"], legend, names, store.spec.teacher)
    _draw_bars(axes["bars"], top5, names, "box" if box else "whole image")
    _save(fig, out)
    return top5


def _draw_photo(ax, picture: np.ndarray, rgba: np.ndarray, box, title: str) -> None:
    height, width = picture.shape[:2]
    ax.imshow(picture)
    ax.imshow(rgba, extent=(0, width, height, 0), interpolation="nearest")
    if box:
        from matplotlib.patches import Rectangle

        x1, y1, x2, y2 = box
        ax.add_patch(
            Rectangle(
                (x1 * width, y1 * height),
                (x2 - x1) * width,
                (y2 - y1) * height,
                fill=False,
                edgecolor="white",
                linewidth=2.5,
            )
        )
    ax.set_title(title, fontsize="medium", parse_math=False)  # a file name is no TeX
    ax.set_axis_off()


def _draw_legend(ax, legend: list[tuple[int, int, tuple]], names: list[str], teacher: str) -> None:
    from matplotlib.patches import Patch

    shown = legend[: len(class_palette())]
    two_columns = len(shown) > 8
    handles = [
        Patch(color=colour, label=f"{_short(names[c], 14 if two_columns else 28)} ({c}): {cells}")
        for c, cells, colour in shown
    ]
    if len(legend) > len(shown):
        handles.append(Patch(color=OTHER_CLASSES_GREY, label=f"{len(legend) - len(shown)} more classes"))
    legend_box = ax.legend(
        handles=handles,
        loc="upper left",
        ncols=2 if two_columns else 1,
        fontsize="x-small" if two_columns else "small",
        frameon=False,
        title=f"{readable(teacher)}: top-1 class of each cell\n(number of cells)",  # two lines: fits the panel
    )
    legend_box.set_in_layout(False)  # a long legend must not shrink the photo and the bars
    ax.set_axis_off()


def _short(name: str, length: int) -> str:
    return name if len(name) <= length else name[: length - 1] + "…"


def _draw_bars(ax, top5: list[tuple[int, float]], names: list[str], region: str) -> None:
    labels = [f"{names[c]} ({c})" for c, _ in top5][::-1]
    probabilities = [p for _, p in top5][::-1]
    ax.barh(labels, probabilities, color="tab:blue")
    for y, p in enumerate(probabilities):
        ax.annotate(f"{p:.1%}", (p, y), xytext=(3, 0), textcoords="offset points", va="center")
    # The axis ends a little past the largest bar (room for its label), so that small bars show.
    ax.set(xlim=(0, max(probabilities) * 1.25), xlabel="probability", title=f"soft target, {region} (top 5)")
