"""ImageNet-1k class names, from the WordNet lists timm ships (``timm/data/_info``; no download).

The files are read in place, without importing timm (which imports torchvision's models: seconds).
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

IMAGENET_NUM_CLASSES = 1000


def _timm_info_file(name: str) -> Path:
    spec = importlib.util.find_spec("timm")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("timm is not installed: it provides the ImageNet class names")
    return Path(spec.submodule_search_locations[0]) / "data" / "_info" / name


@cache
def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 WordNet ids ('n01440764', ...) in class-index order (the sorted ImageFolder order)."""
    return tuple(_timm_info_file("imagenet_synsets.txt").read_text().split())


@cache
def _lemmas() -> dict[str, str]:
    """WordNet id -> its lemmas ('tabby, tabby cat')."""
    lines = _timm_info_file("imagenet_synset_to_lemma.txt").read_text().splitlines()
    return dict(line.split("\t", 1) for line in lines if line.strip())


def class_names(num_classes: int = IMAGENET_NUM_CLASSES) -> list[str]:
    """Short readable names, one per class index: the first WordNet lemma ('tabby' for
    'tabby, tabby cat') for ImageNet-1k; 'class <i>' for any other number of classes."""
    if num_classes != IMAGENET_NUM_CLASSES:
        return [f"class {i}" for i in range(num_classes)]
    lemmas = _lemmas()
    return [lemmas[synset].split(",")[0].strip() for synset in imagenet_synsets()]
