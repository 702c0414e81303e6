"""TensorRT: build an FP16 engine from the strongly typed FP16 ONNX graph, and run it.

`tensorrt` is imported lazily, inside the functions that need it: everything else here (the
sidecar, its validation, the batch profile, the timing cache's handling) is plain Python and works
without it. Building, deserialising and enqueueing run under the engine's GPU (`torch.cuda.device`),
so an engine for `cuda:1` is built for, and runs on, GPU 1.

TensorRT 11 removed `BuilderFlag.FP16`; FP16 engines come from a strongly typed network whose
tensors are already fp16 (our FP16 graph). TensorRT 10 accepts the same flag, so one code path
serves both. I/O buffers are torch CUDA tensors (`data_ptr()`), enqueued with `execute_async_v3`
on torch streams: no pycuda.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trt_relabel.backends import Backend, Pixels
from trt_relabel.errors import RelabelError
from trt_relabel.export import (
    INPUT_NAME,
    OUTPUT_NAMES,
    GraphMetadata,
    graph_sha256,
    read_graph_metadata,
)
from trt_relabel.fileio import write_atomic
from trt_relabel.trt_compat import check_tensorrt_compatible

#: Batches in flight in :meth:`TensorRTBackend.stream`: copy-in of n+1, compute of n, copy-out of n-1.
PIPELINE_DEPTH = 3


class EngineError(RelabelError):
    """An engine that cannot be built, or was built for another GPU or TensorRT version."""


@dataclass(frozen=True)
class EngineSidecar:
    """The JSON written beside each engine: what it was built from, where, and what it takes.

    io: name -> {"mode": "input"|"output", "dtype": str, "shape": list (-1 = dynamic)}.
    profile: (min, opt, max) batch of the optimisation profile. `graph_sha256`: the graph it was
    built from; `plan_sha256`: the plan's own bytes, checked before every use.
    """

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    graph: str
    graph_sha256: str
    io: dict[str, dict[str, Any]]
    profile: tuple[int, int, int]
    metadata: GraphMetadata
    built_at: str
    plan_sha256: str

    def save(self, path: Path) -> None:
        write_atomic(path, json.dumps(dataclasses.asdict(self), indent=2).encode())

    @classmethod
    def load(cls, path: Path) -> EngineSidecar:
        try:
            data = json.loads(path.read_text())
            data["profile"] = tuple(data["profile"])
            data["metadata"] = GraphMetadata.from_dict(data["metadata"])
            return cls(**data)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise EngineError(f"{path}: unreadable engine sidecar ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class Environment:
    """Where an engine runs: TensorRT version, GPU name and compute capability ("9.0")."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str


def current_environment(device: int = 0) -> Environment:
    import tensorrt as trt

    major, minor = torch.cuda.get_device_capability(device)
    return Environment(trt.__version__, torch.cuda.get_device_name(device), f"{major}.{minor}")


def timing_cache_path(folder: Path, env: Environment) -> Path:
    """The timing cache of one TensorRT version and GPU model in `folder`: a cache of another version
    or GPU is never loaded (`tensorrt-timing-<version>-<gpu>-sm<cc>.cache`)."""
    gpu = re.sub(r"[^A-Za-z0-9.]+", "_", env.gpu_name).strip("_")
    return folder / f"tensorrt-timing-{env.tensorrt_version}-{gpu}-sm{env.compute_capability}.cache"


def load_timing_cache(config: Any, path: Path, log: Callable[[str], None]) -> None:
    """Give the builder `config` (a `tensorrt.IBuilderConfig`) the timing cache saved at `path`; one
    TensorRT refuses (another version or GPU, damaged) is replaced by an empty cache, with a line."""
    serialized = path.read_bytes() if path.is_file() else b""
    if config.set_timing_cache(config.create_timing_cache(serialized), ignore_mismatch=False):
        return
    log(f"timing cache {path} does not fit this TensorRT and GPU; starting an empty one")
    if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
        raise EngineError(f"{path}: TensorRT refuses even an empty timing cache")


def save_timing_cache(config: Any, path: Path) -> None:
    """Write the builder's timing cache to `path` (nothing when TensorRT has none)."""
    cache = config.get_timing_cache()
    if cache is not None:
        write_atomic(path, bytes(cache.serialize()))


def batch_profile(max_batch: int, opt_batch: int | None = None) -> tuple[int, int, int]:
    """(min, opt, max) batch sizes of the optimisation profile: min 1, opt defaults to max."""
    if max_batch < 1:
        raise EngineError(f"max batch must be at least 1, got {max_batch}")
    opt = max_batch if opt_batch is None else opt_batch
    if not 1 <= opt <= max_batch:
        raise EngineError(f"opt batch {opt} must be in [1, max batch {max_batch}]")
    return 1, opt, max_batch


def engine_path(graph: Path) -> Path:
    """`<stem>.fp16.onnx` -> `<stem>.fp16.plan` (its sidecar: `<stem>.fp16.json`)."""
    return graph.with_suffix(".plan")


def rebuild_command(metadata: GraphMetadata, out_dir: Path) -> str:
    return (
        f"trt-relabel build-engine --teacher {metadata.teacher} --size {metadata.input_size} "
        f"--topk {metadata.topk} --out {out_dir}"
    )


def check_sidecar(sidecar: EngineSidecar, env: Environment, plan: Path, max_batch: int | None = None) -> None:
    """Refuse an engine built for another TensorRT version or GPU, or one whose profile is too small.

    The error names the command that rebuilds it.
    """
    rebuild = rebuild_command(sidecar.metadata, plan.parent)
    if sidecar.tensorrt_version != env.tensorrt_version:
        raise EngineError(
            f"{plan}: built with TensorRT {sidecar.tensorrt_version}, this is TensorRT {env.tensorrt_version}; "
            f"rebuild it: {rebuild}"
        )
    if (sidecar.gpu_name, sidecar.compute_capability) != (env.gpu_name, env.compute_capability):
        raise EngineError(
            f"{plan}: built for {sidecar.gpu_name} (sm {sidecar.compute_capability}), this is {env.gpu_name} "
            f"(sm {env.compute_capability}); rebuild it: {rebuild}"
        )
    if max_batch is not None and sidecar.profile[2] < max_batch:
        raise EngineError(
            f"{plan}: its profile takes batches up to {sidecar.profile[2]}, not {max_batch}; "
            f"rebuild it: {rebuild} --max-batch {max_batch}"
        )


def build_engine(
    graph: Path,
    max_batch: int = 64,
    opt_batch: int | None = None,
    workspace_bytes: int = 8 << 30,
    rebuild_stale: bool = True,
    log: Callable[[str], None] = print,
    device: int = 0,
) -> Path:
    """Build (or reuse) the FP16 engine of a strongly typed FP16 ONNX graph on GPU `device`; returns
    the plan path.

    An engine whose sidecar matches this graph, its own bytes, TensorRT, GPU and batch profile is
    reused. A stale one is rebuilt when `rebuild_stale`, else refused with the rebuild command. The
    graph is checked against TensorRT's parser rules (:mod:`trt_relabel.trt_compat`) before TensorRT
    loads. The timing cache of this TensorRT and GPU (:func:`timing_cache_path`) is loaded and saved.
    """
    graph = Path(graph)
    check_tensorrt_compatible(graph)
    plan, sidecar_path = engine_path(graph), engine_path(graph).with_suffix(".json")
    env = current_environment(device)
    profile = batch_profile(max_batch, opt_batch)
    graph_sha = graph_sha256(graph)
    if plan.is_file() and sidecar_path.is_file():
        try:
            sidecar = EngineSidecar.load(sidecar_path)
            if sidecar.graph_sha256 != graph_sha:
                raise EngineError(
                    f"{plan}: built from another graph; rebuild it: {rebuild_command(sidecar.metadata, plan.parent)}"
                )
            check_sidecar(sidecar, env, plan, max_batch)
            check_plan(plan, sidecar)
            return plan
        except EngineError:
            if not rebuild_stale:
                raise
            log(f"rebuilding stale engine {plan}")
    with torch.cuda.device(device):
        serialized, io = _build_serialized(graph, profile, workspace_bytes, timing_cache_path(graph.parent, env), log)
    write_atomic(plan, serialized)
    EngineSidecar(
        tensorrt_version=env.tensorrt_version,
        gpu_name=env.gpu_name,
        compute_capability=env.compute_capability,
        graph=graph.name,
        graph_sha256=graph_sha,
        io=io,
        profile=profile,
        metadata=read_graph_metadata(graph),
        built_at=datetime.now(UTC).isoformat(timespec="seconds"),
        plan_sha256=hashlib.sha256(serialized).hexdigest(),
    ).save(sidecar_path)
    return plan


def check_plan(plan: Path, sidecar: EngineSidecar, data: bytes | None = None) -> None:
    """Refuse a plan whose bytes (`data`, else read from `plan`) are not those its sidecar records."""
    found = hashlib.sha256(plan.read_bytes() if data is None else data).hexdigest()
    if found != sidecar.plan_sha256:
        raise EngineError(
            f"{plan}: its bytes (sha256 {found[:16]}) are not those its sidecar records ({sidecar.plan_sha256[:16]}); "
            f"rebuild it: {rebuild_command(sidecar.metadata, plan.parent)}"
        )


def _build_serialized(
    graph: Path, profile: tuple[int, int, int], workspace_bytes: int, cache_path: Path, log: Callable[[str], None]
) -> tuple[bytes, dict[str, dict[str, Any]]]:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{graph}: TensorRT cannot parse the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    pixels = network.get_input(0)
    size = tuple(pixels.shape)[1:]
    optimisation = builder.create_optimization_profile()
    optimisation.set_shape(pixels.name, *[(b, *size) for b in profile])
    config.add_optimization_profile(optimisation)
    load_timing_cache(config, cache_path, log)
    log(f"building TensorRT {trt.__version__} engine from {graph.name}, batch profile {profile} (minutes)")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"{graph}: TensorRT failed to build an engine (see the log above)")
    save_timing_cache(config, cache_path)
    io = {}
    for tensors, mode in (
        ([network.get_input(i) for i in range(network.num_inputs)], "input"),
        ([network.get_output(i) for i in range(network.num_outputs)], "output"),
    ):
        for tensor in tensors:
            io[tensor.name] = {"mode": mode, "dtype": str(tensor.dtype), "shape": list(tensor.shape)}
    return bytes(serialized), io


class TensorRTBackend(Backend):
    """Runs a TensorRT engine with torch CUDA tensors as I/O buffers.

    __call__(pixels uint8 [B, S, S, 3], NumPy or torch (CPU or CUDA)) -> (values fp16 [B, k, h, w],
    indices int32 [B, k, h, w]) as NumPy. :meth:`stream` overlaps the host-to-device copy of batch
    n+1, the compute of batch n and the copy back of batch n-1 through pinned host buffers.
    """

    def __init__(self, plan: Path, max_batch: int | None = None, device: int = 0):
        import tensorrt as trt

        plan = Path(plan)
        sidecar = EngineSidecar.load(plan.with_suffix(".json"))
        check_sidecar(sidecar, current_environment(device), plan, max_batch)
        serialized = plan.read_bytes()
        check_plan(plan, sidecar, serialized)
        self.metadata = sidecar.metadata
        self.graph_sha256 = sidecar.graph_sha256
        self.max_batch = sidecar.profile[2]
        self.device = torch.device("cuda", device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(serialized)
            if self.engine is None:
                raise EngineError(f"{plan}: TensorRT cannot deserialize the engine; rebuild it with build-engine")
            self.context = self.engine.create_execution_context()
        self.outputs = [n for n in self._tensor_names() if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.name = f"tensorrt {trt.__version__} ({torch.cuda.get_device_name(device)}, fp16)"
        self._compute = torch.cuda.Stream(self.device)
        self._copy_in = torch.cuda.Stream(self.device)
        self._copy_out = torch.cuda.Stream(self.device)
        self._slots = [self._allocate_slot() for _ in range(PIPELINE_DEPTH)]

    def _tensor_names(self) -> list[str]:
        return [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def _torch_dtype(self, name: str) -> torch.dtype:
        import tensorrt as trt

        return {
            trt.float16: torch.float16,
            trt.float32: torch.float32,
            trt.int32: torch.int32,
            trt.int64: torch.int64,
            trt.uint8: torch.uint8,
        }[self.engine.get_tensor_dtype(name)]

    def _allocate_slot(self) -> dict[str, Any]:
        meta, batch = self.metadata, self.max_batch
        in_shape = (batch, meta.input_size, meta.input_size, 3)
        out_shape = (batch, meta.topk, *meta.map_size)
        slot: dict[str, Any] = {
            "host_in": torch.empty(in_shape, dtype=torch.uint8, pin_memory=True),
            "dev_in": torch.empty(in_shape, dtype=torch.uint8, device=self.device),
            "done": torch.cuda.Event(),
        }
        for name in self.outputs:
            dtype = self._torch_dtype(name)
            slot[f"dev_{name}"] = torch.empty(out_shape, dtype=dtype, device=self.device)
            slot[f"host_{name}"] = torch.empty(out_shape, dtype=dtype, pin_memory=True)
        return slot

    def _enqueue(self, slot: dict[str, Any], pixels: Pixels) -> int:
        batch = int(pixels.shape[0])
        if batch > self.max_batch:
            raise EngineError(f"batch {batch} exceeds the engine's profile maximum {self.max_batch}")
        with torch.cuda.device(self.device):
            self._copy_in_pixels(slot, pixels, batch)
            self._compute.wait_stream(self._copy_in)
            self.context.set_input_shape(INPUT_NAME, tuple(slot["dev_in"][:batch].shape))
            self.context.set_tensor_address(INPUT_NAME, slot["dev_in"].data_ptr())
            for name in self.outputs:
                self.context.set_tensor_address(name, slot[f"dev_{name}"].data_ptr())
            if not self.context.execute_async_v3(self._compute.cuda_stream):
                raise EngineError("TensorRT execute_async_v3 failed")
            self._copy_out.wait_stream(self._compute)
            with torch.cuda.stream(self._copy_out):
                for name in self.outputs:
                    slot[f"host_{name}"][:batch].copy_(slot[f"dev_{name}"][:batch], non_blocking=True)
                slot["done"].record(self._copy_out)
        return batch

    def _copy_in_pixels(self, slot: dict[str, Any], pixels: Pixels, batch: int) -> None:
        """Copy `pixels` into the slot's device input on the copy-in stream. GPU pixels (e.g. decoded by
        nvJPEG) are produced on the caller's current stream: the copy waits for it, and the caching
        allocator is told that the copy stream uses them (`record_stream`), so their memory is not
        handed out again while the copy may still read it."""
        if isinstance(pixels, torch.Tensor) and pixels.is_cuda:
            producer = torch.cuda.current_stream(pixels.device)
            self._copy_in.wait_stream(producer)
            with torch.cuda.stream(self._copy_in):
                slot["dev_in"][:batch].copy_(pixels, non_blocking=True)
            pixels.record_stream(self._copy_in)
            return
        source = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(pixels))
        with torch.cuda.stream(self._copy_in):
            slot["host_in"][:batch].copy_(source)
            slot["dev_in"][:batch].copy_(slot["host_in"][:batch], non_blocking=True)

    def _collect(self, slot: dict[str, Any], batch: int) -> tuple[np.ndarray, np.ndarray]:
        slot["done"].synchronize()
        values, indices = (slot[f"host_{name}"][:batch].numpy().copy() for name in OUTPUT_NAMES)
        return values, indices

    def __call__(self, pixels: Pixels) -> tuple[np.ndarray, np.ndarray]:
        slot = self._slots[0]
        return self._collect(slot, self._enqueue(slot, pixels))

    def stream(self, batches: Iterable[tuple[Any, Pixels]]) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
        """Label `(tag, pixels)` batches with copies and compute overlapped; yields `(tag, values, indices)`
        in input order."""
        in_flight: deque[tuple[Any, dict[str, Any], int]] = deque()
        for n, (tag, pixels) in enumerate(batches):
            if len(in_flight) == PIPELINE_DEPTH - 1:
                done_tag, slot, batch = in_flight.popleft()
                yield (done_tag, *self._collect(slot, batch))
            slot = self._slots[n % PIPELINE_DEPTH]
            in_flight.append((tag, slot, self._enqueue(slot, pixels)))
        while in_flight:
            done_tag, slot, batch = in_flight.popleft()
            yield (done_tag, *self._collect(slot, batch))
