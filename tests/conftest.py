"""Shared fixtures: freely licensed photos that installed packages ship, and the bundled teacher's graphs.

No test may need ../shared (ImageNet photos): everything here comes from scikit-image and matplotlib.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COFFEE_CLASS = 967  # espresso
CAT_CLASSES = (281, 282, 285)  # tabby, tiger cat, Egyptian cat
UNIFORM_CLASS = 652  # military uniform (Grace Hopper)


def _grace_hopper() -> np.ndarray:
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """name -> uint8 RGB [H, W, 3]: coffee (967), chelsea (281/282/285), rocket, grace_hopper (652)."""
    import skimage.data

    return {
        "coffee": skimage.data.coffee(),
        "chelsea": skimage.data.chelsea(),
        "rocket": skimage.data.rocket(),
        "grace_hopper": _grace_hopper(),
    }


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory, photos) -> Path:
    """A small ImageFolder (class folders `cat`, `coffee`, `uniform`) of real photos and resized,
    flipped and cropped copies of them, saved as JPEG and PNG."""
    root = tmp_path_factory.mktemp("imagefolder")
    for cls, name in (("cat", "chelsea"), ("coffee", "coffee"), ("uniform", "grace_hopper")):
        (root / cls).mkdir()
        img = Image.fromarray(photos[name])
        w, h = img.size
        img.save(root / cls / f"{name}.jpg", quality=92)
        img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / cls / f"{name}_flip.png")
        img.resize((w // 2, h // 2)).save(root / cls / f"{name}_small.JPEG", quality=90)
        img.crop((w // 8, h // 8, w - w // 8, h - h // 8)).save(root / cls / f"{name}_crop.jpeg")
    return root


@pytest.fixture(scope="session")
def bundled_graphs(tmp_path_factory):
    """The bundled teacher's fp32 and FP16 graphs at its default 475 (15x15 maps, top-5), exported once
    per test session into a temporary engines folder (`bundled_graphs.fp32.parent`): exporting is the
    slowest step of the suite, so every test that needs a graph shares these."""
    from trt_relabel.export import build_graphs

    return build_graphs(out_dir=tmp_path_factory.mktemp("engines"), log=lambda _: None)
