"""Inference backends: one callable interface over ONNX Runtime, eager PyTorch and TensorRT.

Every backend maps ``pixels`` uint8 [B, S, S, 3] (NHWC RGB, resized with the teacher's
interpolation) to ``(values, indices)``: top-k logits [B, k, h, w] (float16 or float32) and class
indices int32 [B, k, h, w], as NumPy arrays, following the graph contract of
:mod:`trt_relabel.export`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trt_relabel.classes import ClassList
from trt_relabel.errors import RelabelError, UsageError
from trt_relabel.export import (
    INPUT_NAME,
    BuiltGraphs,
    GraphMetadata,
    RelabelGraph,
    build_graphs,
    graph_sha256,
    import_onnxruntime,
    prepare_teacher,
    relabel_graph,
)

BACKENDS = ("auto", "onnxruntime", "torch", "tensorrt")

#: A batch of uint8 [B, S, S, 3] pixels: NumPy, or a torch tensor on the CPU or a GPU
#: (`generate --decode gpu` hands GPU tensors to the backend).
Pixels = np.ndarray | torch.Tensor


class BackendError(RelabelError):
    """A backend that is not available here, or failed to start."""


class Backend(ABC):
    """`name` says which runtime (and provider/device/precision) runs; `graph_sha256` identifies the
    graph file it runs ("" for eager torch); `teacher_graphs`: the sha256 of every graph of this
    teacher checked in this run (fp32 and FP16, see :func:`store_continues`)."""

    name: str
    metadata: GraphMetadata
    graph_sha256: str
    teacher_graphs: frozenset[str] = frozenset()

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
    missing (TensorRT without its libraries falls back to CUDA), and may switch to its fall-back
    providers when one fails during a run: `name` and `fell_back` always say what runs, and a switch
    during a run is logged. `provider_options`: per provider (default: the GPU of GPU providers,
    `device_id`).
    """

    def __init__(
        self,
        graph: Path,
        metadata: GraphMetadata,
        providers: list[str],
        threads: int | None = None,
        device_id: int = 0,
        provider_options: list[dict[str, str]] | None = None,
        log: Callable[[str], None] = print,
    ):
        ort = import_onnxruntime()

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        if provider_options is None:
            provider_options = [{"device_id": str(device_id)} if p in GPU_PROVIDERS else {} for p in providers]
        try:
            self.session = ort.InferenceSession(
                str(graph), options, providers=providers, provider_options=provider_options
            )
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise BackendError(f"{graph}: ONNX Runtime cannot load the graph: {str(e).splitlines()[0]}") from None
        self.asked = providers[0]
        self.metadata = metadata
        self.graph_sha256 = graph_sha256(graph)
        self._log = log
        self._note_providers()

    def _note_providers(self) -> str:
        active = self.session.get_providers()[0]
        self.name = f"onnxruntime ({active}, {self.metadata.precision})"
        self.fell_back = active != self.asked
        return active

    def __call__(self, pixels: Pixels) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(pixels, torch.Tensor):
            pixels = pixels.cpu().numpy()
        before = self.session.get_providers()[0]
        values, indices = self.session.run(None, {INPUT_NAME: np.ascontiguousarray(pixels)})
        if self._note_providers() != before:
            self._log(f"ONNX Runtime switched from {before} to {self.session.get_providers()[0]} during a run")
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
    return import_onnxruntime().get_available_providers()


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
#: The first ONNX Runtime whose TensorRT provider runs TensorRT 11 (older ones are built for TensorRT 10).
ORT_FOR_TENSORRT_11 = (1, 27)


def ort_providers(precision: str | None, gpu: bool = True) -> tuple[list[str], str]:
    """ONNX Runtime providers to ask for, best first, and the graph precision to feed them (`gpu`
    False: the CPU only)."""
    available = onnxruntime_providers()
    if gpu and "CUDAExecutionProvider" in available and cuda_available():
        return [p for p in (*GPU_PROVIDERS, "CPUExecutionProvider") if p in available], precision or "fp16"
    return ["CPUExecutionProvider"], precision or "fp32"


def ort_cuda_missing() -> str | None:
    """One line when a CUDA GPU is here but the installed ONNX Runtime has no CUDA provider (the CPU
    build, or the CPU build installed over the GPU one); None otherwise."""
    if not cuda_available() or "CUDAExecutionProvider" in onnxruntime_providers():
        return None
    return (
        "a CUDA GPU is here but this ONNX Runtime has no CUDA provider, so it runs on the CPU; install its GPU "
        "build alone: pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'trt-relabel[gpu]'"
    )


def tensorrt_provider_fits(tensorrt_version: str | None, ort_version: str) -> bool:
    """Can ONNX Runtime `ort_version`'s TensorRT provider run TensorRT `tensorrt_version` (None: not
    installed as a Python package, the provider finds its libraries itself)?"""
    if tensorrt_version is None:
        return True
    newer = int(tensorrt_version.split(".")[0]) >= 11
    return not newer or _version_tuple(ort_version) >= ORT_FOR_TENSORRT_11


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def tensorrt_provider_options(metadata: GraphMetadata, device_id: int, max_batch: int, cache: Path) -> dict[str, str]:
    """ONNX Runtime TensorRT provider options: engine and timing caches in `cache` (reused across
    starts), one optimisation profile for batches 1 to `max_batch` (no rebuild at a new batch
    size), and no fp16 flag (the FP16 graph is already strongly typed fp16)."""
    shape = f"{metadata.input_size}x{metadata.input_size}x3"
    return {
        "device_id": str(device_id),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache),
        "trt_profile_min_shapes": f"{INPUT_NAME}:1x{shape}",
        "trt_profile_opt_shapes": f"{INPUT_NAME}:{max_batch}x{shape}",
        "trt_profile_max_shapes": f"{INPUT_NAME}:{max_batch}x{shape}",
        "trt_fp16_enable": "False",
    }


def parse_device(device: str | None) -> int | None:
    """The GPU index of `device`: "cuda:N" -> N; "cuda" or None -> the current CUDA device (0 without
    CUDA); "cpu" -> None."""
    try:
        target = torch.device(device or "cuda")
    except RuntimeError:
        raise UsageError(f"device {device!r}: expected cpu, cuda or cuda:N") from None
    if target.type == "cpu":
        return None
    if target.type != "cuda":
        raise UsageError(f"device {device!r}: expected cpu, cuda or cuda:N")
    if target.index is None:
        return torch.cuda.current_device() if torch.cuda.is_available() else 0
    if torch.cuda.is_available() and target.index >= torch.cuda.device_count():
        raise BackendError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return target.index


def resolve_gpu(device: str | None) -> int | None:
    """:func:`parse_device`, and a BackendError when `device` asks for CUDA where there is none."""
    gpu = parse_device(device)
    if device not in (None, "cpu") and not cuda_available():
        raise BackendError(f"device {device}: no CUDA GPU is available here")
    return gpu


def graph_may_continue(store_graph: str, backend: Backend) -> bool:
    """One store, one teacher: may `backend` label more rows of a store whose manifest names the graph
    `store_graph` (its teacher hash already matched)? Yes when it runs that graph, the other precision
    of the same checked export (`backend.teacher_graphs`), or when either side is eager torch (no
    graph: its labels come from the weights whose hash the store matched). Any other graph is not
    known to compute this teacher: no."""
    if not store_graph or not backend.graph_sha256 or store_graph == backend.graph_sha256:
        return True
    return store_graph in backend.teacher_graphs


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
    classes: ClassList | None = None,
) -> Backend:
    """Open a backend for a teacher, building its ONNX graphs (and engine) when missing.

    kind: "auto" | "onnxruntime" | "torch" | "tensorrt". precision: "fp32" | "fp16" (default fp32
    on CPU, fp16 on a GPU). device: "cpu", "cuda", "cuda:1", ... (default: the current CUDA device
    when present; a CUDA device asked without CUDA is a BackendError); TensorRT builds and runs on
    that GPU, ONNX Runtime's GPU providers take its index ("cpu": ONNX Runtime on the CPU).
    max_batch: the largest batch of the TensorRT profiles (ours and ONNX Runtime's TensorRT
    provider's). compile (torch backend): `torch.compile` the teacher.
    classes: the teacher's own classes (a teacher fine-tuned on them; see
    :func:`trt_relabel.export.prepare_teacher`).
    """
    resolved = choose_backend(kind)
    if resolved == "torch":
        return _torch_backend(teacher, checkpoint, size, topk, device, precision, pretrained, compile, classes)
    missing = tensorrt_missing() if resolved == "tensorrt" else None
    if missing:
        raise BackendError(f"the tensorrt backend needs TensorRT and a CUDA GPU; {missing} is missing here")
    gpu = resolve_gpu(device)
    if resolved == "tensorrt" and gpu is None:
        raise BackendError("the tensorrt backend runs on a CUDA GPU, not on device cpu")
    graphs = build_graphs(teacher, checkpoint, size, topk, engines_dir, pretrained=pretrained, log=log, classes=classes)
    if resolved == "tensorrt":
        from trt_relabel.tensorrt_engine import TensorRTBackend, build_engine

        plan = build_engine(graphs.fp16, max_batch=max_batch, rebuild_stale=False, log=log, device=gpu)
        backend: Backend = TensorRTBackend(plan, max_batch, device=gpu)
    else:
        backend = onnxruntime_backend(graphs, precision, gpu, max_batch, log)
    backend.teacher_graphs = frozenset(graphs.sha256.values())
    return backend


def onnxruntime_backend(
    graphs: BuiltGraphs,
    precision: str | None,
    gpu: int | None,
    max_batch: int,
    log: Callable[[str], None] = print,
) -> OnnxRuntimeBackend:
    """ONNX Runtime over the teacher's graph for `precision` (None: fp16 with CUDA, else fp32) with its
    best providers on GPU `gpu` (None: the CPU); the TensorRT provider caches its engines beside the
    graphs and takes batches up to `max_batch` (see :func:`tensorrt_provider_options`)."""
    ort = import_onnxruntime()

    missing_cuda = ort_cuda_missing() if gpu is not None else None
    if missing_cuda:
        log(missing_cuda)
    providers, graph_precision = ort_providers(precision, gpu is not None)
    trt_version = _installed_version("tensorrt")
    if "TensorrtExecutionProvider" in providers and not tensorrt_provider_fits(trt_version, ort.__version__):
        log(f"ONNX Runtime {ort.__version__}'s TensorRT provider cannot run TensorRT {trt_version} (it needs "
            f"ONNX Runtime >= 1.27); using its CUDA provider")  # fmt: skip
        providers.remove("TensorrtExecutionProvider")
    graph = graphs.fp16 if graph_precision == "fp16" else graphs.fp32
    metadata = dataclasses.replace(graphs.metadata, precision=graph_precision)
    options = []
    for provider in providers:
        if provider == "TensorrtExecutionProvider":
            cache = graphs.fp16.parent / "onnxruntime-tensorrt"
            cache.mkdir(parents=True, exist_ok=True)
            options.append(tensorrt_provider_options(metadata, gpu or 0, max_batch, cache))
        else:
            options.append({"device_id": str(gpu or 0)} if provider in GPU_PROVIDERS else {})
    backend = OnnxRuntimeBackend(graph, metadata, providers, provider_options=options, log=log)
    if backend.fell_back:
        log(f"ONNX Runtime could not start {providers[0]} (its libraries are missing); running {backend.name}")
    return backend


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch_backend(
    teacher: str,
    checkpoint: str | Path | None,
    size: int | None,
    topk: int,
    device: str | None,
    precision: str | None,
    pretrained: bool,
    compile: bool,
    classes: ClassList | None,
) -> TorchBackend:
    target = torch.device(device or ("cuda" if cuda_available() else "cpu"))
    if target.type == "cuda" and not cuda_available():
        raise BackendError(f"device {device}: no CUDA GPU is available")
    precision = precision or ("fp16" if target.type == "cuda" else "fp32")
    prepared = prepare_teacher(teacher, checkpoint, size, topk, pretrained, classes)
    graph = relabel_graph(prepared, precision, channels_last=True)  # the faster layout on CPUs and GPUs
    metadata = dataclasses.replace(prepared.metadata, precision=precision)
    return TorchBackend(graph, metadata, target, compile=compile)
