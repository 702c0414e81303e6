"""The cost of ReLabel targets in a training step: `relabel` against `original` labels.

Same model, same images, same optimizer (trainer.train_step). Each `relabel` step first gathers
its batch's top-k maps from a store (20,000 random rows, 1000 classes, k = 5, 15 x 15) IN THE MAIN
PROCESS (the trainer does it in the loader workers, in parallel with the steps, so this
overstates the cost) and pools them into LabelPooling targets. Reported medians:

- steps: blocks of back-to-back steps of each kind, alternated, timed as a training loop runs
  them (no synchronisation between steps; on a GPU the copies and targets go on a side stream, as in
  the trainer, and the host work overlaps the device's);
- serial: one step at a time, synchronised before and after (host work and device work add up);
- targets alone: gather + copy to the device + trainer.batch_targets, synchronised.

    python bench/train_step.py                                         # CPU: resnet18, batch 32, 224 px
    python bench/train_step.py --model resnet50 --batch 256 --steps 20  # GPU: bf16 AMP, channels_last
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from store_read import build_random_store

from trt_relabel.data import TrainBatch
from trt_relabel.store import LabelStore
from trt_relabel.train_config import TrainConfig
from trt_relabel.trainer import Student, batch_targets, build_optimizer, create_student, train_step


def random_batch(batch: int, size: int, rng: np.random.Generator) -> TrainBatch:
    """Random images, classes, crop boxes (side 0.3-1 of the image) and flips; no maps yet."""
    side = rng.uniform(0.3, 1.0, size=(batch, 2))
    corner = rng.uniform(0, 1, size=(batch, 2)) * (1 - side)
    boxes = np.concatenate([corner, corner + side], axis=1).astype(np.float32)
    return TrainBatch(
        images=torch.randn(batch, 3, size, size),
        labels=torch.from_numpy(rng.integers(0, 1000, batch)),
        boxes=torch.from_numpy(boxes),
        flipped=torch.from_numpy(rng.random(batch) < 0.5),
        values=None,
        indices=None,
    )


def with_maps(batch: TrainBatch, store: LabelStore, rows: np.ndarray, pin: bool) -> TrainBatch:
    """`batch` with the maps of `rows` (pinned on CUDA, as the loader delivers them)."""
    values, indices = (torch.from_numpy(a) for a in store.gather(rows))
    if pin:
        values, indices = values.pin_memory(), indices.pin_memory()
    return batch._replace(values=values, indices=indices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=4, help="steps per timed block, and serial steps")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks of each kind")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each kind first")
    parser.add_argument("--rows", type=int, default=20_000)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = True
    settings = dict(model=args.model, image_size=args.image_size, channels_last=cuda)
    original, relabel = TrainConfig(label_mode="original", **settings), TrainConfig(label_mode="relabel", **settings)
    model = create_student(args.model, 1000).to(device)
    if cuda:
        model.to(memory_format=torch.channels_last)
    student = Student(model)
    optimizer = build_optimizer(model, relabel)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    side_stream = torch.cuda.Stream() if cuda else None  # as the trainer: copies and targets on a side stream
    rng = np.random.default_rng(0)
    batch = random_batch(args.batch, args.image_size, rng)
    if cuda:
        batch = TrainBatch(*(t.pin_memory() if isinstance(t, torch.Tensor) else t for t in batch))

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step(config: TrainConfig, rows: np.ndarray | None) -> None:
        train_step(student, batch if rows is None else with_maps(batch, store, rows, cuda), optimizer, scaler, amp,
                   config, 1000, device, side_stream)  # fmt: skip

    def timed(run, *arguments) -> float:
        sync()
        started = time.perf_counter()
        run(*arguments)
        sync()
        return time.perf_counter() - started

    def block(config: TrainConfig, with_rows: bool) -> None:
        for _ in range(args.steps):
            step(config, rng.choice(args.rows, size=args.batch, replace=False) if with_rows else None)

    def targets_alone(rows: np.ndarray) -> None:
        maps = with_maps(batch, store, rows, cuda)
        on_device = maps._replace(images=None)
        on_device = TrainBatch(
            *(t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in on_device)
        )
        batch_targets(on_device, relabel, 1000, None)

    with tempfile.TemporaryDirectory() as tmp:
        store = LabelStore(build_random_store(Path(tmp) / "store", args.rows))
        np.asarray(store.values).sum(), np.asarray(store.indices).sum()  # warm page cache
        for _ in range(args.warmup):
            step(original, None)
            step(relabel, rng.choice(args.rows, size=args.batch, replace=False))
        times: dict[str, list[float]] = {name: [] for name in ("original", "relabel", "original serial",
                                                                "relabel serial", "targets alone")}  # fmt: skip
        for _ in range(args.repeats):
            times["original"].append(timed(block, original, False) / args.steps)
            times["relabel"].append(timed(block, relabel, True) / args.steps)
        for _ in range(args.steps):
            rows = rng.choice(args.rows, size=args.batch, replace=False)
            times["original serial"].append(timed(step, original, None))
            times["relabel serial"].append(timed(step, relabel, rows))
            times["targets alone"].append(timed(targets_alone, rows))

    ms = {name: 1000 * statistics.median(values) for name, values in times.items()}
    where = (
        torch.cuda.get_device_name() + ", bf16 AMP, channels_last"
        if cuda
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"{args.model} at {args.image_size} px, batch {args.batch}, {where}; medians:")
    print(
        f"  steps   original {ms['original']:9.2f} ms   relabel {ms['relabel']:9.2f} ms   "
        f"overhead {100 * (ms['relabel'] / ms['original'] - 1):+.2f} %   (goal <= 2 %)"
    )
    print(
        f"  serial  original {ms['original serial']:9.2f} ms   relabel {ms['relabel serial']:9.2f} ms   "
        f"overhead {100 * (ms['relabel serial'] / ms['original serial'] - 1):+.2f} %"
    )
    print(f"  targets alone (gather + copy + pooling, synchronised) {ms['targets alone']:.2f} ms = "
          f"{100 * ms['targets alone'] / ms['original serial']:.2f} % of a serial original step")  # fmt: skip


if __name__ == "__main__":
    main()
