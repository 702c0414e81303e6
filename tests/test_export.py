"""ONNX export of the bundled teacher: graph contract, metadata, parity with PyTorch, FP16 agreement,
and `trt-relabel build-engine` reusing unchanged graphs."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import CAT_CLASSES, COFFEE_CLASS, UNIFORM_CLASS
from PIL import Image

from trt_relabel.backends import TorchBackend
from trt_relabel.export import prepare_teacher, read_graph_metadata, relabel_graph
from trt_relabel.images import resize_whole
from trt_relabel.pooling import label_pooling

SIZE = 475


@pytest.fixture(scope="module")
def built(bundled_graphs):
    return bundled_graphs


@pytest.fixture(scope="module")
def pixels(photos) -> np.ndarray:
    """uint8 [4, S, S, 3]: coffee, chelsea, grace_hopper, rocket resized whole."""
    names = ("coffee", "chelsea", "grace_hopper", "rocket")
    return np.stack([resize_whole(Image.fromarray(photos[n]), SIZE, "bicubic") for n in names])


def run(path, pixels):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixels": pixels})


def pooled_top1(values: np.ndarray, indices: np.ndarray, num_classes: int = 1000) -> np.ndarray:
    """Global pooled top-1 of top-k maps: LabelPooling over the whole image (the mean over cells)."""
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(len(values), 1)
    pooled = label_pooling(torch.from_numpy(values.astype(np.float32)), torch.from_numpy(indices), boxes, num_classes)
    return pooled.argmax(1).numpy()


def test_graph_contract_and_metadata(built):
    for path, precision in ((built.fp32, "fp32"), (built.fp16, "fp16")):
        model = onnx.load(str(path))
        (pixels,) = model.graph.input
        assert pixels.name == "pixels"
        assert pixels.type.tensor_type.elem_type == onnx.TensorProto.UINT8
        dims = pixels.type.tensor_type.shape.dim
        assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [SIZE, SIZE, 3]
        assert [o.name for o in model.graph.output] == ["values", "indices"]
        value_type = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.FLOAT
        assert model.graph.output[0].type.tensor_type.elem_type == value_type
        assert model.graph.output[1].type.tensor_type.elem_type == onnx.TensorProto.INT32
        assert read_graph_metadata(path) == dataclasses.replace(built.metadata, precision=precision)
    assert built.metadata.map_size == (15, 15) and built.metadata.topk == 5


def test_fp32_graph_matches_pytorch_on_photos(built, pixels):
    values, indices = run(built.fp32, pixels)
    graph = relabel_graph(prepare_teacher(size=SIZE))
    with torch.no_grad():
        torch_values, torch_indices = graph(torch.from_numpy(pixels))
    assert values.shape == indices.shape == (4, 5, 15, 15)
    assert np.abs(values - torch_values.numpy()).max() <= 1e-3
    assert (np.diff(values, axis=1) <= 0).all()  # descending along k
    top1 = pooled_top1(values, indices)
    assert top1[0] == COFFEE_CLASS and top1[1] in CAT_CLASSES and top1[2] == UNIFORM_CLASS


def test_torch_layouts_agree_and_keep_the_shared_weights_nchw(pixels):
    prepared = prepare_teacher(size=SIZE)
    nchw = TorchBackend(relabel_graph(prepared), prepared.metadata, torch.device("cpu"))
    channels_last = TorchBackend(relabel_graph(prepared, channels_last=True), prepared.metadata, torch.device("cpu"))
    assert nchw.name == "torch (cpu, fp32, NCHW)" and channels_last.name == "torch (cpu, fp32, channels_last)"
    assert all(p.is_contiguous() for p in prepared.fcn.parameters())  # the channels_last copy is its own
    assert any(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in channels_last.module.parameters())  # fmt: skip
    (values, indices), (cl_values, cl_indices) = nchw(pixels), channels_last(pixels)
    assert np.abs(values - cl_values).max() <= 1e-3 and (indices[:, 0] == cl_indices[:, 0]).mean() > 0.99


def test_fp16_graph_agrees_with_fp32(built, pixels):
    values32, indices32 = run(built.fp32, pixels)
    values16, indices16 = run(built.fp16, pixels)
    assert values16.dtype == np.float16
    clear = (values32[:, 0] - values32[:, 1]) > 0.1
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(indices16[:, 0][clear], indices32[:, 0][clear])
    np.testing.assert_array_equal(pooled_top1(values16, indices16), pooled_top1(values32, indices32))


def test_batch_dimension_is_dynamic(built, pixels):
    whole, _ = run(built.fp32, pixels)
    single, _ = run(built.fp32, pixels[1:2])
    assert np.abs(single[0] - whole[1]).max() <= 1e-4


def test_content_hash_follows_weights_and_options(tmp_path):
    base = prepare_teacher(size=224).metadata.teacher_hash
    assert prepare_teacher(size=224).metadata.teacher_hash == base
    assert prepare_teacher(size=224, topk=3).metadata.teacher_hash != base
    assert prepare_teacher(size=256).metadata.teacher_hash != base
    teacher = prepare_teacher(size=224)
    state = teacher.fcn.model.state_dict()
    state["classifier.bias"] = state["classifier.bias"] + 1
    torch.save(state, tmp_path / "changed.pth")
    assert prepare_teacher(checkpoint=tmp_path / "changed.pth", size=224).metadata.teacher_hash != base


def test_build_engine_reuses_unchanged_graphs(built):
    mtimes = [os.stat(p).st_mtime_ns for p in (built.fp32, built.fp16)]
    out = str(built.fp32.parent)
    command = [sys.executable, "-m", "trt_relabel", "build-engine", "--size", str(SIZE), "--out", out]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "unchanged, reused" in result.stderr
    assert "both graphs follow TensorRT's ONNX parser rules" in result.stderr
    assert "engine step skipped: it needs TensorRT and a CUDA GPU" in result.stderr
    assert [os.stat(p).st_mtime_ns for p in (built.fp32, built.fp16)] == mtimes
