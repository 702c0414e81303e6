"""`generate`: label a data set with the teacher into a label store (resumable, multi-process)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from trt_relabel.cli._app import (
    CheckpointOpt,
    ClassMapOpt,
    ClassNamesOpt,
    DeviceOpt,
    EnginesDirOpt,
    OverwriteOpt,
    RetryFailedOpt,
    SizeOpt,
    TeacherOpt,
    TopkOpt,
    app,
    console,
    device_argument,
    workers_option,
)


@app.command("generate")
def generate_command(
    data: Annotated[
        Path,
        typer.Argument(
            help="ImageFolder (class sub-folders), flat folder of images, or tar shards (a .tar or a folder of them)."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", metavar="STORE", help="Label store directory (created or resumed).")
    ],
    file_list: Annotated[
        Path | None,
        typer.Option(
            "--file-list",
            help="Label only these images (with --format wds: these shards): one path relative to DATA per line.",
        ),
    ] = None,
    data_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="folder | wds (WebDataset tar shards of KEY.jpg [+ KEY.cls]) | auto (wds for a .tar or a "
            "folder of only .tar files).",
        ),
    ] = "auto",
    teacher: TeacherOpt = "efficientnet_lite0",
    checkpoint: CheckpointOpt = None,
    size: SizeOpt = None,
    topk: TopkOpt = 5,
    class_names: ClassNamesOpt = None,
    class_map: ClassMapOpt = None,
    backend: Annotated[
        str, typer.Option("--backend", "-b", help="auto | onnxruntime | torch | tensorrt (auto: the fastest here).")
    ] = "auto",
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per teacher call.")] = 64,
    workers: Annotated[
        int | None, workers_option("Decoding processes (0: decode in this process).", default="cores - 1")
    ] = None,
    shard: Annotated[
        str,
        typer.Option("--shard", metavar="I/N", help="Label only rows with row % N == I (one of N jobs on one store)."),
    ] = "0/1",
    engines_dir: EnginesDirOpt = Path("engines"),
    decode: Annotated[
        str, typer.Option("--decode", help="cpu | gpu (JPEGs decoded and resized on the GPU with nvJPEG).")
    ] = "cpu",
    compile: Annotated[bool, typer.Option("--compile", help="torch backend: torch.compile the teacher.")] = False,
    overwrite: OverwriteOpt = False,
    retry_failed: RetryFailedOpt = False,
) -> None:
    """Label every image of DATA with the teacher's top-k label maps into the store --out.

    Class folders named by a teacher class id (ImageNet wnids for ImageNet teachers) get that
    class's index in STORE/samples.tsv, for any subset of the classes; --class-map maps others.

    Rerunning the same command resumes an interrupted run (only the missing rows are labelled).

    Under `torchrun --nproc-per-node N` the processes share the rows of one store, each on its local
    GPU (--device cuda:N is refused there; --device cpu runs every rank on the CPU).

    Exit code 1 when some inputs could not be labelled (listed in STORE/errors.jsonl); fix them and
    rerun with --retry-failed to label just those.
    """
    from trt_relabel.generate import generate
    from trt_relabel.generate_inputs import parse_shard

    result = generate(
        data,
        out,
        teacher=teacher,
        checkpoint=checkpoint,
        size=size,
        topk=topk,
        backend=backend,
        device=device_argument(device),
        batch_size=batch_size,
        workers=workers,
        overwrite=overwrite,
        retry_failed=retry_failed,
        file_list=file_list,
        shard=parse_shard(shard),
        engines_dir=engines_dir,
        decode=decode,
        compile=compile,
        data_format=data_format,
        class_names=class_names,
        class_map=class_map,
    )
    if result.rank != 0:
        return  # torchrun: rank 0 reports for the whole store
    failed = f", {result.failed} failed (listed in {result.errors_path})" if result.failed else ""
    state = "complete" if result.complete else "incomplete (other shards still running or pending)"
    console.print(
        f"labelled {result.labelled} of {result.rows} images{failed}; this run: {result.processed} images "
        f"in {result.seconds:.1f} s, {result.images_per_second:.1f} img/s with {result.backend}; "
        f"store {result.store} {state}"
    )
    if result.failed:
        sys.exit(1)
