"""The GPU decode path's logic, run on the CPU device (nvJPEG itself only where CUDA exists)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from trt_relabel.gpu_decode import decode_resize_jpegs, is_gpu_decodable
from trt_relabel.images import load_rgb, resize_whole


def encoded(array: np.ndarray, fmt: str, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format=fmt, quality=92)
    return buffer.getvalue()


def test_only_rgb_and_grey_jpegs_take_the_gpu_path(photos):
    assert is_gpu_decodable(encoded(photos["coffee"], "JPEG"))
    assert is_gpu_decodable(encoded(photos["coffee"], "JPEG", "L"))
    assert not is_gpu_decodable(encoded(photos["coffee"], "JPEG", "CMYK"))
    assert not is_gpu_decodable(encoded(photos["coffee"], "PNG"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_decode_and_resize_match_the_cpu_path(photos, tmp_path, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    datas, expected = [], []
    for name in ("coffee", "chelsea", "grace_hopper"):
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(encoded(photos[name], "JPEG"))
        datas.append(path.read_bytes())
        expected.append(resize_whole(load_rgb(path), 224, "bicubic"))
    datas.insert(1, encoded(photos["rocket"], "PNG"))
    pixels, failed = decode_resize_jpegs(datas, 224, "bicubic", torch.device(device))
    assert failed == [1]
    assert pixels.shape == (3, 224, 224, 3) and pixels.dtype == torch.uint8
    difference = np.abs(pixels.cpu().numpy().astype(int) - np.stack(expected).astype(int))
    assert difference.mean() < 0.5 and np.percentile(difference, 99) <= 4
    if device == "cpu":  # libjpeg-turbo on both sides: only the resize differs
        assert difference.max() <= 8
