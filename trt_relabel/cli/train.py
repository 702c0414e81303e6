"""`train`: train a timm student on an ImageFolder with the label maps of a store (LabelPooling)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trt_relabel.cli._app import app, console


def _opt(*names: str, help: str):
    return typer.Option(*names, help=help, show_default=False)


@app.command("train")
def train_command(
    data: Annotated[Path | None, _opt("--data", help="Training ImageFolder (DIR/CLASS/IMAGE).")] = None,
    labels: Annotated[Path | None, _opt("--labels", help="Label store of --data (from `generate`).")] = None,
    out: Annotated[Path | None, _opt("--out", help="Run directory: metrics.jsonl and checkpoint.pt.")] = None,
    model: Annotated[str | None, _opt("--model", help="Any timm model name (default: resnet50).")] = None,
    epochs: Annotated[int | None, _opt("--epochs", help="(default: 300)")] = None,
    batch_size: Annotated[
        int | None, _opt("--batch-size", help="Global batch, split over the processes (default: 1024).")
    ] = None,
    image_size: Annotated[int | None, _opt("--image-size", help="(default: 224)")] = None,
    lr: Annotated[float | None, _opt("--lr", help="Peak learning rate for --batch-size (default: 0.1).")] = None,
    val: Annotated[Path | None, _opt("--val", help="Validation ImageFolder: top-1 / top-5 every epoch.")] = None,
    real_labels: Annotated[
        Path | None, _opt("--real-labels", help="ImageNet-ReaL labels JSON (timm's imagenet_real_labels.json).")
    ] = None,
    config: Annotated[Path | None, _opt("--config", help="TOML recipe, e.g. train/resnet50_relabel.toml.")] = None,
    resume: Annotated[bool | None, _opt("--resume", help="Continue the run in --out from its checkpoint.")] = None,
    label_mode: Annotated[
        str | None, _opt("--label-mode", help="relabel | original | smooth | relabel+original (default: relabel).")
    ] = None,
    cutmix: Annotated[float | None, _opt("--cutmix", help="CutMix probability per batch (localized labels).")] = None,
    local_labels: Annotated[int | None, _opt("--local-labels", help="S: add a loss on S x S cell targets.")] = None,
    local_weight: Annotated[float | None, _opt("--local-weight", help="Weight of that loss (default: 1).")] = None,
    workers: Annotated[int | None, _opt("--workers", help="Loader processes per process (default: 8).")] = None,
    amp: Annotated[bool | None, _opt("--amp/--no-amp", help="Mixed precision on CUDA (default: on, bf16).")] = None,
    compile: Annotated[bool | None, _opt("--compile/--no-compile", help="torch.compile the student.")] = None,
    channels_last: Annotated[
        bool | None, _opt("--channels-last/--no-channels-last", help="channels_last memory format.")
    ] = None,
) -> None:
    """Train a student on DATA with LabelPooling soft targets (or the original labels).

    Options given here override the --config recipe. Run under `torchrun --nproc-per-node N` for
    data-parallel training (rank 0 writes RUN_DIR/metrics.jsonl and RUN_DIR/checkpoint.pt).
    """
    given = {name: value for name, value in locals().items() if name != "config" and value is not None}
    from trt_relabel.trainer import load_config, train

    result = train(load_config(config, **given), console=console)
    if result.rank != 0:
        return
    last = result.metrics[-1] if result.metrics else None
    summary = f"; last epoch: loss {last['train_loss']:.4f}" if last else " (nothing left to train)"
    console.print(f"trained {result.epochs} epochs in {result.run_dir}{summary}")
