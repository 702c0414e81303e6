"""The CPU's ceiling for the relabel graph: how many images per second fp32 arithmetic allows here.

Counts the multiply-adds of one image through the relabel graph (every convolution, the classifier
applied as a 1x1 convolution included), measures the best fp32 matrix-multiply rate of ONNX
Runtime on this machine (the kernel its 1x1 convolutions run on, and the most any of them can
reach) and eager PyTorch fp32 on a few batches, then prints the rate no exact fp32 backend can pass
here and how it compares with a multiple of eager PyTorch.

    python bench/cpu_ceiling.py [--teacher efficientnet_lite0] [--size N] [--goal 8]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from trt_relabel.export import prepare_teacher, relabel_graph


def conv_macs(module: torch.nn.Module, size: int) -> int:
    """Multiply-adds of every Conv2d for one uint8 [1, size, size, 3] image through `module`."""
    total = 0

    def count(conv: torch.nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        kernel_h, kernel_w = conv.kernel_size
        total += output.numel() * (conv.in_channels // conv.groups) * kernel_h * kernel_w

    hooks = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.inference_mode():
        module(torch.zeros(1, size, size, 3, dtype=torch.uint8))
    for hook in hooks:
        hook.remove()
    return total


def ort_matmul_macs_per_second(n: int, repeats: int = 10) -> float:
    """Best fp32 multiply-adds per second of an ONNX Runtime n x n MatMul over all cores."""
    spec = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in "ABC"]
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "matmul", spec[:2], spec[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {name: np.random.default_rng(0).random((n, n), dtype=np.float32) for name in "AB"}
    session.run(None, feeds)
    best = min(_seconds(lambda: session.run(None, feeds)) for _ in range(repeats))
    return n**3 / best


def torch_images_per_second(module: torch.nn.Module, size: int, batch: int = 8, repeats: int = 2) -> float:
    pixels = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8)
    with torch.inference_mode():
        module(pixels)
        seconds = sum(_seconds(lambda: module(pixels)) for _ in range(repeats))
    return repeats * batch / seconds


def _seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=None, help="input size (default: the teacher's)")
    parser.add_argument("--goal", type=float, default=8.0, help="multiple of eager PyTorch fp32 to compare with")
    args = parser.parse_args()
    prepared = prepare_teacher(args.teacher, None, args.size, 5)
    size = prepared.metadata.input_size
    module = relabel_graph(prepared, "fp32").eval()
    macs = conv_macs(module, size)
    peak = max(ort_matmul_macs_per_second(n) for n in (1024, 2048))
    reference = torch_images_per_second(module, size)
    ceiling = peak / macs
    print(f"{args.teacher} at {size}: {macs / 1e9:.2f} GMAC per image")
    cores = torch.get_num_threads()
    print(f"ONNX Runtime fp32 MatMul, {cores} cores: {peak / 1e9:.1f} GMAC/s (best of 10 runs at 1024 and at 2048)")
    print(f"ceiling at that rate, model only, no decoding: {ceiling:.1f} img/s")
    print(f"eager PyTorch fp32 NCHW: {reference:.1f} img/s; {args.goal:g}x that: {args.goal * reference:.1f} img/s")
    print(f"the ceiling is {ceiling / reference:.1f}x eager PyTorch")


if __name__ == "__main__":
    main()
