"""LabelPooling speed: sparse label_pooling against the official dense scatter + roi_align.

Run: .venv/bin/python bench/pooling.py [--batch 256] [--k 5] [--size 15] [--classes 1000] [--threads N]

A batch of random top-k maps (distinct classes per cell) and RandomResizedCrop boxes (scale 0.08-1,
ratio 3/4-4/3). "official" builds the dense [B, C, h, w] map with one scatter and runs
torchvision.ops.roi_align on it (naver-ai/relabel_imagenet's get_labelmaps + get_relabel, with a
batched scatter instead of a Python loop); "label_pooling" is trt_relabel.pooling. Prints the
median time of each over many runs after warm-up, the speed-up and the largest difference, for
output sizes 1 and 7, on the CPU and, when there is one, on CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torchvision.ops import roi_align
from torchvision.transforms import RandomResizedCrop

from trt_relabel.pooling import label_pooling


def random_batch(batch: int, k: int, size: int, num_classes: int) -> tuple[torch.Tensor, ...]:
    """values [B, k, size, size] float32 (descending), indices int16, boxes [B, 4] (x1, y1, x2, y2)."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(batch, num_classes, size, size, generator=generator)
    values, indices = scores.topk(k, dim=1)
    image = torch.empty(3, 375, 500)
    crops = [RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(batch)]
    boxes = torch.tensor([[j / 500, i / 375, (j + w) / 500, (i + h) / 375] for i, j, h, w in crops])
    return values.contiguous(), indices.to(torch.int16), boxes


def official(values, indices, boxes, num_classes: int, output_size: int) -> torch.Tensor:
    """Dense map, then roi_align (correct axes, so that it is comparable with label_pooling)."""
    batch, _, height, width = values.shape
    dense = values.new_zeros(batch, num_classes, height, width).scatter_(1, indices.long(), values)
    scale = torch.tensor([width, height, width, height], dtype=values.dtype, device=values.device)
    batch_index = torch.arange(batch, dtype=values.dtype, device=values.device)[:, None]
    rois = torch.cat([batch_index, boxes * scale - 0.5], 1)
    pooled = roi_align(dense, rois, output_size, 1.0, -1, False)
    return pooled.view(batch, num_classes) if output_size == 1 else pooled


def median_ms(function: Callable[[], torch.Tensor], device: torch.device, seconds: float = 3.0) -> float:
    """Median wall time of ``function`` in ms: warm-up calls, then as many calls as fit in ``seconds``
    (at least 10, at most 1000)."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def timed() -> float:
        synchronize()
        start = time.perf_counter()
        function()
        synchronize()
        return time.perf_counter() - start

    warm_up = [timed() for _ in range(3)]
    runs = int(min(1000, max(10, seconds / min(warm_up))))
    for _ in range(runs // 10):
        timed()
    return 1e3 * statistics.median(timed() for _ in range(runs))


def compare(inputs, num_classes: int, output_size: int, device: torch.device) -> None:
    values, indices, boxes = (tensor.to(device) for tensor in inputs)
    sparse = label_pooling(values, indices, boxes, num_classes, output_size)
    dense = official(values, indices, boxes, num_classes, output_size)
    difference = (sparse - dense).abs().max().item()
    official_ms = median_ms(lambda: official(values, indices, boxes, num_classes, output_size), device)
    sparse_ms = median_ms(lambda: label_pooling(values, indices, boxes, num_classes, output_size), device)
    print(
        f"{device.type:4s} output {output_size}: official {official_ms:8.3f} ms   label_pooling "
        f"{sparse_ms:7.3f} ms   speed-up {official_ms / sparse_ms:6.1f}x   max |diff| {difference:.2e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--size", type=int, default=15)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    inputs = random_batch(args.batch, args.k, args.size, args.classes)
    print(f"B={args.batch} k={args.k} {args.size}x{args.size} C={args.classes}, {args.threads} CPU threads")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        for output_size in (1, 7):
            compare(inputs, args.classes, output_size, device)


if __name__ == "__main__":
    main()
