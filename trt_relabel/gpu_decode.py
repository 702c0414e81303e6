"""JPEG decoding and whole-image resizing on the GPU (`generate --decode gpu`).

JPEG files are decoded by nvJPEG through `torchvision.io.decode_jpeg(device="cuda")` and resized
with `torch.nn.functional.interpolate(antialias=True)` using the teacher's interpolation. Files
that are not baseline/progressive RGB or greyscale JPEGs (CMYK, other formats) or that nvJPEG
rejects go back to the CPU path (:func:`trt_relabel.images.load_rgb`), which also gives the error
reason for files no decoder can read.

The result is not bit-identical to the CPU path: the resize filters agree up to rounding, but
nvJPEG upsamples chroma differently from libjpeg-turbo (measured on an H200 over 177 ImageNet
JPEGs at 475: mean absolute difference 0.28 grey levels, single pixels up to 62 at sharp colour
edges; 95% of label-map cells keep their top-1). Use the CPU path where a store must equal a CPU
run bit for bit.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

JPEG_MAGIC = b"\xff\xd8\xff"
#: Adobe APP14 segment (marker, 2 length bytes, "Adobe"): CMYK/YCCK JPEGs carry it, and nvJPEG does
#: not convert them the way Pillow does. The rare RGB JPEGs with it take the CPU path too.
_ADOBE_SEGMENT = re.compile(rb"\xff\xee..Adobe", re.DOTALL)


def is_gpu_decodable(data: bytes) -> bool:
    """True for JPEG data nvJPEG can decode to RGB the way Pillow does (not Adobe CMYK/YCCK)."""
    return data.startswith(JPEG_MAGIC) and _ADOBE_SEGMENT.search(data, 0, 65536) is None


def resize_on_gpu(image: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    """uint8 [3, H, W] on the GPU -> uint8 [size, size, 3] (HWC), antialiased resize of the whole image."""
    mode = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest-exact"}[interpolation]
    x = image[None].float()
    antialias = mode != "nearest-exact"
    resized = F.interpolate(x, size=(size, size), mode=mode, antialias=antialias, align_corners=None)
    return resized[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)


def decode_resize_jpegs(
    datas: list[bytes], size: int, interpolation: str, device: torch.device
) -> tuple[torch.Tensor, list[int]]:
    """Decode and resize a batch of JPEG files on `device`.

    Returns (pixels uint8 [n_ok, size, size, 3] on `device`, positions in `datas` that failed and
    must take the CPU path). Successful images keep their relative order.
    """
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        failed: list[int] = []
    except RuntimeError:
        images, failed = [], []
        for n, data in enumerate(tensors):
            try:
                images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                failed.append(n)
    if not images:
        return torch.empty((0, size, size, 3), dtype=torch.uint8, device=device), failed
    return torch.stack([resize_on_gpu(image, size, interpolation) for image in images]), failed
