"""A tiny ImageFolder of freely licensed photos for a first run and for the tests.

The photos ship with installed packages: scikit-image's `skimage.data` (coffee = espresso 967,
chelsea = a tabby/tiger/Egyptian cat 281/282/285) and matplotlib's sample data (Grace Hopper in
uniform = military uniform 652). Each also appears resized, mirrored and cropped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from trt_relabel.errors import RelabelError

#: class folder -> photo name.
SAMPLE_CLASSES = {"cat": "chelsea", "coffee": "coffee", "uniform": "grace_hopper"}


def sample_photos() -> dict[str, np.ndarray]:
    """name -> uint8 RGB [H, W, 3]: coffee, chelsea, rocket (scikit-image), grace_hopper (matplotlib)."""
    try:
        import skimage.data
    except ImportError:
        raise RelabelError("the sample photos need scikit-image: pip install 'trt-relabel[samples]'") from None
    import matplotlib

    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return {
        "coffee": skimage.data.coffee(),
        "chelsea": skimage.data.chelsea(),
        "rocket": skimage.data.rocket(),
        "grace_hopper": np.asarray(Image.open(hopper).convert("RGB")),
    }


def write_sample_folder(root: str | Path, photos: dict[str, np.ndarray] | None = None) -> Path:
    """Write the ImageFolder `root/{cat,coffee,uniform}/` of 12 images: each photo as JPEG, mirrored as
    PNG, at half size and with an eighth cropped off every side. Returns `root`."""
    photos = photos or sample_photos()
    root = Path(root)
    for folder, name in SAMPLE_CLASSES.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(photos[name])
        w, h = img.size
        img.save(root / folder / f"{name}.jpg", quality=92)
        img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / folder / f"{name}_flip.png")
        img.resize((w // 2, h // 2)).save(root / folder / f"{name}_small.JPEG", quality=90)
        img.crop((w // 8, h // 8, w - w // 8, h - h // 8)).save(root / folder / f"{name}_crop.jpeg")
    return root
