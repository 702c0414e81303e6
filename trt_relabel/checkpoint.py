"""A run directory's state: RUN_DIR/checkpoint.pt (save, load, restore on --resume) and metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from trt_relabel.distributed import Process
from trt_relabel.errors import RelabelError
from trt_relabel.fileio import atomic_file

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_file(path) as f:
        torch.save(state, f)


def load_checkpoint(path: Path, device: torch.device) -> dict:
    if not path.is_file():
        raise RelabelError(f"{path}: no checkpoint to resume from")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is one expected failure
        raise RelabelError(
            f"{path}: cannot load the checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None


def restore_checkpoint(
    checkpoint: dict, path: Path, model: nn.Module, optimizer, scheduler, scaler, process: Process
) -> int:
    """Load the training state of `checkpoint` into the live objects; returns the epochs done."""
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise RelabelError(f"{path}: does not fit this model ({str(e).splitlines()[0]})") from None
    scheduler.load_state_dict(checkpoint["scheduler"])
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base_lr * factor(scheduler.last_epoch)  # this run's schedule: --epochs may have changed
    scaler.load_state_dict(checkpoint["scaler"])
    states = checkpoint["rng"]
    if len(states) == process.world_size:
        torch.set_rng_state(states[process.rank]["torch"].cpu())
        if states[process.rank]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(states[process.rank]["cuda"].cpu())
    return int(checkpoint["epoch"])


def keep_metrics_until(path: Path, epoch: int) -> None:
    """Drop the metrics lines of epochs after `epoch` (written before a crash, not checkpointed)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        path.write_text("".join(line + "\n" for line in lines if json.loads(line)["epoch"] <= epoch))
