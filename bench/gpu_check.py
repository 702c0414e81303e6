"""GPU check: throughput and parity of the GPU paths on one CUDA GPU, no network, a few minutes.

    python bench/gpu_check.py [--images DIR] [--out report.json] [--skip-l2]

1. Teacher throughput (model only, uint8 pixels already on the GPU, batch 32 at 475): the torch
   CUDA backend in fp32 NCHW (the reference), fp32 channels_last, fp16 channels_last — for the
   bundled EfficientNet-Lite0 and for the paper's architecture (timm tf_efficientnet_l2, random
   weights) — and TensorRT FP16 when `tensorrt` is importable.
2. fp16 vs fp32 label maps agree (cells with a clear fp32 margin keep their top-1).
3. label_pooling on CUDA against torchvision's CUDA roi_align on the dense map (B=256, k=5, 15x15).
4. GPU JPEG decode + resize against the CPU path.
5. `generate` end to end on the GPU (`--backend torch`, CPU and GPU decode) over --images.
6. `train` on CUDA: resnet18 on --images in 4 class folders, relabel targets with CutMix and
   local labels, bf16 AMP, channels_last, 2 epochs then --resume to a 3rd.
7. ONNX Runtime on the GPU: the providers that really run, and what was reported (issue 16).
8. With TensorRT: parser-rule check, engine build and rebuild from the timing cache, throughput,
   GPU pixels from a busy stream, a second GPU when present (issue 16).
(bench/gpu_check.sh then runs the CUDA/TensorRT tests and bench/train_step.py on CUDA.)
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch

from trt_relabel.backends import tensorrt_importable
from trt_relabel.export import PreparedTeacher, build_graphs, prepare_teacher, relabel_graph

report: dict = {}


def log(key: str, value) -> None:
    report[key] = value
    print(f"{key}: {json.dumps(value)}", flush=True)


def cuda_rate(fn, batch: int, iters: int, warmup: int = 2) -> float:
    """Images per second of fn() (one batch of `batch` images), timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return batch * iters / (start.elapsed_time(end) / 1000)


def teacher_throughput(name: str, prepared: PreparedTeacher, batch: int, iters: int) -> dict:
    size = prepared.metadata.input_size
    pixels = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device="cuda")
    rates = {}
    torch.backends.cudnn.benchmark = True
    variants = (("fp32 NCHW (reference)", "fp32", False), ("fp32 channels_last", "fp32", True),
                ("fp16 channels_last", "fp16", True))  # fmt: skip
    for label, precision, channels_last in variants:
        graph = relabel_graph(prepared, precision, channels_last).cuda()
        with torch.inference_mode():
            rates[label] = round(cuda_rate(lambda g=graph: g(pixels), batch, iters), 1)
        del graph
        torch.cuda.empty_cache()
    prepared.fcn.cpu()
    reference = rates["fp32 NCHW (reference)"]
    result = {"img_per_s": rates, "x_vs_fp32": {k: round(v / reference, 2) for k, v in rates.items()}}
    log(f"throughput {name} @{size} batch {batch}", result)
    return result


def l2_teacher() -> PreparedTeacher:
    """The paper's teacher architecture at 475 with random weights (the hub is out of reach)."""
    return prepare_teacher("efficientnet_l2_ns_475", pretrained=False)


def fp16_agreement(prepared, photos: np.ndarray) -> dict:
    pixels = torch.from_numpy(photos).cuda()
    with torch.inference_mode():
        v32, i32 = relabel_graph(prepared, "fp32").cuda()(pixels)
        v16, i16 = relabel_graph(prepared, "fp16", channels_last=True).cuda()(pixels)
    clear = (v32[:, 0] - v32[:, 1]) > 0.1
    agree = (i16[:, 0] == i32[:, 0])[clear].float().mean().item()
    all_agree = (i16[:, 0] == i32[:, 0]).float().mean().item()
    result = {"clear_cells_top1_agreement": agree, "all_cells_top1_agreement": round(all_agree, 4),
              "max_abs_logit_diff_top1": (v16[:, 0].float() - v32[:, 0]).abs().max().item()}  # fmt: skip
    log("fp16 vs fp32 label maps (lite0, real photos)", result)
    return result


def pooling_check() -> dict:
    from torchvision.ops import roi_align

    from trt_relabel.pooling import label_pooling

    g = torch.Generator(device="cuda").manual_seed(0)
    batch, k, h, w, classes = 256, 5, 15, 15, 1000
    values = torch.randn(batch, k, h, w, device="cuda", generator=g).sort(1, descending=True).values
    indices = torch.stack([torch.randperm(classes, device="cuda", generator=g)[:k] for _ in range(batch * h * w)])
    indices = indices.view(batch, h, w, k).permute(0, 3, 1, 2).contiguous()
    xy = torch.rand(batch, 2, device="cuda", generator=g) * 0.6
    boxes = torch.cat([xy, xy + 0.1 + torch.rand(batch, 2, device="cuda", generator=g) * 0.3], 1)

    def official():
        dense = torch.zeros(batch, classes, h, w, device="cuda")
        dense.scatter_(1, indices.long(), values)
        scale = torch.tensor([w, h, w, h], device="cuda")
        rois = torch.cat([torch.arange(batch, device="cuda")[:, None].float(), boxes * scale - 0.5], 1)
        return roi_align(dense, rois, output_size=1, spatial_scale=1.0, sampling_ratio=-1, aligned=False).flatten(1)

    ours = label_pooling(values, indices, boxes, classes)
    diff = (ours - official()).abs().max().item()
    rate_ours = cuda_rate(lambda: label_pooling(values, indices, boxes, classes), 1, 50)
    rate_official = cuda_rate(official, 1, 50)
    result = {"max_abs_diff": diff, "ms_label_pooling": round(1000 / rate_ours, 4),
              "ms_dense_roi_align": round(1000 / rate_official, 4)}  # fmt: skip
    log("label_pooling CUDA vs torchvision roi_align CUDA (B=256, k=5, 15x15, C=1000)", result)
    return result


def decode_check(images: list[Path], size: int) -> dict:
    from trt_relabel.gpu_decode import decode_resize_jpegs, is_gpu_decodable
    from trt_relabel.images import load_rgb, resize_whole

    datas = [p.read_bytes() for p in images]
    jpegs = [d for d in datas if is_gpu_decodable(d)]
    paths = [p for p, d in zip(images, datas, strict=True) if is_gpu_decodable(d)]
    pixels, failed = decode_resize_jpegs(jpegs, size, "bicubic", torch.device("cuda"))
    rejected = set(failed)
    ok = [p for n, p in enumerate(paths) if n not in rejected]
    cpu = np.stack([resize_whole(load_rgb(p), size, "bicubic") for p in ok])
    diff = np.abs(pixels.cpu().numpy().astype(int) - cpu.astype(int))
    torch.cuda.synchronize()
    t = time.perf_counter()
    for start in range(0, len(jpegs), 64):
        decode_resize_jpegs(jpegs[start : start + 64], size, "bicubic", torch.device("cuda"))
    torch.cuda.synchronize()
    gpu_rate = len(jpegs) / (time.perf_counter() - t)
    t = time.perf_counter()
    for p in ok[:64]:
        resize_whole(load_rgb(p), size, "bicubic")
    cpu_rate = min(64, len(ok)) / (time.perf_counter() - t)
    result = {"jpegs": len(jpegs), "nvjpeg_failed": len(failed), "mean_abs_diff": float(diff.mean()),
              "max_abs_diff": int(diff.max()), "gpu_decode_resize_img_per_s": round(gpu_rate, 1),
              "cpu_decode_resize_img_per_s_one_core": round(cpu_rate, 1)}  # fmt: skip
    log("GPU JPEG decode + resize vs CPU path", result)
    return result


def generate_check(images: Path, engines: Path) -> dict:
    from trt_relabel.generate import generate
    from trt_relabel.store import LabelStore

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for decode in ("cpu", "gpu"):
            r = generate(images, Path(tmp) / decode, backend="torch", batch_size=64, engines_dir=engines,
                         decode=decode, progress=False)  # fmt: skip
            results[f"decode {decode}"] = {"backend": r.backend, "img_per_s": round(r.images_per_second, 1),
                                           "steady_img_per_s": round(r.steady_images_per_second, 1),
                                           "labelled": r.labelled, "failed": r.failed}  # fmt: skip
        a, b = LabelStore(Path(tmp) / "cpu"), LabelStore(Path(tmp) / "gpu")
        same = (a.indices[:, 0] == b.indices[:, 0]).mean()
        results["top1 cell agreement cpu-decode vs gpu-decode"] = round(float(same), 4)
        truth = _imagenet_truth(a)
        if truth is not None:
            results["pooled top1 accuracy vs file-name class (gpu decode)"] = _pooled_accuracy(b, truth)
    log("generate end to end on the GPU (torch fp16 backend)", results)
    return results


def train_check(photos: list[Path], engines: Path) -> dict:
    from trt_relabel.generate import generate
    from trt_relabel.trainer import load_config, train

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        for n, photo in enumerate(photos[:128]):
            (data / f"class{n % 4}").mkdir(parents=True, exist_ok=True)
            (data / f"class{n % 4}" / photo.name).symlink_to(photo.resolve())
        generate(data, Path(tmp) / "store", backend="torch", batch_size=64, engines_dir=engines, progress=False)
        options = dict(data=data, labels=Path(tmp) / "store", out=Path(tmp) / "run", model="resnet18",
                       batch_size=32, image_size=128, lr=0.05, warmup_epochs=0.5, cutmix=1.0, local_labels=3,
                       channels_last=True, val=data, workers=4)  # fmt: skip
        started = time.perf_counter()
        first = train(load_config(epochs=2, **options))
        seconds = time.perf_counter() - started
        resumed = train(load_config(epochs=3, resume=True, **options))
        lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
    result = {"epochs_run": [first.epochs, resumed.epochs], "metrics_lines": len(lines),
              "train_loss": [round(m["train_loss"], 4) for m in first.metrics + resumed.metrics],
              "val_top1": [m["val_top1"] for m in first.metrics + resumed.metrics],
              "seconds_2_epochs": round(seconds, 1)}  # fmt: skip
    log("train on CUDA (resnet18 @128, relabel + CutMix + local labels, bf16, resume)", result)
    return result


def _imagenet_truth(store) -> np.ndarray | None:
    synsets_file = Path(timm.__file__).parent / "data" / "_info" / "imagenet_synsets.txt"
    synsets = {s: n for n, s in enumerate(sorted(synsets_file.read_text().split()))}
    truth = [synsets.get(Path(s.path).name.split("_")[0], -1) for s in store.samples]
    return np.array(truth) if min(truth) >= 0 else None


def _pooled_accuracy(store, truth: np.ndarray) -> float:
    from trt_relabel.pooling import label_pooling

    values, indices = torch.from_numpy(store.values.astype(np.float32)), torch.from_numpy(np.array(store.indices))
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(len(store), 1)
    top1 = label_pooling(values, indices, boxes, store.num_classes).argmax(1).numpy()
    return round(float((top1 == truth).mean()), 4)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=Path, default=None, help="folder of JPEG photos for decode/generate")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--engines", type=Path, default=Path(tempfile.mkdtemp()) / "engines")
    parser.add_argument("--skip-l2", action="store_true")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    log("environment", {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                        "python": platform.python_version(), "tensorrt": tensorrt_importable()})  # fmt: skip
    steps = [("pooling", pooling_check)]
    prepared = prepare_teacher()
    steps.append(("lite0", lambda: teacher_throughput("efficientnet_lite0", prepared, args.batch, 20)))
    if args.images:
        from trt_relabel.images import load_rgb, resize_whole

        photos = sorted(args.images.glob("*.JPEG"))
        steps.append(("decode", lambda: decode_check(photos, 475)))
        sample = np.stack([resize_whole(load_rgb(p), 475, "bicubic") for p in photos[:32]])
        steps.append(("fp16", lambda: fp16_agreement(prepared, sample)))
        steps.append(("generate", lambda: generate_check(args.images, args.engines)))
        steps.append(("train", lambda: train_check(photos, args.engines)))
    steps.append(("onnxruntime", lambda: onnxruntime_check(args.engines, args.batch)))
    if tensorrt_importable():
        steps.append(("tensorrt", lambda: tensorrt_check(args.engines, args.batch)))
    if not args.skip_l2:
        steps.append(
            ("l2", lambda: teacher_throughput("tf_efficientnet_l2 (random weights)", l2_teacher(), args.batch, 5))
        )
    for name, step in steps:
        start = time.perf_counter()
        try:
            step()
        except Exception as e:  # noqa: BLE001 - a failed step is reported, the others still run
            log(f"{name} FAILED", f"{type(e).__name__}: {e}")
        print(f"[{name}: {time.perf_counter() - start:.1f} s]", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


def tensorrt_check(engines: Path, batch: int) -> dict:
    """Issue 16 on a GPU: the graphs pass the parser-rule check and TensorRT builds them; a rebuild
    reuses the timing cache; the plan runs; GPU pixels written on a busy stream give the labels of
    the same pixels from the host (the copy waits for the producing stream); a second GPU, if any,
    builds and runs its own engine."""
    from trt_relabel.tensorrt_engine import EngineSidecar, TensorRTBackend, build_engine
    from trt_relabel.trt_compat import check_tensorrt_compatible

    graphs = build_graphs(out_dir=engines)
    for path in (graphs.fp32, graphs.fp16):
        check_tensorrt_compatible(path)
    seconds = []
    for _ in range(2):  # the second build starts from the timing cache the first one saved
        started = time.perf_counter()
        plan = build_engine(graphs.fp16, max_batch=batch)
        seconds.append(round(time.perf_counter() - started, 1))
        if len(seconds) == 1:
            plan.unlink()
    backend = TensorRTBackend(plan, max_batch=batch)
    pixels = np.random.default_rng(0).integers(0, 256, (batch, 475, 475, 3), dtype=np.uint8)
    rate = cuda_rate(lambda: backend(pixels), batch, 20)
    stream_rate = cuda_rate(lambda: list(backend.stream((n, pixels) for n in range(8))), batch * 8, 3)
    host_values, host_indices = backend(pixels)
    source = torch.from_numpy(pixels).cuda()
    same = []
    for _ in range(5):
        on_gpu = torch.zeros_like(source)
        torch.cuda._sleep(200_000_000)
        on_gpu.copy_(source)
        same.append(bool(np.array_equal(backend(on_gpu)[1], host_indices)))
    result = {"tensorrt_fp16_img_per_s": round(rate, 1), "tensorrt_fp16_streamed_img_per_s": round(stream_rate, 1),
              "build_seconds_first_then_with_timing_cache": seconds,
              "gpu_pixels_from_busy_stream_same_labels": same}  # fmt: skip
    if torch.cuda.device_count() > 1:
        second = engines / "gpu1"
        second.mkdir(exist_ok=True)
        graph = second / graphs.fp16.name
        graph.write_bytes(graphs.fp16.read_bytes())
        plan1 = build_engine(graph, max_batch=batch, device=1)
        on_gpu1 = TensorRTBackend(plan1, max_batch=batch, device=1)(pixels)[1]
        result["gpu1"] = {"sidecar_gpu": EngineSidecar.load(plan1.with_suffix(".json")).gpu_name,
                          "same_top1_as_gpu0": float((on_gpu1[:, 0] == host_indices[:, 0]).mean())}  # fmt: skip
    log("TensorRT FP16 engine (lite0 @475)", result)
    return result


def onnxruntime_check(engines: Path, batch: int) -> dict:
    """Issue 16 on a GPU: which ONNX Runtime build and providers run here, what a session asked for
    the best GPU provider really runs with, and whether anything was reported."""
    from trt_relabel.backends import onnxruntime_providers, open_backend

    lines: list[str] = []
    backend = open_backend("onnxruntime", engines_dir=engines, max_batch=batch, log=lines.append)
    pixels = np.random.default_rng(0).integers(0, 256, (batch, 475, 475, 3), dtype=np.uint8)
    backend(pixels)
    started = time.perf_counter()
    for _ in range(5):
        backend(pixels)
    rate = batch * 5 / (time.perf_counter() - started)
    import onnxruntime

    result = {"onnxruntime": onnxruntime.__version__, "available_providers": onnxruntime_providers(),
              "backend": backend.name, "fell_back": backend.fell_back, "reported": lines,
              "img_per_s": round(rate, 1)}  # fmt: skip
    log("ONNX Runtime on the GPU (lite0 @475, best provider)", result)
    return result


if __name__ == "__main__":
    main()
