"""`--local-labels S` targets: trt_relabel.targets.local_targets against the dense way.

Run: .venv/bin/python bench/local_targets.py [--batch 256] [--cells 7] [--threads N]

A batch of random top-k maps (k = 5, 15 x 15, 1000 classes), RandomResizedCrop boxes and random
flips (bench/pooling.py's batch). "dense" is the official way: the dense [B, C, h, w] map,
torchvision's roi_align to S x S, softmax over the classes, the flipped crops' targets mirrored
along x. "local_targets" pools the same boxes with their column bins reversed and keeps each
cell's few pooled classes (trt_relabel.targets.CellTargets). Prints the median times of the
targets alone and of targets + the per-cell soft cross-entropy against random cell logits (the
student's log_softmax included in both), the speed-ups, and the largest target difference.
"""

from __future__ import annotations

import argparse

import torch
from pooling import median_ms, official, random_batch

from trt_relabel.targets import local_targets, soft_cross_entropy


def dense_local_targets(values, indices, boxes, flipped, num_classes: int, cells: int) -> torch.Tensor:
    """float32 [B, C, S, S]: softmax of roi_align on the dense map, mirrored where flipped."""
    targets = torch.softmax(official(values, indices, boxes, num_classes, cells), 1)
    return torch.where(flipped[:, None, None, None], targets.flip(3), targets)


def compare(batch: int, cells: int, num_classes: int = 1000) -> dict[str, float]:
    """Median ms of each way (targets, targets + loss), CPU; returns them with the speed-ups."""
    values, indices, boxes = random_batch(batch, 5, 15, num_classes)
    flipped = torch.rand(batch, generator=torch.Generator().manual_seed(1)) < 0.5
    logits = torch.randn(batch, num_classes, cells, cells)
    arguments = (values, indices, boxes, flipped, num_classes, cells)
    cpu = torch.device("cpu")
    times = {
        "dense_ms": median_ms(lambda: dense_local_targets(*arguments), cpu),
        "local_ms": median_ms(lambda: local_targets(*arguments), cpu),
        "dense_loss_ms": median_ms(lambda: soft_cross_entropy(logits, dense_local_targets(*arguments)), cpu),
        "local_loss_ms": median_ms(lambda: local_targets(*arguments).cross_entropy(logits), cpu),
    }
    times["speedup"] = times["dense_ms"] / times["local_ms"]
    times["speedup_with_loss"] = times["dense_loss_ms"] / times["local_loss_ms"]
    times["max_abs_diff"] = float((local_targets(*arguments).dense() - dense_local_targets(*arguments)).abs().max())
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--cells", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = compare(args.batch, args.cells)
    print(f"B={args.batch} S={args.cells} k=5 15x15 C=1000, {args.threads} CPU threads, medians:")
    print(
        f"  targets         dense {result['dense_ms']:8.2f} ms   local_targets {result['local_ms']:7.2f} ms   "
        f"speed-up {result['speedup']:5.1f}x   (goal >= 5x)"
    )
    print(
        f"  targets + loss  dense {result['dense_loss_ms']:8.2f} ms   local_targets {result['local_loss_ms']:7.2f} ms"
        f"   speed-up {result['speedup_with_loss']:5.1f}x"
    )
    print(f"  max |target difference| {result['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
