"""`trt-relabel bench`: model-only and end-to-end throughput of every available backend.

Model-only: the backend alone on batches of already decoded and resized pixels, after one warm-up
batch. End-to-end: a real `generate` run (decode in worker processes, inference, writes into a store)
over the same images, its rate taken after its first batch (pipeline fill and warm-up), likewise.
Every rate is also given as a ratio to eager PyTorch fp32 (NCHW) on the same device in the same run.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trt_relabel.backends import (
    Backend,
    TorchBackend,
    cuda_available,
    onnxruntime_backend,
    onnxruntime_providers,
    resolve_gpu,
    tensorrt_importable,
)
from trt_relabel.errors import UsageError
from trt_relabel.export import BuiltGraphs, PreparedTeacher, export_graphs, prepare_teacher, relabel_graph
from trt_relabel.generate import generate
from trt_relabel.generate_inputs import find_inputs
from trt_relabel.images import load_rgb, resize_whole


@dataclass(frozen=True)
class BenchRow:
    """One backend's rates in images per second (`end_to_end` None: not run end to end)."""

    backend: str
    model_only: float
    end_to_end: float | None
    generate_kind: str | None = None


@dataclass(frozen=True)
class BenchReport:
    device: str
    images: int
    batch_size: int
    input_size: int
    rows: list[BenchRow]

    @property
    def reference(self) -> float:
        """Model-only rate of eager PyTorch fp32 NCHW (always the first row)."""
        return self.rows[0].model_only


def time_model(backend: Backend, pixels: np.ndarray, batch_size: int, repeats: int) -> float:
    """Images per second of `backend` over `pixels` uint8 [N, S, S, 3] after one warm-up batch."""
    backend(pixels[:batch_size])
    batches = [pixels[i : i + batch_size] for i in range(0, len(pixels), batch_size)]
    start = time.perf_counter()
    for _ in range(repeats):
        for batch in batches:
            backend(batch)
    return repeats * len(pixels) / (time.perf_counter() - start)


def model_variants(
    graphs: BuiltGraphs, prepared: PreparedTeacher, batch_size: int, gpu: int | None
) -> list[tuple[Backend, str | None]]:
    """(backend, generate kind or None) for each variant available on GPU `gpu` (None: the CPU); the
    reference comes first."""
    meta = prepared.metadata
    device = torch.device("cpu") if gpu is None else torch.device("cuda", gpu)
    fp32 = dataclasses.replace(meta, precision="fp32")
    cpu = device.type == "cpu"
    variants: list[tuple[Backend, str | None]] = [
        (TorchBackend(relabel_graph(prepared, "fp32"), fp32, device), None),
        (TorchBackend(relabel_graph(prepared, "fp32", channels_last=True), fp32, device), "torch" if cpu else None),
    ]
    if not cpu:
        fp16 = dataclasses.replace(meta, precision="fp16")
        variants.append((TorchBackend(relabel_graph(prepared, "fp16", channels_last=True), fp16, device), "torch"))
    variants.append((onnxruntime_backend(graphs, None, gpu, max(batch_size, 64)), "onnxruntime"))
    if not cpu and tensorrt_importable():
        from trt_relabel.tensorrt_engine import TensorRTBackend, build_engine

        plan = build_engine(graphs.fp16, max_batch=max(batch_size, 64), device=gpu)
        variants.append((TensorRTBackend(plan, batch_size, device=gpu), "tensorrt"))
    return variants


def run_bench(
    data: str | Path,
    *,
    teacher: str = "efficientnet_lite0",
    checkpoint: str | Path | None = None,
    size: int | None = None,
    topk: int = 5,
    batch_size: int = 8,
    workers: int | None = None,
    device: str | None = None,
    limit: int = 64,
    repeats: int = 2,
    engines_dir: str | Path = "engines",
    end_to_end: bool = True,
    log: Callable[[str], None] = print,
) -> BenchReport:
    """Benchmark every backend available here on the first `limit` images of `data` on `device`
    ("cpu", "cuda", "cuda:N"; None: the current GPU when CUDA is here, else the CPU)."""
    gpu = resolve_gpu(device) if device is not None or cuda_available() else None
    entries = find_inputs(data)[:limit]
    if not entries:
        raise UsageError(f"{data}: no images to benchmark")
    prepared = prepare_teacher(teacher, checkpoint, size, topk)
    graphs = export_graphs(prepared, engines_dir, log=log)
    meta = graphs.metadata
    root = Path(data)
    pixels = np.stack([resize_whole(load_rgb(root / e.path), meta.input_size, meta.interpolation) for e in entries])
    rows = []
    with tempfile.TemporaryDirectory(prefix="trt-relabel-bench-") as tmp:
        file_list = Path(tmp) / "images.txt"
        file_list.write_text("".join(f"{e.path}\n" for e in entries))
        for backend, kind in model_variants(graphs, prepared, batch_size, gpu):
            log(f"model only: {backend.name}")
            rate = time_model(backend, pixels, batch_size, repeats)
            e2e = None
            if end_to_end and kind is not None:
                log(f"end to end: generate --backend {kind}")
                result = generate(
                    root, Path(tmp) / f"store-{kind}", teacher=teacher, checkpoint=checkpoint, size=size, topk=topk,
                    backend=kind, device=device, batch_size=batch_size, workers=workers, file_list=file_list,
                    engines_dir=engines_dir, progress=False,
                )  # fmt: skip
                e2e = result.steady_images_per_second
            rows.append(BenchRow(backend.name, rate, e2e, kind))
    device = torch.cuda.get_device_name(gpu) if gpu is not None else f"CPU ({torch.get_num_threads()} threads)"
    return BenchReport(device, len(entries), batch_size, meta.input_size, rows)


def available_summary() -> str:
    return f"CUDA: {cuda_available()}, TensorRT: {tensorrt_importable()}, ORT providers: {onnxruntime_providers()}"
