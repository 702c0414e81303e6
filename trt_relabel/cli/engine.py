"""`teachers` and `build-engine`: list the teachers, export their graphs and build the TensorRT engine."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from trt_relabel.cli._app import (
    CheckpointOpt,
    ClassNamesOpt,
    DeviceOpt,
    EnginesDirOpt,
    SizeOpt,
    TeacherOpt,
    TopkOpt,
    app,
    console,
    device_argument,
)
from trt_relabel.errors import UsageError


@app.command("teachers")
def teachers_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print the teachers as JSON.")] = False,
) -> None:
    """List the registered teachers on stdout, one per line (any timm classifier also works as
    timm:MODEL)."""
    from trt_relabel.teacher import TEACHERS

    if as_json:
        typer.echo(json.dumps([asdict(config) for config in TEACHERS.values()], indent=2))
        return
    rows = [("name", "architecture", "input", "weights", "description")]
    rows += [(c.name, c.architecture, str(c.input_size), c.weights, c.description) for c in TEACHERS.values()]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:  # whole names, never wrapped or cut: the terminal wraps long lines itself
        typer.echo("  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[4]]))


@app.command("build-engine")
def build_engine_command(
    teacher: TeacherOpt = "efficientnet_lite0",
    checkpoint: CheckpointOpt = None,
    size: SizeOpt = None,
    topk: TopkOpt = 5,
    class_names: ClassNamesOpt = None,
    engines_dir: EnginesDirOpt = Path("engines"),
    device: DeviceOpt = "auto",
    out: Annotated[Path | None, typer.Option("--out", "-o", hidden=True)] = None,  # the former name
    max_batch: Annotated[int, typer.Option(min=1, help="Largest batch of the TensorRT profile.")] = 64,
    opt_batch: Annotated[
        int | None, typer.Option(min=1, show_default="--max-batch", help="Batch TensorRT tunes for.")
    ] = None,
    workspace_gib: Annotated[float, typer.Option(help="TensorRT builder workspace limit, GiB.")] = 8.0,
    random_weights: Annotated[bool, typer.Option(help="Random weights (benchmarks of an architecture).")] = False,
    verify: Annotated[bool, typer.Option(help="Check the fp32 graph against PyTorch after export.")] = True,
) -> None:
    """Export the teacher's fp32 and FP16 ONNX graphs, and build the FP16 TensorRT engine when
    TensorRT and a CUDA GPU are present (on --device's GPU; its sidecar names it). Unchanged inputs
    reuse the existing files."""
    if out is not None and engines_dir != Path("engines"):
        raise UsageError("give the engines folder once: --engines-dir (--out is its former name)")
    if device == "cpu":
        raise UsageError("--device cpu: the TensorRT engine builds on a CUDA GPU (give auto, cuda or cuda:N)")
    from trt_relabel.backends import parse_device, tensorrt_missing
    from trt_relabel.classes import read_class_names
    from trt_relabel.export import build_graphs
    from trt_relabel.trt_compat import check_tensorrt_compatible

    classes = read_class_names(class_names) if class_names is not None else None
    gpu = parse_device(device_argument(device))
    built = build_graphs(
        teacher, checkpoint, size, topk, out or engines_dir, pretrained=not random_weights, verify=verify,
        log=console.print, classes=classes,
    )  # fmt: skip
    state = "unchanged, reused" if built.skipped else "written"
    meta = built.metadata
    console.print(
        f"{meta.teacher} ({meta.architecture}) at {meta.input_size}x{meta.input_size} -> "
        f"top-{meta.topk} maps {meta.map_size[0]}x{meta.map_size[1]} of {meta.num_classes} classes, "
        f"teacher hash {meta.teacher_hash}"
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
        device=gpu,
        max_batch=max_batch,
        opt_batch=opt_batch,
        workspace_bytes=int(workspace_gib * 2**30),
        log=console.print,
    )
    console.print(f"  {engine}  (TensorRT engine, sidecar {engine.with_suffix('.json').name})")
