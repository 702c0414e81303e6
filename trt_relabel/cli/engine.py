"""`teachers` and `build-engine`: list the teachers, export their graphs and build the TensorRT engine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trt_relabel.cli._app import app, console

TeacherOpt = Annotated[
    str, typer.Option("--teacher", "-t", help="Registered teacher name or timm:<model> (see `trt-relabel teachers`).")
]
CheckpointOpt = Annotated[
    Path | None, typer.Option("--checkpoint", help="Local weights: .safetensors or a torch state dict (.pth/.pt).")
]
SizeOpt = Annotated[int | None, typer.Option("--size", help="Square input side S (default: the teacher's).")]
TopkOpt = Annotated[int, typer.Option("--topk", "-k", help="Classes kept per label-map cell.")]
EnginesOpt = Annotated[Path, typer.Option("--out", "-o", help="Folder for graphs, engines and the timing cache.")]


@app.command("teachers")
def teachers_command() -> None:
    """List the registered teachers (any timm classifier also works as timm:<name>)."""
    from rich.table import Table

    from trt_relabel.teacher import TEACHERS

    table = Table("name", "architecture", "input", "weights", "description")
    for config in TEACHERS.values():
        table.add_row(config.name, config.architecture, str(config.input_size), config.weights, config.description)
    console.print(table)


@app.command("build-engine")
def build_engine_command(
    teacher: TeacherOpt = "efficientnet_lite0",
    checkpoint: CheckpointOpt = None,
    size: SizeOpt = None,
    topk: TopkOpt = 5,
    out: EnginesOpt = Path("engines"),
    max_batch: Annotated[int, typer.Option(help="Largest batch of the TensorRT profile.")] = 64,
    opt_batch: Annotated[int | None, typer.Option(help="Batch TensorRT tunes for (default: max-batch).")] = None,
    workspace_gib: Annotated[float, typer.Option(help="TensorRT builder workspace limit, GiB.")] = 8.0,
    random_weights: Annotated[bool, typer.Option(help="Random weights (benchmarks of an architecture).")] = False,
    verify: Annotated[bool, typer.Option(help="Check the fp32 graph against PyTorch after export.")] = True,
) -> None:
    """Export the teacher's fp32 and FP16 ONNX graphs, and build the FP16 TensorRT engine when
    TensorRT and a CUDA GPU are present. Unchanged inputs reuse the existing files."""
    from trt_relabel.backends import tensorrt_missing
    from trt_relabel.export import build_graphs
    from trt_relabel.trt_compat import check_tensorrt_compatible

    built = build_graphs(
        teacher, checkpoint, size, topk, out, pretrained=not random_weights, verify=verify, log=console.print
    )
    state = "unchanged, reused" if built.skipped else "written"
    meta = built.metadata
    console.print(
        f"{meta.teacher} ({meta.architecture}) at {meta.input_size}x{meta.input_size} -> "
        f"top-{meta.topk} maps {meta.map_size[0]}x{meta.map_size[1]}, teacher hash {meta.teacher_hash}"
    )
    for path in (built.fp32, built.fp16):
        console.print(f"  {path}  ({path.stat().st_size / 2**20:.1f} MiB, {state})")
    for path in (built.fp32, built.fp16):
        check_tensorrt_compatible(path)
    console.print("  both graphs follow TensorRT's ONNX parser rules")
    missing = tensorrt_missing()
    if missing:
        console.print(f"engine step skipped: it needs TensorRT and a CUDA GPU; {missing} is missing here")
        return
    from trt_relabel.tensorrt_engine import build_engine

    engine = build_engine(
        built.fp16,
        max_batch=max_batch,
        opt_batch=opt_batch,
        workspace_bytes=int(workspace_gib * 2**30),
        log=console.print,
    )
    console.print(f"  {engine}  (TensorRT engine, sidecar {engine.with_suffix('.json').name})")
