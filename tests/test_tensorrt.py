"""Everything around TensorRT that runs without it: sidecar validation, batch profiles, backend and
provider choice. The engine itself is built and compared only where TensorRT and a GPU exist."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from trt_relabel import backends
from trt_relabel.backends import BackendError, OnnxRuntimeBackend, choose_backend, ort_providers
from trt_relabel.errors import UsageError
from trt_relabel.export import GraphMetadata
from trt_relabel.tensorrt_engine import (
    EngineError,
    EngineSidecar,
    Environment,
    batch_profile,
    check_sidecar,
    engine_path,
)

METADATA = GraphMetadata(
    teacher="efficientnet_lite0",
    architecture="tf_efficientnet_lite0",
    input_size=475,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    interpolation="bicubic",
    topk=5,
    num_classes=1000,
    map_size=(15, 15),
    precision="fp16",
    teacher_hash="0123456789abcdef",
)
H100 = Environment("10.13.0", "NVIDIA H100 80GB HBM3", "9.0")


def sidecar(**changes) -> EngineSidecar:
    base = EngineSidecar(
        tensorrt_version=H100.tensorrt_version,
        gpu_name=H100.gpu_name,
        compute_capability=H100.compute_capability,
        graph="lite0.fp16.onnx",
        graph_sha256="ab" * 32,
        io={"pixels": {"mode": "input", "dtype": "DataType.UINT8", "shape": [-1, 475, 475, 3]}},
        profile=(1, 64, 64),
        metadata=METADATA,
        built_at="2026-11-27T00:00:00+00:00",
    )
    return dataclasses.replace(base, **changes)


def test_sidecar_round_trip(tmp_path):
    path = tmp_path / "lite0.fp16.json"
    sidecar().save(path)
    assert EngineSidecar.load(path) == sidecar()
    assert json.loads(path.read_text())["gpu_name"] == H100.gpu_name


def test_unreadable_sidecar_is_one_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(EngineError, match="unreadable engine sidecar"):
        EngineSidecar.load(path)


def test_matching_sidecar_is_accepted(tmp_path):
    check_sidecar(sidecar(), H100, tmp_path / "lite0.fp16.plan", max_batch=64)


@pytest.mark.parametrize(
    ("env", "cause"),
    [
        (dataclasses.replace(H100, tensorrt_version="11.0.0"), "built with TensorRT 10.13.0, this is TensorRT 11.0.0"),
        (Environment("10.13.0", "NVIDIA A100-SXM4-80GB", "8.0"), "built for NVIDIA H100 80GB HBM3"),
    ],
)
def test_engine_from_another_gpu_or_version_names_the_rebuild_command(tmp_path, env, cause):
    with pytest.raises(EngineError, match=cause) as error:
        check_sidecar(sidecar(), env, tmp_path / "lite0.fp16.plan")
    assert f"trt-relabel build-engine --teacher efficientnet_lite0 --size 475 --topk 5 --out {tmp_path}" in str(
        error.value
    )


def test_profile_too_small_is_refused(tmp_path):
    with pytest.raises(EngineError, match="up to 64, not 128.*--max-batch 128"):
        check_sidecar(sidecar(), H100, tmp_path / "x.plan", max_batch=128)


def test_batch_profile():
    assert batch_profile(64) == (1, 64, 64)
    assert batch_profile(128, 32) == (1, 32, 128)
    for bad in ((0, None), (16, 32), (16, 0)):
        with pytest.raises(EngineError):
            batch_profile(*bad)


def test_engine_path_sits_beside_the_graph(tmp_path):
    assert engine_path(tmp_path / "t-475-k5-abc.fp16.onnx") == tmp_path / "t-475-k5-abc.fp16.plan"


def test_auto_prefers_tensorrt_then_onnxruntime(monkeypatch):
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    monkeypatch.setattr(backends, "tensorrt_importable", lambda: True)
    assert choose_backend("auto") == "tensorrt"
    monkeypatch.setattr(backends, "tensorrt_importable", lambda: False)
    assert choose_backend("auto") == "onnxruntime"
    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    assert choose_backend("auto") == "onnxruntime"
    assert choose_backend("torch") == "torch"
    with pytest.raises(UsageError):
        choose_backend("openvino")


def test_onnxruntime_provider_choice(monkeypatch):
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    monkeypatch.setattr(
        backends,
        "onnxruntime_providers",
        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    assert ort_providers(None) == (
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        "fp16",
    )
    monkeypatch.setattr(backends, "onnxruntime_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert ort_providers("fp32") == (["CUDAExecutionProvider", "CPUExecutionProvider"], "fp32")
    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    assert ort_providers(None) == (["CPUExecutionProvider"], "fp32")


def test_missing_provider_fallback_is_detected_and_named(bundled_graphs):
    metadata = dataclasses.replace(bundled_graphs.metadata, precision="fp16")
    backend = OnnxRuntimeBackend(bundled_graphs.fp16, metadata, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert backend.fell_back
    assert backend.name == "onnxruntime (CPUExecutionProvider, fp16)"
    values, indices = backend(np.zeros((2, 475, 475, 3), np.uint8))
    assert values.dtype == np.float16 and indices.dtype == np.int32 and values.shape == (2, 5, 15, 15)


def test_onnxruntime_gpu_providers_run_on_the_asked_gpu(bundled_graphs, monkeypatch):
    import onnxruntime

    asked = []

    def recording_session(*args, **kwargs):
        asked.append(dict(zip(kwargs["providers"], kwargs["provider_options"], strict=True)))
        return real_session(*args, **kwargs)

    real_session = onnxruntime.InferenceSession
    monkeypatch.setattr(onnxruntime, "InferenceSession", recording_session)
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    monkeypatch.setattr(backends, "onnxruntime_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    engines = bundled_graphs.fp32.parent
    backend = backends.open_backend("onnxruntime", engines_dir=engines, device="cuda:1", log=lambda _: None)
    assert asked == [{"CUDAExecutionProvider": {"device_id": "1"}, "CPUExecutionProvider": {}}]
    assert backend.fell_back  # no CUDA provider here: the session runs on the CPU
    backends.open_backend("onnxruntime", engines_dir=engines, log=lambda _: None)
    assert asked[1]["CUDAExecutionProvider"] == {"device_id": "0"}


def test_tensorrt_backend_without_gpu_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    monkeypatch.setattr(backends, "tensorrt_importable", lambda: True)
    with pytest.raises(BackendError, match="needs TensorRT and a CUDA GPU; a CUDA GPU is missing"):
        backends.open_backend("tensorrt", engines_dir=tmp_path, log=lambda _: None)


def test_tensorrt_engine_matches_onnxruntime_fp16(bundled_graphs):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (its wheels come from NVIDIA's index)")
    if not backends.cuda_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from trt_relabel.tensorrt_engine import TensorRTBackend, build_engine

    plan = build_engine(bundled_graphs.fp16, max_batch=8, log=lambda _: None)
    engine = TensorRTBackend(plan, max_batch=8)
    assert trt.__version__ in engine.name
    pixels = np.random.default_rng(0).integers(0, 256, (8, 475, 475, 3), dtype=np.uint8)
    reference = OnnxRuntimeBackend(bundled_graphs.fp32, bundled_graphs.metadata, ["CPUExecutionProvider"])
    ref_values, ref_indices = reference(pixels)
    values, indices = engine(pixels)
    clear = (ref_values[:, 0] - ref_values[:, 1]) > 0.1
    np.testing.assert_array_equal(indices[:, 0][clear], ref_indices[:, 0][clear])
    streamed = list(engine.stream((n, pixels[n : n + 2]) for n in range(0, 8, 2)))
    np.testing.assert_array_equal(np.concatenate([s[1] for s in streamed]), values)
