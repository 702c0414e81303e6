"""`import-relabel`, `export-relabel`, `merge`, `join`, `show` and `stats`: the official ReLabel
maps, teacher ensembles, the stores of shards on separate machines and a look inside a store."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from trt_relabel.classes import unmapped_advice
from trt_relabel.cli._app import ClassMapOpt, OverwriteOpt, RetryFailedOpt, app, console, workers_option
from trt_relabel.errors import UsageError
from trt_relabel.progress import progress_bar
from trt_relabel.terminal import warning

WorkersOpt = Annotated[int, workers_option("Processes reading/writing the .pt files (~1 ms each).", min=1)]
WidthOpt = Annotated[int, typer.Option("--width", min=200, help="Figure width in pixels.")]
HeightOpt = Annotated[int, typer.Option("--height", min=150, help="Figure height in pixels.")]
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)
FIGURE_HELP = "Figure to write: .png, .jpg, .svg or .pdf."


@contextmanager
def _progress(description: str) -> Iterator:
    """A rich progress bar (count, img/s, ETA) on stderr; yields the (done, total) callback of the API.
    The bar appears with the first progress, so that an early error stands alone."""
    bar = progress_bar(console)
    tasks = []

    def update(done: int, total: int) -> None:
        if not tasks:
            bar.start()
            tasks.append(bar.add_task(description, total=total))
        bar.update(tasks[0], completed=done, total=total)

    try:
        yield update
    finally:
        if tasks:
            bar.stop()


def _parse_floats(text: str, option: str, count: int | None = None) -> list[float]:
    try:
        numbers = [float(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"{option} {text!r}: expected comma-separated numbers") from None
    if count is not None and len(numbers) != count:
        raise UsageError(f"{option} {text!r}: expected {count} comma-separated numbers")
    return numbers


@app.command("import-relabel")
def import_relabel_command(
    relabel_root: Annotated[Path, typer.Argument(help="Folder of the official maps: WNID/IMAGE_STEM.pt.")],
    data: Annotated[
        Path, typer.Option("--data", metavar="DIR", help="ImageFolder of the training images (row order).")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", metavar="STORE", help="Label store to write (resumed if it exists).")
    ],
    overwrite: OverwriteOpt = False,
    retry_failed: RetryFailedOpt = False,
    workers: WorkersOpt = DEFAULT_WORKERS,
) -> None:
    """Import the official ReLabel maps (EfficientNet-L2, top-5 of 15x15 cells, [2, 5, 15, 15] .pt
    files) into a label store aligned with the ImageFolder --data, to train without a teacher.

    Files are read with torch.load(weights_only=True); missing or bad ones are listed in the
    store's errors.jsonl. The store keeps float16: float32 logits are rounded. Exit code 1 when
    some failed; fix them and rerun with --retry-failed to read just those.
    """
    from trt_relabel.interop import import_relabel

    with _progress("importing") as progress:
        summary = import_relabel(
            relabel_root, data, out, overwrite=overwrite, retry_failed=retry_failed, workers=workers, progress=progress
        )
    console.print(
        f"{summary.store}: {summary.imported} maps imported now, {summary.already_done} before, "
        f"{summary.failed} failed of {summary.num_samples}"
    )
    if summary.failed:
        console.print(warning(f"{summary.failed} inputs failed: see {summary.errors_path}"))
        raise typer.Exit(1)


@app.command("export-relabel")
def export_relabel_command(
    store: Annotated[Path, typer.Argument(help="Label store to export.")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Folder to write DIR/IMAGE_STEM.pt into.")],
    workers: WorkersOpt = DEFAULT_WORKERS,
) -> None:
    """Write the labelled rows of a store in the official ReLabel layout: one float32 tensor
    [2, k, h, w] per image ([0] logits, [1] class indices as floats), saved with torch.save."""
    from trt_relabel.interop import export_relabel

    with _progress("exporting") as progress:
        written = export_relabel(store, out, workers=workers, progress=progress)
    console.print(f"{out}: {written} label maps written")


@app.command("merge")
def merge_command(
    stores: Annotated[list[Path], typer.Argument(help="Two or more complete, aligned label stores.")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="STORE", help="Merged label store to write.")],
    weights: Annotated[
        str | None,
        typer.Option("--weights", metavar="W1,W2,...", show_default="equal", help="One positive weight per store."),
    ] = None,
    topk: Annotated[
        int | None,
        typer.Option("--topk", "-k", min=1, show_default="the largest input k", help="Classes kept per cell."),
    ] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Ensemble teachers: per cell, the weighted mean of their logits over the union of their
    top-k classes, keeping the new top-k.

    A class missing from one teacher's top-k in a cell counts with that teacher's smallest kept
    logit there (its k-th value: an upper bound of its true logit, which keeps the ranking
    conservative). The stores must hold the same samples, map size and classes; rows failed in
    any input fail in the output.
    """
    from trt_relabel.interop import merge_stores

    weight_list = _parse_floats(weights, "--weights") if weights else None
    with _progress("merging") as progress:
        summary = merge_stores(stores, out, weights=weight_list, topk=topk, overwrite=overwrite, progress=progress)
    console.print(
        f"{summary.store}: {summary.merged} rows merged now, {summary.failed} failed of {summary.num_samples}"
    )


@app.command("join")
def join_command(
    parts: Annotated[list[Path], typer.Argument(help="The stores of `generate --shard I/N` jobs (two or more).")],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", metavar="STORE", help="Joined label store (created, or filled where pending)."),
    ],
    overwrite: OverwriteOpt = False,
) -> None:
    """Join the stores of `generate --shard I/N` jobs run on machines without a shared filesystem
    into one store: every row from the part that labelled it, byte for byte what one process
    would have written.

    The parts must come from the same teacher, graph and input list. Rows no part labelled stay
    pending (label them by resuming with `generate`). Exit code 1 when some rows failed (listed in
    the store's errors.jsonl) or are still pending.
    """
    from trt_relabel.join import join_stores

    with _progress("joining") as progress:
        summary = join_stores(parts, out, overwrite=overwrite, progress=progress)
    failed = f", {summary.failed} failed (listed in {summary.store / 'errors.jsonl'})" if summary.failed else ""
    pending = f", {summary.pending} pending (no part labelled them)" if summary.pending else ""
    state = "complete" if summary.complete else "incomplete"
    console.print(
        Text(f"{summary.store}: {summary.labelled} of {summary.num_samples} rows labelled{failed}{pending}; {state}")
    )
    if summary.failed or summary.pending:
        raise typer.Exit(1)


@app.command("show")
def show_command(
    labels: Annotated[Path, typer.Option("--labels", "-l", metavar="STORE", help="Label store.")],
    out: Annotated[Path, typer.Option("--out", "-o", help=FIGURE_HELP)],
    image: Annotated[
        str | None, typer.Argument(help="Sample path as in samples.tsv, or an image file inside --data.")
    ] = None,
    data: Annotated[
        Path | None, typer.Option("--data", metavar="DIR", help="Data folder (needed for sample paths and --row).")
    ] = None,
    row: Annotated[int | None, typer.Option("--row", min=0, help="Row of the store instead of IMAGE.")] = None,
    box: Annotated[
        str | None,
        typer.Option("--box", metavar="X1,Y1,X2,Y2", show_default="the whole image", help="Box normalised to [0, 1]."),
    ] = None,
    width: WidthOpt = 1200,
    height: HeightOpt = 600,
) -> None:
    """Draw an image with its label map (top-1 class per cell as colours, legend with class
    names), the --box outline and the top-5 classes of its soft target (LabelPooling + softmax)."""
    from trt_relabel.classes import store_classes
    from trt_relabel.store import LabelStore
    from trt_relabel.visualize import figure_format, locate_image, show_label_map

    kind = figure_format(out)
    store = LabelStore(labels)
    row, photo = locate_image(store, image, data, row)
    parsed_box = tuple(_parse_floats(box, "--box", 4)) if box else None
    top5 = show_label_map(store, row, photo, out, box=parsed_box, width=width, height=height)
    classes = store_classes(store)
    sample = store.samples[row]
    title = f"{sample.path}: soft target (top 5); folder class: {classes.label(sample.class_index)}"
    table = Table("class", "name", "probability", title=title)
    for index, probability in top5:
        table.add_row(str(index), classes.names[index], f"{probability:.4f}")
    console.print(table)
    console.print(f"{out}: {width}x{height} {kind.upper()} written")


@app.command("stats")
def stats_command(
    store: Annotated[Path, typer.Argument(help="Label store.")],
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Also draw the entropies and agreement. " + FIGURE_HELP)
    ] = None,
    threshold: Annotated[
        float, typer.Option("--threshold", help="Multi-label when the 2nd class's probability is above this.")
    ] = 0.2,
    as_json: Annotated[bool, typer.Option("--json", help="Print the numbers as JSON on stdout.")] = False,
    target_temperature: Annotated[
        float, typer.Option("--target-temperature", help="T of the targets (as `train --target-temperature`).")
    ] = 1.0,
    class_map: ClassMapOpt = None,
    width: WidthOpt = 1200,
    height: HeightOpt = 600,
) -> None:
    """Statistics of the global soft targets (LabelPooling over the whole image, softmax): top-1
    agreement with the folder class, multi-label images, entropy and top probability, and a
    warning when the targets are close to uniform."""
    from trt_relabel.store import LabelStore
    from trt_relabel.visualize import figure_format, plot_stats, store_stats

    kind = figure_format(plot) if plot else None
    with _progress("pooling") as progress:
        stats = store_stats(
            LabelStore(store),
            threshold=threshold,
            temperature=target_temperature,
            class_map=class_map,
            progress=progress,
        )
    if stats.num_nonfinite:
        console.print(Text(_nonfinite_warning(stats), style="yellow"))
    if as_json:
        typer.echo(json.dumps(stats.to_dict(), indent=2))
    else:
        console.print(_stats_table(stats))
    for line in _stats_warnings(stats):
        console.print(warning(line))
    if plot:
        plot_stats(stats, plot, width=width, height=height)
        console.print(f"{plot}: {width}x{height} {kind.upper()} written")


def _nonfinite_warning(stats) -> str:
    return (
        f"warning: {stats.store}: {stats.num_nonfinite} labelled rows hold non-finite scores (NaN or inf) "
        f"and are left out (first: row {int(stats.nonfinite[0])})"
    )


def _percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.1%}"


def _stats_table(stats) -> Table:
    table = Table("", "", title=f"{stats.store} ({stats.teacher})", show_header=False)
    table.add_row("images", str(stats.num_samples))
    table.add_row("labelled / failed / pending", f"{stats.num_labelled} / {stats.num_failed} / {stats.num_pending}")
    if stats.num_nonfinite:
        table.add_row("left out: non-finite scores", str(stats.num_nonfinite))
    table.add_row(
        "global top-1 = folder class", f"{stats.num_agree} of {stats.num_with_class} ({_percent(stats.agreement)})"
    )
    table.add_row(
        f"multi-label (2nd class > {stats.threshold:g})",
        f"{stats.num_multi_label} of {stats.num_labelled} ({_percent(stats.multi_label_fraction)})",
    )
    if stats.entropy_quartiles:
        q1, median, q3 = stats.entropy_quartiles
        table.add_row(
            f"entropy, nats (mean; quartiles; max {stats.entropy_max:.2f})",
            f"{stats.entropy_mean:.3f}; {q1:.3f} / {median:.3f} / {q3:.3f}",
        )
        table.add_row("top probability (mean)", f"{stats.top_prob_mean:.3f}")
    table.add_row("target temperature", f"{stats.target_temperature:g}")
    return table


def _stats_warnings(stats) -> list[str]:
    """Lines that tell what the numbers cannot say or what to change."""
    lines = []
    if stats.unmapped_folders:
        lines.append(unmapped_advice(stats.unmapped_folders, stats.teacher))
    if stats.near_uniform:
        lines.append(
            f"the targets are close to uniform (mean entropy {stats.entropy_mean:.2f} of at most "
            f"{stats.entropy_max:.2f} nats, mean top probability {stats.top_prob_mean:.3f}): the teacher's logits are "
            "small; sharpen them with `train --target-temperature T` (T < 1; see the figures of "
            "`stats --target-temperature T`)"
        )
    return lines
