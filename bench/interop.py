"""Speed of import-relabel, export-relabel, merge and stats on synthetic official-format maps.

Run: .venv/bin/python bench/interop.py [--num 4000] [--workers 1,2]

Writes --num official map files ([2, 5, 15, 15] float32, torch.save) for an ImageFolder of empty
.JPEG files (listing needs no decoding) in a temporary folder, then times: import with each worker
count, export, merge of two imported stores, and stats (label_pooling over full boxes). Prints
files (rows) per second; ImageNet-1k has 1,281,167 training images.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from trt_relabel.interop import export_relabel, import_relabel, merge_stores
from trt_relabel.store import LabelStore
from trt_relabel.visualize import store_stats

IMAGENET_TRAIN = 1_281_167


def write_official_maps(root: Path, num: int) -> tuple[Path, Path]:
    data, relabel = root / "data", root / "relabel"
    generator = torch.Generator().manual_seed(0)
    for n in range(num):
        wnid = f"n{n % 100:08d}"
        (data / wnid).mkdir(parents=True, exist_ok=True)
        (relabel / wnid).mkdir(parents=True, exist_ok=True)
        (data / wnid / f"img{n}.JPEG").touch()
        scores = torch.randn(5, 15, 15, generator=generator).sort(dim=0, descending=True).values
        classes = (torch.randint(0, 1000, (1, 15, 15), generator=generator) + torch.arange(5)[:, None, None]) % 1000
        torch.save(torch.stack([scores, classes.float()]), relabel / wnid / f"img{n}.pt")
    return data, relabel


def timed(name: str, rows: int, func, *args, **kwargs) -> None:
    start = time.perf_counter()
    func(*args, **kwargs)
    seconds = time.perf_counter() - start
    rate = rows / seconds
    imagenet_minutes = IMAGENET_TRAIN / rate / 60
    print(f"{name:<22} {rows} rows in {seconds:6.2f} s: {rate:7.0f} rows/s (ImageNet-1k: {imagenet_minutes:5.1f} min)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=4000)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts to time import with")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, relabel = write_official_maps(root, args.num)
        for workers in map(int, args.workers.split(",")):
            store = root / f"store{workers}"
            timed(f"import-relabel -j {workers}", args.num, import_relabel, relabel, data, store, workers=workers)
        timed("export-relabel -j 1", args.num, export_relabel, store, root / "exported")
        # The cost of merging is the same whatever the overlap of the classes: merge the store with itself.
        timed("merge (2 stores)", args.num, merge_stores, [store, store], root / "merged")
        timed("stats", args.num, store_stats, LabelStore(store))


if __name__ == "__main__":
    main()
