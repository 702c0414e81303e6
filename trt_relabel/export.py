"""The relabel graph and its ONNX export (fp32 and strongly typed FP16).

Graph contract (the same for the torch module, the ONNX graphs and the TensorRT engine):

- input ``pixels``: uint8 [B, S, S, 3], NHWC RGB, the whole image already resized to S x S with
  :func:`trt_relabel.images.resize_whole` and the teacher's interpolation. Normalisation
  (``x / 255 - mean) / std``) happens inside the graph.
- outputs ``values``: [B, k, h, w] top-k logits per cell, descending along k (float32, or float16
  for the FP16 graph), and ``indices``: int32 [B, k, h, w] their class indices. TopK runs inside
  the graph, so the full [B, C, h, w] map never leaves the device.
- batch dynamic, spatial size fixed; metadata (:class:`GraphMetadata`) stored in the model's
  ``metadata_props`` under the key ``trt_relabel``, so a graph file alone says how to feed it.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import hashlib
import json
import os
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trt_relabel import __version__
from trt_relabel.classes import ClassList, classes_metadata
from trt_relabel.errors import RelabelError, UsageError
from trt_relabel.teacher import (
    FullyConvolutional,
    TeacherConfig,
    create_teacher,
    get_teacher_config,
    to_fully_convolutional,
    weights_hash,
)

METADATA_KEY = "trt_relabel"
INPUT_NAME = "pixels"
OUTPUT_NAMES = ("values", "indices")
#: Largest batch the exported graphs accept (the batch dimension is dynamic up to this).
MAX_EXPORT_BATCH = 4096
#: fp32 graph vs PyTorch: largest allowed absolute difference of the top-k logits at build time.
EXPORT_TOLERANCE = 1e-3
#: Version of what the export code writes; bumped at every change of the graphs' layout, so graphs
#: of older code are exported again (2: Cast before Transpose, no uint8 tensor inside the graph).
EXPORT_FORMAT = 2
#: Hex digits of a graph's sha256 in its file name (`<stem>.<precision>.<digest>.onnx`).
NAME_DIGEST_CHARS = 16


class ExportError(RelabelError):
    """The graph could not be exported or failed its parity check."""


@dataclass(frozen=True)
class GraphMetadata:
    """What a relabel graph computes and how to feed it (stored inside every graph file).

    `teacher_hash` is a content hash of the teacher's weights and the options (size, k, classes),
    shared by the fp32 and FP16 graphs and every backend built from them. `export_format`: the
    :data:`EXPORT_FORMAT` of the code that wrote the graph (1 for graphs without the field).
    `class_ids` and `class_names` list a teacher's own classes (``--class-names``); empty for the
    default classes (ImageNet-1k for 1000, see :func:`trt_relabel.classes.default_classes`).
    """

    teacher: str
    architecture: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    topk: int
    num_classes: int
    map_size: tuple[int, int]
    precision: str
    teacher_hash: str
    tool_version: str = __version__
    input_layout: str = "NHWC uint8 RGB"
    export_format: int = EXPORT_FORMAT
    class_ids: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GraphMetadata:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: dict) -> GraphMetadata:
        listed = ("mean", "std", "map_size", "class_ids", "class_names")
        tuples = {key: tuple(data[key]) for key in listed if key in data}
        return cls(**{"export_format": 1, **data, **tuples})


@dataclass
class PreparedTeacher:
    """A fully convolutional teacher ready for export or eager inference (CPU, float32)."""

    config: TeacherConfig
    fcn: FullyConvolutional
    metadata: GraphMetadata  # precision "fp32"


class RelabelGraph(nn.Module):
    """pixels uint8 [B, S, S, 3] (NHWC RGB) -> (values [B, k, h, w], indices int32 [B, k, h, w]).

    Computes in the dtype of the teacher's parameters (float32 or float16). In eager PyTorch the
    teacher's input is laid out NCHW, or channels_last with `channels_last` (the layout of the
    weights is the caller's: see :func:`relabel_graph`); ONNX graphs have no layout.
    """

    def __init__(
        self,
        fcn: FullyConvolutional,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        topk: int,
        channels_last: bool = False,
    ):
        super().__init__()
        self.fcn = fcn
        self.topk = topk
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        dtype = next(fcn.parameters()).dtype
        std_t = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
        self.register_buffer("scale", (1.0 / (255.0 * std_t)).to(dtype))
        self.register_buffer("shift", (-mean_t / std_t).to(dtype))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Cast before the permute: TensorRT takes uint8 only as a network input, never inside the graph.
        # channels_last: the permuted NHWC tensor already is channels_last, so no copy is made.
        x = pixels.to(self.scale.dtype).permute(0, 3, 1, 2).contiguous(memory_format=self.memory_format)
        x = x * self.scale + self.shift
        values, indices = torch.topk(self.fcn(x), self.topk, dim=1)
        return values, indices.to(torch.int32)


def prepare_teacher(
    teacher: str = "efficientnet_lite0",
    checkpoint: str | Path | None = None,
    size: int | None = None,
    topk: int = 5,
    pretrained: bool = True,
    classes: ClassList | None = None,
) -> PreparedTeacher:
    """Create, load and convert a teacher; compute its metadata and content hash. `classes`: the
    teacher's own classes (a teacher fine-tuned on them: its classifier has len(classes) outputs)."""
    config = get_teacher_config(teacher, size)
    if classes is not None:
        config = dataclasses.replace(config, num_classes=len(classes))
    if not 1 <= topk <= config.num_classes:
        raise UsageError(f"--topk {topk}: must lie in [1, {config.num_classes}] (the teacher's classes)")
    fcn = to_fully_convolutional(create_teacher(config, checkpoint, pretrained), config.input_size)
    class_metadata = {key: tuple(value) for key, value in classes_metadata(classes).items()}
    options = {"config": dataclasses.asdict(config), "topk": topk, "weights": weights_hash(fcn), **class_metadata}
    content_hash = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()
    metadata = GraphMetadata(
        teacher=config.name,
        architecture=config.architecture,
        input_size=config.input_size,
        mean=config.mean,
        std=config.std,
        interpolation=config.interpolation,
        topk=topk,
        num_classes=config.num_classes,
        map_size=fcn.map_size,
        precision="fp32",
        teacher_hash=content_hash[:16],
        **class_metadata,
    )
    return PreparedTeacher(config, fcn, metadata)


def relabel_graph(prepared: PreparedTeacher, precision: str = "fp32", channels_last: bool = False) -> RelabelGraph:
    """The torch relabel module in `precision` "fp32" or "fp16", laid out NCHW or channels_last
    (input and weights). fp32 NCHW shares `prepared`'s weights; the others own a converted copy."""
    if precision not in ("fp32", "fp16"):
        raise ExportError(f"precision must be fp32 or fp16, got {precision!r}")
    config = prepared.config
    graph = RelabelGraph(prepared.fcn, config.mean, config.std, prepared.metadata.topk, channels_last)
    if precision == "fp16" or channels_last:
        graph = copy.deepcopy(graph)
    if precision == "fp16":
        graph = graph.half()
    if channels_last:
        graph = graph.to(memory_format=torch.channels_last)
    return graph.eval()


@dataclass(frozen=True)
class BuiltGraphs:
    """The exported graph files and what they compute. `skipped`: both existed and were reused.
    `sha256`: precision ("fp32", "fp16") -> sha256 of that graph (see :func:`graph_sha256`)."""

    fp32: Path
    fp16: Path
    metadata: GraphMetadata
    skipped: bool
    sha256: dict[str, str] = dataclasses.field(default_factory=dict)


def graph_stem(metadata: GraphMetadata) -> str:
    """File name stem shared by a teacher's graphs and engines: `<teacher>-<S>-k<k>-<hash>`."""
    slug = metadata.teacher.replace(":", "_").replace("/", "_")
    return f"{slug}-{metadata.input_size}-k{metadata.topk}-{metadata.teacher_hash[:12]}"


def read_graph_metadata(path: str | Path) -> GraphMetadata:
    """The :class:`GraphMetadata` stored in a relabel ONNX graph (external weights are not read)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is one expected error
        raise ExportError(f"{path}: not a readable ONNX file ({type(e).__name__})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise ExportError(f"{path}: no trt-relabel metadata; export it with `trt-relabel build-engine`")
    try:
        return GraphMetadata.from_json(props[METADATA_KEY])
    except (ValueError, TypeError, KeyError) as e:
        raise ExportError(f"{path}: malformed trt-relabel metadata ({type(e).__name__}: {e})".splitlines()[0]) from None


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    _update_digest(digest, Path(path))
    return digest.hexdigest()


def _update_digest(digest, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)


def graph_sha256(path: str | Path) -> str:
    """sha256 (hex) of a graph: the bytes of the `.onnx` file, then of each external weight file it names
    (graphs over 1 GiB of weights keep them beside the graph), so a change to any weight changes it."""
    import onnx

    path = Path(path)
    digest = hashlib.sha256()
    _update_digest(digest, path)
    if path.stat().st_size < 1 << 26:  # a graph with external weights is small; a big one holds them all
        model = onnx.load(str(path), load_external_data=False)
        locations = {
            entry.value
            for tensor in model.graph.initializer
            for entry in tensor.external_data
            if entry.key == "location"
        }
        for location in sorted(locations):
            _update_digest(digest, path.parent / location)
    return digest.hexdigest()


def verified_graph_sha256(path: Path) -> str:
    """The graph's sha256, checked against the digest in its name (`<stem>.<precision>.<digest>.onnx`).

    Raises :class:`ExportError` (one line) for a graph changed after export: it must not label.
    """
    found = graph_sha256(path)
    named = path.name.removesuffix(".onnx").rsplit(".", 1)[-1]
    if found[:NAME_DIGEST_CHARS] != named:
        raise ExportError(
            f"{path}: its bytes (sha256 {found[:NAME_DIGEST_CHARS]}) do not match the digest in its name: the "
            f"graph was changed after export; delete it and run `trt-relabel build-engine` to export it again"
        )
    return found


def export_onnx(graph: RelabelGraph, metadata: GraphMetadata, out_dir: Path) -> tuple[Path, str]:
    """Export `graph` with the dynamo exporter (batch dynamic, S fixed) and store `metadata`; returns the
    graph's path `<out_dir>/<stem>.<precision>.<digest>.onnx` and its sha256 (see :func:`graph_sha256`).

    Written atomically: the files appear under their final names only once complete. Graphs over
    1 GiB of weights keep them in a `.onnx.data` file beside the graph, named inside it.
    """
    size = metadata.input_size
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    try:
        program = torch.onnx.export(
            graph,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - the exporter raises many kinds
        raise ExportError(f"{metadata.architecture}: ONNX export failed: {str(e).splitlines()[0]}") from None
    program.model.metadata_props[METADATA_KEY] = metadata.to_json()
    for node in program.model.graph.all_nodes():
        node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)  # source paths: same graph, same bytes anywhere
    weight_bytes = sum(p.numel() * p.element_size() for p in graph.parameters())
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        # a name of its own for the staged graph: its external weight file keeps it
        staged = Path(tmp) / f"{graph_stem(metadata)}.{metadata.precision}.{secrets.token_hex(4)}.onnx"
        program.save(str(staged), external_data=weight_bytes > 1 << 30)
        sha256 = graph_sha256(staged)
        path = out_dir / f"{graph_stem(metadata)}.{metadata.precision}.{sha256[:NAME_DIGEST_CHARS]}.onnx"
        for extra in Path(tmp).iterdir():
            if extra != staged:
                os.replace(extra, out_dir / extra.name)
        os.replace(staged, path)
    return path, sha256


def import_onnxruntime():
    """The `onnxruntime` module; a clear error when no ONNX Runtime build is installed."""
    try:
        import onnxruntime
    except ImportError:
        raise RelabelError(
            "ONNX Runtime is not installed; install one build: pip install 'trt-relabel[cpu]' "
            "(or 'trt-relabel[gpu]' on a CUDA machine)"
        ) from None
    return onnxruntime


def check_parity(graph_path: Path, graph: RelabelGraph, pixels: np.ndarray) -> float:
    """Max abs difference of the top-k logits between ONNX Runtime (CPU) and the torch module."""
    ort = import_onnxruntime()
    session = ort.InferenceSession(str(graph_path), providers=["CPUExecutionProvider"])
    onnx_values, _ = session.run(None, {INPUT_NAME: pixels})
    with torch.no_grad():
        torch_values, _ = graph(torch.from_numpy(pixels))
    return float(np.abs(onnx_values.astype(np.float64) - torch_values.double().numpy()).max())


def probe_pixels(size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    """A smooth, image-like uint8 [batch, size, size, 3] probe (gradients and blobs, seeded)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (batch, 8, 8, 3)).astype(np.float32)
    t = torch.from_numpy(coarse).permute(0, 3, 1, 2)
    up = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return up.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy()


def build_graphs(
    teacher: str = "efficientnet_lite0",
    checkpoint: str | Path | None = None,
    size: int | None = None,
    topk: int = 5,
    out_dir: str | Path = "engines",
    pretrained: bool = True,
    verify: bool = True,
    log: Callable[[str], None] = print,
    classes: ClassList | None = None,
) -> BuiltGraphs:
    """Export the fp32 and FP16 relabel graphs of a teacher into `out_dir` (see :func:`export_graphs`)."""
    prepared = prepare_teacher(teacher, checkpoint, size, topk, pretrained, classes)
    return export_graphs(prepared, out_dir, verify, log)


def export_graphs(
    prepared: PreparedTeacher,
    out_dir: str | Path = "engines",
    verify: bool = True,
    log: Callable[[str], None] = print,
) -> BuiltGraphs:
    """Export the fp32 and FP16 relabel graphs of a prepared teacher into `out_dir`.

    File names carry the teacher's content hash (weights + options) and the graph's own sha256
    (`<stem>.<precision>.<digest>.onnx`): an unchanged teacher reuses the existing files
    (`skipped=True`) once their bytes match their names (a changed graph raises :class:`ExportError`);
    graphs of an older :data:`EXPORT_FORMAT` or with unreadable metadata are exported again. With
    `verify`, the fp32 graph must match PyTorch within :data:`EXPORT_TOLERANCE` on a probe batch,
    and the FP16 graph must pass the ONNX checker.
    """
    out_dir = Path(out_dir)
    found = {p: find_graph(out_dir, dataclasses.replace(prepared.metadata, precision=p)) for p in ("fp32", "fp16")}
    if found["fp32"] and found["fp16"]:
        return BuiltGraphs(found["fp32"][0], found["fp16"][0], prepared.metadata, True, _digests(found))
    for precision in found:
        metadata = dataclasses.replace(prepared.metadata, precision=precision)
        graph = relabel_graph(prepared, precision)
        log(f"exporting {precision} graph of {metadata.teacher} at {metadata.input_size} into {out_dir}")
        path, sha256 = export_onnx(graph, metadata, out_dir)
        found[precision] = (path, sha256)
        if verify and precision == "fp32":
            error = check_parity(path, graph, probe_pixels(metadata.input_size))
            if not error <= EXPORT_TOLERANCE:
                path.unlink()
                raise ExportError(f"{path}: ONNX Runtime differs from PyTorch by {error:.2e} (> {EXPORT_TOLERANCE})")
        if verify and precision == "fp16":
            import onnx

            onnx.checker.check_model(str(path))
    return BuiltGraphs(found["fp32"][0], found["fp16"][0], prepared.metadata, False, _digests(found))


def _digests(found: dict[str, tuple[Path, str] | None]) -> dict[str, str]:
    return {precision: entry[1] for precision, entry in found.items() if entry}


def find_graph(out_dir: Path, metadata: GraphMetadata) -> tuple[Path, str] | None:
    """(path, sha256) of the graph in `out_dir` that computes `metadata` (precision included) with
    this code's :data:`EXPORT_FORMAT`, or None. Every candidate's bytes are checked against its name
    first (see :func:`verified_graph_sha256`): a changed graph raises, it is never silently used."""
    pattern = f"{glob.escape(graph_stem(metadata))}.{metadata.precision}.*.onnx"
    for path in sorted(out_dir.glob(pattern)):
        sha256 = verified_graph_sha256(path)
        if _graph_matches(path, metadata):
            return path, sha256
    return None


def _graph_matches(path: Path, metadata: GraphMetadata) -> bool:
    try:
        found = read_graph_metadata(path)
    except ExportError:
        return False
    return dataclasses.replace(found, tool_version=metadata.tool_version) == metadata
