"""Inference backends: one callable interface over ONNX Runtime, eager PyTorch and TensorRT.

Every backend maps ``pixels`` uint8 [B, S, S, 3] (NHWC RGB, resized with the teacher's
interpolation) to ``(values, indices)``: top-k logits [B, k, h, w] (float16 or float32) and class
indices int32 [B, k, h, w], as NumPy arrays, following the graph contract of
:mod:`trt_relabel.export`.
"""

from __future__ import annotations

import dataclasses
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trt_relabel.errors import RelabelError, UsageError
from trt_relabel.export import (
    INPUT_NAME,
    GraphMetadata,
    RelabelGraph,
    build_graphs,
    prepare_teacher,
    relabel_graph,
    sha256_file,
)

BACKENDS = ("auto", "onnxruntime", "torch", "tensorrt")

#: A batch of uint8 [B, S, S, 3] pixels: NumPy, or a torch tensor on the CPU or a GPU
#: (`generate --decode gpu` hands GPU tensors to the backend).
Pixels = np.ndarray | torch.Tensor


class BackendError(RelabelError):
    """A backend that is not available here, or failed to start."""


class Backend(ABC):
    """`name` says which runtime (and provider/device/precision) runs; `graph_sha256` identifies the
    graph file it runs ("" for eager torch)."""

    name: str
    metadata: GraphMetadata
    graph_sha256: str

    @abstractmethod
    def __call__(self, pixels: Pixels) -> tuple[np.ndarray, np.ndarray]:
        """pixels uint8 [B, S, S, 3] -> (values [B, k, h, w], indices int32 [B, k, h, w])."""

    def stream(self, batches: Iterable[tuple[Any, Pixels]]) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
        """Label `(tag, pixels)` batches in order, yielding `(tag, values, indices)`; backends that can
        overlap transfers with compute (TensorRT) do so here."""
        for tag, pixels in batches:
            yield (tag, *self(pixels))


class OnnxRuntimeBackend(Backend):
    """An ONNX Runtime session over a relabel graph.

    `providers` in preference order; ONNX Runtime silently drops providers whose libraries are
    missing (TensorRT without its libraries falls back to CUDA), so `name` reports the providers
    the session actually runs with. `device_id`: the GPU of the GPU providers.
    """

    def __init__(
        self,
        graph: Path,
        metadata: GraphMetadata,
        providers: list[str],
        threads: int | None = None,
        device_id: int = 0,
    ):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        provider_options = [{"device_id": str(device_id)} if p in GPU_PROVIDERS else {} for p in providers]
        try:
            self.session = ort.InferenceSession(
                str(graph), options, providers=providers, provider_options=provider_options
            )
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise BackendError(f"{graph}: ONNX Runtime cannot load the graph: {str(e).splitlines()[0]}") from None
        active = self.session.get_providers()
        self.name = f"onnxruntime ({active[0]}, {metadata.precision})"
        self.fell_back = active[0] != providers[0]
        self.metadata = metadata
        self.graph_sha256 = sha256_file(graph)

    def __call__(self, pixels: Pixels) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(pixels, torch.Tensor):
            pixels = pixels.cpu().numpy()
        values, indices = self.session.run(None, {INPUT_NAME: np.ascontiguousarray(pixels)})
        return values, indices


class TorchBackend(Backend):
    """Eager PyTorch (CPU or CUDA) over a relabel module, in its precision and layout (see
    :func:`trt_relabel.export.relabel_graph`)."""

    def __init__(self, graph: RelabelGraph, metadata: GraphMetadata, device: torch.device, compile: bool = False):
        graph = graph.to(device)
        self.module = torch.compile(graph) if compile else graph
        self.device = device
        self.metadata = metadata
        self.graph_sha256 = ""
        layout = "channels_last" if graph.memory_format == torch.channels_last else "NCHW"
        self.name = f"torch ({device.type}, {metadata.precision}, {layout}{', compiled' if compile else ''})"

    @torch.inference_mode()
    def __call__(self, pixels: Pixels) -> tuple[np.ndarray, np.ndarray]:
        batch = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(pixels))
        batch = batch.to(self.device, non_blocking=True)
        values, indices = self.module(batch)
        return values.cpu().numpy(), indices.cpu().numpy()


def cuda_available() -> bool:
    return torch.cuda.is_available()


def tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def onnxruntime_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def choose_backend(kind: str) -> str:
    """Resolve "auto": TensorRT (importable + CUDA GPU) > ONNX Runtime CUDA > ONNX Runtime CPU."""
    if kind not in BACKENDS:
        raise UsageError(f"unknown backend {kind!r}; choose from {', '.join(BACKENDS)}")
    if kind != "auto":
        return kind
    if tensorrt_missing() is None:
        return "tensorrt"
    return "onnxruntime"


def tensorrt_missing() -> str | None:
    """What the TensorRT backend lacks here (None: it can run)."""
    if not tensorrt_importable():
        return "the tensorrt package (pip install 'trt-relabel[gpu]')"
    return None if cuda_available() else "a CUDA GPU"


#: ONNX Runtime's providers that run on a GPU, best first.
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def ort_providers(precision: str | None) -> tuple[list[str], str]:
    """ONNX Runtime providers to ask for, best first, and the graph precision to feed them."""
    available = onnxruntime_providers()
    if "CUDAExecutionProvider" in available and cuda_available():
        return [p for p in (*GPU_PROVIDERS, "CPUExecutionProvider") if p in available], precision or "fp16"
    return ["CPUExecutionProvider"], precision or "fp32"


def open_backend(
    kind: str = "auto",
    *,
    teacher: str = "efficientnet_lite0",
    checkpoint: str | Path | None = None,
    size: int | None = None,
    topk: int = 5,
    engines_dir: str | Path = "engines",
    device: str | None = None,
    precision: str | None = None,
    max_batch: int = 64,
    pretrained: bool = True,
    compile: bool = False,
    log: Callable[[str], None] = print,
) -> Backend:
    """Open a backend for a teacher, building its ONNX graphs (and engine) when missing.

    kind: "auto" | "onnxruntime" | "torch" | "tensorrt". precision: "fp32" | "fp16" (default fp32
    on CPU, fp16 on a GPU). device: "cpu", "cuda", "cuda:1", ... (default: CUDA when present,
    GPU 0); ONNX Runtime's GPU providers take its GPU index. max_batch: the largest batch the
    TensorRT profile accepts. compile (torch backend): `torch.compile` the teacher.
    """
    resolved = choose_backend(kind)
    if resolved == "torch":
        return _torch_backend(teacher, checkpoint, size, topk, device, precision, pretrained, compile)
    missing = tensorrt_missing() if resolved == "tensorrt" else None
    if missing:
        raise BackendError(f"the tensorrt backend needs TensorRT and a CUDA GPU; {missing} is missing here")
    graphs = build_graphs(teacher, checkpoint, size, topk, engines_dir, pretrained=pretrained, log=log)
    gpu_index = torch.device(device or "cuda").index or 0
    if resolved == "tensorrt":
        from trt_relabel.tensorrt_engine import TensorRTBackend, build_engine

        plan = build_engine(graphs.fp16, max_batch=max_batch, rebuild_stale=False, log=log)
        return TensorRTBackend(plan, max_batch, device=gpu_index)
    providers, graph_precision = ort_providers(precision)
    graph = graphs.fp16 if graph_precision == "fp16" else graphs.fp32
    metadata = dataclasses.replace(graphs.metadata, precision=graph_precision)
    backend = OnnxRuntimeBackend(graph, metadata, providers, device_id=gpu_index)
    if backend.fell_back:
        log(f"ONNX Runtime could not start {providers[0]} (its libraries are missing); running {backend.name}")
    return backend


def _torch_backend(
    teacher: str,
    checkpoint: str | Path | None,
    size: int | None,
    topk: int,
    device: str | None,
    precision: str | None,
    pretrained: bool,
    compile: bool,
) -> TorchBackend:
    target = torch.device(device or ("cuda" if cuda_available() else "cpu"))
    if target.type == "cuda" and not cuda_available():
        raise BackendError(f"device {device}: no CUDA GPU is available")
    precision = precision or ("fp16" if target.type == "cuda" else "fp32")
    prepared = prepare_teacher(teacher, checkpoint, size, topk, pretrained)
    graph = relabel_graph(prepared, precision, channels_last=True)  # the faster layout on CPUs and GPUs
    metadata = dataclasses.replace(prepared.metadata, precision=precision)
    return TorchBackend(graph, metadata, target, compile=compile)
