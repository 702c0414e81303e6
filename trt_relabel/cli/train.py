"""`train`: train a timm student on an ImageFolder with the label maps of a store (LabelPooling)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from trt_relabel.cli._app import app, console


def _opt(*names: str, help: str, default: object = None, metavar: str | None = None) -> Any:
    """An option that overrides the --config recipe: unset (None) unless given; `default` is the
    recipe's default, shown in the help (TrainConfig's, checked by the tests)."""
    return typer.Option(*names, help=help, metavar=metavar, show_default=False if default is None else str(default))


@app.command("train")
def train_command(
    data: Annotated[
        Path | None,
        _opt("--data", metavar="DIR", help="Training ImageFolder (DIR/CLASS/IMAGE); required here or in --config."),
    ] = None,
    labels: Annotated[
        Path | None, _opt("--labels", metavar="STORE", help="Label store of --data (from `generate`).")
    ] = None,
    out: Annotated[
        Path | None,
        _opt(
            "--out",
            metavar="RUN_DIR",
            help="Run directory: metrics.jsonl and checkpoint.pt; required here or in --config.",
        ),
    ] = None,
    model: Annotated[str | None, _opt("--model", default="resnet50", help="Any timm model name.")] = None,
    epochs: Annotated[int | None, _opt("--epochs", default=300, help="Epochs in all (with --resume: up to).")] = None,
    batch_size: Annotated[
        int | None, _opt("--batch-size", default=1024, help="Global batch, split over the processes.")
    ] = None,
    image_size: Annotated[int | None, _opt("--image-size", default=224, help="Side of the training crops.")] = None,
    img_size: Annotated[int | None, typer.Option("--img-size", hidden=True)] = None,  # timm's name
    lr: Annotated[float | None, _opt("--lr", default=0.1, help="Peak learning rate for --batch-size.")] = None,
    val: Annotated[
        Path | None, _opt("--val", metavar="DIR", help="Validation ImageFolder: top-1 / top-5 every epoch.")
    ] = None,
    real_labels: Annotated[
        Path | None,
        _opt("--real-labels", metavar="FILE", help="ImageNet-ReaL labels JSON (timm's imagenet_real_labels.json)."),
    ] = None,
    config: Annotated[
        Path | None, _opt("--config", metavar="FILE", help="TOML recipe, e.g. train/resnet50_relabel.toml.")
    ] = None,
    resume: Annotated[bool | None, _opt("--resume", help="Continue the run in --out from its checkpoint.")] = None,
    label_mode: Annotated[
        str | None,
        _opt("--label-mode", default="relabel", help="relabel | original | smooth | relabel+original."),
    ] = None,
    cutmix: Annotated[
        float | None, _opt("--cutmix", default=0.0, help="CutMix probability per batch (localized labels).")
    ] = None,
    local_labels: Annotated[
        int | None, _opt("--local-labels", metavar="S", default=0, help="S > 0: add a loss on S x S cell targets.")
    ] = None,
    local_weight: Annotated[float | None, _opt("--local-weight", default=1.0, help="Weight of that loss.")] = None,
    target_temperature: Annotated[
        float | None,
        _opt(
            "--target-temperature",
            metavar="T",
            default=1.0,
            help="Relabel targets = softmax(pooled logits / T); T < 1 sharpens the near-uniform targets of a "
            "teacher with small logits (1: the official targets; see `stats --target-temperature`).",
        ),
    ] = None,
    class_map: Annotated[
        Path | None,
        _opt(
            "--class-map",
            metavar="FILE",
            help="TSV 'folder<TAB>teacher class' (id, name or index) for class folders not named by a teacher "
            "class id.",
        ),
    ] = None,
    workers: Annotated[
        int | None, _opt("--workers", "-j", default=8, help="Loader processes per training process.")
    ] = None,
    amp: Annotated[bool | None, _opt("--amp/--no-amp", default="on, bfloat16", help="Mixed precision on CUDA.")] = None,
    compile: Annotated[
        bool | None, _opt("--compile/--no-compile", default="no-compile", help="torch.compile the student.")
    ] = None,
    channels_last: Annotated[
        bool | None,
        _opt("--channels-last/--no-channels-last", default="no-channels-last", help="channels_last memory format."),
    ] = None,
) -> None:
    """Train a student on DATA with LabelPooling soft targets (or the original labels).

    With relabel targets, N class folders that are N of the teacher's classes (named by their id,
    e.g. ImageNet wnids, or mapped by --class-map) train an N-way student whose targets keep the
    teacher's scores of those N classes.

    Options given here override the --config recipe, whose keys default to the values shown. Run
    under `torchrun --nproc-per-node N` for data-parallel training (rank 0 writes
    RUN_DIR/metrics.jsonl and RUN_DIR/checkpoint.pt).
    """
    image_size = image_size if img_size is None else img_size
    given = {
        name: value for name, value in locals().items() if name not in ("config", "img_size") and value is not None
    }
    from trt_relabel.train_config import load_config
    from trt_relabel.trainer import train

    result = train(load_config(config, **given), console=console)
    if result.rank != 0:
        return
    last = result.metrics[-1] if result.metrics else None
    summary = f"; last epoch: loss {last['train_loss']:.4f}" if last else " (nothing left to train)"
    epochs = "1 epoch" if result.epochs == 1 else f"{result.epochs} epochs"
    console.print(f"trained {epochs} in {result.run_dir}{summary}")
