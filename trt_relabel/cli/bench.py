"""`bench`: model-only and end-to-end throughput of every backend available here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trt_relabel.cli._app import (
    CheckpointOpt,
    DeviceOpt,
    EnginesDirOpt,
    SizeOpt,
    TeacherOpt,
    TopkOpt,
    app,
    console,
    device_argument,
    workers_option,
)


@app.command("bench")
def bench_command(
    data: Annotated[Path, typer.Argument(help="Image folder (ImageFolder or flat) to benchmark on.")],
    teacher: TeacherOpt = "efficientnet_lite0",
    checkpoint: CheckpointOpt = None,
    size: SizeOpt = None,
    topk: TopkOpt = 5,
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 8,
    workers: Annotated[
        int | None, workers_option("Decoding processes of the end-to-end runs.", default="cores - 1")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, metavar="N", help="Benchmark on the first N images.")] = 64,
    repeats: Annotated[int, typer.Option(min=1, help="Model-only passes over the images.")] = 2,
    engines_dir: EnginesDirOpt = Path("engines"),
    end_to_end: Annotated[bool, typer.Option(help="Also run `generate` end to end per backend.")] = True,
) -> None:
    """Images per second of each backend, model only and end to end, and the ratio to eager PyTorch
    fp32 (NCHW) on the same device in the same run."""
    from rich.table import Table

    from trt_relabel.bench import available_summary, run_bench

    console.print(available_summary())
    report = run_bench(
        data, teacher=teacher, checkpoint=checkpoint, size=size, topk=topk, batch_size=batch_size,
        workers=workers, device=device_argument(device), limit=limit, repeats=repeats, engines_dir=engines_dir,
        end_to_end=end_to_end, log=console.print,
    )  # fmt: skip
    title = f"{report.device}: {report.images} images at {report.input_size}, batch {report.batch_size}"
    table = Table(title=title)
    table.add_column("backend")
    for column in ("model", "x ref", "e2e", "x ref", "e2e/model"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in report.rows:
        e2e = row.end_to_end
        table.add_row(
            row.backend,
            f"{row.model_only:.1f}",
            f"{row.model_only / report.reference:.2f}",
            "-" if e2e is None else f"{e2e:.1f}",
            "-" if e2e is None else f"{e2e / report.reference:.2f}",
            "-" if e2e is None else f"{e2e / row.model_only:.0%}",
        )
    console.print(table)
    console.print(
        "img/s; model = model only, e2e = end to end (generate), each after its first batch; "
        "ref = first row: eager PyTorch fp32, NCHW, model only"
    )
