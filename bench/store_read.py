"""Reading the top-k maps of a random batch: LabelStore.gather against the official per-image files.

The official ReLabel loader (naver-ai/relabel_imagenet) keeps one ``torch.save``d [2, 5, 15, 15]
tensor (values and class indices) per image and ``torch.load``s it in every ``__getitem__``.
This script builds both layouts with the same random maps in a temporary directory, reads every
file once (page cache warm: dropping it needs root, so both numbers are WARM), then times random
batches of 256 rows: one ``gather`` call against 256 ``torch.load`` calls plus the stacking.

    python bench/store_read.py [--rows 20000] [--batch 256] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from trt_relabel.images import ImageEntry
from trt_relabel.store import LabelStore, create_store
from trt_relabel.store_format import StoreSpec

TOPK, MAP = 5, 15


def random_maps(rows: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float16 logits (descending along k) and int16 classes [rows, k, 15, 15]."""
    rng = np.random.default_rng(seed)
    values = -np.sort(-rng.normal(size=(rows, TOPK, MAP, MAP)).astype(np.float32), axis=1)
    indices = rng.integers(0, num_classes, size=(rows, TOPK, MAP, MAP), dtype=np.int16)
    return values.astype(np.float16), indices


def build_random_store(path: Path, rows: int, num_classes: int = 1000, chunk: int = 2000) -> Path:
    """A complete store of `rows` random rows (sample paths cNNN/imgNNNNNNN.JPEG)."""
    samples = [ImageEntry(f"c{i % 1000:03d}/img{i:07d}.JPEG", i % 1000) for i in range(rows)]
    spec = StoreSpec("bench", "0" * 64, "1" * 64, 224, (MAP, MAP), TOPK, num_classes)
    writer = create_store(path, spec, samples)
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        values, indices = random_maps(stop - start, num_classes, seed=start)
        writer.write(np.arange(start, stop), values, indices)
    writer.finish()
    return path


def official_files(store: LabelStore, root: Path) -> list[Path]:
    """One torch.save'd float16 [2, k, 15, 15] (values, indices) file per row, as the official maps."""
    files = []
    for row in range(len(store)):
        values, indices = store[row]
        path = root / f"{row:07d}.pt"
        torch.save(torch.stack([torch.tensor(values), torch.tensor(indices).half()]), path)
        files.append(path)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        store = LabelStore(build_random_store(tmp / "store", args.rows))
        (tmp / "official").mkdir()
        files = official_files(store, tmp / "official")
        print(f"built {args.rows} rows in both layouts in {time.perf_counter() - started:.1f} s")
        # Warm the page cache for both layouts.
        np.asarray(store.values).sum(), np.asarray(store.indices).sum()
        for path in files:
            path.read_bytes()

        rng = np.random.default_rng(0)
        gather_s, official_s = [], []
        for _ in range(args.repeats):
            rows = rng.choice(args.rows, size=args.batch, replace=False)
            t0 = time.perf_counter()
            values, indices = store.gather(rows)
            t1 = time.perf_counter()
            maps = torch.stack([torch.load(files[r], weights_only=True) for r in rows])
            t2 = time.perf_counter()
            gather_s.append(t1 - t0)
            official_s.append(t2 - t1)
            assert np.array_equal(maps[:, 0].numpy(), values)  # the same maps

    gather_ms = 1000 * statistics.median(gather_s)
    official_ms = 1000 * statistics.median(official_s)
    print(f"batch of {args.batch} random rows out of {args.rows}, page cache warm, median of {args.repeats}:")
    print(f"  LabelStore.gather        {gather_ms:8.3f} ms")
    print(f"  {args.batch} x torch.load (.pt)   {official_ms:8.3f} ms")
    print(f"  speed-up                 {official_ms / gather_ms:8.1f} x  (goal >= 50 x)")


if __name__ == "__main__":
    main()
