"""Will TensorRT's ONNX parser take this graph? The rules that the ONNX file itself shows, checked
without TensorRT (so on any machine, in the test suite, and in `build-engine` before TensorRT loads).

Rules (onnx-tensorrt's `docs/operators.md` of TensorRT 10.x, and its importer):

- the default-domain opset is one TensorRT 10.0 parses (9 to 20); every node is an ONNX operator
  of the supported list, with its data type T (first input, and first output) among those listed
  for it (so bool and int64 appear only where TensorRT takes them);
- uint8 only as a network input or output, never inside the graph;
- TopK: `K` a constant (initializer or Constant node) of at most 3840, `sorted` = 1;
- network inputs and outputs: a TensorRT type, the batch (dimension 0) the only dynamic dimension.

Passing this check does not prove that TensorRT builds the engine (only a build on a GPU does);
failing it proves that it would not.
"""

from __future__ import annotations

from pathlib import Path

from trt_relabel.errors import RelabelError

#: Default-domain opsets the ONNX parser of TensorRT 10.0 (the oldest we support) accepts.
TENSORRT_OPSETS = (9, 20)
#: Largest K of TensorRT's TopK layer.
MAX_TOPK = 3840
#: Types TensorRT takes as network inputs and outputs.
NETWORK_IO_TYPES = frozenset({"FP32", "FP16", "BF16", "INT32", "INT64", "INT8", "UINT8", "BOOL"})

_FLOAT = "FP32 FP16 BF16"
_NUMBER = f"{_FLOAT} INT32 INT64"
_ANY = f"{_NUMBER} BOOL"
#: Operator -> the data types TensorRT supports for it (onnx-tensorrt's operator matrix, TensorRT 10.x;
#: operators added after 10.0 for language models are left out).
_OPERATOR_TABLE = {
    _FLOAT: """Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Conv ConvTranspose
        Cos Cosh CumSum Dropout Einsum Elu Erf Exp Floor Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
        GroupNormalization GRU HardSigmoid HardSwish Hardmax ImageScaler InstanceNormalization IsInf
        LayerNormalization LeakyRelu Log LogSoftmax LRN LSTM LpNormalization LpPool MatMul MaxPool
        MeanVarianceNormalization PRelu ParametricSoftplus QuantizeLinear RandomNormal RandomNormalLike
        RandomUniform RandomUniformLike Reciprocal Resize RNN Round ScaledTanh Scan Selu Sigmoid Sin Sinh
        Softmax Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Upsample""",
    _NUMBER: """Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual Max Min
        Mod Mul Neg Pad Pow Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
        ReduceProd ReduceSum ReduceSumSquare Relu Scatter ScatterElements ScatterND Shrink Sign SpaceToDepth Sub
        Sum TopK""",
    _ANY: """Concat Expand EyeLike Flatten Gather GatherElements GatherND Identity If Loop OneHot Reshape
        ReverseSequence Shape Size Slice Split Squeeze Tile Transpose Trilu Unsqueeze Where""",
    "FP32 FP16": "BlackmanWindow DeformConv GridSample HammingWindow HannWindow Mish NonMaxSuppression NonZero "
    "RoiAlign",
    "FP32": "STFT",
    "BOOL": "And Not Or Xor",
    f"{_ANY} UINT8": "Cast CastLike",
    f"{_ANY} FP8 FP4 INT4": "Constant ConstantOfShape",
    "INT8 FP8 FP4 INT4": "DequantizeLinear",
    f"{_NUMBER} FP8": "Mean",
    f"{_NUMBER} INT8": "Gelu",
}
SUPPORTED_OPERATORS: dict[str, frozenset[str]] = {
    op: frozenset(types.split()) for types, ops in _OPERATOR_TABLE.items() for op in ops.split()
}
#: ONNX TensorProto type names -> the names of the operator matrix.
_TYPE_NAMES = {
    "FLOAT": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16", "DOUBLE": "DOUBLE", "INT32": "INT32",
    "INT64": "INT64", "INT8": "INT8", "UINT8": "UINT8", "BOOL": "BOOL", "INT4": "INT4", "FLOAT4E2M1": "FP4",
    "FLOAT8E4M3FN": "FP8",
}  # fmt: skip


class TensorRTCompatError(RelabelError):
    """A graph that TensorRT's ONNX parser would refuse; the message names the graph, node and rule."""


def check_tensorrt_compatible(path: str | Path) -> None:
    """Raise :class:`TensorRTCompatError` (one line: the first broken rule, and how many more) when the
    ONNX graph at `path` breaks a rule of TensorRT's parser (see the module docstring)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is one expected error
        raise TensorRTCompatError(f"{path}: not a readable ONNX file ({type(e).__name__})") from None
    problems = tensorrt_problems(model)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise TensorRTCompatError(f"{path}: TensorRT would refuse it: {problems[0]}{more}")


def tensorrt_problems(model) -> list[str]:
    """The rules of TensorRT's ONNX parser that `model` (an onnx.ModelProto) breaks, one line each."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    problems = []
    if opset is None or not TENSORRT_OPSETS[0] <= opset <= TENSORRT_OPSETS[1]:
        problems.append(f"opset {opset}: TensorRT 10.0 parses opsets {TENSORRT_OPSETS[0]} to {TENSORRT_OPSETS[1]}")
    constants = _constants(model)
    types = _tensor_types(model)
    io_names = {v.name for v in (*model.graph.input, *model.graph.output)}
    problems += _io_problems(model, types)
    for node in model.graph.node:
        problems += _node_problems(node, types, io_names, constants)
    return problems


def _io_problems(model, types: dict[str, str]) -> list[str]:
    problems = []
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for value in values:
            if types.get(value.name) not in NETWORK_IO_TYPES:
                problems.append(f"network {kind} '{value.name}' is {types.get(value.name, 'of unknown type')}")
            dims = value.type.tensor_type.shape.dim
            dynamic = [n for n, d in enumerate(dims) if n > 0 and not d.dim_value > 0]
            if not dims or dynamic:
                problems.append(
                    f"network {kind} '{value.name}': dimension {dynamic[0] if dynamic else 'list'} is not static; "
                    "only the batch (dimension 0) may be dynamic"
                )
    return problems


def _node_problems(node, types: dict[str, str], io_names: set[str], constants: dict) -> list[str]:
    where = f"node '{node.name or node.output[0]}' ({node.op_type})"
    if node.domain not in ("", "ai.onnx"):
        return [f"{where}: operator of domain '{node.domain}', not an ONNX operator TensorRT parses"]
    if node.op_type not in SUPPORTED_OPERATORS:
        return [f"{where}: not in TensorRT's list of ONNX operators"]
    tensors = [name for name in (node.input[:1] or node.output[:1]) if name] + list(node.output[:1])
    for name in tensors:
        if types.get(name) == "UINT8" and name not in io_names:
            return [f"{where}: uint8 tensor '{name}' inside the graph; TensorRT takes uint8 only as network I/O"]
        if types.get(name) not in SUPPORTED_OPERATORS[node.op_type]:
            found = types.get(name, "of unknown type")
            return [f"{where}: tensor '{name}' is {found}; TensorRT's {node.op_type} takes {_names(node.op_type)}"]
    if node.op_type == "TopK":
        return _topk_problems(node, where, constants)
    return []


def _topk_problems(node, where: str, constants: dict) -> list[str]:
    from onnx import helper

    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k = constants.get(node.input[1]) if len(node.input) > 1 else None
    if k is None:
        return [f"{where}: K is not a constant; TensorRT needs K as an initializer"]
    if not 1 <= int(k.reshape(-1)[0]) <= MAX_TOPK:
        return [f"{where}: K = {int(k.reshape(-1)[0])}; TensorRT's TopK takes K <= {MAX_TOPK}"]
    if attributes.get("sorted", 1) != 1:
        return [f"{where}: sorted = 0; TensorRT's TopK returns sorted values only"]
    return []


def _names(op_type: str) -> str:
    return ", ".join(sorted(SUPPORTED_OPERATORS[op_type]))


def _constants(model) -> dict:
    """name -> NumPy value of each small constant (initializers and Constant nodes' `value`)."""
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if _is_small(t)}
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None and _is_small(value):
                values[node.output[0]] = numpy_helper.to_array(value)
    return values


def _is_small(tensor) -> bool:
    return not tensor.external_data and len(tensor.dims) <= 1 and (not tensor.dims or tensor.dims[0] <= 16)


def _tensor_types(model) -> dict[str, str]:
    """name -> type name (operator-matrix spelling) of every tensor ONNX shape inference can type.

    Inference runs on a copy whose weights are dropped (types and shapes are kept), so a graph of
    any size is typed quickly."""
    import onnx
    from onnx import TensorProto

    light = onnx.ModelProto()
    light.CopyFrom(model)
    for tensor in light.graph.initializer:
        if not _is_small(tensor):
            tensor.ClearField("raw_data")
            tensor.ClearField("external_data")
            tensor.data_location = TensorProto.DEFAULT
    inferred = onnx.shape_inference.infer_shapes(light)
    graph = inferred.graph
    elem_types = {t.name: t.data_type for t in graph.initializer}
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.tensor_type.elem_type:
            elem_types[value.name] = value.type.tensor_type.elem_type
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                elem_types[node.output[0]] = value.data_type
    names = {name: TensorProto.DataType.Name(elem) for name, elem in elem_types.items()}
    return {name: _TYPE_NAMES.get(kind, kind) for name, kind in names.items()}
