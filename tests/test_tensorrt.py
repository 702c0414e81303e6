"""Everything around TensorRT that runs without it: sidecar validation, batch profiles, backend and
provider choice. The engine itself is built and compared only where TensorRT and a GPU exist."""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest

from trt_relabel import backends
from trt_relabel.backends import (
    BackendError,
    OnnxRuntimeBackend,
    choose_backend,
    ort_providers,
    parse_device,
    tensorrt_provider_fits,
    tensorrt_provider_options,
)
from trt_relabel.errors import RelabelError, UsageError
from trt_relabel.export import GraphMetadata
from trt_relabel.tensorrt_engine import (
    EngineError,
    EngineSidecar,
    Environment,
    batch_profile,
    check_sidecar,
    engine_path,
    load_timing_cache,
    save_timing_cache,
    timing_cache_path,
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
        plan_sha256="cd" * 32,
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


@pytest.fixture
def asked(monkeypatch) -> list[dict[str, dict[str, str]]]:
    """provider -> options of each ONNX Runtime session created during the test (real sessions)."""
    import onnxruntime

    sessions = []
    real_session = onnxruntime.InferenceSession

    def recording_session(*args, **kwargs):
        sessions.append(dict(zip(kwargs["providers"], kwargs["provider_options"], strict=True)))
        return real_session(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording_session)
    return sessions


def test_onnxruntime_gpu_providers_run_on_the_asked_gpu(bundled_graphs, monkeypatch, asked):
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    monkeypatch.setattr(backends, "onnxruntime_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    engines = bundled_graphs.fp32.parent
    backend = backends.open_backend("onnxruntime", engines_dir=engines, device="cuda:1", log=lambda _: None)
    assert asked == [{"CUDAExecutionProvider": {"device_id": "1"}, "CPUExecutionProvider": {}}]
    assert backend.fell_back  # no CUDA provider here: the session runs on the CPU
    backends.open_backend("onnxruntime", engines_dir=engines, log=lambda _: None)
    assert asked[1]["CUDAExecutionProvider"] == {"device_id": "0"}
    backends.open_backend("onnxruntime", engines_dir=engines, device="cpu", log=lambda _: None)
    assert asked[2] == {"CPUExecutionProvider": {}}


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


def test_device_parsing():
    assert parse_device("cpu") is None
    assert parse_device("cuda:1") == 1
    assert parse_device("cuda:0") == 0
    if not backends.cuda_available():
        assert parse_device(None) == parse_device("cuda") == 0
    for bad in ("tpu", "cuda:x", "gpu1"):
        with pytest.raises(UsageError, match="expected cpu, cuda or cuda:N"):
            parse_device(bad)


def test_tensorrt_backend_refuses_the_cpu_device(monkeypatch, tmp_path):
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    monkeypatch.setattr(backends, "tensorrt_importable", lambda: True)
    with pytest.raises(BackendError, match="runs on a CUDA GPU, not on device cpu"):
        backends.open_backend("tensorrt", engines_dir=tmp_path, device="cpu", log=lambda _: None)


class StandInBuilderConfig:
    """A stand-in for `tensorrt.IBuilderConfig`'s timing-cache methods (TensorRT is not installed here):
    TensorRT refuses a cache whose bytes it did not write for this version and GPU (`set_timing_cache`
    returns False), and `get_timing_cache` may return None."""

    def __init__(self, accepts: tuple[bytes, ...] = (b"",), has_cache: bool = True):
        self.accepts, self.has_cache, self.cache = accepts, has_cache, None

    def create_timing_cache(self, serialized: bytes):
        return StandInCache(bytes(serialized))

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        assert ignore_mismatch is False
        if cache.data not in self.accepts:
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return StandInCache(self.cache.data + b"+tuned") if self.has_cache else None


class StandInCache:
    def __init__(self, data: bytes):
        self.data = data

    def serialize(self) -> memoryview:
        return memoryview(self.data)


def test_timing_cache_of_another_tensorrt_or_gpu_starts_empty(tmp_path):
    path = timing_cache_path(tmp_path, H100)
    lines = []
    config = StandInBuilderConfig(accepts=(b"", b"cache of this gpu"))
    load_timing_cache(config, path, lines.append)  # no file yet: an empty cache, silently
    assert config.cache.data == b"" and lines == []
    path.write_bytes(b"cache of this gpu")
    load_timing_cache(config, path, lines.append)
    assert config.cache.data == b"cache of this gpu" and lines == []
    path.write_bytes(b"cache of another gpu")
    load_timing_cache(config, path, lines.append)
    assert config.cache.data == b"" and lines == [
        f"timing cache {path} does not fit this TensorRT and GPU; starting an empty one"
    ]
    with pytest.raises(EngineError, match="refuses even an empty timing cache"):
        load_timing_cache(StandInBuilderConfig(accepts=()), path, lines.append)


def test_timing_cache_is_saved_only_when_tensorrt_has_one(tmp_path):
    path = tmp_path / "timing.cache"
    config = StandInBuilderConfig()
    load_timing_cache(config, path, print)
    save_timing_cache(config, path)
    assert path.read_bytes() == b"+tuned"
    path.unlink()
    no_cache = StandInBuilderConfig(has_cache=False)
    load_timing_cache(no_cache, path, print)
    save_timing_cache(no_cache, path)  # get_timing_cache() gave None: nothing written, no error
    assert not path.exists()


def test_timing_cache_file_is_keyed_by_tensorrt_version_and_gpu(tmp_path):
    names = {
        timing_cache_path(tmp_path, env).name
        for env in (
            H100,
            dataclasses.replace(H100, tensorrt_version="11.1.0"),
            Environment("10.13.0", "NVIDIA A100-SXM4-80GB", "8.0"),
        )
    }
    assert len(names) == 3
    assert timing_cache_path(tmp_path, H100).name == "tensorrt-timing-10.13.0-NVIDIA_H100_80GB_HBM3-sm9.0.cache"


def test_tensorrt_provider_options():
    options = tensorrt_provider_options(METADATA, 1, 32, backends.Path("/e/ort"))
    assert options["trt_profile_min_shapes"] == "pixels:1x475x475x3"
    assert options["trt_profile_opt_shapes"] == options["trt_profile_max_shapes"] == "pixels:32x475x475x3"
    assert options["trt_engine_cache_enable"] == options["trt_timing_cache_enable"] == "True"
    assert options["trt_engine_cache_path"] == "/e/ort" and options["device_id"] == "1"
    assert options["trt_fp16_enable"] == "False"  # the FP16 graph is strongly typed already
    assert tensorrt_provider_fits("10.13.0", "1.22.0") and tensorrt_provider_fits(None, "1.20.1")
    assert not tensorrt_provider_fits("11.1.0", "1.26.2") and tensorrt_provider_fits("11.1.0", "1.27.0")


def test_onnxruntime_tensorrt_provider_gets_its_options(bundled_graphs, monkeypatch, asked):
    import onnxruntime

    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(backends, "onnxruntime_providers", lambda: available)
    monkeypatch.setattr(backends, "_installed_version", lambda _: "10.13.0")
    engines = bundled_graphs.fp32.parent
    lines = []
    backends.open_backend("onnxruntime", engines_dir=engines, device="cuda:1", max_batch=16, log=lines.append)
    trt_options = asked[0]["TensorrtExecutionProvider"]
    assert trt_options["trt_profile_max_shapes"] == "pixels:16x475x475x3" and trt_options["device_id"] == "1"
    assert trt_options["trt_engine_cache_path"] == str(engines / "onnxruntime-tensorrt")
    assert asked[0]["CUDAExecutionProvider"] == {"device_id": "1"}
    monkeypatch.setattr(backends, "_installed_version", lambda _: "11.1.0")
    monkeypatch.setattr(onnxruntime, "__version__", "1.26.0")
    backends.open_backend("onnxruntime", engines_dir=engines, log=lines.append)
    assert list(asked[1]) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert any("cannot run TensorRT 11.1.0" in line for line in lines)


def test_cuda_without_onnxruntimes_cuda_provider_is_one_line(bundled_graphs, monkeypatch):
    monkeypatch.setattr(backends, "cuda_available", lambda: True)  # the real ONNX Runtime here is the CPU build
    lines = []
    backend = backends.open_backend("onnxruntime", engines_dir=bundled_graphs.fp32.parent, log=lines.append)
    assert backend.name == "onnxruntime (CPUExecutionProvider, fp32)"
    assert lines == [
        "a CUDA GPU is here but this ONNX Runtime has no CUDA provider, so it runs on the CPU; install its GPU "
        "build alone: pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'trt-relabel[gpu]'"
    ]


def test_a_provider_switch_during_a_run_is_reported(bundled_graphs):
    """ONNX Runtime's own fall-back: a provider failing inside run() makes the session switch to its
    fall-back providers and run again; the backend says so and its name follows."""
    from onnxruntime.capi.onnxruntime_pybind11_state import EPFail

    lines = []
    providers = ["AzureExecutionProvider", "CPUExecutionProvider"]
    backend = OnnxRuntimeBackend(bundled_graphs.fp32, bundled_graphs.metadata, providers, log=lines.append)
    assert not backend.fell_back and backend.name == "onnxruntime (AzureExecutionProvider, fp32)"

    class FailingOnce:
        def __init__(self, session):
            self.session = session

        def run(self, *args):
            raise EPFail("the provider failed during the run")

        def __getattr__(self, name):
            return getattr(self.session, name)

    backend.session._sess = FailingOnce(backend.session._sess)
    values, _ = backend(np.zeros((1, 475, 475, 3), np.uint8))
    assert values.shape == (1, 5, 15, 15)
    assert backend.fell_back and backend.name == "onnxruntime (CPUExecutionProvider, fp32)"
    assert lines == ["ONNX Runtime switched from AzureExecutionProvider to CPUExecutionProvider during a run"]


def needs_tensorrt_gpu(count: int = 1):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (its wheels come from NVIDIA's index)")
    if not backends.cuda_available() or backends.torch.cuda.device_count() < count:
        pytest.skip(f"needs {count} CUDA GPU(s)")


def test_tensorrt_waits_for_the_stream_that_made_gpu_pixels(bundled_graphs):
    """GPU pixels still being written on the caller's stream (nvJPEG decode) when the engine is called:
    the copy must wait for them. Without `wait_stream` the copy reads the buffer before the write."""
    needs_tensorrt_gpu()
    import torch

    from trt_relabel.tensorrt_engine import TensorRTBackend, build_engine

    engine = TensorRTBackend(build_engine(bundled_graphs.fp16, max_batch=8, log=lambda _: None), max_batch=8)
    photos = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (8, 475, 475, 3), dtype=np.uint8))
    expected_values, expected_indices = engine(photos.numpy())
    source = photos.cuda()
    torch.cuda.synchronize()
    for _ in range(3):
        pixels = torch.zeros_like(source)
        torch.cuda._sleep(200_000_000)  # the producing stream is busy for a while (~0.1 s)
        pixels.copy_(source)  # written on the current stream after the sleep
        values, indices = engine(pixels)
        del pixels  # freed right away: record_stream keeps it from being reused under the copy
        np.testing.assert_array_equal(indices, expected_indices)
        np.testing.assert_array_equal(values, expected_values)


def test_tensorrt_builds_and_runs_on_the_asked_gpu(bundled_graphs, tmp_path):
    needs_tensorrt_gpu(2)
    import torch

    from trt_relabel.tensorrt_engine import TensorRTBackend, build_engine

    graph = tmp_path / bundled_graphs.fp16.name
    graph.write_bytes(bundled_graphs.fp16.read_bytes())
    plan = build_engine(graph, max_batch=4, log=lambda _: None, device=1)
    sidecar = EngineSidecar.load(plan.with_suffix(".json"))
    assert sidecar.gpu_name == torch.cuda.get_device_name(1)
    engine = TensorRTBackend(plan, max_batch=4, device=1)
    pixels = np.random.default_rng(0).integers(0, 256, (4, 475, 475, 3), dtype=np.uint8)
    on_gpu0 = engine(pixels)
    with torch.cuda.device(0):  # the caller's current device does not matter
        assert np.array_equal(engine(torch.from_numpy(pixels).cuda(1))[1], on_gpu0[1])
    assert engine._slots[0]["dev_in"].device == torch.device("cuda", 1)


def test_no_onnxruntime_build_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # neither the cpu nor the gpu extra installed
    with pytest.raises(
        RelabelError, match=r"ONNX Runtime is not installed; install one build: pip install 'trt-relabel\[cpu\]'"
    ):
        backends.onnxruntime_providers()
