"""TensorRT's ONNX parser rules, checked without TensorRT: both exported graphs follow them, and graphs
that break one (built by hand with onnx.helper, like the uint8 Transpose of the first exporter) are
refused with one line naming the graph, the node and the rule."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from trt_relabel.tensorrt_engine import build_engine
from trt_relabel.trt_compat import TensorRTCompatError, check_tensorrt_compatible, tensorrt_problems


def test_both_exported_graphs_follow_tensorrts_rules(bundled_graphs):
    for path in (bundled_graphs.fp32, bundled_graphs.fp16):
        check_tensorrt_compatible(path)
        model = onnx.load(str(path), load_external_data=False)
        first = model.graph.node[0]
        assert (first.op_type, list(first.input)) == ("Cast", ["pixels"])  # no uint8 tensor inside the graph


def relabel_like(
    *,
    transpose_first: bool = False,
    k: int = 2,
    k_constant: bool = True,
    spatial: object = 8,
    opset: int = 20,
    extra: list | None = None,
) -> onnx.ModelProto:
    """A small graph with the relabel graph's shape: pixels uint8 [B, S, S, 3] -> Cast -> Transpose -> TopK
    over the channels -> values float [B, k, S, S], indices int32. `transpose_first` puts the Transpose
    on the uint8 pixels (the first exporter's order)."""
    pixels = helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["batch", spatial, 8, 3])
    values = helper.make_tensor_value_info("values", TensorProto.FLOAT, ["batch", k, spatial, 8])
    indices = helper.make_tensor_value_info("indices", TensorProto.INT32, ["batch", k, spatial, 8])
    if transpose_first:
        nodes = [
            helper.make_node("Transpose", ["pixels"], ["nchw_u8"], name="permute", perm=[0, 3, 1, 2]),
            helper.make_node("Cast", ["nchw_u8"], ["nchw"], name="to_float", to=TensorProto.FLOAT),
        ]
    else:
        nodes = [
            helper.make_node("Cast", ["pixels"], ["nhwc"], name="to_float", to=TensorProto.FLOAT),
            helper.make_node("Transpose", ["nhwc"], ["nchw"], name="permute", perm=[0, 3, 1, 2]),
        ]
    inputs = [pixels]
    initializers = []
    if k_constant:
        initializers.append(numpy_helper.from_array(np.array([k], np.int64), "k"))
    else:
        inputs.append(helper.make_tensor_value_info("k", TensorProto.INT64, [1]))
    nodes += [
        *(extra or []),
        helper.make_node("TopK", ["nchw", "k"], ["values", "indices64"], name="topk", axis=1),
        helper.make_node("Cast", ["indices64"], ["indices"], name="to_int32", to=TensorProto.INT32),
    ]
    graph = helper.make_graph(nodes, "relabel_like", inputs, [values, indices], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_the_hand_built_graph_passes():
    assert tensorrt_problems(relabel_like()) == []


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        (relabel_like(transpose_first=True), "node 'permute' (Transpose): tensor 'pixels' is UINT8"),
        (relabel_like(k_constant=False), "node 'topk' (TopK): K is not a constant"),
        (relabel_like(k=5000), "node 'topk' (TopK): K = 5000; TensorRT's TopK takes K <= 3840"),
        (relabel_like(spatial="height"), "network input 'pixels': dimension 1 is not static"),
        (relabel_like(opset=22), "opset 22: TensorRT 10.0 parses opsets 9 to 20"),
        (
            relabel_like(extra=[helper.make_node("Unique", ["nchw"], ["unique"], name="unique")]),
            "node 'unique' (Unique): not in TensorRT's list of ONNX operators",
        ),
        (
            relabel_like(
                extra=[
                    helper.make_node("Cast", ["nchw"], ["flags"], name="to_bool", to=TensorProto.BOOL),
                    helper.make_node("Relu", ["flags"], ["relu"], name="relu_bool"),
                ]
            ),
            "node 'relu_bool' (Relu): tensor 'flags' is BOOL",
        ),
        (
            relabel_like(
                extra=[
                    helper.make_node("Cast", ["nchw"], ["small"], name="to_uint8", to=TensorProto.UINT8),
                    helper.make_node("Cast", ["small"], ["back"], name="from_uint8", to=TensorProto.FLOAT),
                ]
            ),
            "node 'to_uint8' (Cast): uint8 tensor 'small' inside the graph",
        ),
    ],
)
def test_a_broken_rule_is_named(model, problem):
    problems = tensorrt_problems(model)
    assert problems and problems[0].startswith(problem), problems


def test_the_first_exporters_graph_is_refused_in_one_line_before_tensorrt_loads(tmp_path):
    path = tmp_path / "old.fp16.onnx"
    onnx.save(relabel_like(transpose_first=True), str(path))
    with pytest.raises(TensorRTCompatError) as error:
        check_tensorrt_compatible(path)
    message = str(error.value)
    assert message.startswith(f"{path}: TensorRT would refuse it: node 'permute' (Transpose)")
    assert "(and 1 more)" in message and "\n" not in message
    # build_engine checks first: the rule is reported here, where TensorRT cannot even be imported
    with pytest.raises(TensorRTCompatError, match="node 'permute'"):
        build_engine(path, log=lambda _: None)
