"""Shared fixtures: freely licensed photos that installed packages ship, and the bundled teacher's graphs.

No test may need ../shared (ImageNet photos): everything here comes from scikit-image and matplotlib.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trt_relabel.samples import sample_photos, write_sample_folder

COFFEE_CLASS = 967  # espresso
CAT_CLASSES = (281, 282, 285)  # tabby, tiger cat, Egyptian cat
UNIFORM_CLASS = 652  # military uniform (Grace Hopper)


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """name -> uint8 RGB [H, W, 3]: coffee (967), chelsea (281/282/285), rocket, grace_hopper (652)."""
    return sample_photos()


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory, photos) -> Path:
    """A small ImageFolder (class folders `cat`, `coffee`, `uniform`) of real photos and resized,
    flipped and cropped copies of them, saved as JPEG and PNG (12 images)."""
    return write_sample_folder(tmp_path_factory.mktemp("imagefolder"), photos)


@pytest.fixture(scope="session")
def bundled_graphs(tmp_path_factory):
    """The bundled teacher's fp32 and FP16 graphs at its default 475 (15x15 maps, top-5), exported once
    per test session into a temporary engines folder (`bundled_graphs.fp32.parent`): exporting is the
    slowest step of the suite, so every test that needs a graph shares these."""
    from trt_relabel.export import build_graphs

    return build_graphs(out_dir=tmp_path_factory.mktemp("engines"), log=lambda _: None)
